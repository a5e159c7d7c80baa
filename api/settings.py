"""What the API is configured with, and what it knows of the engine's engine-wide settings.

The threshold is the API's own default for every turn (a turn's ``slkv`` may override it); an admin changes
it with PUT /admin/offload. The host budget belongs to the engine: PUT /admin/offload sends it there
(``EngineClient.set_host_budget``), and ``host_budget`` is what the engine last reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slkv_sglang.model_layers import ModelLayers

from .auth import Keys


@dataclass
class Settings:
    layers: ModelLayers  # the served model's, to check a turn's SimLayerKV settings as the engine would
    keys: Keys = field(default_factory=Keys)
    model_name: str = "SmolLM2-135M-Instruct"
    threshold: float = 0.9
    # the engine's host budget as it last reported it (a turn's layer map, or its answer to PUT /admin/offload);
    # None until it has (an engine without --slkv-offload never does)
    host_budget: int | None = None
    worker: str = "local"
    kv_bytes_per_token_layer: int = 0  # 2 (K, V) x kv heads x head dim x dtype bytes
    max_turns_per_key: int = 64
    metrics_need_admin: bool = False
    initial_threshold: float = field(init=False)  # what PUT /admin/offload's null threshold restores

    def __post_init__(self) -> None:
        self.initial_threshold = self.threshold

    def offload(self) -> dict[str, Any]:
        return {"budget_bytes": self.host_budget, "threshold": self.threshold}

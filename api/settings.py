"""What the API is configured with; the threshold and offload budget change at run time (PUT /admin/offload)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .auth import Keys


@dataclass
class Settings:
    keys: Keys = field(default_factory=Keys)
    model_name: str = "SmolLM2-135M-Instruct"
    threshold: float = 0.9
    offload_budget_bytes: int | None = None  # None: the engine's own --slkv-offload-budget
    worker: str = "local"
    kv_bytes_per_token_layer: int = 0  # 2 (K, V) x kv heads x head dim x dtype bytes
    max_turns_per_key: int = 64
    metrics_need_admin: bool = False
    initial: dict[str, Any] = field(init=False)  # what PUT /admin/offload's nulls restore

    def __post_init__(self) -> None:
        self.initial = self.offload()

    def offload(self) -> dict[str, Any]:
        return {"budget_bytes": self.offload_budget_bytes, "threshold": self.threshold}

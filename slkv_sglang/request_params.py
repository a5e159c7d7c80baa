"""Per-request SimLayerKV settings: the engine's config, overridden by ``custom_params["slkv"]``.

A client (the chat API's admin threshold, the evaluator's side-by-side configurations) can change the
threshold, the score mode, turn SimLayerKV off, or force a lazy set for one request::

    sampling_params={"custom_params": {"slkv": {"threshold": 0.8, "score": "mean"}}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .config import SCORE_MODES, ScoreMode, SlkvConfig, SlkvConfigError
from .model_layers import ModelLayers

OVERRIDE_KEY = "slkv"
_ALLOWED = {"enabled", "threshold", "score", "force_lazy", "session", "offload_budget"}


@dataclass(frozen=True)
class RequestParams:
    rid: str
    enabled: bool
    threshold: float
    score: ScoreMode
    force_lazy: tuple[int, ...] | None
    last_chunk: bool  # this forward processes the prompt's last token (extend) or is a decode step
    session: str  # whose host copies a lazy layer's offloaded KV join (the chat session; else the request)
    offload_budget: int | None  # a new host budget for the engine (the chat API's admin setting)


def parse_overrides(raw: Any, layers: ModelLayers | None = None) -> dict[str, Any]:
    """Validate a ``custom_params["slkv"]`` value; raise ``SlkvConfigError`` with a clear message.

    ``layers``: the served model's layers, where requests enter (the tokenizer process), so ``force_lazy``
    names only layers SimLayerKV can make lazy; the scheduler parses what was validated there without them."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SlkvConfigError(f"custom_params.slkv must be an object, got {type(raw).__name__}")
    unknown = set(raw) - _ALLOWED
    if unknown:
        raise SlkvConfigError(f"unknown custom_params.slkv keys {sorted(unknown)}; allowed: {sorted(_ALLOWED)}")
    out: dict[str, Any] = {}
    if "enabled" in raw:
        if not isinstance(raw["enabled"], bool):
            raise SlkvConfigError("custom_params.slkv.enabled must be a boolean")
        out["enabled"] = raw["enabled"]
    if "threshold" in raw:
        t = raw["threshold"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise SlkvConfigError(f"custom_params.slkv.threshold must be a number > 0, got {t!r}")
        out["threshold"] = float(t)
    if "score" in raw:
        if raw["score"] not in SCORE_MODES:
            raise SlkvConfigError(f"custom_params.slkv.score must be one of {SCORE_MODES}, got {raw['score']!r}")
        out["score"] = raw["score"]
    if "force_lazy" in raw and raw["force_lazy"] is not None:
        forced = raw["force_lazy"]
        if not isinstance(forced, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in forced):
            raise SlkvConfigError("custom_params.slkv.force_lazy must be a list of layer ids")
        if layers is not None:
            _check_lazy_layers(forced, layers)
        out["force_lazy"] = tuple(sorted(set(forced)))
    if "session" in raw:
        if not isinstance(raw["session"], str) or not 0 < len(raw["session"]) <= 256:
            raise SlkvConfigError("custom_params.slkv.session must be a non-empty string of at most 256 characters")
        out["session"] = raw["session"]
    if "offload_budget" in raw:
        b = raw["offload_budget"]
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise SlkvConfigError(f"custom_params.slkv.offload_budget must be an integer >= 0 (bytes), got {b!r}")
        out["offload_budget"] = b
    return out


def _check_lazy_layers(forced: Sequence[int], layers: ModelLayers) -> None:
    outside = sorted({x for x in forced if not 0 <= x < layers.num_layers})
    if outside:
        raise SlkvConfigError(f"custom_params.slkv.force_lazy layer ids must be in [0, {layers.num_layers}), got {outside}")
    sliding = sorted(set(forced) - set(layers.full))
    if sliding:
        raise SlkvConfigError(f"custom_params.slkv.force_lazy names sliding-window layers {sliding}: they already read "
                              f"only their window and are never lazy; this model's full-attention layers are "
                              f"{list(layers.full)}")


def request_params(config: SlkvConfig, rid: str, custom_params: Mapping[str, Any] | None, last_chunk: bool) -> RequestParams:
    overrides = parse_overrides((custom_params or {}).get(OVERRIDE_KEY))
    return RequestParams(
        rid=rid,
        enabled=overrides.get("enabled", config.enabled),
        threshold=overrides.get("threshold", config.threshold),
        score=overrides.get("score", config.score),
        force_lazy=overrides.get("force_lazy"),
        last_chunk=last_chunk,
        session=overrides.get("session", rid),
        offload_budget=overrides.get("offload_budget"),
    )

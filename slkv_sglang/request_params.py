"""Per-request SimLayerKV settings: the engine's config, overridden by ``custom_params["slkv"]``.

A client can change the threshold, the score mode, the granularity or when to decide, turn SimLayerKV off, or force a lazy set
(layers, or (layer, KV head) pairs) for one request, and label it for reports::

    sampling_params={"custom_params": {"slkv": {"threshold": 0.8, "score": "mean", "session": "chat-42"}}}

Everything a client sends is checked where requests enter (the tokenizer process, with the served model's
layers: ``check_generate``), so the scheduler, which parses the same value again without the layers, can
never fail on it: a value passing ``check_generate`` also passes ``parse_overrides(raw)``. Engine-wide
settings (the host budget) are not taken per request; they go through the admin channel (``admin``).
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from typing import Any, Mapping

from .config import (DECIDE_MODES, GRANULARITIES, SCORE_MODES, DecideMode, Granularity, ScoreMode, SlkvConfig,
                     SlkvConfigError)
from .model_layers import ModelLayers

OVERRIDE_KEY = "slkv"
WHERE = f"custom_params.{OVERRIDE_KEY}"
MAX_LABEL = 256
_KEYS = ("enabled", "threshold", "score", "granularity", "mode", "force_lazy", "force_lazy_heads", "session")
_ENGINE_WIDE = {"offload_budget": "the host budget is engine-wide: an admin sets it through the admin channel "
                                  "(the chat API's PUT /admin/offload, or SGLang's /set_internal_state with "
                                  "slkv_host_budget)"}


class RequestParamsError(SlkvConfigError):
    """A client's SimLayerKV setting is invalid. ``field`` names it (``custom_params.slkv.force_lazy[3]``);
    SGLang answers a ``ValueError`` from ``generate_request`` with a 400 carrying the message."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field


@dataclass(frozen=True)
class RequestParams:
    rid: str
    enabled: bool
    threshold: float
    score: ScoreMode
    granularity: Granularity
    mode: DecideMode  # when it decides: at the prompt's last queries (prefill) or at its first decode step
    force_lazy: tuple[int, ...] | None
    force_lazy_heads: tuple[tuple[int, int], ...] | None
    last_chunk: bool  # this forward processes the prompt's last token (extend) or is a decode step
    session: str  # a label for reports (the chat session; else the request id); nothing is keyed by it


def check_generate(sampling_params: Any, layers: ModelLayers) -> None:
    """Where requests enter: refuse settings the scheduler could not take, naming the field. A generate
    request has one sampling-parameter object, or one per prompt of a batch. A ``custom_params`` that is not
    an object holds no SimLayerKV settings (SGLang's own business; the scheduler ignores it)."""
    if isinstance(sampling_params, Mapping):
        check_custom_params(sampling_params.get("custom_params"), layers, "custom_params")
    elif isinstance(sampling_params, list):
        for i, params in enumerate(sampling_params):
            if isinstance(params, Mapping):
                check_custom_params(params.get("custom_params"), layers, f"sampling_params[{i}].custom_params")


def check_custom_params(custom_params: Any, layers: ModelLayers, where: str) -> None:
    if isinstance(custom_params, Mapping) and OVERRIDE_KEY in custom_params:
        parse_overrides(custom_params[OVERRIDE_KEY], layers, f"{where}.{OVERRIDE_KEY}")


def parse_overrides(raw: Any, layers: ModelLayers | None = None, where: str = WHERE) -> dict[str, Any]:
    """Validate a ``custom_params["slkv"]`` value into the overrides it sets; raise ``RequestParamsError``.

    ``layers``: the served model's layers, where requests enter, so ``force_lazy`` names only layers that
    SimLayerKV can make lazy; the scheduler parses what was checked there without them."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise RequestParamsError(where, f"must be an object, got {_kind(raw)}")
    for key in raw:
        if key not in _KEYS:
            field = f"{where}.{_name(key)}"
            if key in _ENGINE_WIDE:
                raise RequestParamsError(field, f"is not a per-request setting: {_ENGINE_WIDE[key]}")
            raise RequestParamsError(field, f"is not a SimLayerKV setting; the settings are {list(_KEYS)}")
    out: dict[str, Any] = {}
    if "enabled" in raw:
        if not isinstance(raw["enabled"], bool):
            raise RequestParamsError(f"{where}.enabled", f"must be true or false, got {_show(raw['enabled'])}")
        out["enabled"] = raw["enabled"]
    if "threshold" in raw:
        out["threshold"] = _threshold(raw["threshold"], f"{where}.threshold")
    if "score" in raw:
        if not isinstance(raw["score"], str) or raw["score"] not in SCORE_MODES:
            raise RequestParamsError(f"{where}.score", f"must be one of {list(SCORE_MODES)}, got {_show(raw['score'])}")
        out["score"] = raw["score"]
    if "mode" in raw:
        if not isinstance(raw["mode"], str) or raw["mode"] not in DECIDE_MODES:
            raise RequestParamsError(f"{where}.mode", f"must be one of {list(DECIDE_MODES)}, got {_show(raw['mode'])}")
        out["mode"] = raw["mode"]
    if "granularity" in raw:
        if not isinstance(raw["granularity"], str) or raw["granularity"] not in GRANULARITIES:
            raise RequestParamsError(f"{where}.granularity",
                                     f"must be one of {list(GRANULARITIES)}, got {_show(raw['granularity'])}")
        out["granularity"] = raw["granularity"]
    if raw.get("force_lazy") is not None:
        out["force_lazy"] = _force_lazy(raw["force_lazy"], layers, f"{where}.force_lazy")
    if raw.get("force_lazy_heads") is not None:
        out["force_lazy_heads"] = _force_lazy_heads(raw["force_lazy_heads"], layers, f"{where}.force_lazy_heads")
    if "session" in raw:
        label = raw["session"]
        if not isinstance(label, str) or not 0 < len(label) <= MAX_LABEL or not label.isprintable():
            raise RequestParamsError(f"{where}.session", f"must be a label of 1 to {MAX_LABEL} printable "
                                                         f"characters, got {_show(label)}")
        out["session"] = label
    return out


def _threshold(value: Any, where: str) -> float:
    number = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer past float's range
            number = math.inf
    if not (math.isfinite(number) and number > 0):
        raise RequestParamsError(where, f"must be a finite number > 0 (above 1 no layer is lazy), got {_show(value)}")
    return number


def _force_lazy(forced: Any, layers: ModelLayers | None, where: str) -> tuple[int, ...]:
    if not isinstance(forced, (list, tuple)):
        raise RequestParamsError(where, f"must be a list of layer ids, got {_kind(forced)}")
    if layers is not None and len(forced) > layers.num_layers:
        raise RequestParamsError(where, f"names {len(forced)} layers; this model has {layers.num_layers}")
    seen: set[int] = set()
    for i, layer in enumerate(forced):
        field = f"{where}[{i}]"
        _layer_id(layer, layers, field)
        if layer in seen:
            raise RequestParamsError(field, f"names layer {layer} a second time")
        seen.add(layer)
    return tuple(sorted(seen))


def _force_lazy_heads(forced: Any, layers: ModelLayers | None, where: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(forced, (list, tuple)):
        raise RequestParamsError(where, f"must be a list of [layer, KV head] pairs, got {_kind(forced)}")
    if layers is not None and len(forced) > layers.num_layers * layers.num_kv_heads:
        raise RequestParamsError(where, f"names {len(forced)} heads; this model has "
                                        f"{layers.num_layers * layers.num_kv_heads} (layer, KV head) pairs")
    seen: set[tuple[int, int]] = set()
    for i, pair in enumerate(forced):
        field = f"{where}[{i}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RequestParamsError(field, f"must be a [layer, KV head] pair, got {_show(pair)}")
        layer, head = pair
        _layer_id(layer, layers, f"{field}[0]")
        if isinstance(head, bool) or not isinstance(head, int) or head < 0 or (
                layers is not None and head >= layers.num_kv_heads):
            bound = f"[0, {layers.num_kv_heads})" if layers is not None else ">= 0"
            raise RequestParamsError(f"{field}[1]", f"must be a KV head id in {bound}, got {_show(head)}")
        if (layer, head) in seen:
            raise RequestParamsError(field, f"names layer {layer}, head {head} a second time")
        seen.add((layer, head))
    return tuple(sorted(seen))


def _layer_id(layer: Any, layers: ModelLayers | None, field: str) -> None:
    """Refuse anything but the id of a layer SimLayerKV may make lazy."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise RequestParamsError(field, f"must be a layer id (an integer), got {_show(layer)}")
    if layer < 0 or (layers is not None and layer >= layers.num_layers):
        bound = f"[0, {layers.num_layers})" if layers is not None else ">= 0"
        raise RequestParamsError(field, f"must be a layer id in {bound}, got {_show(layer)}")
    if layers is not None and layer not in layers.full:
        raise RequestParamsError(field, f"names sliding-window layer {layer}: it already reads only its window "
                                        f"and is never lazy; this model's full-attention layers are "
                                        f"{list(layers.full)}")


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 30, 30, 30


def _show(value: Any) -> str:
    """A client's value, short enough to put in an answer (nesting, long strings and long lists clipped)."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an integer over Python's 4,300-digit str() limit
        return "an integer too long to print"


def _name(key: Any) -> str:
    """A client's key as a field name: itself when a short printable string, else its clipped repr."""
    if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 40:
        return key
    return _show(key)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def request_params(config: SlkvConfig, rid: str, custom_params: Mapping[str, Any] | None, last_chunk: bool) -> RequestParams:
    """Scheduler side: the request's settings; its ``custom_params`` were checked where it entered."""
    overrides = parse_overrides(custom_params.get(OVERRIDE_KEY) if isinstance(custom_params, Mapping) else None)
    return RequestParams(
        rid=rid,
        enabled=overrides.get("enabled", config.enabled),
        threshold=overrides.get("threshold", config.threshold),
        score=overrides.get("score", config.score),
        granularity=overrides.get("granularity", config.granularity),
        mode=overrides.get("mode", config.mode),
        force_lazy=overrides.get("force_lazy"),
        force_lazy_heads=overrides.get("force_lazy_heads"),
        last_chunk=last_chunk,
        session=overrides.get("session", rid),
    )

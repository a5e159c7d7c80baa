"""Reporting: a request's layer map travels from the scheduler (``SchedulerSide.outbox``) to the client's
``meta_info["slkv"]``; the scheduler's per-request maps and KV tier are reported in SGLang's internal state, and
the engine-wide settings an admin may change join SGLang's admin channel."""

from __future__ import annotations

from typing import Any

from .. import admin
from .scheduler import SchedulerSide

META_KEY = "slkv"


def report_decision(side: SchedulerSide, _result: Any, _processor: Any, i: int, req: Any, logits_output: Any) -> None:
    """SchedulerBatchResultProcessor._maybe_collect_customized_info: a decision taken in this forward becomes
    request-level ``customized_info``, which SGLang ships to the tokenizer process."""
    rec = side.outbox.take(req.rid)
    if rec is not None:
        if req.customized_info is None:
            req.customized_info = {}
        req.customized_info[META_KEY] = [rec]
    return None


def request_level_key(result: bool, _streamer: Any, key: str) -> bool | None:
    """SchedulerOutputStreamer.is_request_level_customized_info_key: the layer map is one per request."""
    return True if key == META_KEY else None


def unwrap_meta(_result: Any, _tokenizer_manager: Any, meta_info: dict, *args: Any, **kwargs: Any) -> None:
    """TokenizerManager.update_request_meta_info (tokenizer side): SGLang accumulates customized info in a list;
    clients get the latest map."""
    value = meta_info.get(META_KEY)
    if isinstance(value, list):
        if value:
            meta_info[META_KEY] = value[-1]
        else:  # a batch neighbour had a map, this request has none (SimLayerKV off for it)
            del meta_info[META_KEY]
    return None


def report_sizes(side: SchedulerSide, result: Any, *args: Any, **kwargs: Any) -> None:
    """SchedulerInternalStateController.get_internal_state: the sizes of SimLayerKV's per-request maps and the
    scheduler's RSS, under ``slkv`` (``get_internal_state`` / ``/server_info``)."""
    if side.tracker is None:
        return None
    import psutil

    sizes = {**side.tracker.sizes(), "outbox": len(side.outbox), "rss_bytes": psutil.Process().memory_info().rss}
    if side.tier is not None:
        sizes.update(side.tier.sizes())
    if side.planner is not None:
        sizes["planner_heals"] = side.planner.heals
    result.internal_state["slkv"] = sizes
    return None


def admin_handlers(side: SchedulerSide, handlers: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """SchedulerInternalStateController._update_handlers: the engine-wide settings an admin changes."""
    return admin.add_handlers(handlers, [side.tier.host] if side.tier is not None else [])

"""The SGLang plugin (entry point group ``sglang.srt.plugins``): flags, backends and request hooks.

``register()`` runs in every SGLang process (launcher/tokenizer, scheduler, detokenizer). It only installs
hooks; nothing happens unless SimLayerKV is enabled (``--enable-simlayerkv`` or ``SLKV_ENABLE=1``).

Data flow: the ``ForwardBatch.init_new`` hook puts each request's settings on the batch; the attention
backend (a subclass of SGLang's torch_native or FlashInfer backend) scores layers and restricts decode;
the batch-result hook moves a finished decision into ``req.customized_info``, which SGLang ships to the
tokenizer process, where it becomes ``meta_info["slkv"]``.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from . import admin, startup
from .config import DECIDE_MODES, GRANULARITIES, SCORE_MODES, SlkvConfig, SlkvConfigError
from .model_layers import ModelLayers, check_servable
from .kv.executor import KvExecutor
from .kv.planner import KvPlanner
from .kv.tier import KvTier
from .report import Outbox
from .request_params import RequestParams, RequestParamsError, check_generate, request_params
from .tracker import LazyTracker

logger = logging.getLogger("slkv.plugin")

META_KEY = "slkv"
_config: SlkvConfig | None = None


def config() -> SlkvConfig:
    """This process's SimLayerKV config, read once from ``SLKV_*``."""
    global _config
    if _config is None:
        _config = SlkvConfig.from_env()
    return _config


# ---- CLI flags -------------------------------------------------------------------------------------------
class _EnvAction(argparse._StoreAction):
    """Stores the flag and mirrors it into its ``SLKV_*`` variable, which reaches the spawned processes.

    Subclasses ``_StoreAction`` so that SGLang's ``--config`` YAML merging accepts it.
    """

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        super().__call__(parser, namespace, values, option_string)
        env = self.metavar_env  # type: ignore[attr-defined]
        os.environ[env] = "1" if values is True else str(values)  # bare --enable-simlayerkv stores True
        try:
            SlkvConfig.from_env()
        except SlkvConfigError as exc:
            parser.error(str(exc))


def _add_flag(parser: Any, flag: str, env: str, **kw: Any) -> None:
    added = parser.add_argument(flag, action=_EnvAction, **kw)
    added.metavar_env = env  # type: ignore[attr-defined]


def _add_cli_args(_result: Any, parser: argparse.ArgumentParser) -> None:
    """ServerArgs.add_cli_args: the ``--slkv-*`` flags (argument groups share the parser's namespace)."""
    parser_ = parser.add_argument_group("SimLayerKV (slkv-sglang plugin)")
    _add_flag(parser_, "--enable-simlayerkv", "SLKV_ENABLE", nargs="?", const=True, default=None,
              help="Per-request lazy layers (SimLayerKV): lazy layers decode from sink + recent KV only.")
    _add_flag(parser_, "--slkv-threshold", "SLKV_THRESHOLD", type=float, default=None,
              help="A layer is lazy when its score exceeds this (default 0.9; > 1 disables trimming).")
    _add_flag(parser_, "--slkv-sink", "SLKV_SINK", type=int, default=None, help="Sink tokens kept (default 4).")
    _add_flag(parser_, "--slkv-recent", "SLKV_RECENT", type=int, default=None,
              help="Recent window kept in lazy layers (default 1020).")
    _add_flag(parser_, "--slkv-last", "SLKV_LAST", type=int, default=None,
              help="Last prompt queries that score a layer (default 32).")
    _add_flag(parser_, "--slkv-mode", "SLKV_MODE", choices=DECIDE_MODES, default=None,
              help="Decide at prefill (last queries) or at the first decode step.")
    _add_flag(parser_, "--slkv-score", "SLKV_SCORE", choices=SCORE_MODES, default=None,
              help="Score reduction over heads: mean (paper), kvmin or headmin (guard retrieval heads).")
    _add_flag(parser_, "--slkv-granularity", "SLKV_GRANULARITY", choices=GRANULARITIES, default=None,
              help="What is lazy: whole layers (default, the paper) or each KV head of a layer on its own.")
    _add_flag(parser_, "--slkv-profile", "SLKV_PROFILE", default=None,
              help="A calibrated profile (slkv calibrate): its settings become the defaults; other flags override.")
    _add_flag(parser_, "--slkv-protect", "SLKV_PROTECT", default=None,
              help="Comma-separated layer ids never made lazy (e.g. a model's retrieval layers).")
    _add_flag(parser_, "--slkv-offload", "SLKV_OFFLOAD", nargs="?", const=True, default=None,
              help="Lazy layers give their middle tokens' device KV back, keeping a host copy (torch_native).")
    _add_flag(parser_, "--slkv-offload-budget", "SLKV_OFFLOAD_BUDGET", type=int, default=None,
              help="Host bytes for offloaded KV (default 4 GiB); when full, the least recently used sessions "
                   "are evicted, and what does not fit is recomputed when a later turn needs it.")
    _add_flag(parser_, "--slkv-poison-freed", "SLKV_POISON", nargs="?", const=True, default=None,
              help="Debug: fill freed device KV (SGLang's freed slots, or freed rows with offload) with NaN so "
                   "that any read of it shows in the outputs.")
    _add_flag(parser_, "--slkv-overcommit", "SLKV_OVERCOMMIT", type=float, default=None,
              help="With --slkv-offload: give SGLang this many times the token slots its KV memory holds in "
                   "full KV (default 1); admission counts device rows, so rows lazy layers free admit more.")


# ---- engine side -----------------------------------------------------------------------------------------
@dataclass
class _Process:
    """This SGLang process's SimLayerKV parts, set when its attention backend is built (one per scheduler process).
    Only the hooks below read them; the backend, planner and executor get what they need as arguments."""

    outbox: Outbox = field(default_factory=Outbox)
    tracker: LazyTracker | None = None
    planner: KvPlanner | None = None  # with --slkv-offload
    executor: KvExecutor | None = None
    tree_cache: Any = None  # SGLang's radix cache, seen at the first prefix match (admission evicts through it)


_proc = _Process()


def _report_sizes(result: Any, *args: Any, **kwargs: Any) -> None:
    """SchedulerInternalStateController.get_internal_state: the sizes of SimLayerKV's per-request maps and the
    scheduler's RSS, under ``slkv`` (``get_internal_state`` / ``/server_info``)."""
    if _proc.tracker is None:
        return None
    import psutil

    sizes = {**_proc.tracker.sizes(), "outbox": len(_proc.outbox), "rss_bytes": psutil.Process().memory_info().rss}
    tier = _tier()
    if tier is not None:
        sizes.update(tier.sizes())
    result.internal_state["slkv"] = sizes
    return None


def _wrap_backend_factories() -> None:
    from sglang.srt.layers.attention import attention_registry as reg

    plain_torch = reg.ATTENTION_BACKENDS["torch_native"]
    plain_flashinfer = reg.ATTENTION_BACKENDS["flashinfer"]

    def torch_native(runner: Any) -> Any:
        if not config().enabled:
            return plain_torch(runner)
        from .backends.torch_native import SlkvTorchNativeBackend

        backend = SlkvTorchNativeBackend(runner, config(), _proc.outbox)
        _proc.tracker = backend.tracker
        if backend.executor is not None:
            _proc.executor = backend.executor
            _proc.planner = KvPlanner(backend.executor.tier, strict=config().poison)
        logger.info("SimLayerKV on torch_native: %s", config())
        return backend

    def flashinfer(runner: Any) -> Any:
        if not config().enabled or runner.use_mla_backend:
            return plain_flashinfer(runner)
        from .backends.flashinfer import SlkvFlashInferBackend

        backend = SlkvFlashInferBackend(runner, config(), _proc.outbox)
        _proc.tracker = backend.tracker
        logger.info("SimLayerKV on flashinfer: %s", config())
        return backend

    reg.ATTENTION_BACKENDS["torch_native"] = torch_native
    reg.ATTENTION_BACKENDS["flashinfer"] = flashinfer


def _tier() -> KvTier | None:
    return _proc.executor.tier if _proc.executor is not None else None


def _attach_params(result: Any, _cls: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    """ForwardBatch.init_new: stage each request's settings for the backend's next ``plan``, and with offload
    hand the executor this forward's ``KvStep``.

    The eager runner copies the ForwardBatch into static buffers before planning, dropping extra
    attributes, so the settings go to the tracker, which checks they match the batch it plans.
    """
    if not config().enabled or _proc.tracker is None or not (batch.forward_mode.is_extend()
                                                             or batch.forward_mode.is_decode()):
        return None
    decode = batch.forward_mode.is_decode()
    params = []
    for req in batch.reqs:
        last = decode or req.extend_end == len(req.full_untruncated_fill_ids)
        try:
            params.append(request_params(config(), req.rid, req.sampling_params.custom_params, last))
        except SlkvConfigError as exc:  # validated in the tokenizer process; never expected here
            raise RuntimeError(f"slkv: invalid overrides reached the scheduler for {req.rid}: {exc}") from exc
    _proc.outbox.tick()
    _proc.tracker.stage(params)
    if _proc.planner is not None and _proc.executor is not None:
        prefixes = [0] * len(batch.reqs) if decode else list(batch.prefix_lens)
        tokens = [_step_tokens(req, p, decode, prefix + ext) for req, p, prefix, ext in
                  zip(batch.reqs, params, prefixes, [0] * len(batch.reqs) if decode else batch.extend_lens)]
        step = _proc.planner.plan(batch.reqs, [int(_pool_row(r)) for r in batch.reqs], [p.session for p in params],
                                  tokens, prefixes)
        _proc.executor.begin(step)
    return None


def _step_tokens(req: Any, params: RequestParams, decode: bool, seq_len: int) -> list[int] | None:
    """The token ids a forward's KV work needs fingerprints of: a prefill's positions 0..seq_len-1; in decode,
    only a request deciding at its first decode step (mode ``decode``) needs its whole sequence."""
    if not decode:
        return list(req.full_untruncated_fill_ids[:seq_len])
    if params.enabled and params.mode == "decode" and len(req.output_ids) == 1:
        return list(req.origin_input_ids) + list(req.output_ids)
    return None


def _cap_prefix(result: int, req: Any, input_len: int) -> int | None:
    """Leave at least ``last`` prompt tokens to extend, so a radix hit still has the queries that score: for
    requests that score their prompt (SimLayerKV on, deciding at prefill); the others take the whole match."""
    if not config().enabled:
        return None
    params = request_params(config(), req.rid, req.sampling_params.custom_params, last_chunk=True)
    if not params.enabled or params.mode != "prefill":
        return None
    return max(0, min(result, input_len - config().last))


def _match_prefix(_result: Any, req: Any, tree_cache: Any = None, *args: Any, **kwargs: Any) -> None:
    """Req.init_next_round_input: with --slkv-offload, the matched prefix stops where some layer's KV is on neither
    tier (``KvPlanner.match``); the prefill recomputes the rest from the tokens."""
    if _proc.planner is None or tree_cache is None:
        return None
    _proc.tree_cache = tree_cache
    if not req.prefix_len:
        _proc.planner.retire(req, None)
        return None
    cached = tree_cache.prefix_device_indices(req)
    keep = _proc.planner.match(req, cached, list(req.full_untruncated_fill_ids[: req.prefix_len]), tree_cache.page_size)
    if keep < req.prefix_len:
        req.prefix_len = keep
        req.num_matched_prefix_tokens = min(req.num_matched_prefix_tokens, keep)
        req.kv.cache_protected_len = min(req.kv.cache_protected_len, keep)
    return None


def _pool_row(req: Any) -> int | None:
    """The request's ``req_to_token`` row (SGLang 0.5.23 keeps it on ``req.kv``), None once released."""
    return getattr(getattr(req, "kv", None), "req_pool_idx", None)


def _release_row(req: Any, *args: Any, **kwargs: Any) -> None:
    """release_kv_cache: the request leaves (finished, aborted, retracted); its per-request state goes."""
    row = _pool_row(req)
    if row is not None and _proc.tracker is not None:
        _proc.tracker.release_row(int(row))
    if _proc.planner is not None:
        _proc.planner.retire(req, None if row is None else int(row))
    return None


def _report_decision(_result: Any, _self: Any, i: int, req: Any, logits_output: Any) -> None:
    """Batch results: a decision taken in this forward becomes request-level ``customized_info``."""
    rec = _proc.outbox.take(req.rid)
    if rec is not None:
        if req.customized_info is None:
            req.customized_info = {}
        req.customized_info[META_KEY] = [rec]
    return None


def _free_rows(allocator: Any, free_index: Any, *args: Any, **kwargs: Any) -> None:
    """TokenToKVPoolAllocator.free: SGLang frees slots (radix eviction, aborts), so do their rows and host copies.
    Without offload, ``--slkv-poison-freed`` fills the freed slots of SGLang's own per-layer buffers with NaN.

    Inside a free group the slots arrive again, concatenated, at the group's end."""
    if allocator.free_group is not None or not free_index.numel():
        return None
    tier = _tier()
    if tier is not None:
        tier.free_slots(free_index)
    elif config().enabled and config().poison:
        kv = allocator._kvcache
        for layer in range(kv.layer_num):
            kv.get_key_buffer(layer)[free_index] = float("nan")
            kv.get_value_buffer(layer)[free_index] = float("nan")
    return None


# ---- admission with --slkv-offload: SGLang counts token slots, the device holds (layer, token) rows ------
def _overcommit_pool(result: Any, *args: Any, **kwargs: Any) -> Any:
    """KVCacheConfigurator.config_from_budget: with ``--slkv-overcommit F`` SGLang gets F times the token
    slots its KV bytes hold; the KV tier keeps those bytes (``_take_over_kv_pool``)."""
    cfg = config()
    if not (cfg.enabled and cfg.offload and cfg.overcommit > 1.0):
        return None
    if result.swa_max_total_num_tokens:
        raise SlkvConfigError("--slkv-overcommit does not support sliding-window KV pools")
    from sglang.srt.runtime_context import get_schedule

    page = get_schedule().page_size
    result.max_total_num_tokens = int(result.max_total_num_tokens * cfg.overcommit) // page * page
    return result


def _no_kv_buffers(original: Any, kv_pool: Any, *args: Any, **kwargs: Any) -> Any:
    """MHATokenToKVPool._create_buffers: with offload the KV tier holds the KV, so SGLang's per-layer
    buffers are created one page long instead of at the (possibly overcommitted) pool size."""
    if not (config().enabled and config().offload):
        return original(kv_pool, *args, **kwargs)
    size, kv_pool.size = kv_pool.size, 0
    try:
        return original(kv_pool, *args, **kwargs)
    finally:
        kv_pool.size = size


def _alloc_with_rows(original: Any, allocator: Any, need_size: int, *args: Any, **kwargs: Any) -> Any:
    """TokenToKVPoolAllocator.alloc: refuse (None, as for no free slots) without a row per unit
    for each slot (``KvTier.rows_per_slot``); on success
    the slots are owed their rows until written."""
    tier = _tier()
    if tier is not None and need_size * tier.rows_per_slot > tier.spare_rows:
        return None
    slots = original(allocator, need_size, *args, **kwargs)
    if slots is not None and tier is not None:
        tier.ledger.owe_slots(slots)
    return slots


def _evict_for_rows(tree_cache: Any, rows_needed: int) -> None:
    """Evict the radix tree (LRU) until ``rows_needed`` rows are spare or nothing is left to evict: an
    evicted token frees only the rows it still holds, fewer than one per unit where lazy layers or heads
    released it."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    tier = _tier()
    while tier is not None and tier.spare_rows < rows_needed:
        short = -(-(rows_needed - tier.spare_rows) // tier.rows_per_slot)
        if tree_cache.evict(EvictParams(num_tokens=short)).num_tokens_evicted == 0:
            break


def _evict_more(_result: Any, allocator: Any, tree_cache: Any, num_tokens: int) -> None:
    """evict_to_free_tokens: SGLang evicts ``num_tokens`` tokens; keep going until their rows are there."""
    tier = _tier()
    if tier is not None and tree_cache is not None and tree_cache.supports_prefix_sharing():
        _evict_for_rows(tree_cache, num_tokens * tier.rows_per_slot)
    return None


def _decode_fits_rows(result: bool, allocator: Any, *args: Any, num_tokens: int = 0, **kwargs: Any) -> bool | None:
    """check_decode_capacity: the next decode step also needs a spare row per unit and token, or SGLang
    retracts."""
    tier = _tier()
    if tier is None or not result:
        return None
    return tier.spare_rows >= num_tokens * tier.rows_per_slot


def _evictable_by_rows(result: int, budget: Any) -> int | None:
    """PrefillBudget._available_and_evictable: SGLang adds free slots and the tree's evictable *tokens*;
    admission needs rows: spare rows plus the rows evictable slots hold, a row per unit to a
    token.

    Which slots are evictable (unlocked in the tree) is not known here, only how many (k) and that they are among
    the allocated slots no running request reads; a request admitted earlier in this round locks its prefix
    without running yet. So the rows counted are those of the k idle slots holding the fewest: never more than
    eviction can free (counting all idle slots admitted more than the rows allowed, and SGLang's allocation then
    failed)."""
    tier = _tier()
    if tier is None or _proc.tracker is None:
        return None
    allocator = budget.allocator
    idle = ~_proc.tracker.running_slots(tier.rows.num_slots)  # allocated slots no running request reads
    idle[0] = False
    for free in (allocator.free_pages, allocator.release_pages):
        idle[free] = False
    k = int(budget.tree_cache.evictable_size())
    return min(result, (tier.spare_rows + tier.rows.fewest(idle, k)) // tier.rows_per_slot)


def _prefix_rows(tree_cache: Any, req: Any) -> int:
    """Rows a new request's prefill takes before it runs (``KvPlanner.prefix_rows``)."""
    assert _proc.planner is not None
    restores = req.prefix_len and not req.kv.holds_kv  # else an earlier chunk restored its prefix
    return _proc.planner.prefix_rows(req, tree_cache.prefix_device_indices(req) if restores else None)


def _promise_prefix_rows(original: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    """alloc_for_extend: evict for, and promise, the rows the batch's prefixes take before they are read."""
    if _proc.planner is None:
        return original(batch, *args, **kwargs)
    tree_cache = batch.tree_cache
    return _proc.planner.allocate(
        [_prefix_rows(tree_cache, req) for req in batch.reqs], lambda n: _evict_for_rows(tree_cache, n),
        batch.extend_num_tokens, lambda: original(batch, *args, **kwargs),
        lambda: [int(_pool_row(req)) for req in batch.reqs])


def _charge_prefix_rows(original: Any, adder: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    """PrefillAdder.add_one_req: admission charges a request the rows its prefix takes (as tokens of a row
    per unit)
    on top of its new tokens, through SGLang's per-request overhead."""
    extra = 0
    tier = _tier()
    if tier is not None:
        extra = -(-_prefix_rows(adder.tree_cache, req) // tier.rows_per_slot)
    adder.per_req_token_overhead += extra
    try:
        return original(adder, req, *args, **kwargs)
    finally:
        adder.per_req_token_overhead -= extra


def _adopt_duplicates(original: Any, tree_cache: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
    """UnifiedRadixCache.insert: where the tree already holds the request's tokens in other slots, the insert frees
    the request's own and SGLang points the request at the tree's; first those take over the rows and host copies
    they lack (``KvTier.adopt``): a lazy layer may have released them, and the request's window reads them next."""
    tier = _tier()
    if tier is not None and params.key is not None and params.value is not None and len(params.key):
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams

        probe = tree_cache.tree_core.match_prefix(MatchPrefixParams(key=params.key))  # a walk, as touch_prefix does
        tree_cache._apply_cache_actions(probe.cache_actions)
        n = min(probe.device_prefix_len, len(params.value))
        if n:
            tree = tree_cache.path_device_indices(probe.last_device_node)[:n].to(torch.int64)
            own = params.value[:n].to(tree.device, torch.int64)
            dup = tree != own
            if bool(dup.any()):
                tier.adopt(own[dup], tree[dup])
    return original(tree_cache, params, *args, **kwargs)


def _reset_rows(_result: Any, _allocator: Any, *args: Any, **kwargs: Any) -> None:
    """TokenToKVPoolAllocator.clear (flush_cache): no slot is live any more."""
    tier = _tier()
    if tier is not None:
        tier.clear()
    return None


def _request_level_key(result: bool, _self: Any, key: str) -> bool | None:
    return True if key == META_KEY else None


def _unwrap_meta(_result: Any, _self: Any, meta_info: dict, *args: Any, **kwargs: Any) -> None:
    """Tokenizer side: SGLang accumulates customized info in a list; clients get the latest map."""
    value = meta_info.get(META_KEY)
    if isinstance(value, list):
        if value:
            meta_info[META_KEY] = value[-1]
        else:  # a batch neighbour had a map, this request has none (SimLayerKV off for it)
            del meta_info[META_KEY]
    return None


def _validate_request(tokenizer_manager: Any, obj: Any, *args: Any, **kwargs: Any) -> None:
    """Tokenizer side: refuse bad ``custom_params.slkv`` (for the served model's layers) before it reaches the
    scheduler. SGLang answers the ValueError with a 400 naming the field; ``Engine.generate`` raises it."""
    check_generate(getattr(obj, "sampling_params", None), ModelLayers.from_model_config(tokenizer_manager.model_config))
    return None


def _validate_before_streaming(tokenizer_manager: Any, obj: Any, *args: Any, **kwargs: Any) -> None:
    """TokenizerManager.create_abort_task: a streaming ``/generate`` sends its 200 before ``generate_request``
    runs (its errors become an event in the stream); this is called first, so bad settings get their 400."""
    try:
        _validate_request(tokenizer_manager, obj)
    except RequestParamsError as exc:
        from fastapi import HTTPException

        raise HTTPException(status_code=400, detail=str(exc)) from exc
    return None


def _admin_handlers(handlers: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """SchedulerInternalStateController._update_handlers: the engine-wide settings an admin changes."""
    tier = _tier()
    return admin.add_handlers(handlers, [tier.host] if tier is not None else [])


def _validate_startup(*args: Any, **kwargs: Any) -> None:
    cfg = SlkvConfig.from_env()  # raises SlkvConfigError with the offending variable
    if cfg.enabled:
        logger.info("SimLayerKV enabled: %s", cfg)
    return None


def _uses_cuda(server_args: Any) -> bool:
    import torch

    return (getattr(server_args, "device", None) != "cpu" and os.environ.get("SGLANG_USE_CPU_ENGINE") != "1"
            and torch.cuda.is_available())


def _plan_server_args(server_args: Any, *args: Any, **kwargs: Any) -> None:
    """ServerArgs.resolve_once (before): name the covered backend, CUDA graphs off, refuse what is not served."""
    cfg = SlkvConfig.from_env()
    if not cfg.enabled or getattr(server_args, "_resolution_finished", False):
        return None
    from sglang.srt.arg_groups.overrides import declare_resolution

    requested = {name: getattr(server_args, name, None) for name in
                 (*startup.BACKEND_FIELDS, "device", "disable_cuda_graph", "enable_mixed_chunk", "speculative_algorithm",
                  "enable_dp_attention", "pp_size")}
    plan = startup.plan_server_args(requested, _uses_cuda(server_args), cfg)
    if plan.declarations:
        declare_resolution(server_args, "slkv_sglang", **plan.declarations)
    for note in plan.notes:
        logger.warning(note)
    return None


def _check_resolved(_result: Any, server_args: Any, *args: Any, **kwargs: Any) -> None:
    """ServerArgs.resolve_once (after): what SGLang resolved runs on a backend the plugin covers, and the model
    is one SimLayerKV serves (SGLang built and kept its ModelConfig while resolving)."""
    cfg = SlkvConfig.from_env()
    if cfg.enabled:
        from sglang.srt.arg_groups.model_override_base import model_config_of, resolved_view

        view = resolved_view(server_args)
        from sglang.srt.model_executor.cuda_graph_config import Backend

        graphs = view.cuda_graph_config
        graphs_on = [phase for phase in ("decode", "prefill") if getattr(graphs, phase).backend != Backend.DISABLED]
        if not _uses_cuda(server_args):
            graphs_on = []
        startup.check_resolved({name: getattr(view, name, None) for name in startup.BACKEND_FIELDS}, cfg, graphs_on)
        check_servable(ModelLayers.from_model_config(model_config_of(server_args)), cfg)
    return None


_SRT = "sglang.srt."
_ALLOCATOR = "mem_cache.allocator."
_HOOKS: list[tuple[str, Any, HookType]] = [
    # flags, start-up, per-request settings and layer maps
    ("server_args.ServerArgs.add_cli_args", _add_cli_args, HookType.AFTER),
    ("entrypoints.engine.Engine._launch_subprocesses", _validate_startup, HookType.BEFORE),
    ("server_args.ServerArgs.resolve_once", _plan_server_args, HookType.BEFORE),
    ("server_args.ServerArgs.resolve_once", _check_resolved, HookType.AFTER),
    ("model_executor.forward_batch_info.ForwardBatch.init_new", _attach_params, HookType.AFTER),
    ("managers.schedule_batch.Req._compute_max_prefix_len", _cap_prefix, HookType.AFTER),
    ("mem_cache.common.release_kv_cache", _release_row, HookType.BEFORE),
    ("managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor."
     "_maybe_collect_customized_info", _report_decision, HookType.AFTER),
    ("managers.scheduler_components.output_streamer.SchedulerOutputStreamer.is_request_level_customized_info_key",
     _request_level_key, HookType.AFTER),
    ("managers.tokenizer_manager.TokenizerManager.update_request_meta_info", _unwrap_meta, HookType.AFTER),
    ("managers.tokenizer_manager.TokenizerManager.generate_request", _validate_request, HookType.BEFORE),
    ("managers.tokenizer_manager.TokenizerManager.create_abort_task", _validate_before_streaming, HookType.BEFORE),
    ("managers.scheduler_components.internal_state.SchedulerInternalStateController._update_handlers",
     _admin_handlers, HookType.AFTER),
    ("managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
     _report_sizes, HookType.AFTER),
    # --slkv-offload: the KV tier follows SGLang's slots, prefixes and admission
    ("managers.schedule_batch.Req.init_next_round_input", _match_prefix, HookType.AFTER),
    (_ALLOCATOR + "token.TokenToKVPoolAllocator.free", _free_rows, HookType.BEFORE),
    (_ALLOCATOR + "token.TokenToKVPoolAllocator.clear", _reset_rows, HookType.AFTER),
    (_ALLOCATOR + "token.TokenToKVPoolAllocator.alloc", _alloc_with_rows, HookType.AROUND),
    (_ALLOCATOR + "base.BaseTokenToKVPoolAllocator.evict_to_free_tokens", _evict_more, HookType.AFTER),
    (_ALLOCATOR + "base.BaseTokenToKVPoolAllocator.check_decode_capacity", _decode_fits_rows, HookType.AFTER),
    ("mem_cache.prefill_budget.PrefillBudget._available_and_evictable", _evictable_by_rows, HookType.AFTER),
    ("mem_cache.allocation.alloc_for_extend", _promise_prefix_rows, HookType.AROUND),
    ("mem_cache.unified_radix_cache.UnifiedRadixCache.insert", _adopt_duplicates, HookType.AROUND),
    ("managers.schedule_policy.PrefillAdder.add_one_req", _charge_prefix_rows, HookType.AROUND),
    ("mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget", _overcommit_pool, HookType.AFTER),
    ("mem_cache.memory_pool.MHATokenToKVPool._create_buffers", _no_kv_buffers, HookType.AROUND),
]


def register() -> None:
    for target, fn, kind in _HOOKS:
        HookRegistry.register(_SRT + target, fn, kind)
    _wrap_backend_factories()

"""Scheduler side: SimLayerKV in SGLang's radix cache, slot allocator and admission.

Radix: a prefix match leaves the queries that score a prompt, and with ``--slkv-offload`` stops where some unit's
KV is on neither tier. With ``--slkv-offload`` SGLang counts token slots while the device holds rows (a unit's KV
of one slot, ``docs/memory.md``): allocation, eviction and admission are made to count rows, so the rows lazy
units give back admit more requests. The KV tier's parts come from ``SchedulerSide``; without offload these hooks
return at once.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import SlkvConfigError
from ..request_params import request_params
from .scheduler import SchedulerSide, req_pool_idx, shared_salt

SHARED_LOOKED_UP = "slkv_shared_looked_up"  # on SGLang's Req: the length its shared-tier lookup was made at


# ---- radix cache ------------------------------------------------------------------------------------------
def cap_prefix(side: SchedulerSide, result: int, req: Any, input_len: int) -> int | None:
    """Leave at least ``last`` prompt tokens to extend, so a radix hit still has the queries that score: for
    requests that score their prompt (SimLayerKV on, deciding at prefill); the others take the whole match."""
    if not side.config.enabled:
        return None
    params = request_params(side.config, req.rid, req.sampling_params.custom_params, last_chunk=True)
    if not params.enabled or params.mode != "prefill":
        return None
    return max(0, min(result, input_len - side.config.last))


def match_prefix(side: SchedulerSide, _result: Any, req: Any, tree_cache: Any = None, *args: Any, **kwargs: Any) -> None:
    """Req.init_next_round_input: with --slkv-offload, the matched prefix stops where some layer's KV is on neither
    tier (``KvPlanner.match``); the prefill recomputes the rest from the tokens."""
    if side.planner is None or tree_cache is None:
        return None
    if not req.prefix_len:
        side.planner.retire(req, None)
        return None
    cached = tree_cache.prefix_device_indices(req)
    keep = side.planner.match(req, cached, list(req.full_untruncated_fill_ids[: req.prefix_len]), tree_cache.page_size)
    if keep < req.prefix_len:
        req.prefix_len = keep
        req.num_matched_prefix_tokens = min(req.num_matched_prefix_tokens, keep)
        req.kv.cache_protected_len = min(req.kv.cache_protected_len, keep)
    return None


def restore_shared(side: SchedulerSide, req: Any, tree_cache: Any = None, *args: Any, **kwargs: Any) -> None:
    """Req.init_next_round_input (before): with a shared tier, the blocks of the request's prefix that the store
    holds past what the radix cache matches come back into rows of fresh slots and join the tree, so the match
    that follows finds them (``kv/shared.py``). Looked up once per request and length (SGLang matches a waiting
    request again at every scheduling round). Nothing found, no room or a failed store: the prefill recomputes.
    Not for what SGLang does not match through its tree (embedding overrides, streaming sessions' own slots), nor
    with pages of more than one token (the tier's rows follow SGLang's one-token slot allocator)."""
    tier = side.tier
    if (tier is None or tier.shared is None or tree_cache is None or not tree_cache.supports_prefix_sharing()
            or tree_cache.page_size != 1 or req.positional_embed_overrides is not None
            or getattr(req.session, "streaming", False)):
        return None
    ids = [*req.origin_input_ids, *req.output_ids]
    if getattr(req, SHARED_LOOKED_UP, None) == len(ids):
        return None
    setattr(req, SHARED_LOOKED_UP, len(ids))
    from array import array

    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    limit = req._compute_max_prefix_len(len(ids))  # SGLang's cap, and ``cap_prefix``'s
    key = array("q", ids[:limit])
    probe = _walk(tree_cache, RadixKey(key, extra_key=req.extra_key, cache_salt=req.cache_salt))
    matched = probe.device_prefix_len
    kv = tier.shared.lookup(ids, matched, limit, shared_salt(req))
    if kv is None:
        return None
    allocator = tree_cache.token_to_kv_pool_allocator
    # the matched prefix stays while slots and rows are made for the rest
    lock = tree_cache.lock(probe.last_device_node) if matched else None
    try:
        n = kv.shape[1]
        matched_slots = tree_cache.path_device_indices(probe.last_device_node)[:matched] if matched else None
        _evict_for_rows(side, tree_cache, n * tier.rows_per_slot, matched_slots)
        if allocator.available_size() < n:
            tree_cache.evict(EvictParams(num_tokens=n - allocator.available_size()))
        slots = allocator.alloc(n)
        if slots is None:
            tier.shared.stats.no_room += 1
            return None
        if not tier.fill_slots(slots.to(torch.int64), kv):
            allocator.free(slots)
            tier.shared.stats.no_room += 1
            return None
        prefix = tree_cache.path_device_indices(probe.last_device_node)[:matched]
        try:  # prev_prefix_len: the matched part is the tree's own, not duplicates for the insert to free
            tree_cache.insert(InsertParams(key=RadixKey(key[: matched + n], extra_key=req.extra_key,
                                                        cache_salt=req.cache_salt),
                                           value=torch.cat([prefix.to(slots.device, slots.dtype), slots]),
                                           prev_prefix_len=matched))
        except Exception:
            allocator.free(slots)
            raise
        tier.shared.restored(kv)
    finally:
        tree_cache.unlock(lock)
    return None


def _walk(tree_cache: Any, key: Any) -> Any:
    """The radix tree's match of ``key`` (``MatchResult``), walked as ``touch_prefix`` walks it: no session
    shortcut, no finalizers, nothing loaded back."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams

    probe = tree_cache.tree_core.match_prefix(MatchPrefixParams(key=key))
    tree_cache._apply_cache_actions(probe.cache_actions)
    return probe


def adopt_duplicates(side: SchedulerSide, original: Any, tree_cache: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
    """UnifiedRadixCache.insert: where the tree already holds the request's tokens in other slots, the insert frees
    the request's own and SGLang points the request at the tree's; first those take over the rows and host copies
    they lack (``KvTier.adopt``): a lazy layer may have released them, and the request's window reads them next."""
    tier, moved = side.tier, False
    if tier is not None and params.key is not None and params.value is not None and len(params.key):
        probe = _walk(tree_cache, params.key)
        n = min(probe.device_prefix_len, len(params.value))
        if n:
            tree = tree_cache.path_device_indices(probe.last_device_node)[:n].to(torch.int64)
            own = params.value[:n].to(tree.device, torch.int64)
            dup = tree != own
            moved = bool(dup.any())
            if moved:
                tier.adopt(own[dup], tree[dup])
    result = original(tree_cache, params, *args, **kwargs)
    if moved:
        # after a checkpoint's insert SGLang points the running request at the tree's slots (req_to_token written
        # next): what it reads changes, so the running mask is rebuilt when next asked
        side.tracker.slots_moved()
    return result


# ---- slots and their rows -------------------------------------------------------------------------------
def free_slots(side: SchedulerSide, allocator: Any, free_index: Any, *args: Any, **kwargs: Any) -> None:
    """TokenToKVPoolAllocator.free: SGLang frees slots (radix eviction, aborts), so do their rows and host copies.
    Without offload, ``--slkv-poison-freed`` fills the freed slots of SGLang's own per-layer buffers with NaN.

    Inside a free group the slots arrive again, concatenated, at the group's end."""
    if allocator.free_group is not None or not free_index.numel():
        return None
    tier = side.tier
    if tier is not None:
        tier.free_slots(free_index)
    elif side.config.enabled and side.config.poison:
        kv = allocator._kvcache
        for layer in range(kv.layer_num):
            kv.get_key_buffer(layer)[free_index] = float("nan")
            kv.get_value_buffer(layer)[free_index] = float("nan")
    return None


def reset_rows(side: SchedulerSide, _result: Any, _allocator: Any, *args: Any, **kwargs: Any) -> None:
    """TokenToKVPoolAllocator.clear (flush_cache): no slot is live any more."""
    tier = side.tier
    if tier is not None:
        tier.clear()
    return None


def alloc_with_rows(side: SchedulerSide, original: Any, allocator: Any, need_size: int, *args: Any, **kwargs: Any) -> Any:
    """TokenToKVPoolAllocator.alloc: refuse (None, as for no free slots) without a row per unit
    for each slot (``KvTier.rows_per_slot``); on success
    the slots are owed their rows until written."""
    tier = side.tier
    if tier is not None and need_size * tier.rows_per_slot > tier.spare_rows:
        return None
    slots = original(allocator, need_size, *args, **kwargs)
    if slots is not None and tier is not None:
        tier.ledger.owe_slots(slots)
    return slots


def _evict_for_rows(side: SchedulerSide, tree_cache: Any, rows_needed: int, matched: torch.Tensor | None = None) -> None:
    """Make ``rows_needed`` rows spare: by moving idle cached KV to the host (``KvTier.demote``: the radix cache
    keeps those prefixes, a later turn reloads them) and, where that frees none, by evicting the radix tree (LRU),
    which also gives the host room back; until nothing is left to evict. An evicted token frees only the rows it
    still holds, fewer than one per unit where lazy layers or heads released it or it was demoted. Running
    requests, those admitted (``SchedulerSide.admitted``), heals and ``matched`` keep their rows."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    tier = side.tier
    if tier is None or side.tracker is None or tier.spare_rows >= rows_needed:
        return
    keep = side.tracker.running_slots(tier.rows.num_slots).clone()
    healing = None if side.planner is None else side.planner.healing()
    for slots in (*side.admitted, healing, matched):
        if slots is not None:
            keep[slots.cpu()] = True
    while tier.spare_rows < rows_needed:
        if tier.demote(rows_needed - tier.spare_rows, keep):
            continue
        short = -(-(rows_needed - tier.spare_rows) // tier.rows_per_slot)
        if tree_cache.evict(EvictParams(num_tokens=short)).num_tokens_evicted == 0:
            break


def evict_more(side: SchedulerSide, _result: Any, allocator: Any, tree_cache: Any, num_tokens: int) -> None:
    """evict_to_free_tokens: SGLang evicts ``num_tokens`` tokens; keep going until their rows are there."""
    tier = side.tier
    if tier is not None and tree_cache is not None and tree_cache.supports_prefix_sharing():
        _evict_for_rows(side, tree_cache, num_tokens * tier.rows_per_slot)
    return None


def decode_fits_rows(side: SchedulerSide, result: bool, allocator: Any, *args: Any, num_tokens: int = 0, **kwargs: Any) -> bool | None:
    """check_decode_capacity: the next decode step also needs a spare row per unit and token, or SGLang
    retracts."""
    tier = side.tier
    if tier is None or not result:
        return None
    return tier.spare_rows >= num_tokens * tier.rows_per_slot


# ---- admission counts rows ------------------------------------------------------------------------------
def evictable_by_rows(side: SchedulerSide, result: int, budget: Any) -> int | None:
    """PrefillBudget._available_and_evictable: SGLang adds free slots and the tree's evictable *tokens*;
    admission needs rows: spare rows plus the rows evictable slots hold, a row per unit to a
    token.

    Which slots are evictable (unlocked in the tree) is not known here, only how many (k) and that they are among
    the allocated slots no running request reads; a request admitted earlier in this round locks its prefix
    without running yet. So the rows counted are those of the k idle slots holding the fewest: never more than
    eviction can free (counting all idle slots admitted more than the rows allowed, and SGLang's allocation then
    failed)."""
    tier = side.tier
    if tier is None or side.tracker is None:
        return None
    allocator = budget.allocator
    idle = ~side.tracker.running_slots(tier.rows.num_slots)  # allocated slots no running request reads
    idle[0] = False
    for free in (allocator.free_pages, allocator.release_pages):
        idle[free] = False
    k = int(budget.tree_cache.evictable_size())
    return min(result, (tier.spare_rows + tier.rows.fewest(idle, k)) // tier.rows_per_slot)


def _prefix_rows(side: SchedulerSide, tree_cache: Any, req: Any) -> int:
    """Rows a new request's prefill takes before it runs (``KvPlanner.prefix_rows``)."""
    assert side.planner is not None
    restores = req.prefix_len and not req.kv.holds_kv  # else an earlier chunk restored its prefix
    return side.planner.prefix_rows(req, tree_cache.prefix_device_indices(req) if restores else None)


def promise_prefix_rows(side: SchedulerSide, original: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    """alloc_for_extend: evict for, and promise, the rows the batch's prefixes take before they are read."""
    if side.planner is None:
        return original(batch, *args, **kwargs)
    tree_cache = batch.tree_cache
    try:
        return side.planner.allocate(
            [_prefix_rows(side, tree_cache, req) for req in batch.reqs], lambda n: _evict_for_rows(side, tree_cache, n),
            batch.extend_num_tokens, lambda: original(batch, *args, **kwargs),
            lambda: [int(req_pool_idx(req)) for req in batch.reqs])
    finally:  # the batch's requests run from now on: the tracker's running slots cover them
        side.admitted.clear()


def charge_prefix_rows(side: SchedulerSide, original: Any, adder: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    """PrefillAdder.add_one_req: admission charges a request the rows its prefix takes (as tokens of a row
    per unit) on top of its new tokens, through SGLang's per-request overhead. An admitted request's prefix keeps
    its rows until its batch is allocated (``SchedulerSide.admitted``)."""
    tier = side.tier
    if tier is None:
        return original(adder, req, *args, **kwargs)
    extra = -(-_prefix_rows(side, adder.tree_cache, req) // tier.rows_per_slot)
    adder.per_req_token_overhead += extra
    try:
        result = original(adder, req, *args, **kwargs)
    finally:
        adder.per_req_token_overhead -= extra
    if req.prefix_len and not req.kv.holds_kv and any(r is req for r in adder.can_run_list):
        side.admitted.append(adder.tree_cache.prefix_device_indices(req).to(torch.int64).cpu())
    return result


# ---- the KV pool's size ---------------------------------------------------------------------------------
def overcommit_pool(side: SchedulerSide, result: Any, configurator: Any, *args: Any, **kwargs: Any) -> Any:
    """KVCacheConfigurator.config_from_budget: with offload SGLang gets ``slot_factor`` times the token slots its KV
    bytes hold in full KV (``--slkv-overcommit F``, or what the slots' index affords); the KV tier keeps those
    bytes, less the index (``kv.pool.RowKVPool``)."""
    cfg = side.config
    if not (cfg.enabled and cfg.offload):
        return None
    from sglang.srt.runtime_context import get_parallel, get_schedule

    from ..kv.tier import slot_factor, units_per_layer

    model = configurator.model_config
    heads = model.get_num_kv_heads(get_parallel().attn_tp_size)
    row_bytes = 2 * heads // units_per_layer(cfg.granularity, heads) * model.head_dim * configurator.kv_cache_dtype.itemsize
    factor = slot_factor(row_bytes, cfg.overcommit)
    if factor == 1.0:
        return None
    if result.swa_max_total_num_tokens:
        raise SlkvConfigError("--slkv-offload does not support sliding-window KV pools")
    page = get_schedule().page_size
    result.max_total_num_tokens = int(result.max_total_num_tokens * factor) // page * page
    return result


def kv_pool_class(side: SchedulerSide, original: Any, configurator: Any, *args: Any, kind: str = "", **kwargs: Any) -> Any:
    """KVCacheConfigurator._resolve_kv_pool_class: with SimLayerKV on, an MHA model's pool is the plugin's
    (``kv/pool.py``): SGLang's own class with the reads and writes the backends make, its KV in rows with offload."""
    cls = original(configurator, *args, kind=kind, **kwargs)
    if not side.config.enabled or kind != "mha":
        return cls
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from ..kv.pool import pool_class

    if cls is not MHATokenToKVPool:
        raise SlkvConfigError(f"--enable-simlayerkv reads KV through SGLang's MHATokenToKVPool; this platform or layout "
                              f"builds {cls.__name__}")
    return pool_class(side.config)


def unfuse_row_writes(side: SchedulerSide, result: bool, *args: Any, **kwargs: Any) -> bool | None:
    """models.utils.enable_fused_set_kv_buffer (after): a model whose RoPE kernel would store KV itself (CUDA, bf16
    KV: Qwen3-MoE and a few others) stores it through the pool's ``set_kv_buffer`` instead when its KV lives in
    rows (``--slkv-offload``): the fused kernel writes SGLang's per-layer buffers, one page long there."""
    return False if result and side.tier is not None else None

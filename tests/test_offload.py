"""The host tier and the KV tier's parts, without an engine: bit-exact round trips of real model KV, copies
addressed by slot and checked by prefix fingerprint, the budget, LRU eviction of host entries, restores, heals and the
admission ledger. ``test_offload_engine.py`` runs the same paths inside SGLang."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from offload import HostArena
from slkv_sglang.tools.corpus import prompt_ids
from slkv_sglang.tools.host_reads import HostReads
from slkv_sglang.config import SlkvConfig
from slkv_sglang.kv.executor import KvExecutor
from slkv_sglang.kv.fingerprint import prefix_fingerprints
from slkv_sglang.kv.planner import KvPlanner
from slkv_sglang.kv.rows import LostKv
from slkv_sglang.kv.step import Heal, KvStep, RequestStep
from slkv_sglang.kv.tier import DEMOTE_AHEAD, INDEX_BYTES, KvTier, pool_rows, slot_factor
from slkv_sglang.tracker import LazyTracker

SINK, RECENT = 4, 256


@pytest.fixture(scope="module")
def model_kv(model_path, tokenizer) -> list[torch.Tensor]:
    """Per layer, the KV of a real 1.2K-token prompt as ``[tokens, 2, kv_heads, dim]`` (the arena's layout)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = prompt_ids(tokenizer, 1200, seed=3, question="What does this code do?")
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    return [torch.stack([layer.keys[0], layer.values[0]]).permute(2, 0, 1, 3).contiguous() for layer in cache.layers]


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_save_then_reload_is_bit_exact(model_kv):
    seq = model_kv[0].shape[0]
    slots = torch.randperm(seq) + 1  # slots are not positions: any order
    fps = prefix_fingerprints(list(range(seq)))
    arena = HostArena(1 << 30, num_units=len(model_kv), num_slots=seq)
    entry = arena.new_entry()
    for layer, kv in enumerate(model_kv):
        middle = slice(SINK, seq - RECENT)
        assert arena.save(entry, "a", [layer], slots[middle], fps[middle], kv[middle])
    for layer, kv in enumerate(model_kv):
        out = torch.empty_like(kv[SINK : seq - RECENT])
        assert arena.reload([layer], slots[SINK : seq - RECENT], fps[SINK : seq - RECENT], out, reader="b")
        assert torch.equal(out, kv[SINK : seq - RECENT])
    part = torch.empty_like(model_kv[7][100:300])  # any subset, in any order
    assert arena.reload([7], slots[100:300].flip(0), fps[100:300].flip(0), part) and torch.equal(part, model_kv[7][100:300].flip(0))
    assert arena.reload([7], slots[:0], fps[:0], part[:0])  # nothing to read: nothing missing
    assert arena.stats.held_bytes == sum(_bytes(kv[SINK : seq - RECENT]) for kv in model_kv)
    # read by other labels than the one that saved ("b", then no label): every copy once, then the 200 again
    assert arena.stats.shared_tokens == len(model_kv) * (seq - SINK - RECENT) + 200


def test_a_copy_is_never_restored_into_another_prefix(model_kv):
    """The slot-keyed copy carries its prefix's fingerprint: a reader whose tokens differ anywhere before a
    position gets nothing (and recomputes), however its request is labelled."""
    kv = model_kv[3][:100]
    slots = torch.arange(1, 101)
    ids = list(range(100))
    arena = HostArena(1 << 30, num_units=1, num_slots=200)
    arena.save(arena.new_entry(), "session-1", [0], slots, prefix_fingerprints(ids), kv)
    other = ids[:]
    other[10] = 999  # a branch that differs at position 10: every position from 10 on has another prefix
    out = torch.zeros_like(kv)
    assert not arena.reload([0], slots, prefix_fingerprints(other), out, reader="session-1")
    assert arena.stats.mismatches == 1 and not out.any()
    assert arena.reload([0], slots[:10], prefix_fingerprints(other)[:10], out[:10])  # the shared part is shared
    held = arena.hosted(slots, prefix_fingerprints(other))
    assert held[0, :10].all() and not held[0, 10:].any()


def test_save_skips_what_is_held_and_forget_frees_chunks(model_kv):
    kv = model_kv[12]
    slots, fps = torch.arange(1, 1201), prefix_fingerprints(list(range(1200)))
    arena = HostArena(1 << 30, num_units=30, num_slots=1200)
    arena.save(arena.new_entry(), "s", [12], slots[SINK:600], fps[SINK:600], kv[SINK:600])
    before = arena.stats.saved_bytes
    arena.save(arena.new_entry(), "s", [12], slots[SINK:900], fps[SINK:900], kv[SINK:900])  # the next turn
    assert arena.stats.saved_bytes - before == _bytes(kv[600:900])  # only the new tokens were copied
    arena.forget(slots[500:])  # SGLang freed the tail's slots
    assert int(arena.hosted(slots)[12].sum()) == 500 - SINK
    assert arena.stats.held_bytes == _bytes(kv[SINK:600])  # the second turn's chunk died with its last slot
    arena.forget(slots)
    assert arena.stats.held_bytes == 0 and len(arena) == 0


def test_lru_eviction_drops_whole_entries():
    seg = torch.randn(100, 2, 3, 64)
    arena = HostArena(budget_bytes=3 * _bytes(seg), num_units=1, num_slots=500)
    fps = torch.arange(100)
    entries = {}
    for i, name in enumerate("abc"):
        entries[name] = arena.new_entry()
        assert arena.save(entries[name], name, [0], torch.arange(1, 101) + 100 * i, fps, seg)
    out = torch.empty_like(seg)
    assert arena.reload([0], torch.arange(1, 101), fps, out)  # a reload makes a the most recently used
    assert arena.save(arena.new_entry(), "d", [0], torch.arange(301, 401), fps, seg)  # evicts b
    held = arena.hosted(torch.arange(1, 401)).view(4, 100).all(dim=1).tolist()
    assert held == [True, False, True, True] and arena.stats.evictions == 1
    arena.set_budget(_bytes(seg))  # shrink: c then a go, d (the most recent) stays
    assert arena.hosted(torch.arange(1, 401)).view(4, 100).all(dim=1).tolist() == [False, False, False, True]
    big = arena.new_entry()
    assert not arena.save(big, "e", [0], torch.arange(401, 501), fps, torch.randn(100, 2, 3, 65))  # > the budget
    assert arena.stats.refused == 1 and arena.hosted(torch.arange(301, 401)).all()  # nothing evicted for it


def test_budget_is_never_exceeded():
    rng = random.Random(7)
    arena = HostArena(budget_bytes=40_000, num_units=3, num_slots=600)
    for step in range(400):
        layer, start = rng.randrange(3), rng.randrange(1, 500)
        n = rng.randint(1, 300)  # up to 38 KB: some saves exceed a shrunk budget alone
        slots = torch.arange(start, min(start + n, 601))
        arena.save(arena.new_entry(), "x", [layer], slots, slots * 3, torch.randn(slots.numel(), 2, 1, 16))
        if step % 37 == 0:
            arena.set_budget(rng.randrange(10_000, 60_000))
        if step % 11 == 0:
            arena.forget(torch.arange(rng.randrange(1, 600), 601))
        held = sum(c.nbytes for c in arena._chunks.values())
        assert arena.stats.held_bytes == held <= arena.budget_bytes
        assert int((arena.loc >= 0).sum()) == sum(c.live for c in arena._chunks.values())
    assert arena.stats.evictions > 0 and arena.stats.refused > 0


def test_host_blocks_are_recycled_within_the_budget(model_kv):
    """Freed host memory is reused for the next save (no fresh allocation to fault in), and free blocks
    count against the budget like held KV."""
    from offload.arena import BLOCK_BYTES

    kv = torch.cat(model_kv[:12])  # 14,400 tokens x 1536 B: whole blocks and a tail
    assert _bytes(kv) // BLOCK_BYTES >= 2 and _bytes(kv) % BLOCK_BYTES
    n = kv.shape[0]
    slots, fps = torch.arange(1, n + 1), torch.arange(n)
    arena = HostArena(budget_bytes=3 * _bytes(kv), num_units=1, num_slots=n)
    arena.save(arena.new_entry(), "a", [0], slots, fps, kv)
    blocks = {b.data_ptr() for c in arena._chunks.values() for b in c.blocks}
    assert len(blocks) == _bytes(kv) // BLOCK_BYTES
    arena.forget(slots)
    assert len(arena._spare) == len(blocks)
    arena.save(arena.new_entry(), "b", [0], slots, fps, kv)
    assert {b.data_ptr() for c in arena._chunks.values() for b in c.blocks} == blocks
    out = torch.empty_like(kv)
    assert arena.reload([0], slots, fps, out) and torch.equal(out, kv)
    arena.forget(slots)
    arena.set_budget(_bytes(kv) // 2)  # free blocks shrink with the budget
    assert len(arena._spare) * BLOCK_BYTES + arena.stats.held_bytes <= arena.budget_bytes


def test_prepinned_blocks_serve_the_first_saves():
    """A share of the budget is allocated and touched at start (``prepin``, whole blocks, at most the budget); the
    first save fills those blocks instead of allocating."""
    from offload.arena import BLOCK_BYTES

    kv = torch.randn(2 * BLOCK_BYTES // (2 * 4 * 64 * 4), 2, 4, 64)  # exactly two blocks of float32 rows
    slots = torch.arange(1, kv.shape[0] + 1)
    arena = HostArena(budget_bytes=5 * BLOCK_BYTES, num_units=1, num_slots=kv.shape[0], prepin=3 * BLOCK_BYTES + 7)
    prepinned = {b.data_ptr() for b in arena._spare}
    assert len(prepinned) == 3
    arena.save(arena.new_entry(), "a", [0], slots, slots, kv)
    used = {b.data_ptr() for c in arena._chunks.values() for b in c.blocks}
    assert len(used) == 2 and used < prepinned and len(arena._spare) == 1
    assert len(HostArena(budget_bytes=2 * BLOCK_BYTES + 1, num_units=1, num_slots=1, prepin=9 * BLOCK_BYTES)._spare) == 2


# ---- the KV tier: planner and executor over real tensors -------------------------------------------------
def _tier(layers: int = 2, host_budget: int = 1 << 20, units_per_layer: int = 1) -> KvTier:
    """Two KV heads per layer, in one row per layer (``units_per_layer`` 1) or one row per head (2)."""
    return KvTier.build(layers, units_per_layer, 100, num_rows=layers * units_per_layer * 101, heads=2, dim=4,
                        dtype=torch.float32, device="cpu", host_budget=host_budget, poison=True)


def test_the_kv_report_has_the_counters_bench_memory_reads():
    from slkv_sglang.tools.bench_memory import TRANSFER_COUNTERS

    report = _tier().report(torch.arange(1, 5))
    assert all(key in report for pair in TRANSFER_COUNTERS for key in pair)


def _kv(tier: KvTier, layer: int, slots: torch.Tensor) -> torch.Tensor:
    """``[n, 2, heads, dim]``: what a read of ``slots`` in ``layer`` gets from the device rows."""
    at = tier.rows.lookup(layer, slots)
    return torch.stack([tier.rows.gather(at, 0), tier.rows.gather(at, 1)], dim=1)


def _lazy(*layers: bool) -> torch.Tensor:
    """``[layers, 2 heads]``: whole layers lazy or not."""
    return torch.tensor([[lazy, lazy] for lazy in layers])


def _step(req_pool_idx: int, ids: list[int], heal: Heal | None = None) -> KvStep:
    req = SimpleNamespace(rid="r")
    return KvStep([RequestStep(req, "r", "s", req_pool_idx, prefix_fingerprints(ids), heal)])


@pytest.mark.parametrize("units_per_layer", [1, 2])
def test_tier_releases_restores_and_falls_back_to_recompute(units_per_layer):
    """A lazy layer's middle goes to the host and its rows are freed; the next prefill restores it exactly. A
    budget too small frees the rows all the same, the planner cuts the prefix there, and the recomputing
    prefill heals the cached slots. The same with a row per layer and a row per KV head."""
    # a budget of 10 tokens of one layer
    tier, ids = _tier(host_budget=10 * 2 * 2 * 4 * 4, units_per_layer=units_per_layer), list(range(40))
    planner, ex = KvPlanner(tier, strict=True), KvExecutor(tier, sink=4, recent=10, strict=True)
    req_to_token = torch.zeros(4, 100, dtype=torch.int64)
    req_to_token[1, :40] = slots = torch.arange(1, 41)
    kv = torch.randn(40, 2, 2, 4)
    ex.begin(_step(1, ids))
    for layer in range(2):
        ex.write(layer, slots, kv[:, 0], kv[:, 1])
    ex.release_lazy(1, _lazy(True, False), 16, req_to_token, shared=None)  # middle 4..5: fits
    assert tier.rows.held(slots).tolist() == [38] * units_per_layer + [40] * units_per_layer
    assert planner.restorable(slots, prefix_fingerprints(ids)) == 40
    assert planner.restorable(slots, prefix_fingerprints([7] + ids[1:])) == 4  # another prefix: not restorable
    ex.begin(_step(2, ids + [1]))
    req_to_token[2, :40] = slots
    ex.restore(0, req_to_token, [40])
    assert torch.equal(_kv(tier, 0, slots), kv) and tier.stats.restored_rows == 2 * units_per_layer
    ex.begin(_step(1, ids))
    ex.release_lazy(1, _lazy(False, True), 40, req_to_token, shared=None)  # 26 tokens: refused, lost
    assert tier.stats.lost_rows == 26 * units_per_layer
    assert tier.rows.held(slots).tolist() == [40] * units_per_layer + [14] * units_per_layer
    assert planner.restorable(slots, prefix_fingerprints(ids)) == 4
    fresh = torch.arange(41, 81)
    req_to_token[3, :40] = fresh
    ex.begin(_step(3, ids, Heal(4, slots[4:].clone())))  # the recomputing prefill writes its own slots, then heals
    for layer in range(2):
        ex.write(layer, fresh[4:], kv[4:, 0], kv[4:, 1])
        ex.heal(layer, req_to_token, [4], [36])
    assert planner.restorable(slots, prefix_fingerprints(ids)) == 40 and tier.stats.healed_rows == 26 * units_per_layer
    assert torch.equal(_kv(tier, 1, slots), kv)


def test_demotion_moves_the_idlest_cached_kv_to_the_host_and_a_restore_brings_it_back():
    """Under row pressure idle cached slots give their rows up, least recently seen first, with host copies,
    so the prefix stays restorable (not recomputed); slots a running or admitted request reads are kept, and
    without a host budget nothing is demoted (the caller evicts instead)."""
    tier = _tier()
    planner, ex = KvPlanner(tier, strict=True), KvExecutor(tier, sink=4, recent=10, strict=True)
    req_to_token = torch.zeros(4, 100, dtype=torch.int64)
    old_ids, new_ids = list(range(20)), list(range(100, 130))
    req_to_token[1, :20] = old = torch.arange(1, 21)
    req_to_token[2, :30] = new = torch.arange(21, 51)
    kv = torch.randn(50, 2, 2, 4)
    for idx, ids, slots in ((1, old_ids, old), (2, new_ids, new)):  # two decisions, old first; none lazy
        ex.begin(_step(idx, ids))
        for layer in range(2):
            ex.write(layer, slots, kv[slots - 1, 0], kv[slots - 1, 1])
        ex.release_lazy(idx, _lazy(False, False), len(ids), req_to_token, shared=None)
    keep = torch.zeros(101, dtype=torch.bool)
    assert _tier(host_budget=0).demote(10, keep) == 0
    keep[old[:5]] = True  # read by a running request
    free = tier.rows.free
    assert int(tier.rows.num_rows * DEMOTE_AHEAD) == 3  # freed beyond the need: up to 23 rows, 2 to a slot
    assert tier.demote(20, keep) == 22  # eleven idle slots of the old conversation, both layers
    assert tier.rows.free == free + 22 and tier.stats.demoted_rows == 22
    assert tier.rows.held(old).tolist() == [9, 9] and tier.rows.held(new).tolist() == [30, 30]
    assert tier.host.hosted(old[5:16], prefix_fingerprints(old_ids)[5:16]).all()
    assert planner.restorable(old, prefix_fingerprints(old_ids)) == 20
    ex.begin(_step(3, old_ids + [7]))
    req_to_token[3, :20] = old
    for layer in range(2):
        ex.restore(layer, req_to_token, [20])
        assert torch.equal(_kv(tier, layer, old), kv[:20])
    assert tier.stats.restored_rows == 22
    # only into the host's free bytes (row_bytes 64), and never a slot whose KV some unit lost (a heal fills it)
    tier.host.set_budget(tier.host.stats.held_bytes + 64)
    assert tier.demote(20, keep) == 0  # room for one row: not for a slot's two
    tier.host.set_budget(tier.host.stats.held_bytes + 6 * 64)
    assert tier.demote(20, keep) == 6  # old[5:8]: the oldest idle, restored above
    tier.host.set_budget(1 << 20)
    tier.rows.release(torch.tensor([0]), new[:2])
    assert tier.demote(1000, keep) == 2 * 12 + 2 * 28  # old[8:20], new[2:30]
    assert tier.rows.held(new).tolist() == [0, 2] and tier.rows.held(old[:5]).tolist() == [5, 5]


def test_a_restore_that_cannot_complete_fails_the_request_not_the_engine():
    """A restore the planner did not foresee (here: the host copy evicted after the match) never reads wrong
    KV: strict mode raises, otherwise the request is finished with an error and nothing of it is cached."""
    for strict in (True, False):
        tier, ids = _tier(), list(range(40))
        ex = KvExecutor(tier, sink=4, recent=10, strict=strict)
        req_to_token = torch.zeros(4, 100, dtype=torch.int64)
        req_to_token[1, :40] = slots = torch.arange(1, 41)
        ex.begin(_step(1, ids))
        for layer in range(2):
            ex.write(layer, slots, torch.randn(40, 2, 4), torch.randn(40, 2, 4))
        ex.release_lazy(1, _lazy(True, True), 40, req_to_token, shared=None)
        tier.host.set_budget(0)
        planner, req = KvPlanner(tier, strict=strict), SimpleNamespace(rid="r")
        ex.begin(planner.plan([req], [1], ["s"], [ids], [40]))
        if strict:
            with pytest.raises(LostKv):
                ex.restore(0, req_to_token, [40])
            continue
        ex.restore(0, req_to_token, [40])
        assert ex.failed(0) and tier.stats.failed_requests == 1
        assert ex.read(0, 0, slots) is None  # a read of lost rows computes nothing for the request
        # the executor only reports; the scheduler side finishes the request, once
        (failed, why), = planner.settle()
        assert failed is req and why.startswith("slkv: KV of request r could not be made whole (layer 0:")
        assert planner.settle() == []


def test_slots_are_sized_by_what_their_index_costs():
    """Without --slkv-overcommit a pool gets as many slots as keep their index under 1/32 of its bytes (at most 8
    per full-KV token); an operator's factor is used as given. The index is paid out of the KV bytes."""
    assert INDEX_BYTES == 5  # row_of int32 + the ledger's bool, per (unit, slot); 4 more per slot and per row
    assert slot_factor(512, 0.0) == 3.2  # a row per KV head: 64 x 2 (K, V) x 4 bytes (float32), or 128 x 2 x 2
    assert slot_factor(1536, 0.0) == 8.0  # a row per layer of the bundled model: capped
    assert slot_factor(64, 0.0) == 1.0  # rows so small that no extra slot pays: never fewer slots than tokens
    assert slot_factor(512, 2.0) == 2.0 and slot_factor(4096, 1.5) == 1.5
    # 10 units, 320 slots at 3.2 (100 full-KV tokens): 10 x 101 rows' bytes less 321 x (10 x 5 + 4) bytes of
    # index, in rows of 512 + 4 bytes
    assert pool_rows(10, 320, 3.2, 512) == 968  # 517,120 - 17,334 = 499,786 bytes: 968.6 rows
    assert pool_rows(10, 100, 1.0, 512) == 991  # 517,120 - 5,454 = 511,666 bytes: 991.6 rows


def test_ledger_counts_promised_rows():
    """Admission's ledger: allocated slots are owed a row per layer until written, restores are promised
    before the forward takes them, and whatever is freed or taken leaves the ledger."""
    tier, ids = _tier(), list(range(8))
    ex = KvExecutor(tier, sink=2, recent=2, strict=True)
    req_to_token = torch.zeros(4, 100, dtype=torch.int64)
    req_to_token[1, :8] = slots = torch.arange(1, 9)
    tier.ledger.owe_slots(slots)
    assert (tier.rows.free, tier.spare_rows) == (202, 186)
    ex.begin(_step(1, ids))
    for layer in range(2):
        ex.write(layer, slots, torch.randn(8, 2, 4), torch.randn(8, 2, 4))
    assert (tier.rows.free, tier.spare_rows) == (186, 186)
    ex.release_lazy(1, _lazy(False, True), 8, req_to_token, shared=None)  # a lazy layer gives 4 back
    planner = KvPlanner(tier, strict=True)
    need = planner.prefix_rows(SimpleNamespace(), slots)
    assert tier.spare_rows == 190 and need == 4
    tier.ledger.promise(3, need)  # the next turn's prefill will restore them
    assert tier.spare_rows == 186
    req_to_token[3, :8] = slots
    ex.begin(_step(3, ids))
    ex.restore(1, req_to_token, [8])
    assert (tier.rows.free, tier.spare_rows, tier.ledger.promised[3]) == (186, 186, 0)
    tier.ledger.retire(3)
    more = torch.tensor([9, 10])
    tier.ledger.owe_slots(more)
    ex.write(0, more, torch.randn(2, 2, 4), torch.randn(2, 2, 4))  # layer 1 never writes: an aborted prefill
    assert tier.spare_rows == 182
    tier.free_slots(more)
    assert tier.ledger.reserved == 0 and tier.spare_rows == tier.rows.free == 186


def test_new_tokens_without_rows_fail_their_forward_and_stay_owed():
    """A forward whose new tokens find too few free rows (a bug of admission's) takes none, writes nothing, fails
    its requests, and leaves the rows owed until SGLang frees the slots."""
    tier, ids = _tier(), list(range(8))
    ex = KvExecutor(tier, sink=2, recent=2, strict=False)
    kept = tier.rows.take(tier.rows.free - 15)  # 15 rows free: 8 slots in 2 units need 16
    slots = torch.arange(1, 9)
    tier.ledger.owe_slots(slots)
    ex.begin(_step(1, ids))
    for layer in range(2):
        ex.write(layer, slots, torch.ones(8, 2, 4), torch.ones(8, 2, 4))
    assert list(ex.step.failed) == [0] and "(no rows for new tokens)" in ex.step.failed[0]
    assert tier.stats.failed_requests == 1
    assert (tier.rows.free, tier.ledger.reserved) == (15, 16)
    assert int((tier.rows.row_of[:, slots] >= 0).sum()) == 0 and tier.rows.miscounted() == 0
    tier.free_slots(slots)
    tier.rows.give(kept)
    assert tier.ledger.reserved == 0 and tier.rows.free == tier.rows.num_rows


@pytest.mark.parametrize("units_per_layer", [1, 2])
def test_the_layers_of_a_forward_never_wait_for_the_device(units_per_layer):
    """A forward over rows reads values off the device once: its first write takes the new tokens' rows in every
    unit. Each layer's write and page reads after that are device work only (on a GPU each read is a wait, per
    layer). A page read of KV that is not there is counted on the device; the step's requests fail when a decision
    would release rows (nothing is released) or when the scheduler side settles the forward."""
    layers, ids = 4, list(range(8))
    tier = _tier(layers=layers, units_per_layer=units_per_layer)
    ex, planner = KvExecutor(tier, sink=2, recent=2, strict=False), KvPlanner(tier, strict=False)
    req_to_token = torch.zeros(4, 100, dtype=torch.int64)
    req_to_token[1, :8] = slots = torch.arange(1, 9)
    tier.ledger.owe_slots(slots)
    kv = torch.randn(layers, 8, 2, 2, 4)
    req = SimpleNamespace(rid="r")
    ex.begin(planner.plan([req], [1], ["s"], [ids], None))
    with HostReads() as reads:
        for layer in range(layers):
            ex.write(layer, slots, kv[layer, :, 0], kv[layer, :, 1])
            ex.pages(tier.rows.page_ids(layer, slots))
    assert reads.where == {"tolist": 1}
    assert (tier.ledger.reserved, tier.rows.free) == (0, tier.rows.num_rows - layers * units_per_layer * 8)
    assert all(torch.equal(_kv(tier, layer, slots), kv[layer]) for layer in range(layers))
    assert planner.settle() == []
    for decides in (False, True):
        ex.begin(planner.plan([req], [1], ["s"], [ids], None))
        with HostReads() as reads:
            ex.pages(tier.rows.page_ids(0, torch.tensor([9])))  # slot 9 holds nothing
        assert reads.count == 0 and not ex.failed(0)
        if decides:
            ex.release_lazy(1, _lazy(*[True] * layers), 8, req_to_token, shared=None)
            assert ex.failed(0) and tier.stats.released_rows == 0
        (failed, why), = planner.settle()
        assert failed is req and why.endswith("(1 page reads found no KV on the device)")
        assert tier.stats.failed_requests == 1 + decides


def test_steps_of_the_same_request_settle_apart_and_report_once():
    """Steps are told apart by identity (their fields hold tensors): a prefill's step and the next decode's over the
    same request, their fingerprints of other lengths, settle together, and a failure is reported once."""
    planner, req = KvPlanner(_tier(), strict=False), SimpleNamespace(rid="r")
    planner.plan([req], [1], ["s"], [list(range(8))], [0])
    decode = planner.plan([req], [1], ["s"], [list(range(9))], None)
    decode.fail(0, "no rows for new tokens", strict=False)
    assert planner.settle() == [(req, "slkv: KV of request r could not be made whole (no rows for new tokens)")]
    assert planner.settle() == []


def test_a_model_stores_kv_through_the_pool_over_rows():
    """A model whose RoPE kernel stores KV itself (SGLang's ``enable_fused_set_kv_buffer``: CUDA, bf16 KV) stores
    it through the pool's ``set_kv_buffer`` when KV lives in rows, whose SGLang buffers are one page long; over
    SGLang's own buffers the fusion stays. The hook, called with what SGLang decided, on the scheduler side as a
    real backend's start-up attaches it."""
    from slkv_sglang.hooks.admission import unfuse_row_writes
    from slkv_sglang.hooks.scheduler import SchedulerSide
    from slkv_sglang.tools import graph_check

    assert unfuse_row_writes(SchedulerSide(), True) is None  # SimLayerKV off: nothing attached
    for pool, fused in (("slots", None), ("rows", False)):
        with graph_check.one_rank():
            backend = graph_check.standin_backend("cpu", graph_check.CPU_SHAPE, graph_check.POOLS[pool])
        side = SchedulerSide()
        side.attach(backend.tracker, backend.pool)
        assert unfuse_row_writes(side, True) is fused, pool  # None: SGLang's answer stands
        assert unfuse_row_writes(side, False) is None, pool


def test_the_scheduler_waits_for_a_whole_decode_replay_over_rows():
    """With overlap scheduling SGLang lets the scheduler's device work run beside a decode graph's replay once the
    backend's reads of shared state end (a CUDA event it records). Over rows every layer reads the row index and
    takes rows, so that pool declares the end of the replay (``read_ends``), which the plugin's backends hand
    SGLang; over slots SGLang's own declaration stands, and prefill keeps its whole-forward fence."""
    from sglang.srt.layers.attention.base_attn_backend import SharedReadEnds
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from slkv_sglang.tools import graph_check

    for pool, decode in (("slots", SharedReadEnds.IN_REPLAY), ("rows", SharedReadEnds.POST_REPLAY)):
        with graph_check.one_rank():
            backend = graph_check.standin_backend("cpu", graph_check.CPU_SHAPE, graph_check.POOLS[pool])
        assert backend.shared_read_ends(ForwardMode.DECODE) is decode, pool
        assert backend.shared_read_ends(ForwardMode.EXTEND) is SharedReadEnds.UNKNOWN, pool


def test_cached_slots_adopt_what_a_duplicate_holds():
    """SGLang frees a request's own slots where the radix tree already holds its tokens and points the request at
    the tree's: the tree's slots first take over the rows and host copies they lack (a lazy layer released them),
    so the request's next reads are whole, and the freed duplicates take nothing with them."""
    tier, ids = _tier(), list(range(40))
    ex = KvExecutor(tier, sink=4, recent=10, strict=True)
    req_to_token = torch.zeros(4, 100, dtype=torch.int64)
    req_to_token[1, :40] = tree = torch.arange(1, 41)
    kv = torch.randn(40, 2, 2, 4)
    ex.begin(_step(1, ids))
    for layer in range(2):
        ex.write(layer, tree, kv[:, 0], kv[:, 1])
    ex.release_lazy(1, _lazy(True, False), 40, req_to_token, shared=None)  # layer 0: middle 4..29 to host
    own = torch.arange(41, 81)  # a second request recomputed the same tokens into its own slots
    for layer in range(2):
        ex.write(layer, own, kv[:, 0], kv[:, 1])
    tier.host.save(tier.host.new_entry(), "x", [1], own[:2], prefix_fingerprints(ids)[:2], kv[:2])
    tier.adopt(own, tree)
    tier.free_slots(own)
    assert tier.rows.held(tree).tolist() == [40, 40] and tier.stats.adopted_rows == 26
    assert torch.equal(_kv(tier, 0, tree), kv)
    hosted = tier.host.hosted(tree, prefix_fingerprints(ids))
    assert hosted[0, 4:30].all() and hosted[1, :2].all()  # layer 0's own copies stay; layer 1 took own's two
    assert tier.rows.free == tier.rows.num_rows - 80 and not tier.host.hosted(own).any()


def test_running_slots_follow_a_request_pointed_at_the_trees_slots():
    """A checkpoint's insert that finds a running request's tokens cached under other slots frees its own and points
    it at the tree's: the running mask admission keeps from demotion follows once told (``slots_moved``, called by
    the insert hook), instead of the freed slots until the next forward."""
    req_to_token = torch.zeros(4, 16, dtype=torch.int32)
    req_to_token[1, :5] = torch.arange(10, 15)
    tracker = LazyTracker(SlkvConfig(enabled=True), num_layers=2, num_kv_heads=1, req_pool_size=4,
                          req_to_token=req_to_token)
    tracker.running[1] = 5  # what plan() records for a batch with that request
    assert tracker.running_slots(32).nonzero().flatten().tolist() == [10, 11, 12, 13, 14]
    req_to_token[1, :3] = torch.arange(20, 23)  # SGLang's write after the insert
    assert tracker.running_slots(32).nonzero().flatten().tolist() == [10, 11, 12, 13, 14]  # kept until told
    tracker.slots_moved()
    assert tracker.running_slots(32).nonzero().flatten().tolist() == [13, 14, 20, 21, 22]


def test_lazy_heads_free_their_own_rows():
    """With a row per KV head, a layer lazy in one head gives back that head's middle rows only: its other head
    still reads everything, the lazy head reads its window, and a read of the lazy head's middle is refused. With
    a row per layer the same decision frees nothing (the layer's other head needs the rows)."""
    ids, slots = list(range(40)), torch.arange(1, 41)
    req_to_token = torch.zeros(4, 100, dtype=torch.int64)
    req_to_token[1, :40] = slots
    kv = torch.randn(40, 2, 2, 4)
    one_head = torch.tensor([[True, False], [False, False]])
    for units_per_layer, freed in ((1, 0), (2, 26)):
        tier = _tier(units_per_layer=units_per_layer)
        ex = KvExecutor(tier, sink=4, recent=10, strict=True)
        ex.begin(_step(1, ids))
        for layer in range(2):
            ex.write(layer, slots, kv[:, 0], kv[:, 1])
        ex.release_lazy(1, one_head, 40, req_to_token, shared=None)
        assert tier.stats.released_rows == freed and tier.rows.free == tier.rows.num_rows - 80 * units_per_layer + freed
        window = torch.cat([slots[:4], slots[30:]])
        k, v = ex.read(0, 0, slots, torch.tensor([False, True]))  # the kept head: everything
        assert torch.equal(k, kv[:, 0, 1:]) and torch.equal(v, kv[:, 1, 1:])
        k, v = ex.read(0, 0, window, torch.tensor([True, False]))  # the lazy head: its window
        assert torch.equal(k, kv[torch.cat([torch.arange(4), torch.arange(30, 40)]), 0, :1])
        if freed:
            with pytest.raises(LostKv):
                ex.read(0, 0, slots)
            assert tier.host.hosted(slots).sum(dim=1).tolist() == [26, 0, 0, 0]  # head 0 of layer 0 only
            report = tier.report(slots)
            assert report["device_tokens"] == [[14, 40], [40, 40]] and report["host_tokens"] == [[26, 0], [0, 0]]
            ex.begin(_step(2, ids + [1]))
            req_to_token[2, :40] = slots
            ex.restore(0, req_to_token, [40])
            assert tier.stats.restored_rows == 26
        assert torch.equal(_kv(tier, 0, slots), kv)


def test_per_head_round_trip_of_model_kv_is_bit_exact(model_kv):
    """Real KV of every layer in rows of one KV head each: a random per-head lazy set releases its middles (the
    host copy of each lazy head, the device rows of each freed), and restoring every layer gives back exactly the
    KV written, head by head."""
    layers, (seq, _, heads, dim) = len(model_kv), model_kv[0].shape
    tier = KvTier.build(layers, heads, seq, num_rows=layers * heads * (seq + 1), heads=heads, dim=dim,
                        dtype=torch.float32, device="cpu", host_budget=1 << 30, poison=True)
    ex = KvExecutor(tier, sink=SINK, recent=RECENT, strict=True)
    ids, slots = list(range(seq)), torch.randperm(seq) + 1
    req_to_token = torch.zeros(3, seq, dtype=torch.int64)
    req_to_token[1] = req_to_token[2] = slots
    ex.begin(_step(1, ids))
    for layer, kv in enumerate(model_kv):
        ex.write(layer, slots, kv[:, 0], kv[:, 1])
    lazy = torch.rand(layers, heads, generator=torch.Generator().manual_seed(5)) < 0.5
    ex.release_lazy(1, lazy, seq, req_to_token, shared=None)
    middle = seq - SINK - RECENT
    assert tier.stats.released_rows == int(lazy.sum()) * middle
    assert tier.report(slots)["device_tokens"] == torch.where(lazy, seq - middle, seq).tolist()
    ex.begin(_step(2, ids))
    for layer in range(layers):
        ex.restore(layer, req_to_token, [seq])
    assert tier.stats.restored_rows == int(lazy.sum()) * middle and tier.rows.free == tier.rows.num_rows - layers * heads * seq
    for layer, kv in enumerate(model_kv):
        assert torch.equal(_kv(tier, layer, slots), kv), layer


def test_one_save_call_holds_several_units_within_the_budget(model_kv):
    """A decision saves all its lazy units in one call, one chunk: each unit reloads bit for bit; the units past
    the budget (the last ones) are refused and counted; the chunk's memory goes with its last forgotten slot."""
    n = 500
    kv = torch.cat([layer[SINK : SINK + n] for layer in model_kv[:5]])  # units 0..4, unit-major
    unit_bytes = _bytes(kv) // 5
    slots, fps = torch.arange(1, n + 1), prefix_fingerprints(list(range(n)))
    arena = HostArena(budget_bytes=3 * unit_bytes, num_units=5, num_slots=n)
    assert arena.save(arena.new_entry(), "a", [0, 1, 2, 3, 4], slots, fps, kv) == 3
    assert (arena.stats.refused, arena.stats.refused_bytes, arena.stats.held_bytes) == (1, 2 * unit_bytes, 3 * unit_bytes)
    assert len(arena._chunks) == 1
    for unit in range(3):
        out = torch.empty_like(model_kv[unit][SINK : SINK + n])
        assert arena.reload([unit], slots, fps, out) and torch.equal(out, model_kv[unit][SINK : SINK + n])
    assert arena.hosted(slots).sum(dim=1).tolist() == [n, n, n, 0, 0]
    # several units in one reload, unit-major as saved: in order (one run over the chunk) and reversed (scattered)
    want = {u: model_kv[u][SINK : SINK + n] for u in range(3)}
    out = torch.empty((3 * n, *kv.shape[1:]))
    assert arena.reload([0, 1, 2], slots, fps, out) and torch.equal(out, torch.cat([want[u] for u in (0, 1, 2)]))
    out = torch.empty((2 * n, *kv.shape[1:]))
    assert arena.reload([2, 0], slots.flip(0), fps.flip(0), out)
    assert torch.equal(out, torch.cat([want[u].flip(0) for u in (2, 0)]))
    assert not arena.reload([0, 3], slots, fps, out)  # unit 3 was refused: all or nothing
    arena.forget(slots[: n // 2])
    assert arena.stats.held_bytes == 3 * unit_bytes  # the chunk still holds the other half
    arena.forget(slots[n // 2 :])
    assert arena.stats.held_bytes == 0 and not arena._chunks


def test_a_save_past_a_chunks_numbering_splits_and_reloads_whole(monkeypatch):
    """A chunk numbers its copies in OFFSET_BITS (shrunk here to 3: 8 copies): a longer save becomes several
    chunks, and a reload whose run of index entries goes on from one chunk's last copy into the next chunk's first
    reads each from its own chunk."""
    import offload.arena as arena_module

    monkeypatch.setattr(arena_module, "OFFSET_BITS", 3)
    monkeypatch.setattr(arena_module, "OFFSET_MASK", 7)
    slots, fps = torch.arange(10, 22), torch.arange(12)
    for units in ([0], [0, 1]):  # 8 slots then 4 in one unit; 4 slots per chunk in two
        arena = HostArena(1 << 30, num_units=2, num_slots=100)
        kv = torch.randn(len(units) * 12, 2, 1, 4)
        assert arena.save(arena.new_entry(), "a", units, slots, fps, kv) == len(units)
        assert len(arena._chunks) == (2 if len(units) == 1 else 3)
        out = torch.empty_like(kv)
        assert arena.reload(units, slots, fps, out) and torch.equal(out, kv)


def test_adopted_copies_survive_their_chunk_being_evicted():
    """``own``'s copies move to ``tree`` where it lacks them; those it keeps (``tree`` has its own) go at once, so an
    eviction of the chunk before SGLang frees ``own`` leaves no index entry pointing at it."""
    arena = HostArena(1 << 30, num_units=2, num_slots=100)
    fps = torch.arange(3)
    kv_own, kv_tree = torch.randn(6, 2, 1, 4), torch.randn(3, 2, 1, 4)
    own, tree = torch.tensor([10, 11, 12]), torch.tensor([50, 51, 52])
    arena.save(arena.new_entry(), "own", [0, 1], own, fps, kv_own)
    arena.save(arena.new_entry(), "tree", [1], tree, fps, kv_tree)  # tree holds unit 1 already
    arena.adopt(own, tree)
    assert not bool(arena.hosted(own).any())
    out = torch.empty(6, 2, 1, 4)
    assert arena.reload([0, 1], tree, fps, out)
    assert torch.equal(out[:3], kv_own[:3]) and torch.equal(out[3:], kv_tree)  # unit 0 adopted, unit 1 tree's own
    arena.set_budget(0)  # every entry evicted, the adopted copies' chunk with them
    arena.forget(own)
    arena.forget(tree)
    assert arena.stats.held_bytes == 0 and not arena._chunks and int((arena.loc >= 0).sum()) == 0

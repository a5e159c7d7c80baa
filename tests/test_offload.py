"""The host tier: bit-exact round trips of real model KV, incremental offload, the budget, LRU eviction."""

from __future__ import annotations

import random

import pytest
import torch

from offload import HostArena, OffloadRefused
from slkv_sglang.corpus import prompt_ids

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


def test_offload_then_reload_is_bit_exact(model_kv):
    arena = HostArena(budget_bytes=1 << 30)
    seq = model_kv[0].shape[0]
    for layer, kv in enumerate(model_kv):
        assert arena.offload("s", layer, SINK, kv[SINK : seq - RECENT]) == _bytes(kv[SINK : seq - RECENT])
    for layer, kv in enumerate(model_kv):
        out = torch.full_like(kv[SINK : seq - RECENT], float("nan"))
        assert arena.reload("s", layer, SINK, out)
        assert torch.equal(out, kv[SINK : seq - RECENT])
    part = torch.empty_like(model_kv[7][100:300])
    assert arena.reload("s", 7, 100, part) and torch.equal(part, model_kv[7][100:300])
    assert arena.stats.held_bytes == sum(_bytes(kv[SINK : seq - RECENT]) for kv in model_kv)


def test_offload_is_incremental(model_kv):
    """Turn 2 extends the offloaded range: only tokens the host lacks are copied, the rest is reused."""
    kv = model_kv[12]
    arena = HostArena(budget_bytes=1 << 30)
    arena.offload("s", 12, SINK, kv[SINK:600])
    copied = arena.offload("s", 12, SINK, kv[SINK:900])  # the next turn's middle, overlapping turn 1's
    assert copied == _bytes(kv[600:900])
    assert arena.held("s", 12) == (SINK, 900)
    out = torch.empty_like(kv[SINK:900])
    assert arena.reload("s", 12, SINK, out) and torch.equal(out, kv[SINK:900])
    assert arena.stats.offloaded_bytes == _bytes(kv[SINK:900])
    with pytest.raises(ValueError, match="does not continue"):
        arena.offload("s", 12, 950, kv[950:1000])  # a gap would leave tokens nowhere


def test_lru_eviction_tells_the_owner():
    seg = torch.randn(100, 2, 3, 64)
    arena = HostArena(budget_bytes=3 * _bytes(seg))
    evicted: list[str] = []
    arena.on_evict = evicted.append
    for sid in ("a", "b", "c"):
        arena.offload(sid, 0, 4, seg)
    assert arena.reload("a", 0, 4, torch.empty_like(seg))  # a reload makes a the most recently used
    arena.offload("d", 0, 4, seg)  # evicts b, the least recently used
    assert [arena.held(s, 0) is not None for s in "abcd"] == [True, False, True, True]
    assert evicted == ["b"] and arena.stats.evictions == 1 and arena.stats.evicted_bytes == _bytes(seg)
    assert not arena.reload("b", 0, 4, torch.empty_like(seg))  # evicted: the caller recomputes
    arena.set_budget(_bytes(seg))  # shrink: c then a go, d (the most recent) stays
    assert [arena.held(s, 0) is not None for s in "abcd"] == [False, False, False, True]
    assert evicted == ["b", "c", "a"]
    with pytest.raises(OffloadRefused):
        arena.offload("e", 0, 4, torch.randn(200, 2, 3, 64))  # larger than the whole budget
    assert arena.stats.refused == 1 and arena.held("e", 0) is None and arena.held("d", 0) is not None
    arena.offload("e", 0, 4, seg)  # evicts d, never the session being offloaded
    assert evicted[-1] == "d" and arena.stats.held_bytes == _bytes(seg)


def test_budget_is_never_exceeded():
    rng = random.Random(0)
    arena = HostArena(budget_bytes=40_000)
    lengths: dict[tuple[str, int], int] = {}
    for _ in range(2000):
        sid, layer = f"s{rng.randrange(6)}", rng.randrange(3)
        op = rng.random()
        if op < 0.6:
            start = 4 + lengths.get((sid, layer), 0) if arena.held(sid, layer) else 4
            n = rng.randrange(1, 40)
            try:
                arena.offload(sid, layer, start, torch.randn(n, 2, 1, 16))
                lengths[(sid, layer)] = start - 4 + n
            except OffloadRefused:
                pass
        elif op < 0.8:
            arena.set_budget(rng.randrange(10_000, 60_000))
        elif op < 0.85:
            arena.drop(sid)
        if arena.held(sid, layer) is None:
            lengths.pop((sid, layer), None)
        held = sum(arena.session_bytes(f"s{i}") for i in range(6))
        assert arena.stats.held_bytes == held
        assert held <= arena.budget_bytes
    assert arena.stats.evictions > 0 and arena.stats.refused > 0


def test_row_pool_frees_restores_and_forgets():
    """The device side: a lazy layer's middle rows go to the host and back bit-exactly; freed slots free
    every layer's rows and cut the host range; a read of freed KV raises instead of returning garbage."""
    from slkv_sglang.row_pool import LayerRowPool

    layers, slots = 3, torch.arange(1, 51)
    pool = LayerRowPool(layers, 100, num_rows=layers * 101, heads=2, dim=4, dtype=torch.float32, device="cpu",
                        arena=HostArena(1 << 20), poison=True)
    for layer in range(layers):
        pool.write(layer, slots, torch.randn(50, 2, 4), torch.randn(50, 2, 4))
    kept = pool.kv[pool.rows(1, slots)].clone()
    pool.release("s", 1, slots[4:40], start=4)
    assert pool.rows_used() == [50, 14, 50] and pool.free_rows == layers * 101 - 114
    assert torch.isnan(pool.kv[pool._free[pool.free_rows - 36 : pool.free_rows]]).all()  # poisoned
    with pytest.raises(RuntimeError, match="not on the device"):
        pool.rows(1, slots)
    pool.restore(1, slots)
    assert torch.equal(pool.kv[pool.rows(1, slots)], kept)
    pool.release("s", 1, slots[4:45], start=4)  # the next turn's longer middle: only 5 new tokens copied
    assert pool.arena.stats.offloaded_bytes == 41 * pool.row_bytes and pool.arena.held("s", 1) == (4, 45)
    pool.free_slots(slots[30:])  # SGLang evicted the tail
    assert pool.arena.held("s", 1) == (4, 30) and pool.rows_used() == [30, 4, 30]
    pool.restore(1, slots[:30])
    assert torch.equal(pool.kv[pool.rows(1, slots[:30])], kept[:30])


def test_row_pool_loses_what_the_host_cannot_take_and_heals_it():
    """A host budget too small for the middle: the rows are freed all the same (device memory follows the
    layer map), the prefix is restorable only up to them, and recomputed KV fills the cached slots again."""
    from slkv_sglang.row_pool import LayerRowPool

    layers, slots, fresh = 2, torch.arange(1, 41), torch.arange(41, 81)
    pool = LayerRowPool(layers, 100, num_rows=layers * 101, heads=2, dim=4, dtype=torch.float32, device="cpu",
                        arena=HostArena(10 * 2 * 2 * 4 * 4), poison=True)  # room for 10 tokens of one layer
    kv = torch.randn(40, 2, 2, 4)
    for layer in range(layers):
        pool.write(layer, slots, kv[:, 0], kv[:, 1])
    pool.release("s", 0, slots[4:10], start=4)  # 6 tokens: fit the host
    assert pool.restorable(slots) == 40
    pool.release("s", 1, slots[4:30], start=4)  # 26 tokens: refused, freed without a copy
    assert pool.stats.lost_rows == 26 and pool.rows_used() == [34, 14]
    assert pool.restorable(slots) == 4  # layer 1 lost positions 4..29: a prefix match stops at 4
    pool.arena.set_budget(0)  # the host evicts s: layer 0's copy is gone too
    assert pool.restorable(slots[:10]) == 4 and not (pool.owner_of >= 0).any()
    for layer in range(layers):  # the recomputing prefill writes its own slots, then heals the cached ones
        pool.write(layer, fresh[4:30], kv[4:30, 0], kv[4:30, 1])
        pool.heal(layer, slots[4:30], fresh[4:30])
    assert pool.restorable(slots) == 40 and pool.stats.healed_rows == 6 + 26
    assert torch.equal(pool.kv[pool.rows(1, slots)], kv)


def test_row_pool_counts_promised_rows():
    """Admission's ledger: allocated slots are owed a row per layer until written, restores are promised
    before the forward takes them, and whatever is freed or taken leaves the ledger."""
    from slkv_sglang.row_pool import LayerRowPool

    pool = LayerRowPool(2, 10, num_rows=2 * 11, heads=1, dim=2, dtype=torch.float32, device="cpu",
                        arena=HostArena(1 << 20))
    slots = torch.arange(1, 9)
    pool.reserve_slots(slots)
    assert (pool.free_rows, pool.spare_rows) == (22, 6)
    for layer in range(2):
        pool.write(layer, slots, torch.randn(8, 1, 2), torch.randn(8, 1, 2))
    assert (pool.free_rows, pool.spare_rows) == (6, 6)
    pool.release("s", 1, slots[2:6], start=2)  # a lazy layer gives 4 rows back
    assert pool.spare_rows == 10 and pool.prefix_needs(slots) == 4
    pool.promise(row=3, n=pool.prefix_needs(slots))  # the next turn's prefill will restore them
    assert pool.spare_rows == 6
    pool.restore(1, slots, row=3)
    assert (pool.free_rows, pool.spare_rows, pool.promised[3]) == (6, 6, 0)
    pool.release_promise(3)
    more = torch.tensor([9, 10])
    pool.reserve_slots(more)
    pool.write(0, more, torch.randn(2, 1, 2), torch.randn(2, 1, 2))  # layer 1 never writes: an aborted prefill
    assert pool.spare_rows == 2
    pool.free_slots(more)
    assert pool.reserved == 0 and pool.spare_rows == pool.free_rows == 6


def test_host_blocks_are_recycled_within_the_budget(model_kv):
    """Freed host memory is reused for the next offload (no fresh allocation to fault in), and free blocks
    count against the budget like held KV."""
    from offload.arena import BLOCK_BYTES

    kv = torch.cat(model_kv[:4])  # 4800 tokens x 1536 B: whole blocks and a tail
    arena = HostArena(budget_bytes=3 * _bytes(kv))
    arena.offload("a", 0, 0, kv)
    blocks = {c.block.data_ptr() for c in arena._sessions["a"].layers[0] if c.block is not None}
    assert len(blocks) == _bytes(kv) // BLOCK_BYTES
    arena.drop("a")
    assert len(arena._spare) == len(blocks)
    arena.offload("b", 0, 0, kv)
    assert {c.block.data_ptr() for c in arena._sessions["b"].layers[0] if c.block is not None} == blocks
    out = torch.empty_like(kv)
    assert arena.reload("b", 0, 0, out) and torch.equal(out, kv)
    arena.drop("b")
    arena.set_budget(_bytes(kv) // 2)  # free blocks shrink with the budget
    assert len(arena._spare) * BLOCK_BYTES + arena.stats.held_bytes <= arena.budget_bytes

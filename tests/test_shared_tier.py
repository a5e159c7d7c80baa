"""The shared tier (``slkv_sglang/kv/shared.py``) on a real Mooncake Store, without an engine: keys, write-back of
device rows and host copies, lookup past a prefix, and every failure a miss."""

from __future__ import annotations

import torch

from offload.store import open_store
from slkv_sglang.kv.fingerprint import prefix_fingerprints
from slkv_sglang.kv.shared import BLOCK, SharedTier, block_keys
from slkv_sglang.kv.tier import KvTier

LAYERS, UNITS_PER_LAYER, HEADS, DIM = 3, 2, 2, 8
SLOTS = 8 * BLOCK


def _tier(mooncake, seed: bytes, write_back: bool = True) -> KvTier:
    tier = KvTier.build(LAYERS, UNITS_PER_LAYER, SLOTS, LAYERS * UNITS_PER_LAYER * SLOTS, heads=HEADS, dim=DIM,
                        dtype=torch.float32, device="cpu", host_budget=64 << 20)
    tier.shared = SharedTier(open_store(mooncake.url), open_store(mooncake.url), seed, tier.rows, tier.host,
                             timeout_s=5.0, queue_bytes=64 << 20, write_back=write_back)
    return tier


def _written(tier: KvTier, slots: torch.Tensor) -> torch.Tensor:
    """Every unit of ``slots`` gets random KV in rows of its own; returns it ``[units, n, 2, heads, dim]``."""
    kv = torch.randn(tier.rows.num_units, slots.numel(), 2, HEADS // UNITS_PER_LAYER, DIM)
    tier.ledger.owe_slots(slots)
    assert tier.fill_slots(slots, kv)
    return kv


def test_keys_chain_every_earlier_token():
    ids = list(range(3 * BLOCK + 5))
    keys = block_keys(b"seed", ids, 3)
    assert len(set(keys)) == 3 and keys == block_keys(b"seed", ids + [9, 9], 3)
    changed = [7, *ids[1:]]  # one token of the first block: every key differs
    assert not set(keys) & set(block_keys(b"seed", changed, 3))
    assert not set(keys) & set(block_keys(b"other model", ids, 3))
    later = ids[: 2 * BLOCK] + [0] + ids[2 * BLOCK + 1 :]  # a token of the last block: only its key differs
    assert block_keys(b"seed", later, 3)[:2] == keys[:2] and block_keys(b"seed", later, 3)[2] != keys[2]


def test_round_trip_of_device_rows_and_host_copies(mooncake):
    seed = b"test-round-trip"
    writer, reader = _tier(mooncake, seed), _tier(mooncake, seed)
    ids = torch.randint(0, 50_000, (3 * BLOCK + 10,)).tolist()
    slots = torch.arange(1, len(ids) + 1)
    kv = _written(writer, slots)
    fps = prefix_fingerprints(ids)
    # unit 1's middle goes to the host and leaves the device, as a lazy unit's release does
    middle = slots[4 : 2 * BLOCK]
    at = writer.rows.row_of[1, middle]
    assert writer.host.save(writer.host.new_entry(), "s", [1], middle, fps[4 : 2 * BLOCK], writer.rows.kv[at]) == 1
    writer.rows.release(torch.tensor([1]), middle)
    assert writer.shared.save(ids, slots, fps, "s") == 3  # three whole blocks; the 10 tokens past them are not
    assert writer.shared.flush()
    assert writer.shared.stats.written_blocks == 3 and writer.shared.save(ids, slots, fps, "s") == 0  # written once

    got = reader.shared.lookup(ids, BLOCK + 3, len(ids))  # past a prefix of 67 tokens, up to the last whole block
    assert got is not None and torch.equal(got, kv[:, BLOCK + 3 : 3 * BLOCK])
    assert reader.shared.stats.restored_tokens == 2 * BLOCK - 3 and reader.shared.stats.hits == 1
    assert reader.shared.lookup(ids, 0, 2 * BLOCK + 5) is not None  # a limit inside a block stops before it
    assert reader.shared.stats.restored_tokens == 2 * BLOCK - 3 + 2 * BLOCK
    other = [ids[0] + 1, *ids[1:]]
    assert reader.shared.lookup(other, 0, len(other)) is None and reader.shared.stats.misses == 1


def test_lost_host_copy_stops_the_write_before_its_block(mooncake):
    writer = _tier(mooncake, b"test-lost-copy")
    ids = torch.randint(0, 50_000, (3 * BLOCK,)).tolist()
    slots = torch.arange(1, len(ids) + 1)
    _written(writer, slots)
    writer.rows.release(torch.tensor([0]), slots[BLOCK + 5 : BLOCK + 9])  # on neither tier
    assert writer.shared.save(ids, slots, prefix_fingerprints(ids), "s") == 1
    assert writer.shared.flush() and writer.shared.stats.written_blocks == 1


def test_store_down_is_a_miss_and_a_counted_failure(mooncake):
    seed = b"test-store-down"
    writer, reader = _tier(mooncake, seed), _tier(mooncake, seed)
    ids = torch.randint(0, 50_000, (2 * BLOCK,)).tolist()
    slots = torch.arange(1, len(ids) + 1)
    _written(writer, slots)
    assert writer.shared.save(ids, slots, prefix_fingerprints(ids), "s") == 2 and writer.shared.flush()
    mooncake.stop()
    try:
        assert reader.shared.lookup(ids, 0, len(ids)) is None
        assert (reader.shared.stats.failures, reader.shared.stats.misses) == (1, 0)
    finally:
        mooncake.start()


def test_read_only_worker_writes_nothing(mooncake):
    tier = _tier(mooncake, b"test-read-only", write_back=False)
    ids = torch.randint(0, 50_000, (2 * BLOCK,)).tolist()
    slots = torch.arange(1, len(ids) + 1)
    _written(tier, slots)
    assert tier.shared.save(ids, slots, prefix_fingerprints(ids), "s") == 0

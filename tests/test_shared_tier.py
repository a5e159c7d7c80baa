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


def _tier(mooncake, seed: bytes, write_back: bool = True, queue_bytes: int = 64 << 20) -> KvTier:
    tier = KvTier.build(LAYERS, UNITS_PER_LAYER, SLOTS, LAYERS * UNITS_PER_LAYER * SLOTS, heads=HEADS, dim=DIM,
                        dtype=torch.float32, device="cpu", host_budget=64 << 20)
    tier.shared = SharedTier(open_store(mooncake.url), open_store(mooncake.url), seed, tier.rows, tier.host,
                             timeout_s=5.0, queue_bytes=queue_bytes, write_back=write_back)
    return tier


def _written(tier: KvTier, slots: torch.Tensor) -> torch.Tensor:
    """Every unit of ``slots`` gets random KV in rows of its own; returns it ``[units, n, 2, heads, dim]``."""
    kv = torch.randn(tier.rows.num_units, slots.numel(), 2, HEADS // UNITS_PER_LAYER, DIM)
    tier.ledger.owe_slots(slots)
    assert tier.fill_slots(slots, kv)
    return kv


def _written_pair(mooncake, seed: bytes, blocks: int) -> tuple[KvTier, KvTier, list[int], torch.Tensor]:
    """A writer and a reader on one store, and ``blocks`` blocks of random tokens whose KV the writer holds."""
    writer, reader = _tier(mooncake, seed), _tier(mooncake, seed)
    ids = torch.randint(0, 50_000, (blocks * BLOCK,)).tolist()
    slots = torch.arange(1, len(ids) + 1)
    _written(writer, slots)
    return writer, reader, ids, slots


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
    assert writer.host.save(writer.host.new_entry(), "s", [1], middle, fps[4 : 2 * BLOCK], writer.rows.get(at)) == 1
    writer.rows.release(torch.tensor([1]), middle)
    reloads = writer.host.stats.reloaded_bytes
    assert writer.shared.save(ids, slots, fps, "lora-a|") == 3  # three whole blocks; the 10 tokens past them are not
    assert writer.shared.flush()
    assert writer.shared.stats.written_blocks == 3 and writer.shared.save(ids, slots, fps, "lora-a|") == 0  # once
    assert writer.host.stats.reloaded_bytes == reloads  # reading the host copies for the store is no reload

    got = reader.shared.lookup(ids, BLOCK + 3, len(ids), "lora-a|")  # past 67 tokens, to the last whole block
    assert got is not None and torch.equal(got, kv[:, BLOCK + 3 : 3 * BLOCK])
    assert torch.equal(reader.shared.lookup(ids, 0, 2 * BLOCK + 5, "lora-a|"), kv[:, : 2 * BLOCK])  # whole blocks
    assert reader.shared.stats.misses == 0
    other = [ids[0] + 1, *ids[1:]]
    assert reader.shared.lookup(other, 0, len(other), "lora-a|") is None  # another first token: every key differs
    assert reader.shared.lookup(ids, 0, len(ids), "lora-b|") is None  # another adapter (SGLang's extra key)
    assert reader.shared.stats.misses == 2 and reader.shared.stats.failures == 0
    reader.shared.restored(got)  # what the caller counts once the KV is in rows
    assert (reader.shared.stats.hits, reader.shared.stats.restored_tokens) == (1, 2 * BLOCK - 3)


def test_a_value_of_another_size_is_refused(mooncake):
    seed = b"test-wrong-size"
    writer, reader, ids, slots = _written_pair(mooncake, seed, 2)
    first, _ = block_keys(seed, ids, 2)
    planted = bytes(writer.shared.block_bytes - 4)  # too short for a block
    assert writer.shared.writes.put_many([first], [planted]) == [True]
    assert writer.shared.save(ids, slots, prefix_fingerprints(ids)) == 2 and writer.shared.flush()
    assert reader.shared.lookup(ids, 0, len(ids)) is None  # the first block is refused, so nothing is
    assert (reader.shared.stats.failures, reader.shared.stats.misses) == (1, 0)


def test_lost_host_copy_stops_the_write_before_its_block(mooncake):
    writer = _tier(mooncake, b"test-lost-copy")
    ids = torch.randint(0, 50_000, (3 * BLOCK,)).tolist()
    slots = torch.arange(1, len(ids) + 1)
    _written(writer, slots)
    writer.rows.release(torch.tensor([0]), slots[BLOCK + 5 : BLOCK + 9])  # on neither tier
    assert writer.shared.save(ids, slots, prefix_fingerprints(ids)) == 1
    assert writer.shared.flush() and writer.shared.stats.written_blocks == 1


def test_store_down_is_a_miss_and_a_counted_failure(mooncake):
    writer, reader, ids, slots = _written_pair(mooncake, b"test-store-down", 2)
    assert writer.shared.save(ids, slots, prefix_fingerprints(ids)) == 2 and writer.shared.flush()
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
    assert tier.shared.save(ids, slots, prefix_fingerprints(ids)) == 0
    assert tier.shared.lookup(ids, 0, len(ids)) is None and tier.shared.stats.misses == 1


def test_a_full_queue_drops_what_it_cannot_take(mooncake):
    tier = _tier(mooncake, b"test-queue", queue_bytes=0)
    one = tier.shared.block_bytes
    tier.shared.queue_bytes = one  # room for one block
    ids = torch.randint(0, 50_000, (3 * BLOCK,)).tolist()
    slots = torch.arange(1, len(ids) + 1)
    _written(tier, slots)
    assert tier.shared.save(ids, slots, prefix_fingerprints(ids)) == 1 and tier.shared.stats.write_dropped == 2
    assert tier.shared.flush() and tier.shared.stats.written_blocks == 1
    assert tier.shared.save(ids, slots, prefix_fingerprints(ids)) == 1  # a later turn writes the next one

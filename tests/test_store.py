"""The shared store (``offload/store.py``, ``offload/mooncake.py``) against a real Mooncake master and store service
on loopback (``slkv_sglang/tools/local_mooncake.py``): round trips, a value outliving the client that wrote it,
failures counted and bounded in time while the master hangs or is down, recovery after its restart, URLs refused at
start-up."""

from __future__ import annotations

import os
import time

import pytest

from offload.store import open_store, parse_store_url

from slkv_sglang.tools.local_mooncake import LocalMooncake

MB = 1 << 20
TIMEOUT_S = 1.0  # LocalMooncake's timeout_ms
RETRY_S = 0.5  # its retry_ms


@pytest.fixture
def store(mooncake):
    with open_store(mooncake.url) as store:
        yield store


def _keys(name: str, n: int) -> list[str]:
    return [f"{name}-{os.getpid()}-{time.monotonic_ns()}-{i}" for i in range(n)]


def _eventually_stored(store, deadline_s: float) -> float:
    """Seconds until a put succeeds again."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if store.put_many(_keys("probe", 1), [b"x"]) == [True]:
            return time.monotonic() - start
        time.sleep(0.2)
    pytest.fail(f"the store did not store again within {deadline_s} s")


def test_round_trips_of_batches(store):
    # 80 MB in 1 MB values and a few odd sizes: more than the 64 MB transfer buffer, so more than one transfer
    values = [os.urandom(MB) for _ in range(80)] + [os.urandom(n) for n in (1, 4097, 3 * MB + 5)]
    keys = _keys("round", len(values))
    assert store.put_many(keys, values) == [True] * len(values)
    assert store.put_many(keys[:1], [values[0]]) == [True]  # present already: stored, the same content
    missing = _keys("missing", 2)
    assert store.get_many(keys + missing) == values + [None, None]
    assert store.exists_many([missing[0], keys[5], missing[1]]) == [False, True, False]
    view = memoryview(bytearray(values[-1]))[5:MB]  # a caller's buffer, not bytes
    assert store.put_many(keys[-1:], [view]) == [True]  # the key holds values[-1] already
    stats = store.stats
    total = sum(map(len, values))
    assert (stats.puts, stats.put_bytes) == (len(values) + 2, total + MB + view.nbytes)
    assert (stats.gets, stats.hits, stats.misses, stats.get_bytes) == (len(values) + 2, len(values), 2, total)
    assert stats.failures == 0 and stats.put_seconds > 0 and stats.get_seconds > 0

    unread = _keys("unread", 3)
    assert store.put_many(unread, [b"a", b"b", b"c"]) == [True] * 3
    store.remove_many(unread[:2] + missing[:1])  # an absent key is no failure
    assert store.exists_many(unread) == [False, False, True]
    assert store.get_many(unread) == [None, None, b"c"]
    assert store.stats.failures == 0

    with pytest.raises(ValueError, match="2 keys but 1 values"):
        store.put_many(_keys("uneven", 2), [b"x"])
    with pytest.raises(ValueError, match="empty value"):
        store.put_many(_keys("empty", 1), [b""])


def test_batches_of_kv_blocks_past_the_transfer_buffer(store):
    """Values of a shared-tier block's size (SmolLM2-135M in float32: 64 tokens x 30 layers x 3 KV heads x 2 x 64
    x 4 bytes) whose sum is past the 64 MB transfer buffer: every one stored and read back (a 4K-token history)."""
    values = [os.urandom(2_949_120) for _ in range(64)]
    keys = _keys("blocks", len(values))
    assert store.put_many(keys, values) == [True] * len(values)
    assert store.get_many(keys) == values
    assert store.stats.failures == 0


def test_a_value_larger_than_the_transfer_buffer_is_a_counted_failure(store):
    keys = _keys("large", 2)
    assert store.put_many(keys, [os.urandom(65 * MB), b"small"]) == [False, True]
    assert store.stats.failures == 1
    assert store.get_many(keys) == [None, b"small"]
    assert store.stats.failures == 1 and store.stats.misses == 1


def test_a_value_outlives_the_client_that_stored_it(mooncake):
    """A worker's client lends the store no memory (segment_mb=0): its values live in the store service."""
    keys, values = _keys("outlive", 4), [os.urandom(2 * MB) for _ in range(4)]
    with open_store(mooncake.url) as writer:
        assert writer.put_many(keys, values) == [True] * 4
    with open_store(mooncake.url) as reader:
        assert reader.get_many(keys) == values


def test_a_hung_master_fails_calls_within_the_timeout(mooncake, store):
    keys, value = _keys("hung", 1), os.urandom(MB)
    assert store.put_many(keys, [value]) == [True]
    mooncake.pause()
    try:
        start = time.monotonic()
        assert store.put_many(_keys("hung", 1), [value]) == [False]
        first = time.monotonic() - start
        start = time.monotonic()
        assert store.get_many(keys) == [None]  # within retry_ms: not asked
        assert store.exists_many(keys) == [False]
        store.remove_many(keys)
        rest = time.monotonic() - start
    finally:
        mooncake.resume()
    print(f"hung master: the first failed put took {first:.2f} s (timeout {TIMEOUT_S} s), the next three "
          f"{rest * 1000:.1f} ms")
    assert TIMEOUT_S * 0.9 < first < TIMEOUT_S + 1.5
    assert rest < 0.1
    assert store.stats.failures == 4 and store.stats.misses == 0
    _eventually_stored(store, 10)
    assert store.get_many(keys) == [value]


def test_a_stopped_master_fails_calls_and_the_store_recovers_after_its_restart(mooncake, store):
    before = _keys("before", 1)
    assert store.put_many(before, [b"forgotten"]) == [True]
    mooncake.stop()
    try:
        start = time.monotonic()
        assert store.put_many(_keys("stopped", 2), [b"a", b"b"]) == [False, False]
        first = time.monotonic() - start
        start = time.monotonic()
        assert store.get_many(before) == [None]
        rest = time.monotonic() - start
    finally:
        mooncake.start()
    print(f"stopped master: the first failed put took {first:.2f} s, the next call {rest * 1000:.1f} ms")
    assert first < 6  # a refused connection: the client's pool retries ~4.3 s whatever the timeouts
    assert rest < 0.1
    assert store.stats.failures == 3
    recovered = _eventually_stored(store, 15)
    print(f"stored again {recovered:.2f} s after the store service mounted its memory again")
    keys, values = _keys("after", 3), [os.urandom(MB) for _ in range(3)]
    assert store.put_many(keys, values) == [True] * 3
    assert store.get_many(keys + before) == values + [None]  # the restarted master forgot the older value
    assert store.stats.failures == 3


@pytest.mark.parametrize("url, named", [
    ("redis://127.0.0.1:6379", "unknown scheme 'redis'"),
    ("mooncake://", "no master host"),
    ("mooncake://127.0.0.1:port", "master port"),
    ("mooncake://127.0.0.1:70000", "master port"),
    ("mooncake://127.0.0.1:50051/store", "only mooncake://MASTER_HOST:MASTER_PORT"),
    ("mooncake://127.0.0.1:50051?segment=64", "unknown parameter(s) ['segment']"),
    ("mooncake://127.0.0.1:50051?buffer_mb=0", "buffer_mb must be an integer >= 1, got '0'"),
    ("mooncake://127.0.0.1:50051?timeout_ms=1.5", "timeout_ms must be an integer >= 1"),
    ("mooncake://127.0.0.1:50051?segment_mb=-1", "segment_mb must be an integer >= 0"),
    ("mooncake://127.0.0.1:50051?metadata=etcd://x:2379", "metadata must be an http:// URL"),
    ("mooncake://127.0.0.1:50051?local=", "local must name"),
    ("mooncake://127.0.0.1:50051?buffer_mb=8&buffer_mb=16", "given twice"),
    ("mooncake://127.0.0.1:50051?buffer_mb", "name=value"),
])
def test_bad_urls_are_refused_naming_the_part(url, named):
    with pytest.raises(ValueError, match="store URL") as refused:
        open_store(url)
    assert named in str(refused.value)


def test_url_defaults_and_an_unreachable_master():
    config = parse_store_url("mooncake://10.0.0.7")
    assert (config.master, config.metadata, config.segment_mb, config.buffer_mb, config.local) == (
        "10.0.0.7:50051", "http://10.0.0.7:8080/metadata", 0, 64, "127.0.0.1")
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="master 127.0.0.1:1 unreachable"):
        open_store("mooncake://127.0.0.1:1")
    assert time.monotonic() - start < 1

"""``slkv bench-shared``: the next turn after a worker switch, its history restored from the shared tier against
recomputed, and the shared tier's bandwidth against a plain put/get of the same bytes. Prints figures, no pass/fail.

One engine with ``--slkv-offload --slkv-shared-store`` on a Mooncake Store of its own on loopback (a master and a
store service, ``tools/local_mooncake.py``). The switch happens on that engine: ``flush_cache`` empties its device
and host tiers, as a worker that never saw the session has them, while the store keeps what the first turn wrote
back. Each session's second turn (one new token: its time is the time to first token) runs twice: restored from
the store, then, the cache flushed and the store emptied again, recomputed from the tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from typing import Any

from ..config import SlkvConfig
from ..kv.shared import BLOCK
from .bench import QUESTION, greedy, timed
from .corpus import follow_up_ids, prompt_ids
from .local_mooncake import LocalMooncake

FOLLOW_UP = "And which function is the longest?"


def _state(engine: Any) -> dict[str, Any]:
    (state,) = engine.loop.run_until_complete(engine.tokenizer_manager.get_internal_state())
    return state["slkv"]


def written_back(engine: Any, timeout_s: float = 120.0) -> None:
    """Until the engine's write-back queue is empty (the first turn's KV is in the store)."""
    deadline = time.monotonic() + timeout_s
    while _state(engine)["shared_queued_bytes"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the write-back queue did not drain")
        time.sleep(0.05)


def switch_ttft(engine: Any, store: LocalMooncake, tokenizer: Any, tokens: int, sessions: int) -> dict[str, Any]:
    """Median seconds of a second turn restored from the store and recomputed, over ``sessions`` sessions; the
    prompt tokens each found cached; the engine's shared-tier counters after the run."""
    restored, recomputed, cached = [], [], []
    follow = follow_up_ids(tokenizer, FOLLOW_UP)
    last: dict[str, Any] = {}
    for i in range(sessions):
        ids = prompt_ids(tokenizer, tokens, seed=700 + i, question=QUESTION)
        _, first = timed(engine, ids, greedy(8, session=f"switch{i}"))
        turn2 = ids + first["output_ids"] + follow
        written_back(engine)
        engine.flush_cache()  # a worker that never saw the session
        secs, out = timed(engine, turn2, greedy(1, session=f"switch{i}"))
        restored.append(secs)
        cached.append(out["meta_info"]["cached_tokens"])
        last = out["meta_info"]["slkv"]["kv"]
        engine.flush_cache()
        store.clear()
        secs, out = timed(engine, turn2, greedy(1, session=f"switch{i}"))
        recomputed.append(secs)
        engine.flush_cache()
    return {"prompt": len(turn2), "restored": statistics.median(restored),
            "recomputed": statistics.median(recomputed), "cached": cached, "kv": last}


def plain_bandwidth(store: LocalMooncake, block_bytes: int, blocks: int, repeats: int) -> tuple[float, float]:
    """Median seconds of a plain put and get of ``blocks`` values of ``block_bytes`` through a client of the same
    store (what the shared tier moves for ``blocks`` blocks, without its gather, keys and row placement)."""
    from offload.store import open_store

    client = open_store(store.url)
    try:
        value = bytes(block_bytes)
        puts, gets = [], []
        for r in range(repeats):
            keys = [f"bench-plain-{r}-{b}" for b in range(blocks)]
            t0 = time.perf_counter()
            assert all(client.put_many(keys, [value] * blocks))
            puts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert all(v is not None for v in client.get_many(keys))
            gets.append(time.perf_counter() - t0)
        return statistics.median(puts), statistics.median(gets)
    finally:
        client.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="slkv bench-shared", description=__doc__)
    p.add_argument("--tokens", type=int, default=4096, help="history length (default 4096)")
    p.add_argument("--sessions", type=int, default=3, help="sessions measured (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="plain put/get repeats (default 5)")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from ..model import ensure_bundled_model
    from ..runtime import make_engine, shutdown_engine

    path = ensure_bundled_model()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    store = LocalMooncake(segment_mb=2048)
    config = replace(SlkvConfig.from_env(), enabled=True, offload=True, shared_store=store.url)
    engine = make_engine(path, slkv=config, max_total_tokens=4 * args.tokens)
    try:
        got = switch_ttft(engine, store, tokenizer, args.tokens, args.sessions)
        kv = got["kv"]
        block_bytes = kv["shared_restored_bytes"] // max(1, kv["shared_restored_tokens"]) * BLOCK
        blocks = got["prompt"] // BLOCK
        put_s, get_s = plain_bandwidth(store, block_bytes, blocks, args.repeats)
    finally:
        shutdown_engine(engine)
        store.close()
    nbytes = blocks * block_bytes
    print(f"second turn after a worker switch, {got['prompt']}-token prompt, median of {args.sessions} sessions:")
    print(f"  restored from the shared tier {got['restored'] * 1e3:8.1f} ms  (cached tokens {got['cached']})")
    print(f"  recomputed                    {got['recomputed'] * 1e3:8.1f} ms")
    print(f"  restored / recomputed         {got['restored'] / got['recomputed']:8.2f}")
    restore = kv["shared_restored_bytes"] / kv["shared_restore_seconds"]
    write = kv["shared_written_bytes"] / kv["shared_write_seconds"] if kv["shared_write_seconds"] else float("nan")
    print(f"shared tier over the run: restored {kv['shared_restored_bytes'] / 2**20:.0f} MiB at "
          f"{restore / 2**30:.2f} GiB/s, written {kv['shared_written_bytes'] / 2**20:.0f} MiB at "
          f"{write / 2**30:.2f} GiB/s")
    print(f"plain put/get of {blocks} values of {block_bytes / 2**20:.1f} MiB ({nbytes / 2**20:.0f} MiB), median of "
          f"{args.repeats}: put {nbytes / put_s / 2**30:.2f} GiB/s, get {nbytes / get_s / 2**30:.2f} GiB/s")
    print(f"  shared-tier restore / plain get: {restore / (nbytes / get_s):.2f}")
    return 0

"""``slkv bench-memory``: device KV per session and next-turn latency with ``--slkv-offload``, on one engine.

Prints figures, no pass/fail:

* device KV per 4K-token session, SimLayerKV with offload vs full KV, measured from the rows the engine's
  pool holds for each session after its first turn, and the number of such sessions a fixed device pool
  holds: as arithmetic (the pool's bytes / bytes per session), and as measured through SGLang's admission and
  radix cache (sessions run back to back, then how many still find their whole history cached);
* time to first token of turn 2 three ways: lazy layers' KV reloaded from the host (offload), the whole
  history recomputed (radix cache flushed between the turns), and everything resident (SimLayerKV off);
* the host tier's bandwidth: what the engine measured for its offloads and reloads over the run, and the
  arena against a plain tensor copy of the same bytes (``slkv_sglang.tools.bench_offload``) at this run's KV shapes.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from typing import Any

import torch

from .bench_offload import bandwidth, report

from .bench import QUESTION, greedy, timed
from ..config import SlkvConfig
from .corpus import prompt_ids

FOLLOW_UP = "And which function is the longest?"
# The request's KV report (``KvTier.report``) fields the host tier's offloads and reloads are timed in
TRANSFER_COUNTERS = (("host_saved_bytes", "host_save_seconds"), ("host_reloaded_bytes", "host_reload_seconds"))


def _generate(engine: Any, ids: list[int], n: int, **slkv: Any) -> tuple[float, dict[str, Any]]:
    return timed(engine, ids, greedy(n, **slkv))


def cached_sessions(engine: Any, tokenizer: Any, n: int, tokens: int, follow: list[int], last: int,
                    **slkv: Any) -> int:
    """First turns of ``n`` sessions back to back, then their second turns newest first: how many found
    their whole history still cached (counting stops at the first that did not)."""
    engine.flush_cache()
    histories = []
    for i in range(n):
        ids = prompt_ids(tokenizer, tokens, seed=400 + i, question=QUESTION)
        _, first = _generate(engine, ids, 8, session=f"fit{i}", **slkv)
        histories.append((i, len(ids), ids + first["output_ids"] + follow))
    kept = 0
    for i, prompt_len, turn2 in reversed(histories):
        _, out = _generate(engine, turn2, 1, session=f"fit{i}", **slkv)
        if out["meta_info"]["cached_tokens"] < prompt_len - last:
            break
        kept += 1
    return kept


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="slkv bench-memory", description=__doc__)
    p.add_argument("--tokens", type=int, default=4096, help="session length (default 4096)")
    p.add_argument("--sessions", type=int, default=3, help="sessions measured (default 3)")
    p.add_argument("--threshold", type=float, default=None, help="SimLayerKV threshold (default: config)")
    p.add_argument("--pool-tokens", type=int, default=16384,
                   help="device KV bytes, in full-KV tokens (SGLang's --max-total-tokens; default 16384)")
    p.add_argument("--overcommit", type=float, default=2.0, help="--slkv-overcommit (default 2)")
    p.add_argument("--fit-sessions", type=int, default=6, help="sessions run back to back (default 6; 0 skips)")
    args = p.parse_args(argv)

    from transformers import AutoConfig, AutoTokenizer

    from ..model import ensure_bundled_model
    from .corpus import follow_up_ids
    from ..runtime import make_engine, shutdown_engine

    config = SlkvConfig.from_env()
    config = replace(config, enabled=True, offload=True, threshold=args.threshold or config.threshold,
                     overcommit=args.overcommit)
    path = ensure_bundled_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoConfig.from_pretrained(path)
    kv_shape = (model.num_key_value_heads, model.hidden_size // model.num_attention_heads)
    follow = follow_up_ids(tokenizer, FOLLOW_UP)
    engine = make_engine(path, slkv=config, chunked_prefill_size=1024, max_total_tokens=args.pool_tokens)
    try:
        kept, lazy, ttft = [], [], {"reload": [], "recompute": [], "resident": []}
        for n in range(args.sessions):
            ids = prompt_ids(tokenizer, args.tokens, seed=300 + n, question=QUESTION)
            _, first = _generate(engine, ids, 8, session=f"s{n}")
            kv = first["meta_info"]["slkv"]["kv"]
            kept.append(sum(map(sum, kv["device_tokens"])))  # tokens kept, summed over (layer, KV head)
            lazy.append(len(first["meta_info"]["slkv"]["lazy_heads"]))
            turn2 = ids + first["output_ids"] + follow
            seconds, second = _generate(engine, turn2, 1, session=f"s{n}")
            ttft["reload"].append(seconds)
            transfers = second["meta_info"]["slkv"]["kv"]
            engine.flush_cache()
            ttft["recompute"].append(_generate(engine, turn2, 1, session=f"r{n}")[0])
            engine.flush_cache()
            _generate(engine, ids, 8, enabled=False)
            ttft["resident"].append(_generate(engine, turn2, 1, enabled=False)[0])
            engine.flush_cache()
        pool_bytes, head_bytes = kv["rows"] * kv["row_bytes"], kv["head_bytes"]
        layers, heads_per_row = len(kv["device_tokens"]), kv["row_bytes"] // head_bytes
        fit = {name: cached_sessions(engine, tokenizer, args.fit_sessions, args.tokens, follow, config.last, **slkv)
               for name, slkv in (("full", {"enabled": False}), ("simlayerkv", {}))} if args.fit_sessions else {}
    finally:
        shutdown_engine(engine)
    heads, dim = kv_shape
    full = args.tokens * layers * heads * head_bytes
    slkv = statistics.mean(kept) * head_bytes
    print(f"SimLayerKV {config}")
    print(f"device KV per {args.tokens}-token session after turn 1 ({args.sessions} sessions; a device row holds "
          f"{heads_per_row} KV head(s) of one layer and token):")
    print(f"  full KV     {full / 2**20:7.1f} MiB")
    print(f"  SimLayerKV  {slkv / 2**20:7.1f} MiB   ({full / slkv:.2f}x less; {statistics.mean(lazy):.1f} lazy KV heads "
          f"of {layers * heads})")
    print(f"sessions a pool of {kv['rows']} rows ({pool_bytes / 2**30:.2f} GiB) holds: "
          f"full {pool_bytes // full}, SimLayerKV {int(pool_bytes // slkv)} (bytes / bytes per session)")
    if fit:
        print(f"  measured, {args.fit_sessions} sessions back to back, overcommit {args.overcommit}: whole history "
              f"still cached at turn 2 for full {fit['full']}, SimLayerKV {fit['simlayerkv']}")
    print("time to first token of turn 2 (median):")
    for name, values in ttft.items():
        print(f"  {name:<10} {statistics.median(values):6.2f} s")
    print(f"  reload / recompute: {statistics.median(ttft['reload']) / statistics.median(ttft['recompute']):.2f}")
    print("host tier, as the engine measured it over the run:")
    for way, (bytes_key, seconds_key) in zip(("offload", "reload"), TRANSFER_COUNTERS):
        moved, secs = transfers[bytes_key], transfers[seconds_key]
        print(f"  {way:<8} {moved / 2**20:8.1f} MiB in {secs:6.3f} s  {moved / max(secs, 1e-9) / 2**30:6.2f} GiB/s")
    units_lazy = max(1, round(statistics.mean(lazy) / heads_per_row))  # rows are released per unit
    nbytes, figures = bandwidth(args.tokens, config.sink + config.recent, units_lazy, heads_per_row, dim, repeats=21,
                                device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                                per_layer=heads // heads_per_row)
    print(f"host tier vs a plain copy of one session's offload ({units_lazy} lazy units of {heads_per_row} KV "
          f"head(s), {nbytes / 2**20:.1f} MiB):")
    report(nbytes, figures)
    return 0

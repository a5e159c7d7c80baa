"""``slkv bench-serve``: multi-turn chat served under a fixed device KV budget, configurations back to back.

N concurrent sessions (closed loop: a session sends its next turn when its reply ends; optionally Poisson
session starts) each chat over a long document (``serve_workload``). Every configuration gets the same device
KV bytes (``--pool-tokens`` full-KV tokens), the same sessions and the same seed, one after the other for each
N of the sweep:

* ``sglang``: plain SGLang, the plugin off for every request;
* ``simlayerkv``: SimLayerKV restricting lazy layers' reads, memory unchanged (same engine as ``sglang``);
* ``offload-full``: the ``--slkv-offload`` engine with SimLayerKV off per request: full KV in its row pool. A
  control: on CPU that engine's prefill attends for the new tokens only, while SGLang's torch_native extend
  pads the query to the whole history, so it separates the backend's speed from the memory SimLayerKV frees;
* ``simlayerkv-offload``: ``--slkv-offload``, the same bytes as the others, its token slots sized by the plugin;
  ``--overcommit F ...`` adds ``simlayerkv-offload@F`` (``--slkv-overcommit F``) for each F, each its own engine;
* ``hicache``: SGLang's hierarchical cache, CUDA only (``--hicache``).

The needle planted in each first turn is asked for by its last, so quality is judged in the same run.
``--fillers text random`` plays the sweep twice, on stdlib documents and on random tokens (whose laziness
differs), and prints the two side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..config import SlkvConfig
from .serve_report import engine_totals, figures, plots, saturation, table
from .serve_workload import FILLERS, STATS, Session, Workload, build_sessions


@dataclass(frozen=True)
class Configuration:
    name: str
    engine: str  # plain | offload | hicache
    slkv: dict[str, Any]  # per-request custom_params.slkv


CONFIGURATIONS = [Configuration("sglang", "plain", {"enabled": False}), Configuration("simlayerkv", "plain", {}),
                  Configuration("offload-full", "offload", {"enabled": False}),
                  Configuration("simlayerkv-offload", "offload", {}),
                  Configuration("hicache", "hicache", {"enabled": False})]
AUTO = "simlayerkv-offload"  # the offload engine whose slots the plugin sizes (no --slkv-overcommit)


def with_overcommits(chosen: list[Configuration], overcommits: list[float]) -> list[Configuration]:
    """``chosen`` and, for each operator's factor F, ``simlayerkv-offload@F`` on an engine of its own."""
    return chosen + [Configuration(f"{AUTO}@{f:g}", f"offload@{f:g}", {}) for f in overcommits]
NO_HICACHE = "hicache: not run (SGLang's hierarchical cache needs CUDA; run with --hicache on a GPU machine)"


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module's description as written, and every option's default."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slkv bench-serve", description=__doc__, formatter_class=_Help)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 3, 4], help="concurrent sessions swept")
    p.add_argument("--turns", type=int, default=3, help="turns per session, the last asking for the needle (>= 2)")
    p.add_argument("--doc-tokens", type=int, default=2048, help="first turn: document + needle + question")
    p.add_argument("--pool-tokens", type=int, default=6144,
                   help="device KV bytes of every configuration, in full-KV tokens (SGLang's --max-total-tokens)")
    p.add_argument("--overcommit", type=float, nargs="*", default=[],
                   help="also run simlayerkv-offload@F with --slkv-overcommit F, for each F")
    p.add_argument("--fillers", nargs="+", choices=FILLERS, default=["text"],
                   help="what documents and pasted turns are made of: stdlib source, or random tokens")
    p.add_argument("--stats", choices=sorted(STATS), default="lmsys", help="chat statistics the lengths follow")
    p.add_argument("--reply-scale", type=float, default=0.125, help="reply lengths times this (CPU decode is slow)")
    p.add_argument("--reply-cap", type=int, default=64, help="longest reply, tokens (needle answers: 24)")
    p.add_argument("--rate", type=float, default=None, help="Poisson session starts per second (default: all at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=1024, help="chunked prefill size")
    p.add_argument("--configs", nargs="+", default=[c.name for c in CONFIGURATIONS if c.engine != "hicache"],
                   choices=[c.name for c in CONFIGURATIONS if c.engine != "hicache"], help="configurations run")
    p.add_argument("--hicache", action="store_true", help="also run SGLang's hierarchical cache (CUDA only)")
    p.add_argument("--threshold", type=float, default=None, help="SimLayerKV threshold (default: config)")
    p.add_argument("--out", type=Path, default=None, help="write every figure and turn record as JSON here")
    p.add_argument("--plots", type=Path, default=Path("docs/img"), help="folder for the two PNGs")
    p.add_argument("--no-progress", action="store_true")
    return p


def _engines(names: set[str], path: Path, base: SlkvConfig, args: argparse.Namespace) -> dict[str, Any]:
    """One engine per kind needed, each with ``--pool-tokens`` full-KV tokens' bytes of device KV (overcommit
    gives an offload engine more token slots, not more bytes: its rows hold those bytes)."""
    from ..runtime import make_engine

    kinds = {"plain": replace(base, enabled=True, offload=False, overcommit=0.0),
             "offload": replace(base, enabled=True, offload=True, overcommit=0.0),
             "hicache": replace(base, enabled=False, offload=False, overcommit=0.0),
             **{f"offload@{f:g}": replace(base, enabled=True, offload=True, overcommit=f) for f in args.overcommit}}
    extra = {"hicache": {"enable_hierarchical_cache": True}}
    return {kind: make_engine(path, slkv=cfg, chunked_prefill_size=args.chunk, max_total_tokens=args.pool_tokens,
                              **extra.get(kind, {}))
            for kind, cfg in kinds.items() if kind in names}


def _progress(total: int, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="turns", unit="turn", file=sys.stderr, disable=quiet)


def sweep(engines: dict[str, Any], chosen: list[Configuration], sessions: list[Session], counts: list[int],
          last_window: int, on_turn: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """For each session count, every configuration in turn on a flushed cache; a run's figures and records.

    Configurations alternate within each count, so drift on a shared machine hits all of them alike."""
    from .serve_driver import run_sessions

    counters: dict[str, dict[str, int]] = {kind: {} for kind in engines}  # engine-wide KV-tier counters so far
    runs: list[dict[str, Any]] = []
    for n in counts:
        for c in chosen:
            engine = engines[c.engine]
            engine.flush_cache()
            wall, records = run_sessions(engine, sessions[:n], c.slkv, last_window, on_turn)
            runs.append({"config": c.name, "sessions": n, "figures": figures(wall, records, counters[c.engine]),
                         "records": [asdict(r) for r in records]})
            counters[c.engine] = {k: max(v, counters[c.engine].get(k, 0)) for k, v in engine_totals(records).items()}
    return runs


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.turns < 2:
        raise SystemExit("slkv bench-serve: --turns must be >= 2 (the last turn asks for the needle)")
    from transformers import AutoTokenizer

    from ..model import ensure_bundled_model
    from ..runtime import has_cuda, shutdown_engine

    chosen = [c for c in CONFIGURATIONS if c.name in args.configs or (c.engine == "hicache" and args.hicache)]
    chosen = with_overcommits(chosen, args.overcommit)
    if args.hicache and not has_cuda():
        raise SystemExit(f"slkv bench-serve: --hicache needs CUDA. {NO_HICACHE}")
    not_run = {} if args.hicache else {"hicache": NO_HICACHE}
    base = SlkvConfig.from_env()
    base = replace(base, threshold=args.threshold or base.threshold)
    path = ensure_bundled_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    workloads = [Workload(args.doc_tokens, args.turns, args.stats, args.reply_scale, args.reply_cap, args.rate,
                          args.seed, filler) for filler in args.fillers]
    engines = _engines({c.engine for c in chosen}, path, base, args)
    bar = _progress(sum(args.sessions) * args.turns * len(chosen) * len(workloads), args.no_progress)
    results = []
    try:
        for workload in workloads:
            sessions = build_sessions(tokenizer, max(args.sessions), workload)
            results.append((workload, sweep(engines, chosen, sessions, args.sessions, base.last,
                                            on_turn=lambda: bar.update(1))))
    finally:
        bar.close()
        for engine in engines.values():
            shutdown_engine(engine)
    _report(args, argv, base, results, not_run)
    return 0


def _report(args: argparse.Namespace, argv: list[str], base: SlkvConfig,
            results: list[tuple[Workload, list[dict[str, Any]]]], not_run: dict[str, str]) -> None:
    print(f"slkv bench-serve {' '.join(argv)}")
    print(f"SimLayerKV {base.score}@{base.threshold}, window {base.sink} + {base.recent}, last {base.last}; device KV "
          f"{args.pool_tokens} full-KV tokens for every configuration")
    for workload, runs in results:
        _report_runs(workload, runs)
    print(_sizing(results))
    for line in not_run.values():
        print(line)
    workload, runs = results[0]
    title = (f"{workload.doc_tokens}-token documents, {workload.turns} turns, KV of {args.pool_tokens} tokens")
    for png in plots(runs, args.plots, title):
        print(f"wrote {png}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"argv": argv, "slkv": base.to_env(), "pool_tokens": args.pool_tokens,
                                        "not_run": not_run,
                                        "workloads": [{"workload": asdict(w), "saturation": saturation(runs),
                                                       "runs": runs} for w, runs in results]}, indent=1))
        print(f"wrote {args.out}")


def _report_runs(workload: Workload, runs: list[dict[str, Any]]) -> None:
    baseline = "sglang" if any(r["config"] == "sglang" for r in runs) else runs[0]["config"]
    print(f"\nworkload: {workload}")
    print(table(runs, baseline))
    for name, s in saturation(runs).items():
        print(f"{name}: best turns/s at {s['peak_at_sessions']} sessions; recomputes history from "
              f"{s['memory_bound_from'] or 'no'} sessions")
    control = {r["sessions"]: r["figures"]["turns_per_s"] for r in runs if r["config"] == "offload-full"}
    for r in runs:  # the same engine and backend, SimLayerKV on or off: what the freed memory alone buys
        if r["config"] == AUTO and r["sessions"] in control:
            print(f"{AUTO} / offload-full turns/s at {r['sessions']} sessions: "
                  f"{r['figures']['turns_per_s'] / control[r['sessions']]:.2f}")
    saved = [r["figures"]["kv_saved"] for r in runs if r["figures"].get("kv_saved") is not None]
    if saved:
        mean = sum(saved) / len(saved)
        print(f"device KV saved after a first turn: {100 * mean:.1f}% (overcommit that matches it: "
              f"{1 / (1 - mean):.2f})")


def _sizing(results: list[tuple[Workload, list[dict[str, Any]]]]) -> str:
    """The plugin's slot sizing against the operators' factors, side by side: per workload and session count,
    ``simlayerkv-offload``'s turns/s over the best ``simlayerkv-offload@F``'s, and the history each recomputed (the
    work the memory decides, free of the machine's noise)."""
    lines = ["", "| filler | sessions | simlayerkv-offload turns/s | best @F turns/s (F) | ratio | recomputed tokens: "
             "plugin's / each F |", "|---|---|---|---|---|---|"]
    for workload, runs in results:
        for n in sorted({r["sessions"] for r in runs}):
            auto = next((r for r in runs if r["sessions"] == n and r["config"] == AUTO), None)
            picked = [r for r in runs if r["sessions"] == n and r["config"].startswith(AUTO + "@")]
            if auto is None or not picked:
                continue
            best = max(picked, key=lambda r: r["figures"]["turns_per_s"])
            a, b = auto["figures"]["turns_per_s"], best["figures"]["turns_per_s"]
            each = ", ".join(f"{r['config'].split('@')[1]}: {r['figures']['recomputed_tokens']}" for r in picked)
            lines.append(f"| {workload.filler} | {n} | {a:.3f} | {b:.3f} ({best['config'].split('@')[1]}) | {a / b:.2f} "
                         f"| {auto['figures']['recomputed_tokens']} / {each} |")
    return "\n".join(lines) if len(lines) > 3 else ""

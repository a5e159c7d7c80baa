"""Figures, tables and plots of ``slkv bench-serve`` from its per-turn records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .serve_driver import TurnRecord

HOST_COUNTERS = ("host_saved_bytes", "host_reloaded_bytes", "recomputed_tokens", "restored_rows", "demoted_rows")


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _latency(records: list[TurnRecord]) -> dict[str, float | None]:
    ttft = [r.ttft for r in records]
    itl = [b - a for r in records for a, b in zip(r.token_times, r.token_times[1:])]
    return {"ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "itl_p50": _pct(itl, 50), "itl_p99": _pct(itl, 99)}


def engine_totals(records: list[TurnRecord]) -> dict[str, int]:
    """The engine-wide KV-tier counters after the run (monotonic: the largest value any turn reported)."""
    kvs = [r.slkv["kv"] for r in records if r.slkv.get("kv")]
    return {name: max((kv.get(name, 0) for kv in kvs), default=0) for name in HOST_COUNTERS}


def figures(wall: float, records: list[TurnRecord], before: dict[str, int]) -> dict[str, Any]:
    """One run's figures; ``before``: the engine's counters before the run (they count since start-up)."""
    prompt = sum(r.prompt_tokens for r in records)
    lazy = [len(r.slkv["lazy_layers"]) for r in records if "lazy_layers" in r.slkv]
    last = [r for r in records if r.answered is not None]
    out: dict[str, Any] = {
        "wall_s": wall,
        "turns": len(records),
        "turns_per_s": len(records) / wall,
        "output_tokens_per_s": sum(len(r.token_times) for r in records) / wall,
        **_latency(records),
        "by_turn": {k: _latency([r for r in records if r.turn == k]) for k in sorted({r.turn for r in records})},
        "prompt_tokens": prompt,
        "cached_ratio": sum(r.cached_tokens for r in records) / prompt,
        "recomputed_tokens": sum(r.recomputed_tokens for r in records),
        "needles_checked": len(last),
        "needles_answered": sum(bool(r.answered) for r in last),
        "lazy_layers": float(np.mean(lazy)) if lazy else None,
    }
    kvs = [r.slkv["kv"] for r in records if r.slkv.get("kv")]
    if kvs:
        # device KV a first turn keeps after its decision, against every layer keeping every prompt token
        saved = [1 - _kept(r.slkv["kv"]["device_tokens"]) / r.prompt_tokens
                 for r in records if r.turn == 1 and r.slkv.get("kv")]
        out["kv_saved"] = float(np.mean(saved)) if saved else None
        after = engine_totals(records)
        out["host"] = {"held_peak_bytes": max(kv["host_held_bytes"] for kv in kvs),
                       **{name: after[name] - before.get(name, 0) for name in HOST_COUNTERS}}
    return out


def _kept(device_tokens: list[list[int]]) -> float:
    """Tokens a request keeps on the device, averaged over its (layer, KV head) pairs."""
    return sum(map(sum, device_tokens)) / sum(map(len, device_tokens))


def _s(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def table(runs: list[dict[str, Any]], baseline: str) -> str:
    """Markdown: one row per (sessions, configuration); ``x base``: turns/s over ``baseline``'s at the same N."""
    base = {r["sessions"]: r["figures"]["turns_per_s"] for r in runs if r["config"] == baseline}
    lines = ["| sessions | configuration | turns/s | x base | output tok/s | TTFT p50 / p99 s | ITL p50 / p99 ms "
             "| TTFT p50 / p99 s by turn | cached | recomputed | host peak MiB | needles |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        f = r["figures"]
        ratio = f["turns_per_s"] / base[r["sessions"]] if r["sessions"] in base else None
        by_turn = " · ".join(f"{k}: {_s(v['ttft_p50'], digits=1)}/{_s(v['ttft_p99'], digits=1)}"
                             for k, v in f["by_turn"].items())
        host = _s(f["host"]["held_peak_bytes"], 2**-20, 0) if "host" in f else "–"
        lines.append(
            f"| {r['sessions']} | {r['config']} | {f['turns_per_s']:.3f} | {_s(ratio)} "
            f"| {f['output_tokens_per_s']:.2f} "
            f"| {_s(f['ttft_p50'])} / {_s(f['ttft_p99'])} | {_s(f['itl_p50'], 1e3, 0)} / {_s(f['itl_p99'], 1e3, 0)} "
            f"| {by_turn} | {100 * f['cached_ratio']:.0f}% | {f['recomputed_tokens']} | {host} "
            f"| {f['needles_answered']}/{f['needles_checked']} |")
    return "\n".join(lines)


def saturation(runs: list[dict[str, Any]]) -> dict[str, dict[str, int | None]]:
    """Per configuration: the session count of its best turns/s, and the first count at which it recomputed
    history (its cache no longer held every session: memory-bound)."""
    out: dict[str, dict[str, int | None]] = {}
    for name in dict.fromkeys(r["config"] for r in runs):
        mine = sorted((r for r in runs if r["config"] == name), key=lambda r: r["sessions"])
        best = max(mine, key=lambda r: r["figures"]["turns_per_s"])
        bound = next((r["sessions"] for r in mine if r["figures"]["recomputed_tokens"] > 0), None)
        out[name] = {"peak_at_sessions": best["sessions"], "memory_bound_from": bound}
    return out


def plots(runs: list[dict[str, Any]], folder: Path, title: str) -> list[Path]:
    """Turns/s and TTFT p99 against concurrent sessions, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label, name in (("turns_per_s", "completed turns / s", "serve_throughput.png"),
                             ("ttft_p99", "TTFT p99 (s)", "serve_ttft_p99.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for config in dict.fromkeys(r["config"] for r in runs):
            mine = sorted((r for r in runs if r["config"] == config), key=lambda r: r["sessions"])
            ax.plot([r["sessions"] for r in mine], [r["figures"][key] for r in mine], marker="o", label=config)
        ax.set_xticks(sorted({r["sessions"] for r in runs}))
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written

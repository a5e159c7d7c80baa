"""``slkv calibrate``: a model's SimLayerKV settings, measured on calibration needle prompts, written as a profile.

Sweeps threshold, recent window and granularity (score mode too, if asked) through the real engine on needle
prompts of their own seeds and depths (the evaluator's cases are not among them), and keeps the setting that saves
the most KV while finding every needle full KV finds. Ties go to the higher threshold (fewer lazy layers on prompts
unlike the calibration set). The recent window is engine-wide, so each window value gets its own engine. Writes the
profile (``--slkv-profile`` loads it), the sweep, and the Pareto curve of KV saved against needles kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import GRANULARITIES, SCORE_MODES, SlkvConfig
from .evaluate import MODELS, evaluate, needle_case, settings, summarise
from ..model_layers import ModelLayers
from ..profile import write_profile

# calibration haystacks: seeds and depths apart from the evaluator's (seeds 0.., depths 0.1/0.35/0.6/0.85)
SEED_BASE = 1000
DEPTHS = (0.2, 0.5, 0.75)


def choose(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row that loses no needle full KV finds and saves the most KV (then: the higher threshold)."""
    safe = [r for r in rows if r["family"] == "simlayerkv" and not r["lost_vs_full"]]
    return max(safe, key=lambda r: (round(r["compression"], 6), r["threshold"]), default=None)


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats on both KV saved and needles found."""
    pts = [r for r in rows if r["family"] == "simlayerkv"]
    return sorted((r for r in pts if not any(o["compression"] >= r["compression"] and o["correct"] >= r["correct"]
                                             and (o["compression"], o["correct"]) != (r["compression"], r["correct"])
                                             for o in pts)), key=lambda r: r["compression"])


def plot(rows: list[dict[str, Any]], chosen: dict[str, Any] | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for granularity in dict.fromkeys(r["granularity"] for r in rows if r["family"] == "simlayerkv"):
        mine = [r for r in rows if r["family"] == "simlayerkv" and r["granularity"] == granularity]
        ax.scatter([100 * r["kv_saved"] for r in mine], [r["correct"] for r in mine],
                   marker="o" if granularity == "layer" else "^", label=f"per {granularity}", alpha=0.7)
        for r in mine:
            ax.annotate(f"{r['threshold']}/{r['recent']}", (100 * r["kv_saved"], r["correct"]), fontsize=6)
    front = pareto(rows)
    ax.plot([100 * r["kv_saved"] for r in front], [r["correct"] for r in front], "k--", linewidth=1, label="Pareto")
    full = next(r for r in rows if r["family"] == "full")
    ax.axhline(full["correct"], color="grey", linewidth=1, label="full KV")
    if chosen is not None:
        ax.scatter([100 * chosen["kv_saved"]], [chosen["correct"]], s=160, facecolors="none", edgecolors="red",
                   label="profile")
    ax.set_xlabel("KV saved at the prompt length (%)")
    ax.set_ylabel(f"needles found (of {full['cases']})")
    ax.set_title("calibration: threshold/recent per point")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slkv calibrate", description=__doc__)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--out", type=Path, default=Path("runs/calibrate/profile.json"), help="the profile to write")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--depths", type=float, nargs="+", default=list(DEPTHS))
    parser.add_argument("--seeds", type=int, default=2, help="haystacks per length and depth")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.85, 0.9, 0.95])
    parser.add_argument("--recents", type=int, nargs="+", default=[1020], help="recent windows (one engine each)")
    parser.add_argument("--granularities", nargs="+", choices=GRANULARITIES, default=list(GRANULARITIES))
    parser.add_argument("--scores", nargs="+", choices=SCORE_MODES, default=["kvmin"])
    args = parser.parse_args(argv)

    from transformers import AutoConfig, AutoTokenizer

    from ..runtime import make_engine, shutdown_engine

    ensure_model, answer_prefix = MODELS[args.model]
    path = ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    cases = [needle_case(tokenizer, n, d, SEED_BASE + s, answer_prefix) for n in args.lengths for d in args.depths
             for s in range(args.seeds)]
    text = AutoConfig.from_pretrained(path).get_text_config()
    layers = ModelLayers.from_layer_types(text.num_hidden_layers, getattr(text, "layer_types", None))
    plan = settings(args.scores, args.thresholds, layers.full, args.granularities)
    by_name = {s.name: s for s in plan}
    base = SlkvConfig.from_env()
    rows: list[dict[str, Any]] = []
    for recent in args.recents:
        config = SlkvConfig(enabled=True, recent=recent, sink=base.sink, last=base.last)
        engine = make_engine(path, slkv=config, chunked_prefill_size=8192)
        try:
            anchor = next(s.name for s in plan if s.family == "simlayerkv")
            outcomes = evaluate(engine, cases, plan, anchor)
        finally:
            shutdown_engine(engine)
        for row in summarise(outcomes, cases):
            s = by_name.get(row["setting"])
            if s is None:  # the random-layers control: not a setting to choose
                continue
            rows.append({**row, "family": s.family, "score": s.score, "threshold": s.threshold,
                         "granularity": s.granularity, "recent": recent})
    chosen = choose(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    (args.out.parent / "sweep.json").write_text(json.dumps(rows, indent=1))
    plot(rows, chosen, args.out.with_suffix(".png"))
    print(f"{'setting':<20}{'recent':>7}{'needles':>9}{'lost':>6}{'KV x':>7}{'heads':>7}")
    for r in rows:
        print(f"{r['setting']:<20}{r['recent']:>7}{r['correct']:>4}/{r['cases']:<4}{len(r['lost_vs_full']):>6}"
              f"{r['compression']:>7.2f}{r['lazy_heads']:>7.1f}")
    if chosen is None:
        print("no setting kept every needle full KV found: no profile written")
        return 1
    profile = {"threshold": chosen["threshold"], "score": chosen["score"], "granularity": chosen["granularity"],
               "recent": chosen["recent"], "sink": base.sink, "last": base.last}
    measured = {k: chosen[k] for k in ("correct", "cases", "compression", "kv_saved", "lazy_layers", "lazy_heads")}
    measured.update(lengths=args.lengths, depths=args.depths, seeds=args.seeds, seed_base=SEED_BASE)
    write_profile(args.out, args.model, profile, measured, rows)
    print(f"profile: {profile} ({chosen['compression']:.2f}x less KV, {chosen['correct']}/{chosen['cases']} needles)"
          f" -> {args.out}; Pareto plot {args.out.with_suffix('.png')}")
    return 0

"""``slkv eval``: needle-in-a-haystack retrieval through the real engine, configurations side by side.

One engine with the plugin serves every configuration through per-request overrides: full KV, SimLayerKV
per score mode, threshold, granularity (whole layers, or single KV heads) and decide mode (at the prompt's last
queries, or at the first decode step), StreamingLLM (every layer lazy) and a random-layers control with the same
number of lazy layers as the default configuration. Haystacks are Python stdlib source (on every machine);
the needle is a sentence with a random 5-digit passcode at a given depth. Quality is judged by retrieval,
the metric that perplexity misses (docs/evaluation.md: continuation NLL barely moves when needles are lost).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import DECIDE_MODES, DEFAULT_SCORE, DEFAULT_THRESHOLD, GRANULARITIES, SlkvConfig
from .corpus import document
from ..layer_map import LayerMap
from .gemma3 import ensure_gemma3_model
from ..model import ensure_bundled_model
from .corpus import chat_input_ids
from ..model_layers import ModelLayers
from ..profile import read_profile

WORDS = ["amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "krypton",
         "lagoon", "marble", "nectar", "onyx", "prairie", "quartz", "russet", "saffron", "tundra", "umber", "violet"]
NEW_TOKENS = 24  # the model spells the 5 digits one token each after repeating the question
# model -> (its HF directory, made once; the answer's primed start). Gemma 3 270M is a base model: asked in its
# turn format it continues the haystack, but it completes "The secret passcode for the" with "<word> vault is
# <digits>" (all 4 cases of a 1K/1.5K trial with full KV).
MODELS: dict[str, tuple[Callable[[], Path], str]] = {
    "smollm2": (ensure_bundled_model, ""),
    "gemma3-270m": (ensure_gemma3_model, "The secret passcode for the"),
}


@dataclass
class Case:
    name: str
    length: int
    depth: float
    input_ids: list[int]
    answer: str
    needle_at: int  # token index where the needle starts
    question: str = ""  # the question whose answer is the passcode


@dataclass
class Setting:
    name: str
    family: str  # full | simlayerkv | streaming | random
    overrides: dict[str, Any]
    score: str = ""
    threshold: float = 0.0
    granularity: str = "layer"
    mode: str = "prefill"


@dataclass
class Outcome:
    case: str
    setting: str
    correct: bool
    text: str
    lazy_layers: list[int] = field(default_factory=list)
    lazy_heads: int = 0  # lazy (layer, KV head) pairs
    scores: list[float | None] = field(default_factory=list)  # None in sliding-window layers
    compression: float = 1.0
    ident_fraction: float | None = None


def needle_case(tokenizer: Any, length: int, depth: float, seed: int, answer_prefix: str = "",
                ask: str | None = None, hay: Callable[[int, int], list[int]] | None = None) -> Case:
    """A prompt of exactly ``length`` tokens with the needle starting at ``depth`` of the haystack.

    ``answer_prefix``: the start of the answer, after the chat template's generation prompt, for base models that
    do not answer a question in chat turns but complete a primed answer (passkey-retrieval style).
    ``ask``: what the prompt asks after the haystack instead of the passcode (a chat whose last turn asks for it,
    ``slkv bench-serve``); the passcode question is in ``Case.question`` either way.
    ``hay``: the haystack's ids, given their count and the seed (default: a stdlib document)."""
    rng = random.Random(seed * 1000 + int(depth * 100) + length)
    word, code = rng.choice(WORDS), f"{rng.randrange(10_000, 100_000)}"
    needle = tokenizer(f"\nThe secret passcode for the {word} vault is {code}.\n", add_special_tokens=False)["input_ids"]
    question = f"What is the secret passcode for the {word} vault? Answer with the number only."
    mark = "\x00HAY\x00"
    frame = chat_input_ids(tokenizer, [{"role": "user", "content": f"{mark}\n\n{ask or question}"}])
    mark_ids = tokenizer(mark, add_special_tokens=False)["input_ids"]
    at = next(i for i in range(len(frame)) if frame[i : i + len(mark_ids)] == mark_ids)
    head, tail = frame[:at], frame[at + len(mark_ids) :] + tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
    budget = length - len(head) - len(tail) - len(needle)
    filler = (hay(budget, seed) if hay is not None
              else tokenizer(document(seed, min_chars=budget * 6), add_special_tokens=False)["input_ids"][:budget])
    cut = int(depth * budget)
    ids = head + filler[:cut] + needle + filler[cut:] + tail
    return Case(f"needle-{length}-d{int(depth * 100)}-s{seed}", length, depth, ids, code, len(head) + cut, question)


def settings(scores: list[str], thresholds: list[float], full_layers: Sequence[int],
             granularities: Sequence[str] = ("layer",), modes: Sequence[str] = ("prefill",)) -> list[Setting]:
    """``full_layers``: the model's full-attention layers, all that SimLayerKV (and so StreamingLLM here) trims.
    A setting is named ``<score>@<threshold>``, with ``/head`` for head granularity and ``/decode`` for deciding at
    the first decode step."""
    out = [Setting("full", "full", {"enabled": False})]
    out += [Setting(setting_name(s, t, g, m), "simlayerkv", {"score": s, "threshold": t, "granularity": g, "mode": m},
                    s, t, g, m)
            for m in modes for g in granularities for s in scores for t in thresholds]
    out.append(Setting("streaming", "streaming", {"force_lazy": list(full_layers)}))
    return out


def setting_name(score: str, threshold: float, granularity: str = "layer", mode: str = "prefill") -> str:
    return f"{score}@{threshold}" + ("" if granularity == "layer" else f"/{granularity}") + (
        "" if mode == "prefill" else f"/{mode}")


def _params(overrides: dict[str, Any]) -> dict[str, Any]:
    return {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "custom_params": {"slkv": overrides}}


def _outcome(case: Case, setting: Setting, out: dict[str, Any]) -> Outcome:
    meta = out["meta_info"].get("slkv")
    result = Outcome(case.name, setting.name, case.answer in out["text"], out["text"])
    if meta is not None:
        lm = LayerMap.from_dict(meta)
        result.lazy_layers, result.scores, result.lazy_heads = lm.lazy_layers, list(lm.scores), len(lm.lazy_heads)
        result.compression = lm.compression(len(case.input_ids))
        timing = meta.get("timing") or {}
        if timing.get("prefill_forward_s"):
            result.ident_fraction = timing["identification_s"] / timing["prefill_forward_s"]
    return result


def run_case(engine: Any, case: Case, plan: list[Setting], anchor: str, seed: int) -> list[Outcome]:
    """The anchor setting first on an empty cache (its timing covers the whole prefill), then the others
    batched on the radix cache, then the random control sized like the anchor's decision."""
    engine.flush_cache()
    by_name = {s.name: s for s in plan}
    first = _outcome(case, by_name[anchor], engine.generate(input_ids=case.input_ids, sampling_params=_params(by_name[anchor].overrides)))
    rest = [s for s in plan if s.name != anchor]
    outs = engine.generate(input_ids=[case.input_ids] * len(rest), sampling_params=[_params(s.overrides) for s in rest])
    results = [first] + [_outcome(case, s, o) for s, o in zip(rest, outs)]
    rng = random.Random(seed)
    scored = [layer for layer, score in enumerate(first.scores) if score is not None]  # sliding layers: None
    chosen = sorted(rng.sample(scored, len(first.lazy_layers)))
    control = Setting("random", "random", {"force_lazy": chosen})
    results.append(_outcome(case, control, engine.generate(input_ids=case.input_ids, sampling_params=_params(control.overrides))))
    return results


def evaluate(engine: Any, cases: list[Case], plan: list[Setting], anchor: str, progress: bool = True) -> list[Outcome]:
    from tqdm import tqdm

    outcomes: list[Outcome] = []
    for i, case in enumerate(tqdm(cases, desc="cases", disable=not progress)):
        outcomes += run_case(engine, case, plan, anchor, seed=i)
    return outcomes


def write_report(out: Path, config: SlkvConfig, anchor: str, cases: list[Case], plan: list[Setting],
                 outcomes: list[Outcome]) -> list[dict[str, Any]]:
    rows = summarise(outcomes, cases)
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": asdict(config), "anchor": anchor, "summary": rows,
              "cases": [{k: v for k, v in asdict(c).items() if k != "input_ids"} for c in cases],
              "outcomes": [asdict(o) for o in outcomes]}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    plot(outcomes, rows, plan, out)
    return rows


def summarise(outcomes: list[Outcome], cases: list[Case]) -> list[dict[str, Any]]:
    full_ok = {o.case for o in outcomes if o.setting == "full" and o.correct}
    rows = []
    for name in dict.fromkeys(o.setting for o in outcomes):
        mine = [o for o in outcomes if o.setting == name]
        idents = [o.ident_fraction for o in mine if o.ident_fraction is not None]
        rows.append({
            "setting": name,
            "accuracy": sum(o.correct for o in mine) / len(mine),
            "correct": sum(o.correct for o in mine),
            "cases": len(mine),
            "lost_vs_full": sorted(o.case for o in mine if o.case in full_ok and not o.correct),
            "compression": statistics.mean(o.compression for o in mine),
            "kv_saved": 1 - 1 / statistics.mean(o.compression for o in mine),
            "lazy_layers": statistics.mean(len(o.lazy_layers) for o in mine),
            "lazy_heads": statistics.mean(o.lazy_heads for o in mine),
            "ident_fraction": statistics.mean(idents) if idents else None,
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'setting':<20}{'needles':>9}{'lost':>6}{'KV x':>7}{'saved':>7}{'lazy':>6}{'heads':>7}{'ident':>8}")
    for r in rows:
        ident = f"{100 * r['ident_fraction']:.2f}%" if r["ident_fraction"] is not None else "-"
        print(f"{r['setting']:<20}{r['correct']:>4}/{r['cases']:<4}{len(r['lost_vs_full']):>6}{r['compression']:>7.2f}"
              f"{100 * r['kv_saved']:>6.1f}%{r['lazy_layers']:>6.1f}{r['lazy_heads']:>7.1f}{ident:>8}")


def plot(outcomes: list[Outcome], rows: list[dict[str, Any]], plan: list[Setting], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    modes = sorted({s.score for s in plan if s.family == "simlayerkv"})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        name = next(s.name for s in plan if s.score == mode and s.granularity == "layer" and s.mode == "prefill")
        mine = [o for o in outcomes if o.setting == name]
        grid = np.array([[np.nan if s is None else s for s in o.scores] for o in mine], dtype=float).T
        im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"lazy score ({mode})")
        ax.set_xlabel("case")
        ax.set_ylabel("layer")
        ax.set_xticks(range(len(mine)), [o.case.replace("needle-", "") for o in mine], rotation=90, fontsize=6)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "lazy_scores.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    by_name = {s.name: s for s in plan}
    lines = dict.fromkeys((s.score, s.granularity, s.mode) for s in plan if s.family == "simlayerkv")
    for score, granularity, mode in lines:
        pts = [(100 * r["kv_saved"], 100 * r["accuracy"], by_name[r["setting"]].threshold) for r in rows
               if r["setting"] in by_name
               and (by_name[r["setting"]].score, by_name[r["setting"]].granularity, by_name[r["setting"]].mode)
               == (score, granularity, mode)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ("o-" if granularity == "layer" else "^--"),
                label=f"SimLayerKV {score}" + ("" if granularity == "layer" else f" per {granularity}")
                + ("" if mode == "prefill" else f", {mode}"))
        for x, y, t in pts:
            ax.annotate(f"{t}", (x, y), fontsize=7)
    for r in rows:
        if r["setting"] in ("full", "streaming", "random"):
            ax.plot(100 * r["kv_saved"], 100 * r["accuracy"], "s", label=r["setting"])
    ax.set_xlabel("KV saved at the prompt length (%)")
    ax.set_ylabel("needle accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "kv_vs_accuracy.png", dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slkv eval", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/eval"), help="directory for JSON and PNGs")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.35, 0.6, 0.85])
    parser.add_argument("--seeds", type=int, default=3, help="haystacks per length and depth")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--scores", nargs="+", default=["mean", "kvmin", "headmin"])
    parser.add_argument("--granularities", nargs="+", choices=GRANULARITIES, default=list(GRANULARITIES),
                        help="what is lazy: whole layers, single KV heads (default: both)")
    parser.add_argument("--modes", nargs="+", choices=DECIDE_MODES, default=list(DECIDE_MODES),
                        help="when to decide: at the prompt's last queries, at the first decode step (default: both)")
    parser.add_argument("--recent", type=int, default=None, help="recent window (default: the engine's)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="a profile from `slkv calibrate`: one more setting, `profile`; the engine takes its window")
    parser.add_argument("--quick", action="store_true", help="2 short cases, 1 threshold: a smoke run")
    parser.add_argument("--model", choices=MODELS, default="smollm2",
                        help="the bundled model, or the hybrid Gemma 3 270M (sliding-window layers; a base model, "
                             "so its answer is primed)")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.depths, args.seeds, args.thresholds = [1536], [0.3, 0.7], 1, [DEFAULT_THRESHOLD]

    from transformers import AutoConfig, AutoTokenizer

    from ..runtime import make_engine, shutdown_engine

    base = SlkvConfig.from_env()
    chosen = read_profile(args.profile) if args.profile else {}
    window = {k: chosen.get(k, getattr(base, k)) for k in ("recent", "sink", "last")}
    if args.recent is not None:
        if chosen and args.recent != window["recent"]:
            parser.error(f"--recent {args.recent} differs from the profile's window ({window['recent']})")
        window["recent"] = args.recent
    config = SlkvConfig(enabled=True, **window)
    ensure_model, answer_prefix = MODELS[args.model]
    path = ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    cases = [needle_case(tokenizer, n, d, s, answer_prefix) for n in args.lengths for d in args.depths
             for s in range(args.seeds)]
    text_config = AutoConfig.from_pretrained(path).get_text_config()
    layers = ModelLayers.from_layer_types(text_config.num_hidden_layers, getattr(text_config, "layer_types", None))
    plan = settings(args.scores, args.thresholds, layers.full, args.granularities, args.modes)
    if chosen:
        decision = {k: chosen[k] for k in ("score", "threshold", "granularity", "mode") if k in chosen}
        plan.append(Setting("profile", "simlayerkv", decision, decision.get("score", DEFAULT_SCORE),
                            decision.get("threshold", DEFAULT_THRESHOLD), decision.get("granularity", "layer"),
                            decision.get("mode", "prefill")))
    anchor_score = DEFAULT_SCORE if DEFAULT_SCORE in args.scores else args.scores[0]
    anchor_t = DEFAULT_THRESHOLD if DEFAULT_THRESHOLD in args.thresholds else args.thresholds[0]
    anchor = setting_name(anchor_score, anchor_t, "layer" if "layer" in args.granularities else args.granularities[0],
                          "prefill" if "prefill" in args.modes else args.modes[0])
    engine = make_engine(path, slkv=config, chunked_prefill_size=8192)
    try:
        outcomes = evaluate(engine, cases, plan, anchor)
    finally:
        shutdown_engine(engine)
    rows = write_report(args.out, config, anchor, cases, plan, outcomes)
    print(f"SimLayerKV evaluation: {len(cases)} needle cases, window sink {config.sink} + recent {config.recent}")
    print_table(rows)
    print(f"ident = scoring time / prefill forward time, measured on {anchor} (empty cache); results in {args.out}")
    return 0

"""``slkv bench``: identification overhead and decode step time, SimLayerKV vs full KV, on one engine.

Prints figures (no pass/fail). Identification time is measured inside the scheduler around the scoring
calls and reported per request in ``meta_info["slkv"]["timing"]`` next to the wall time of the forwards
that prefilled the prompt. Decode step time is (t(1 + n tokens) - t(1 token)) / n with the prompt served
from the radix cache, so both configurations pay the same small prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import SlkvConfig
from .corpus import prompt_ids

QUESTION = "Summarise the code above in one sentence."


def greedy(n: int, **slkv: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True}
    if slkv:
        params["custom_params"] = {"slkv": slkv}
    return params


def timed(engine: Any, ids: list[int] | list[list[int]], params: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = engine.generate(input_ids=ids, sampling_params=params)
    return time.perf_counter() - t0, out


def identification(engine: Any, tokenizer: Any, lengths: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for n in lengths:
        fractions, lazy = [], []
        for r in range(repeats):
            engine.flush_cache()
            _, out = timed(engine, prompt_ids(tokenizer, n, seed=100 + r, question=QUESTION), greedy(1))
            meta = out["meta_info"]["slkv"]
            fractions.append(meta["timing"]["identification_s"] / meta["timing"]["prefill_forward_s"])
            lazy.append(len(meta["lazy_layers"]))
        rows.append({"tokens": n, "ident_fraction": statistics.mean(fractions), "lazy_layers": statistics.mean(lazy),
                     "layers": len(meta["lazy"])})
    return rows


def decode_steps(engine: Any, tokenizer: Any, n_prompt: int, n_new: int, batch: int, repeats: int) -> dict[str, Any]:
    """Median over ``repeats`` alternating runs, so drift on a shared machine hits both configurations."""
    prompts = [prompt_ids(tokenizer, n_prompt, seed=200 + b, question=QUESTION) for b in range(batch)]
    engine.flush_cache()
    engine.generate(input_ids=prompts, sampling_params=[greedy(1, enabled=False)] * batch)  # fill the radix cache
    steps: dict[str, list[float]] = {"full": [], "simlayerkv": []}
    lazy: list[int] = []
    for _ in range(repeats):
        for name, slkv in (("full", {"enabled": False}), ("simlayerkv", {})):
            t1, _ = timed(engine, prompts, [greedy(1, **slkv)] * batch)
            tn, out = timed(engine, prompts, [greedy(1 + n_new, **slkv)] * batch)
            steps[name].append((tn - t1) / n_new)
            if name == "simlayerkv":
                lazy += [len(o["meta_info"]["slkv"]["lazy_layers"]) for o in out]
    result: dict[str, Any] = {"prompt_tokens": n_prompt, "new_tokens": n_new, "batch": batch, "repeats": repeats}
    for name, values in steps.items():
        step = statistics.median(values)
        result[name] = {"step_ms": step * 1e3, "tokens_per_s": batch / step, "runs_ms": [v * 1e3 for v in values]}
    result["lazy_layers"] = statistics.mean(lazy)
    result["speedup"] = result["full"]["step_ms"] / result["simlayerkv"]["step_ms"]
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slkv bench", description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096], help="prompt lengths for identification")
    parser.add_argument("--repeats", type=int, default=2, help="prompts per length")
    parser.add_argument("--decode-prompt", type=int, default=4096, help="prompt length for the decode comparison")
    parser.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed")
    parser.add_argument("--decode-repeats", type=int, default=3, help="alternating runs per configuration")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="decode batch sizes")
    parser.add_argument("--threshold", type=float, default=None, help="SimLayerKV threshold (default: config)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from ..model import ensure_bundled_model
    from ..runtime import make_engine, shutdown_engine

    config = SlkvConfig.from_env()
    config = replace(config, enabled=True, threshold=args.threshold or config.threshold)
    path = ensure_bundled_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = make_engine(path, slkv=config, chunked_prefill_size=8192)
    try:
        figures = {
            "config": config.to_env(),
            "identification": identification(engine, tokenizer, args.lengths, args.repeats),
            "decode": [decode_steps(engine, tokenizer, args.decode_prompt, args.decode_tokens, b, args.decode_repeats) for b in args.batch],
        }
    finally:
        shutdown_engine(engine)
    print(f"SimLayerKV {config}")
    print("identification overhead (scoring time / prefill forward time)")
    for row in figures["identification"]:
        print(f"  {row['tokens']:>5} tokens: {100 * row['ident_fraction']:.2f}%  (lazy layers {row['lazy_layers']:.1f}/{row['layers']})")
    layers = figures["identification"][0]["layers"] if figures["identification"] else "?"
    print(f"decode step at {args.decode_prompt} prompt tokens ({args.decode_tokens} steps)")
    for d in figures["decode"]:
        print(
            f"  batch {d['batch']}: full {d['full']['step_ms']:.1f} ms, SimLayerKV {d['simlayerkv']['step_ms']:.1f} ms "
            f"(x{d['speedup']:.2f}; lazy layers {d['lazy_layers']:.1f}/{layers})"
        )
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0

"""The evaluator: needle cases read back from their text, and a small run through the real engine."""

from __future__ import annotations

import json
import re

import pytest

from slkv_sglang.config import SlkvConfig
from slkv_sglang.tools.evaluate import evaluate, needle_case, settings, write_report


def _covering_end(tokenizer, ids: list[int], start: int, text: str) -> int:
    """The smallest ``end`` such that ``ids[start:end]`` decodes to a text containing ``text``."""
    lo, hi = start, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if text in tokenizer.decode(ids[start:mid]) else (mid + 1, hi)
    return lo


def _covering_start(tokenizer, ids: list[int], text: str) -> int:
    """The largest ``start`` such that ``ids[start:]`` decodes to a text containing ``text``."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if text in tokenizer.decode(ids[mid:]) else (lo, mid - 1)
    return lo


@pytest.mark.parametrize("length, depth, seed", [(2048, 0.6, 2), (1536, 0.1, 0), (4096, 0.85, 1)])
def test_needle_sits_at_its_depth(tokenizer, length, depth, seed):
    """Read back from the prompt's text: one needle, whose code is the answer and whose vault the question
    names, starting at ``needle_at`` with ``depth`` of the haystack's tokens before it."""
    case = needle_case(tokenizer, length, depth, seed=seed)
    ids, text = case.input_ids, tokenizer.decode(case.input_ids)
    assert len(ids) == length
    needles = re.findall(r"\nThe secret passcode for the (\w+) vault is (\d{5})\.\n", text)
    assert len(needles) == 1 and needles[0][1] == case.answer
    question = f"\n\nWhat is the secret passcode for the {needles[0][0]} vault? Answer with the number only."
    assert question in text

    header_end = _covering_end(tokenizer, ids, 0, "<|im_start|>user\n")  # the haystack starts here
    assert _covering_start(tokenizer, ids, "\nThe secret passcode") == case.needle_at
    needle_end = _covering_end(tokenizer, ids, case.needle_at, f" vault is {case.answer}.\n")
    question_start = _covering_start(tokenizer, ids, question)
    before, after = case.needle_at - header_end, question_start - needle_end
    assert abs(before / (before + after) - depth) <= 1 / (before + after)


@pytest.mark.engine
def test_small_evaluation_run(slkv_engine, tokenizer, tmp_path):
    cases = [needle_case(tokenizer, 1536, d, seed=0) for d in (0.3, 0.7)]
    plan = settings(["mean", "kvmin"], [0.9], full_layers=range(30), granularities=("layer", "head"))
    outcomes = evaluate(slkv_engine, cases, plan, anchor="kvmin@0.9", progress=False)
    rows = write_report(tmp_path, SlkvConfig(enabled=True), "kvmin@0.9", cases, plan, outcomes)
    by = {r["setting"]: r for r in rows}
    assert set(by) == {"full", "mean@0.9", "kvmin@0.9", "mean@0.9/head", "kvmin@0.9/head", "streaming", "random"}
    assert by["full"]["correct"] >= 1, "full KV should find at least one needle at 1.5K"
    assert by["full"]["compression"] == 1.0 and by["streaming"]["compression"] > by["kvmin@0.9"]["compression"]
    assert by["random"]["lazy_layers"] == by["kvmin@0.9"]["lazy_layers"]
    # per KV head the same kvmin criterion makes at least the lazy layers' heads lazy, so it keeps no more KV
    assert by["kvmin@0.9/head"]["lazy_heads"] >= 3 * by["kvmin@0.9"]["lazy_layers"]
    assert by["kvmin@0.9/head"]["compression"] >= by["kvmin@0.9"]["compression"]
    assert by["kvmin@0.9"]["ident_fraction"] is not None and 0 < by["kvmin@0.9"]["ident_fraction"] < 0.5
    report = json.loads((tmp_path / "results.json").read_text())
    assert len(report["outcomes"]) == len(cases) * (len(plan) + 1)
    assert (tmp_path / "lazy_scores.png").stat().st_size > 0 and (tmp_path / "kv_vs_accuracy.png").stat().st_size > 0

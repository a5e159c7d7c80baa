"""The evaluator: deterministic needle cases, and a small run through the real engine."""

from __future__ import annotations

import json

from slkv_sglang.config import SlkvConfig
from slkv_sglang.evaluate import evaluate, needle_case, settings, write_report


def test_needle_is_where_it_should_be(tokenizer):
    a = needle_case(tokenizer, 2048, 0.6, seed=2)
    assert a.input_ids == needle_case(tokenizer, 2048, 0.6, seed=2).input_ids
    assert len(a.input_ids) == 2048
    assert a.answer in tokenizer.decode(a.input_ids[a.needle_at : a.needle_at + 20])
    shallow = needle_case(tokenizer, 2048, 0.1, seed=2)
    assert shallow.needle_at < a.needle_at < 2048


def test_small_evaluation_run(slkv_engine, tokenizer, tmp_path):
    cases = [needle_case(tokenizer, 1536, d, seed=0) for d in (0.3, 0.7)]
    plan = settings(["mean", "kvmin"], [0.9], full_layers=range(30))
    outcomes = evaluate(slkv_engine, cases, plan, anchor="kvmin@0.9", progress=False)
    rows = write_report(tmp_path, SlkvConfig(enabled=True), "kvmin@0.9", cases, plan, outcomes)
    by = {r["setting"]: r for r in rows}
    assert set(by) == {"full", "mean@0.9", "kvmin@0.9", "streaming", "random"}
    assert by["full"]["correct"] >= 1, "full KV should find at least one needle at 1.5K"
    assert by["full"]["compression"] == 1.0 and by["streaming"]["compression"] > by["kvmin@0.9"]["compression"]
    assert by["random"]["lazy_layers"] == by["kvmin@0.9"]["lazy_layers"]
    assert by["kvmin@0.9"]["ident_fraction"] is not None and 0 < by["kvmin@0.9"]["ident_fraction"] < 0.5
    report = json.loads((tmp_path / "results.json").read_text())
    assert len(report["outcomes"]) == len(cases) * (len(plan) + 1)
    assert (tmp_path / "lazy_scores.png").stat().st_size > 0 and (tmp_path / "kv_vs_accuracy.png").stat().st_size > 0

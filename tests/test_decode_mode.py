"""Deciding at the first decode step (``mode: decode``) in the real SGLang CPU engine, with the checks prefill mode
has (``test_engine.py``): lazy sets and tokens equal the reference's, nothing lazy is plain decode, a batch decides
and decodes as each request alone, and a chunked prompt or a radix hit decides as one prefill.

In decode mode the score is the attention of the first generated token (one query, ``w_last`` = 1) over the whole
sequence, taken at the first decode step; the first token itself comes from the prefill with full KV.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from slkv_sglang.tools.corpus import prompt_ids
from slkv_sglang.layer_map import LayerMap

from .conftest import CHUNK, TEST_SLKV

pytestmark = pytest.mark.engine  # every test here starts an SGLang engine or a server with one

NEW_TOKENS = 8
QUESTION = "Which classes and functions are defined in the code above? Answer briefly."
LENGTHS = [700, CHUNK + 16, 1300, 1600, 2 * CHUNK + 8, 2400]  # two end with a chunk shorter than `last`
DECODE = replace(TEST_SLKV, mode="decode")


def _greedy(**slkv) -> dict:
    return {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True,
            "custom_params": {"slkv": {"mode": "decode", **slkv}}}


def _layer_map(out: dict) -> LayerMap:
    return LayerMap.from_dict(out["meta_info"]["slkv"])


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [prompt_ids(tokenizer, n, seed=200 + i, question=QUESTION) for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def solo_runs(slkv_engine, prompts) -> list[dict]:
    slkv_engine.flush_cache()
    return [slkv_engine.generate(input_ids=ids, sampling_params=_greedy()) for ids in prompts]


def test_decode_mode_lazy_sets_and_tokens_match_reference(solo_runs, prompts, reference):
    total_lazy = 0
    for i, (ids, out) in enumerate(zip(prompts, solo_runs)):
        ref = reference.generate(ids, DECODE, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        got, want = _layer_map(out), ref.layer_map
        assert got.decide_mode == "decode" and got.decided_at == want.decided_at == len(ids) + 1
        for layer, (a, b) in enumerate(zip(got.lazy, want.lazy)):
            if a != b:
                assert abs(want.scores[layer] - DECODE.threshold) < 1e-3, (i, layer, want.scores[layer])
        assert got.scores == pytest.approx(want.scores, abs=2e-4)
        assert out["output_ids"] == ref.output_ids, f"prompt {i} ({len(ids)} tokens)"
        total_lazy += len(got.lazy_layers)
    assert total_lazy >= len(prompts), "too few lazy layers: the comparison would not exercise lazy decode"


def test_decode_mode_nothing_lazy_is_plain_decode(slkv_engine, prompts):
    for ids in prompts[:2]:
        kept = slkv_engine.generate(input_ids=ids, sampling_params=_greedy(threshold=1.5))
        off = slkv_engine.generate(input_ids=ids, sampling_params=_greedy(enabled=False))
        assert _layer_map(kept).lazy_layers == [] and "slkv" not in off["meta_info"]
        assert kept["output_ids"] == off["output_ids"]


def test_decode_mode_batch_equals_alone_and_radix_hit_keeps_the_decision(slkv_engine, prompts, solo_runs):
    """Decode-mode requests beside a prefill-mode one and a plain one, in one batch; then a prompt again, from
    the radix cache (decode mode needs no prefix cap: all of it is served cached but the last token)."""
    chosen = [prompts[i] for i in (0, 1, 2, 3)]
    settings = [{}, {"threshold": 0.8, "score": "mean"}, {"mode": "prefill"}, {"enabled": False}]
    slkv_engine.flush_cache()
    alone = [slkv_engine.generate(input_ids=ids, sampling_params=_greedy(**s)) for ids, s in zip(chosen, settings)]
    slkv_engine.flush_cache()
    together = slkv_engine.generate(input_ids=chosen, sampling_params=[_greedy(**s) for s in settings])
    assert [_layer_map(o).decide_mode for o in alone[:3]] == ["decode", "decode", "prefill"]
    for a, b in zip(alone, together):
        assert b["output_ids"] == a["output_ids"]
        if "slkv" in a["meta_info"]:
            assert _layer_map(b).lazy == _layer_map(a).lazy
    slkv_engine.generate(input_ids=prompts[4], sampling_params=_greedy())
    again = slkv_engine.generate(input_ids=prompts[4], sampling_params=_greedy())
    assert again["meta_info"]["cached_tokens"] == len(prompts[4]) - 1
    assert _layer_map(again).lazy == _layer_map(solo_runs[4]).lazy
    assert _layer_map(again).scores == pytest.approx(_layer_map(solo_runs[4]).scores, abs=1e-5)
    assert again["output_ids"] == solo_runs[4]["output_ids"]

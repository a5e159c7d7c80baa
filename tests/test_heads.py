"""Head granularity (``granularity: head``) in the real SGLang CPU engine, against the reference model.

Each (layer, KV head) is lazy or not on its own; decode reads sink + recent in lazy heads and everything in the
others. The reference (``slkv_sglang/tools/reference.py``) masks the middle keys of lazy heads' query heads; the engine
splits a partly lazy layer's heads into two attention calls: tokens agreeing is the check that both read the same
KV. Prompts are 0.6-2.2K tokens (long enough to trim with the suite's 4 + 256 window, short enough that ten
reference runs stay cheap); one ends with a chunk shorter than ``last`` (carried queries).
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from slkv_sglang.tools.corpus import prompt_ids
from slkv_sglang.layer_map import LayerMap

from .conftest import CHUNK, TEST_SLKV

pytestmark = pytest.mark.engine  # every test here starts an SGLang engine or a server with one

NEW_TOKENS = 8
QUESTION = "Which classes and functions are defined in the code above? Answer briefly."
LENGTHS = [600, 800, 950, CHUNK + 16, 1200, 1350, 1500, 1700, 1900, 2200]
NUM_LAYERS, KV_HEADS = 30, 3
FORCED = (0, 2, 3, 5, 7, 9)  # the prompts with forced head sets: short to long, one with a chunk of 16 tokens


def _greedy(**slkv) -> dict:
    return {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True, "custom_params": {"slkv": slkv}}


def _layer_map(out: dict) -> LayerMap:
    return LayerMap.from_dict(out["meta_info"]["slkv"])


def _forced_heads(seed: int) -> list[tuple[int, int]]:
    """About a third of the (layer, KV head) pairs, with at least one layer lazy in every head and one in one
    head only: both decode paths (the whole-layer window and the heads split in two) run."""
    rng = random.Random(seed)
    pairs = {(layer, head) for layer in range(NUM_LAYERS) for head in range(KV_HEADS) if rng.random() < 0.33}
    whole, partial = rng.sample(range(NUM_LAYERS), 2)
    pairs |= {(whole, h) for h in range(KV_HEADS)}
    pairs = {p for p in pairs if p[0] != partial} | {(partial, rng.randrange(KV_HEADS))}
    return sorted(pairs)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [prompt_ids(tokenizer, n, seed=100 + i, question=QUESTION) for i, n in enumerate(LENGTHS)]


def test_forced_heads_and_head_scores_match_reference(slkv_engine, prompts, reference):
    """Six of the prompts, each with its own forced head set: the engine decodes the reference's tokens, and the
    per-KV-head scores it decides on (computed whether or not a set is forced) equal the reference's, so the rule
    both share (``scoring.decide``) takes the same per-head decisions."""
    slkv_engine.flush_cache()
    for i in FORCED:
        ids, forced = prompts[i], _forced_heads(i)
        out = slkv_engine.generate(input_ids=ids, sampling_params=_greedy(force_lazy_heads=forced))
        ref = reference.generate(ids, replace(TEST_SLKV, granularity="head"), max_new_tokens=NEW_TOKENS,
                                 ignore_eos=True, force_lazy_heads=forced)
        got, want = _layer_map(out), ref.layer_map
        assert got.lazy_heads == want.lazy_heads == forced
        assert 0 < len(got.lazy_layers) < len({layer for layer, _ in forced})  # whole and partly lazy layers
        for row_got, row_want in zip(got.head_scores, want.head_scores):
            assert row_got == pytest.approx(row_want, abs=2e-4)
        assert out["output_ids"] == ref.output_ids, f"prompt {i} ({len(ids)} tokens)"


def test_scored_heads_decide_and_decode_as_the_reference(slkv_engine, prompts, reference):
    """Without forcing: the heads over the threshold are lazy, more of them than in whole lazy layers, and the
    tokens equal the reference's. A head whose score sits on the threshold may go either way."""
    config = replace(TEST_SLKV, granularity="head")
    for i in (2, 9):
        out = slkv_engine.generate(input_ids=prompts[i], sampling_params=_greedy(granularity="head"))
        ref = reference.generate(prompts[i], config, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        got, want = _layer_map(out), ref.layer_map
        assert got.granularity == "head"
        for layer in range(NUM_LAYERS):
            for head in range(KV_HEADS):
                if got.heads[layer][head] != want.heads[layer][head]:
                    assert abs(want.head_scores[layer][head] - config.threshold) < 1e-3, (i, layer, head)
        assert len(got.lazy_heads) > KV_HEADS * len(got.lazy_layers), "no layer lazy in only some heads"
        assert out["output_ids"] == ref.output_ids


def test_every_head_kept_is_plain_decode(slkv_engine, prompts):
    """Head granularity with nothing lazy (threshold above 1) decodes what SimLayerKV off decodes; that one equals
    the plugin-off engine (``test_engine.test_nothing_lazy_is_plain_sglang``)."""
    for ids in prompts[:2]:
        kept = slkv_engine.generate(input_ids=ids, sampling_params=_greedy(granularity="head", threshold=1.5))
        off = slkv_engine.generate(input_ids=ids, sampling_params=_greedy(enabled=False))
        assert _layer_map(kept).lazy_heads == []
        assert kept["output_ids"] == off["output_ids"]


def test_batch_with_head_sets_equals_alone_and_radix_hit_keeps_them(slkv_engine, prompts):
    """Three requests with different head sets (and one with layer granularity) in one batch each get their solo
    tokens and heads; a repeat of a prompt served from the radix cache decides the same heads."""
    chosen = [prompts[i] for i in (0, 3, 5, 7)]
    settings = [{"force_lazy_heads": _forced_heads(50)}, {"granularity": "head"},
                {"granularity": "head", "threshold": 0.8}, {"threshold": 0.8}]
    slkv_engine.flush_cache()
    alone = [slkv_engine.generate(input_ids=ids, sampling_params=_greedy(**s)) for ids, s in zip(chosen, settings)]
    slkv_engine.flush_cache()
    together = slkv_engine.generate(input_ids=chosen, sampling_params=[_greedy(**s) for s in settings])
    assert len({tuple(_layer_map(o).lazy_heads) for o in alone}) == 4
    for a, b in zip(alone, together):
        assert b["output_ids"] == a["output_ids"]
        assert _layer_map(b).heads == _layer_map(a).heads
    again = slkv_engine.generate(input_ids=chosen[1], sampling_params=_greedy(**settings[1]))
    assert again["meta_info"]["cached_tokens"] == len(chosen[1]) - TEST_SLKV.last
    assert _layer_map(again).heads == _layer_map(together[1]).heads
    assert again["output_ids"] == together[1]["output_ids"]

"""--slkv-offload in the real CPU engine: lazy layers give device KV back, later turns restore it, tokens
stay those of the same engine config without offload. Freed rows are poisoned with NaN throughout, so a
read of freed KV would show up as different tokens."""

from __future__ import annotations

from dataclasses import replace

import pytest

from slkv_sglang.corpus import prompt_ids
from slkv_sglang.layer_map import LayerMap
from slkv_sglang.runtime import shutdown_engine

from .conftest import TEST_SLKV, start_engine

QUESTIONS = [
    "Which classes are defined in the code above? Answer briefly.",
    "Which of them is the largest?",
    "Name one function of that class.",
    "What does that function return?",
]
NEW_TOKENS = 10
# Host budget: one ~3K-token conversation fits (its lazy layers' middle KV is ~40-60 MB in float32), a second
# one does not, so the second is served by the refusal path (its lazy layers keep their device KV).
BUDGET = 80 << 20


def _turn_suffix(tokenizer, question: str) -> list[int]:
    return tokenizer(f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                     add_special_tokens=False)["input_ids"]


def _conversation(engine, tokenizer, seed: int, session: str) -> list[dict]:
    """Four greedy turns over one ~3K-token document; each turn resends the whole history (radix reuse)."""
    ids = prompt_ids(tokenizer, 3000, seed=seed, question=QUESTIONS[0])
    outs = []
    for turn, question in enumerate(QUESTIONS):
        if turn:
            ids = ids + outs[-1]["output_ids"] + _turn_suffix(tokenizer, question)
        params = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True,
                  "custom_params": {"slkv": {"session": session}}}
        outs.append(engine.generate(input_ids=ids, sampling_params=params))
    return outs


@pytest.fixture(scope="module")
def offload_engine(model_path):
    engine = start_engine(replace(TEST_SLKV, offload=True, offload_budget=BUDGET, poison=True), model_path)
    yield engine
    shutdown_engine(engine)


@pytest.fixture(scope="module")
def baseline(slkv_engine, tokenizer) -> list[list[dict]]:
    """The same conversations on the session's engine: same SimLayerKV settings, offload off."""
    slkv_engine.flush_cache()
    return [_conversation(slkv_engine, tokenizer, seed, f"base-{seed}") for seed in (11, 12)]


def test_four_turns_with_offload_match_without(offload_engine, baseline, tokenizer):
    first = _conversation(offload_engine, tokenizer, 11, "conv-a")
    released_before = 0
    for turn, (got, want) in enumerate(zip(first, baseline[0])):
        lm = LayerMap.from_dict(got["meta_info"]["slkv"])
        assert lm.lazy == LayerMap.from_dict(want["meta_info"]["slkv"]).lazy, f"turn {turn + 1}"
        assert got["output_ids"] == want["output_ids"], f"turn {turn + 1}"
        kv = got["meta_info"]["slkv"]["kv"]
        seq = lm.decided_at
        assert lm.lazy_layers, "the test needs lazy layers"
        for layer in range(lm.num_layers):  # device KV follows the layer map
            if lm.lazy[layer]:
                assert kv["device_tokens"][layer] == TEST_SLKV.sink + TEST_SLKV.recent
            else:
                assert kv["device_tokens"][layer] == seq
        assert kv["released_rows"] > released_before
        released_before = kv["released_rows"]
        if turn:  # the prefix's offloaded KV came back for the prefill, and only new tokens were copied out
            assert kv["restored_rows"] > 0
            assert kv["host_offloaded_bytes"] < (turn + 1) * kv["host_host_bytes"]
    assert kv["host_evictions"] == 0 and kv["host_host_bytes"] <= BUDGET


def test_budget_too_small_keeps_kv_on_device(offload_engine, baseline, tokenizer):
    """The second conversation does not fit the host budget: its lazy layers keep their device KV (counted),
    and its tokens are unchanged."""
    second = _conversation(offload_engine, tokenizer, 12, "conv-b")
    for turn, (got, want) in enumerate(zip(second, baseline[1])):
        assert got["output_ids"] == want["output_ids"], f"turn {turn + 1}"
    kv = second[-1]["meta_info"]["slkv"]["kv"]
    assert kv["kept_rows"] > 0 and kv["host_refused"] > 0
    assert kv["host_host_bytes"] <= BUDGET


def test_budget_changes_at_run_time(offload_engine, tokenizer):
    """The chat API's PUT /admin/offload reaches the engine as a request override: a larger budget takes the
    offload the full budget refused above."""
    ids = prompt_ids(tokenizer, 2000, seed=13, question=QUESTIONS[0])
    params = {"temperature": 0.0, "max_new_tokens": 2, "ignore_eos": True,
              "custom_params": {"slkv": {"session": "conv-c", "offload_budget": 4 * BUDGET}}}
    kv = offload_engine.generate(input_ids=ids, sampling_params=params)["meta_info"]["slkv"]["kv"]
    assert kv["host_budget"] == 4 * BUDGET
    assert kv["session_host_bytes"] > 0 and BUDGET < kv["host_host_bytes"] <= 4 * BUDGET

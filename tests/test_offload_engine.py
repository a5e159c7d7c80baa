"""--slkv-offload in the real CPU engine: lazy layers give device KV back, later turns restore it, tokens
stay those of the same engine config without offload. Freed rows are poisoned with NaN throughout, so a
read of freed KV would show up as different tokens."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import pytest

from api.app import kv_location
from slkv_sglang.tools.corpus import document, prompt_ids
from slkv_sglang.layer_map import LayerMap
from slkv_sglang.tools.corpus import follow_up_ids
from slkv_sglang.runtime import shutdown_engine

from .conftest import OFFLOAD_BUDGET, TEST_SLKV, page_size, recomputed_tokens, set_host_budget
from .servers import engine_start_lock

pytestmark = pytest.mark.engine  # every test here starts an SGLang engine or a server with one

QUESTIONS = [
    "Which classes are defined in the code above? Answer briefly.",
    "Which of them is the largest?",
    "Name one function of that class.",
    "What does that function return?",
    "Is any of it tested?",
]
NEW_TOKENS = 10
# Host budgets: one ~3K-token conversation fits BUDGET (its lazy layers' middle KV is ~40-60 MB in float32);
# TINY is less than one lazy KV head's middle (~1.4 MB: the engine keeps a row per KV head), so with it every offload
# is refused.
BUDGET = OFFLOAD_BUDGET  # the session's offload engine's (conftest)
TINY = 1 << 20


def _conversation(engine, tokenizer, seed: int, session: str, turns: int, budget: int | None = None,
                  history: tuple[dict, ...] = ()) -> list[dict]:
    """Greedy turns over one ~3K-token document; each turn resends the whole history (radix reuse). With
    ``history`` (earlier turns' outputs) the conversation resumes after them; returns the new turns."""
    if budget is not None:  # an admin's change (PUT /admin/offload), before the turns
        assert set_host_budget(engine, budget) == [True]
    return engine.loop.run_until_complete(_turns(engine, tokenizer, seed, session, turns, history))


async def _turns(engine, tokenizer, seed: int, session: str, turns: int, history: tuple[dict, ...] = ()) -> list[dict]:
    ids = prompt_ids(tokenizer, 3000, seed=seed, question=QUESTIONS[0])
    outs = list(history)
    params = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True,
              "custom_params": {"slkv": {"session": session}}}
    for turn in range(turns):
        if turn:
            ids = ids + outs[turn - 1]["output_ids"] + follow_up_ids(tokenizer, QUESTIONS[turn])
        if turn >= len(history):
            outs.append(await engine.async_generate(input_ids=ids, sampling_params=params))
    return outs[len(history) :]


@pytest.fixture(scope="module")
def baseline(slkv_engine, tokenizer) -> Callable[[], list[list[dict]]]:
    """The same conversations on the session's engine: same SimLayerKV settings, offload off.

    Computed in the background: a task on the event loop every engine of this process shares, so it runs (in
    slkv_engine's scheduler, on the other core) whenever a test waits on the offload engine; calling the
    fixture's value waits for what is left of it. A test asks for it after its own offload turns."""
    slkv_engine.flush_cache()

    async def both() -> list[list[dict]]:
        return [await _turns(slkv_engine, tokenizer, 11, "base-a", 5),
                await _turns(slkv_engine, tokenizer, 12, "base-b", 2)]

    task = slkv_engine.loop.create_task(both())
    yield lambda: slkv_engine.loop.run_until_complete(task)
    slkv_engine.loop.run_until_complete(task)  # nothing left running into the next module


def _assert_same(got: list[dict], want: list[dict], first_turn: int = 0) -> None:
    for turn, (g, w) in enumerate(zip(got, want), start=first_turn + 1):
        assert LayerMap.from_dict(g["meta_info"]["slkv"]).lazy == LayerMap.from_dict(w["meta_info"]["slkv"]).lazy, turn
        assert g["output_ids"] == w["output_ids"], f"turn {turn}"


def _assert_device_follows_layer_map(out: dict, hosted: bool) -> None:
    """Lazy KV heads (the engine keeps a row per KV head) keep sink + recent on the device; their middle is on the
    host (``hosted``) or nowhere (freed for recompute), and the chat API's per-head location says which."""
    record = out["meta_info"]["slkv"]
    lm, kv = LayerMap.from_dict(record), record["kv"]
    window = TEST_SLKV.sink + TEST_SLKV.recent
    assert lm.lazy_heads, "the test needs lazy heads"
    where = kv_location(record)
    for layer, heads in enumerate(lm.heads):
        for head, lazy in enumerate(heads):
            assert kv["device_tokens"][layer][head] == (window if lazy else lm.decided_at), (layer, head)
            if lazy:  # (a head lazy in an earlier turn only keeps that turn's host copy: KV never changes)
                assert kv["host_tokens"][layer][head] == (lm.decided_at - window if hosted else 0), (layer, head)
            assert where[layer][head] == ("device" if not lazy else "host" if hosted else "recompute"), (layer, head)


def _fresh(engine, tokenizer, budget: int) -> dict:
    """What each test starts from, whatever ran before it: host budget ``budget``, radix cache and host tier empty.
    Returns the engine's counters as of now: they are cumulative, so a test checks how much they moved."""
    assert set_host_budget(engine, budget) == [True]
    assert engine.flush_cache().success
    short = prompt_ids(tokenizer, 100, seed=5, question=QUESTIONS[0])  # too short to trim: frees and copies nothing
    counters = engine.generate(input_ids=short, sampling_params={"max_new_tokens": 1})["meta_info"]["slkv"]["kv"]
    assert engine.flush_cache().success  # its prefix (the system prompt) is not left for the test to hit
    return counters


def _moved(after: dict, before: dict, key: str) -> int:
    return after[key] - before[key]


def _middles(out: dict) -> int:
    """Rows the request's lazy heads give back: the middle ``[sink, decided_at - recent)`` of each."""
    lm = LayerMap.from_dict(out["meta_info"]["slkv"])
    return len(lm.lazy_heads) * (lm.decided_at - TEST_SLKV.sink - TEST_SLKV.recent)


def _history(out: dict) -> int:
    """Tokens a finished turn leaves cached: its prompt and its output but the last token (no KV yet)."""
    return out["meta_info"]["prompt_tokens"] + len(out["output_ids"]) - 1


def test_four_turns_with_offload_match_without(offload_engine, baseline, tokenizer):
    before = _fresh(offload_engine, tokenizer, BUDGET)
    first = _conversation(offload_engine, tokenizer, 11, "conv-a", 4)
    _assert_same(first, baseline()[0])
    last, given_back = before, 0
    for turn, got in enumerate(first):
        _assert_device_follows_layer_map(got, hosted=True)
        kv = got["meta_info"]["slkv"]["kv"]
        assert _moved(kv, last, "released_rows") == _middles(got)  # each lazy head gives back its middle
        if turn:  # the prefix's offloaded KV came back for the prefill, and only new tokens were copied out
            assert _moved(kv, last, "restored_rows") == given_back  # what the turn before gave back, all of it
            assert _moved(kv, before, "host_saved_bytes") < (turn + 1) * kv["host_held_bytes"]
        last, given_back = kv, _middles(got)
    for counter in ("host_evictions", "lost_rows", "recomputed_tokens"):
        assert _moved(kv, before, counter) == 0, counter
    assert kv["host_held_bytes"] <= BUDGET


def test_budget_too_small_for_one_session_recomputes(offload_engine, baseline, tokenizer):
    """A host budget shrunk at run time (the chat API's PUT /admin/offload) below one lazy layer's middle: the
    host copies held then are evicted, conv-b's lazy layers free their device KV without a host copy, and its
    next turn recomputes the history. Tokens stay those of the engine without offload."""
    _fresh(offload_engine, tokenizer, BUDGET)
    # another session on the host; plain text, so that it shares no prefix (no system prompt) with conv-b
    other = tokenizer(document(13, min_chars=8000), add_special_tokens=False)["input_ids"][:1000]
    hosted = offload_engine.generate(input_ids=other, sampling_params={
        "max_new_tokens": 1, "custom_params": {"slkv": {"session": "other", "force_lazy": list(range(10))}}})
    held = hosted["meta_info"]["slkv"]["kv"]
    assert held["host_bytes"] > TINY
    second = _conversation(offload_engine, tokenizer, 12, "conv-b", 2, budget=TINY)
    _assert_same(second, baseline()[1])
    turn1, turn2 = (out["meta_info"]["slkv"]["kv"] for out in second)
    assert turn1["host_budget"] == TINY and _moved(turn1, held, "host_evictions") == 1  # the other session's entry
    # conv-b's lazy heads give back their middles with no copy: the one save of its decision is refused
    assert _moved(turn1, held, "lost_rows") == _middles(second[0]) and _moved(turn1, held, "host_refused") == 1
    assert turn1["host_bytes"] == 0
    # the second turn's match is cut at the sink (where the lost middles start), and the prefill heals them
    assert _moved(turn2, turn1, "recomputed_tokens") == recomputed_tokens(
        _history(second[0]), second[1]["meta_info"]["prompt_tokens"], TEST_SLKV.sink, page_size(offload_engine))
    assert _moved(turn2, turn1, "healed_rows") == _middles(second[0])
    assert _moved(turn2, turn1, "restored_rows") == 0  # nothing came from the host
    for out in second:
        _assert_device_follows_layer_map(out, hosted=False)
    assert turn2["host_held_bytes"] <= TINY


def test_evicted_session_recomputes_its_next_turn(offload_engine, baseline, tokenizer):
    """conv-a's fourth turn leaves its history cached and its lazy layers' middles on the host only; an admin
    shrinks the budget, which evicts them, and raises it again. The fifth turn cannot reload them: it recomputes,
    gives the tokens it would have given, and its KV goes back to the host."""
    _fresh(offload_engine, tokenizer, BUDGET)
    fourth = _conversation(offload_engine, tokenizer, 11, "conv-a", 4, history=tuple(baseline()[0][:3]))
    _assert_same(fourth, baseline()[0][3:4], first_turn=3)
    _assert_device_follows_layer_map(fourth[0], hosted=True)
    assert set_host_budget(offload_engine, TINY) == [True]
    fifth = _conversation(offload_engine, tokenizer, 11, "conv-a", 5, budget=BUDGET, history=tuple(baseline()[0][:4]))
    _assert_same(fifth, baseline()[0][4:], first_turn=4)
    before, kv = fourth[0]["meta_info"]["slkv"]["kv"], fifth[0]["meta_info"]["slkv"]["kv"]
    assert _moved(kv, before, "host_evictions") == 1  # the fourth turn's entry
    # its lazy heads' middles went with it: the fifth turn's match is cut at the sink
    assert kv["host_budget"] == BUDGET and _moved(kv, before, "recomputed_tokens") == recomputed_tokens(
        _history(fourth[0]), fifth[0]["meta_info"]["prompt_tokens"], TEST_SLKV.sink, page_size(offload_engine))
    assert _moved(kv, before, "restored_rows") == 0
    assert kv["host_bytes"] > 0 and kv["host_held_bytes"] <= BUDGET
    _assert_device_follows_layer_map(fifth[0], hosted=True)


def test_host_budget_is_an_admin_setting(offload_engine, slkv_engine, tokenizer):
    """The host budget changes through the admin channel only (``slkv_sglang.admin``): a request naming it is
    refused, bad values leave the budget as it was, an engine without a host tier refuses it."""
    ids = prompt_ids(tokenizer, 400, seed=5, question=QUESTIONS[0])
    params = {"temperature": 0.0, "max_new_tokens": 1}

    def budget() -> int:
        return offload_engine.generate(input_ids=ids, sampling_params=params)["meta_info"]["slkv"]["kv"]["host_budget"]

    before = budget()
    with pytest.raises(ValueError, match="custom_params.slkv.offload_budget is not a per-request setting"):
        offload_engine.generate(input_ids=ids, sampling_params={**params, "custom_params": {"slkv": {"offload_budget": 1}}})
    for bad in (-1, True, 1.5, (1 << 50) + 1, 10**30):
        assert set_host_budget(offload_engine, bad) == [False], bad
    assert budget() == before
    assert set_host_budget(slkv_engine, BUDGET) == [False]  # no --slkv-offload: no host tier


# ---- admission counts rows: --slkv-overcommit ------------------------------------------------------------
# KV bytes of 5000 full-KV tokens (90 x 5001 rows of one KV head, 512 bytes each: 230,446,080); with overcommit 2,
# 10,000 token slots, whose index (5 bytes per (unit, slot) and 4 per slot: kv.tier) takes 10,001 x 454 bytes;
# the rest in rows of 512 + 4 bytes (a row's place in the free stack): 437,801 rows
POOL_TOKENS, POOL_ROWS = 5000, 437_801
FORCED = list(range(20))  # 20 of 30 layers lazy: a session keeps 10 x 2K + 20 x 260 rows, not 30 x 2K


@pytest.fixture(scope="module")
def overcommit_engine(model_path):
    from slkv_sglang.runtime import make_engine

    config = replace(TEST_SLKV, offload=True, overcommit=2.0, poison=True)
    with engine_start_lock():
        engine = make_engine(model_path, slkv=config, chunked_prefill_size=1024, max_total_tokens=POOL_TOKENS)
    yield engine
    shutdown_engine(engine)


def test_freed_rows_admit_more_sessions(overcommit_engine, slkv_engine, tokenizer):
    """Three 2K-token sessions need more KV than the pool's bytes hold in full KV. With lazy layers' rows
    freed, admission (which counts rows) keeps all three histories cached: every second turn is a radix hit
    over the whole history, restored from the host, and every token is the engine-without-offload's."""
    sessions = []
    for i in range(3):
        ids = prompt_ids(tokenizer, 2000, seed=21 + i, question=QUESTIONS[0])
        params = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True,
                  "custom_params": {"slkv": {"session": f"oc-{i}", "force_lazy": FORCED}}}
        first = overcommit_engine.generate(input_ids=ids, sampling_params=params)
        sessions.append((ids, first, ids + first["output_ids"] + follow_up_ids(tokenizer, QUESTIONS[1]), params))
    kv = sessions[-1][1]["meta_info"]["slkv"]["kv"]
    units = sum(map(len, kv["device_tokens"]))  # a row per (layer, KV head) and token
    assert units == 90 and kv["rows"] == POOL_ROWS < sum(len(s[0]) for s in sessions) * units  # full KV: no
    slkv_engine.flush_cache()

    async def without_offload() -> list[tuple[dict, dict]]:  # in the background, while the second turns run
        return [(await slkv_engine.async_generate(input_ids=ids, sampling_params=params),
                 await slkv_engine.async_generate(input_ids=ids2, sampling_params=params))
                for ids, _, ids2, params in sessions]

    base = slkv_engine.loop.create_task(without_offload())
    seconds = [overcommit_engine.generate(input_ids=s[2], sampling_params=s[3]) for s in sessions[::-1]][::-1]
    for (ids, first, ids2, _), second in zip(sessions, seconds):
        # the whole history was there: all a radix match can give (the first turn's prompt and output but its last
        # token, capped so that the ``last`` prompt tokens score), nothing cut
        assert second["meta_info"]["cached_tokens"] == min(_history(first), len(ids2) - TEST_SLKV.last)
    assert seconds[0]["meta_info"]["slkv"]["kv"]["restored_rows"] > kv["restored_rows"]
    for (_, first, _, _), second, (want1, want2) in zip(sessions, seconds, slkv_engine.loop.run_until_complete(base)):
        assert first["output_ids"] == want1["output_ids"]
        assert second["output_ids"] == want2["output_ids"]

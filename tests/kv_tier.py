"""The KV tier inside the engine: a differential fuzz test, each recoverable state, and a soak, run on two code paths
(``test_kv_tier.py``: torch_native; ``test_kv_tier_flashinfer.py``: the FlashInfer backend's reads with a torch
stand-in for its kernels). Their bodies and helpers live here; each test module starts its own engines.

The fuzz test runs a seeded random sequence of chat operations on an engine with ``--slkv-offload
--slkv-poison-freed --slkv-overcommit 2`` and a shared tier (``--slkv-shared-store`` on the suite's Mooncake Store) in
a small pool, and compares it token for token with an engine of the same
SimLayerKV settings without offload, given the same per-request decisions (the offload engine's lazy layers,
forced: a layer whose score sits on the threshold may flip between two prefills of the same tokens computed in
other chunks, which is not what this test is about). Both prefill in chunks of ``FUZZ_CHUNK`` tokens, so every
prompt is chunked.

Operations: new conversations, follow-up turns, branches from an earlier turn under the same and under another
session label, regenerations, aborts mid-decode, ``flush_cache``, host budget changes down to zero, batches of
concurrent requests; and store failures at fixed steps (``STORE_EVENTS``: the master stopped, started again,
restarted to drop every value), which draw nothing from the seed's generator, so the operations are the seed's with
or without them. ``SLKV_FUZZ_SEED`` / ``SLKV_FUZZ_OPS`` change the run; a failure prints the seed and the
operations that led to it (the failing conversation's lineage).

The engine without offload answers in the background (``Differ``): its requests wait in a queue and run, a few
at a time, while the offload engine serves the next operations (both engines share one event loop, so every call
that waits on one engine drives the other; on two cores they compute side by side). The offload engine sees
exactly the sequence of operations it saw before; every answer is still compared, only later. A difference
fails the test at the next operation (or at the end), naming the operation and lineage it came from.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field, replace

import pytest

from slkv_sglang.tools.corpus import prompt_ids
from slkv_sglang.layer_map import LayerMap
from slkv_sglang.tools.corpus import follow_up_ids
from slkv_sglang.tools.bench_shared import written_back

from .conftest import TEST_SLKV, page_size, recomputed_tokens, start_engine

SEED = int(os.environ.get("SLKV_FUZZ_SEED", "20261127"))
OPS = int(os.environ.get("SLKV_FUZZ_OPS", "200"))
# The FlashInfer path's fuzz (the same seed's first operations): every path it asserts is taken by then
STANDIN_OPS = int(os.environ.get("SLKV_FUZZ_OPS", "100"))
POOL_TOKENS = 3000  # the offload engine's KV bytes hold 3000 full-KV tokens (6000 slots with overcommit 2)
FUZZ_CHUNK = 256
NEW_TOKENS = 4
# What happens to the shared store at these steps of every 50: ``LocalMooncake`` methods.
STORE_EVENTS = {20: "stop", 30: "start", 45: "clear"}
DOC_TOKENS = [280, 400, 600]  # past sink + recent (260): lazy layers release a middle
QUESTIONS = ["Which classes are defined above?", "Name one function.", "What does it return?", "Is it tested?",
             "Summarise the code in one line.", "Which module is imported first?"]


@dataclass
class Conversation:
    ids: list[int]  # the next prompt
    label: str
    lineage: list[str] = field(default_factory=list)  # the operations that built it


def start_offload_engine(model_path, mooncake, **config):
    """The fuzz engine: ``--slkv-offload --slkv-poison-freed --slkv-overcommit 2``, a shared tier on ``mooncake``, a
    small pool; ``config``: more ``SlkvConfig`` fields."""
    config = replace(TEST_SLKV, offload=True, overcommit=2.0, poison=True, offload_budget=64 << 20,
                     shared_store=mooncake.url, **config)
    return start_engine(config, model_path, chunked_prefill_size=FUZZ_CHUNK, max_total_tokens=POOL_TOKENS)


def start_same_without_offload(model_path):
    """The engine every answer is compared with: SimLayerKV's settings, no offload, the same prefill chunks."""
    return start_engine(TEST_SLKV, model_path, chunked_prefill_size=FUZZ_CHUNK)


def _set_host_budget(engine, nbytes: int) -> None:
    from sglang.srt.managers.io_struct import SetInternalStateReq

    engine.loop.run_until_complete(
        engine.tokenizer_manager.set_internal_state(SetInternalStateReq(server_args={"slkv_host_budget": nbytes})))


def _params(conv: Conversation, new_tokens: int = NEW_TOKENS) -> dict:
    return {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True,
            "custom_params": {"slkv": {"session": conv.label}}}


def _abort_mid_decode(engine, conv: Conversation, rid: str) -> None:
    """Stream a long answer and abort it after a few tokens (its KV is freed mid-decode)."""
    stream = engine.generate(input_ids=conv.ids, sampling_params=_params(conv, 200), stream=True, rid=rid)
    for n, _ in enumerate(stream):
        if n == 2:
            engine.tokenizer_manager.abort_request(rid)
    for _ in stream:
        pass


def _forced(params: dict, got: dict) -> dict:
    """``params`` with the offload engine's decision forced (and no layer lazy by its own score)."""
    lazy = LayerMap.from_dict(got["meta_info"]["slkv"]).lazy_heads
    slkv = {**params["custom_params"]["slkv"], "force_lazy_heads": lazy, "threshold": 2.0}
    return {**params, "custom_params": {"slkv": slkv}}


def _same(got: dict, want: dict) -> str | None:
    if got["output_ids"] != want["output_ids"]:
        return f"tokens {got['output_ids']} != {want['output_ids']}"
    if LayerMap.from_dict(got["meta_info"]["slkv"]).heads != LayerMap.from_dict(want["meta_info"]["slkv"]).heads:
        return "lazy layers differ although forced"
    return None


class Differ:
    """The engine without offload, given the offload engine's prompts and (forced) decisions, in the background.

    ``submit`` queues a comparison and returns at once; a task on the engines' shared event loop runs the queue
    in batches of up to ``BATCH`` requests on ``base``. It makes progress whenever the test waits on the
    offload engine (``generate``, ``flush_cache``, the admin channel: each runs that same loop), so the two
    engines compute side by side. ``check`` fails the test with the first difference found so far; ``finish``
    waits for every queued comparison, then checks. Batching on the reference side does not change what is
    compared: each answer is still the one request's prompt and decision against the offload engine's answer
    (``test_engine.test_batch_equals_alone``: a batch gives each request its solo tokens)."""

    BATCH = 6

    def __init__(self, base):
        self.base, self.loop = base, base.loop
        self.queue: list[tuple[list[int], dict, dict, str]] = []
        self.problems: list[str] = []
        self.compared = 0
        self.task: asyncio.Task | None = None

    def submit(self, ids: list[int], params: dict, got: dict, context: str) -> None:
        self.queue.append((ids, _forced(params, got), got, context))
        if self.task is None or self.task.done():
            if self.task is not None:
                self.task.result()  # an engine error surfaces here
            self.task = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        while self.queue:
            items, self.queue = self.queue[: self.BATCH], self.queue[self.BATCH :]
            want = await self.base.async_generate(input_ids=[i[0] for i in items],
                                                  sampling_params=[i[1] for i in items])
            for (_ids, _params, got, context), w in zip(items, want):
                problem = _same(got, w)
                if problem:
                    self.problems.append(f"{context}: {problem}")
                self.compared += 1

    def check(self) -> None:
        if self.problems:
            pytest.fail(self.problems[0])

    def finish(self) -> int:
        """Wait for every queued comparison (the task drains what is queued while it runs); the number compared."""
        if self.task is not None:
            self.loop.run_until_complete(self.task)  # an engine error surfaces here
        assert not self.queue
        self.check()
        return self.compared


def fuzz(fuzz_engine, same_without_offload, tokenizer, mooncake, ops: int) -> None:
    """``ops`` seeded operations on ``fuzz_engine`` (its first test: the counters it asserts count since its
    start), every answer compared with the engine without offload given the same decisions."""
    rng = random.Random(SEED)
    print(f"\nKV-tier fuzz: seed {SEED}, {ops} operations (SLKV_FUZZ_SEED to replay)")
    convs: list[Conversation] = []
    log: list[str] = []
    differ = Differ(same_without_offload)
    counts = 0
    budget_changes = aborts = answers = 0
    tier: dict = {}

    def run(batch: list[Conversation], op: str) -> None:
        nonlocal answers
        answers += len(batch)
        ids = [c.ids for c in batch]
        params = [_params(c) for c in batch]
        got = fuzz_engine.generate(input_ids=ids, sampling_params=params)
        for conv, one, p, g in zip(batch, ids, params, got):
            conv.lineage.append(op)
            differ.submit(one, p, g, f"seed {SEED}, operation {len(log)} ({op}) on {conv.label}; its lineage "
                                     f"({len(conv.lineage)} operations): {list(conv.lineage)}")
            conv.ids = conv.ids + g["output_ids"]
            tier.update(g["meta_info"]["slkv"]["kv"])

    def add(conv: Conversation) -> None:
        convs.append(conv)
        if len(convs) > 10:
            convs.pop(0)

    for step in range(ops):
        event = STORE_EVENTS.get(step % 50)
        if event is not None:
            getattr(mooncake, event)()
            log.append(f"store_{event}")
            print(f"  {step:>3} store_{event}", flush=True)
        kind = rng.choices(["new", "turn", "branch", "regenerate", "batch", "abort", "flush", "budget"],
                           weights=[2, 8, 3, 2, 3, 1, 1, 2])[0] if convs else "new"
        if kind == "new":
            n = rng.choice(DOC_TOKENS)
            conv = Conversation(prompt_ids(tokenizer, n, seed=rng.randrange(10**6), question=rng.choice(QUESTIONS)),
                                label=f"c{step}")
            add(conv)
            op = f"new({n} tokens)"
            run([conv], op)
        elif kind in ("turn", "regenerate"):
            conv = rng.choice(convs)
            if kind == "turn":
                conv.ids = conv.ids + follow_up_ids(tokenizer, rng.choice(QUESTIONS))
            else:  # the same prompt again: its answer was appended, so drop it and ask again
                conv.ids = conv.ids[:-NEW_TOKENS]
            op = f"{kind}({conv.label})"
            run([conv], op)
        elif kind == "branch":
            parent = rng.choice(convs)
            cut = rng.randrange(len(parent.ids) // 2, len(parent.ids))  # an earlier point of the history
            label = parent.label if rng.random() < 0.5 else f"b{step}"  # same label, or another one
            conv = Conversation(parent.ids[:cut] + follow_up_ids(tokenizer, rng.choice(QUESTIONS)), label,
                                [*parent.lineage, f"branch({parent.label}@{cut} as {label})"])
            add(conv)
            op = f"branch({parent.label}@{cut})"
            run([conv], op)
        elif kind == "batch":
            batch = rng.sample(convs, min(len(convs), rng.randint(2, 4)))
            for conv in batch:
                conv.ids = conv.ids + follow_up_ids(tokenizer, rng.choice(QUESTIONS))
            op = f"batch({[c.label for c in batch]})"
            run(batch, op)
        elif kind == "abort":
            conv = rng.choice(convs)
            op = f"abort({conv.label})"
            _abort_mid_decode(fuzz_engine, conv, f"fuzz-abort-{step}")
            aborts += 1
        elif kind == "flush":
            op = "flush_cache"
            fuzz_engine.flush_cache()
        else:
            nbytes = rng.choice([0, 1 << 20, 8 << 20, 64 << 20])
            op = f"host_budget({nbytes})"
            _set_host_budget(fuzz_engine, nbytes)
            budget_changes += 1
        log.append(op)
        print(f"  {step:>3} {op}", flush=True)
        counts += 1
        differ.check()
    if not mooncake.running:  # a shorter run (SLKV_FUZZ_OPS) may end while it is stopped
        mooncake.start()
    compared = differ.finish()
    print(f"KV-tier fuzz: {counts} operations, {compared} answers compared, {aborts} aborts, "
          f"{budget_changes} budget changes: no difference")
    print("KV-tier counters:", {k: tier[k] for k in ("restored_rows", "recomputed_tokens", "healed_rows", "adopted_rows",
                                                     "demoted_rows", "lost_rows", "host_evictions", "host_shared_tokens",
                                                     "host_mismatches", "row_shortfalls", "failed_requests",
                                                     "shared_written_blocks", "shared_hits", "shared_restored_tokens",
                                                     "shared_misses", "shared_failures", "shared_no_room")})
    assert compared == answers and tier["failed_requests"] == 0  # every answer compared
    # every path this test exists for was taken (docs/memory.md): host copies restored, a cut prefix recomputed and
    # its cached slots healed, a duplicate's rows adopted by the tree's slots, idle cached KV demoted to the host
    # under row pressure, host entries evicted, copies reloaded
    # by a conversation other than the one that saved them, prefixes restored from the shared store (after a
    # flush), store operations failed (the master stopped) and recomputed. (The counters are the engine's since
    # its start: this test is the first of the module's engine.)
    for path in ("restored_rows", "recomputed_tokens", "healed_rows", "adopted_rows", "demoted_rows", "host_evictions",
                 "host_shared_tokens", "shared_hits", "shared_failures"):
        assert tier[path] > 0, f"seed {SEED}, {ops} operations: no operation took the path counted by {path}"
    assert _sizes(fuzz_engine)["slots_miscounted"] == 0  # admission's per-slot row count agrees with the rows


# ---- soak: nothing per request outlives its request -------------------------------------------------------
SOAK_REQUESTS, SOAK_BATCH, SOAK_CONCURRENT = 250, 25, 8


def _sizes(engine) -> dict[str, int]:
    (state,) = engine.loop.run_until_complete(engine.tokenizer_manager.get_internal_state())
    return state["slkv"]


def soak(fuzz_engine, tokenizer, requests: int) -> None:
    """``requests`` short requests (24 per document, sent as three concurrent batches of 8 one after the
    other, plus one aborted mid-decode; every prompt is long enough for lazy layers to release rows): after the first
    50 and at the end, every per-request map of the scheduler is empty when idle, the host tier holds no more
    host entries than the pool can cache, and the scheduler's RSS has not grown but by the pool rows first used
    since (their memory is committed on first use; the radix cache fills the pool as it caches documents) and by
    what the host tier holds more.

    Batches rather than one request at a time: the requests are the same ones (each its own prefill over the
    cached document, its own per-request entries in every map), and each batch still restores the shared middle
    and releases it again; several requests alive at once in the maps is, if anything, the harder case for
    "nothing outlives its request"."""
    fuzz_engine.flush_cache()
    _set_host_budget(fuzz_engine, 64 << 20)
    rng = random.Random(SEED)
    seen: dict[int, dict[str, int]] = {}
    for start in range(0, requests, SOAK_BATCH):
        seed = rng.randrange(10**6)  # a group shares its document: short prefills over a cached prefix
        ids = [prompt_ids(tokenizer, DOC_TOKENS[1], seed=seed, question=f"{QUESTIONS[i % len(QUESTIONS)]} ({i})")
               for i in range(SOAK_BATCH - 1)]
        params = {"temperature": 0.0, "max_new_tokens": 1, "ignore_eos": True}
        for part in range(0, len(ids), SOAK_CONCURRENT):  # each batch restores the shared middle, then releases it
            outs = fuzz_engine.generate(input_ids=ids[part : part + SOAK_CONCURRENT], sampling_params=params)
            assert len(outs) == len(ids[part : part + SOAK_CONCURRENT])
            row_bytes = outs[0]["meta_info"]["slkv"]["kv"]["row_bytes"]
        _abort_mid_decode(fuzz_engine, Conversation(ids[0], "soak"), f"soak-abort-{start}")
        done = start + SOAK_BATCH
        if done in (50, requests):
            seen[done] = _sizes(fuzz_engine)
            print(f"after {done} requests: {seen[done]}")
    first, last = seen[50], seen[requests]
    assert last["host_entries"] > 0  # lazy layers saved copies
    for key in ("tracker_tails", "tracker_awaiting", "tracker_timing", "tracker_running", "outbox", "ledger_promised",
                "ledger_reserved", "slots_miscounted", "planner_heals"):
        assert first[key] == last[key] == 0, key
    # bounded by the cache, not by the requests: an entry lives while a cached slot holds one of its copies, one
    # per decision of a cached history and one per demotion (which moves idle histories whole, at most two each)
    assert last["host_entries"] <= 2 * (POOL_TOKENS * 2 // DOC_TOKENS[1])
    # RSS grows by the pool's rows first used since (the radix cache fills the pool: their pages are committed
    # then, ``DeviceRows.peak``), by the host tier's growth (its blocks are allocated as it fills: up to 60 MB of
    # the 64 MB budget here, bounded above) and by less than 64 MB else
    pool_growth = (last["device_rows_peak"] - first["device_rows_peak"]) * row_bytes
    host_growth = last["host_held_bytes"] - first["host_held_bytes"]
    assert last["rss_bytes"] - first["rss_bytes"] - pool_growth - host_growth < 64 << 20, (first, last, pool_growth)


# ---- recoverable states: each falls back to recomputation, tokens unchanged --------------------------------
def _turns(engine, differ: Differ, tokenizer, seed: int, label: str, turns: int, extra: int = 0,
           history: tuple[dict, ...] = ()) -> list[dict]:
    """A conversation over a 600-token document on ``engine``, each turn queued on ``differ`` to be checked
    against the engine without offload given the same decisions; ``extra`` tokens of document ride along with
    every follow-up (long prefills over a cached prefix). With ``history`` (earlier turns' outputs) the
    conversation resumes after them; returns the new turns."""
    conv = Conversation(prompt_ids(tokenizer, 600, seed=seed, question=QUESTIONS[0]), label)
    outs = list(history)
    for turn in range(turns):
        if turn:
            more = prompt_ids(tokenizer, extra, seed=seed + turn, question=QUESTIONS[turn])[1:] if extra else []
            conv.ids = conv.ids + more + follow_up_ids(tokenizer, QUESTIONS[turn])
        if turn >= len(history):
            got = engine.generate(input_ids=conv.ids, sampling_params=_params(conv))
            differ.submit(conv.ids, _params(conv), got, f"{label}, turn {turn}")
            outs.append(got)
        conv.ids = conv.ids + outs[turn]["output_ids"]
    return outs[len(history) :]


def _history(out: dict) -> int:
    """Tokens a finished turn leaves cached: its prompt and its output but the last token (no KV yet)."""
    return out["meta_info"]["prompt_tokens"] + len(out["output_ids"]) - 1


def _lazy(out: dict) -> set[tuple[int, int]]:
    return set(LayerMap.from_dict(out["meta_info"]["slkv"]).lazy_heads)


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def recoverable_states(engine, same_without_offload, tokenizer, mooncake) -> None:
    """Missing host copies, a gap in them, rows short for a batch of restores, and an abort while a prefill
    restores: every one gives the tokens of the engine without offload, and the counter that says what happened.
    (The engine without offload answers in the background, ``Differ``; every answer is compared by the end.)

    The shared store starts empty: documents whose first source file is the same begin with the same tokens, and a
    prefix an earlier test wrote back would be restored past the radix match that the expected counts start from."""
    differ = Differ(same_without_offload)
    engine.flush_cache()
    written_back(engine)  # nothing an earlier test queued lands in the store after it is emptied
    mooncake.clear()
    _set_host_budget(engine, 64 << 20)
    kv = lambda out: out["meta_info"]["slkv"]["kv"]  # noqa: E731

    page, sink, window = page_size(engine), TEST_SLKV.sink, TEST_SLKV.sink + TEST_SLKV.recent

    # a gap: the host evicts the first turn's copies (the older entry) and keeps the second's
    one, two = _turns(engine, differ, tokenizer, 31, "gap", 2)
    first_map = LayerMap.from_dict(one["meta_info"]["slkv"])
    # the second turn restores what the first turn's lazy heads gave back, their middles, and nothing else
    assert (kv(two)["restored_rows"] - kv(one)["restored_rows"]
            == len(first_map.lazy_heads) * (first_map.decided_at - window))
    assert _lazy(one) & _lazy(two), "a gap needs a head lazy in both turns (its middle starts in the first's copies)"
    _set_host_budget(engine, kv(two)["host_held_bytes"] - kv(one)["host_held_bytes"])
    (three,) = _turns(engine, differ, tokenizer, 31, "gap", 3, history=(one, two))
    # cut before the gap: at the sink, where the middle of a head lazy in both turns starts
    assert (kv(three)["recomputed_tokens"] - kv(two)["recomputed_tokens"]
            == recomputed_tokens(_history(two), three["meta_info"]["prompt_tokens"], sink, page))
    assert kv(three)["host_evictions"] > kv(two)["host_evictions"]

    # missing copies: the budget goes to zero between turns; every host copy goes, the gap's too
    assert _lazy(three), "the test needs lazy heads"
    _set_host_budget(engine, 0)
    four = _turns(engine, differ, tokenizer, 32, "missing", 2)
    # the first turn matches the chat template's head of the gap's conversation, whose copies went: cut at the sink
    head = _common(prompt_ids(tokenizer, 600, seed=32, question=QUESTIONS[0]),
                   prompt_ids(tokenizer, 600, seed=31, question=QUESTIONS[0]))
    assert (kv(four[0])["recomputed_tokens"] - kv(three)["recomputed_tokens"]
            == recomputed_tokens(head, four[0]["meta_info"]["prompt_tokens"], sink, page))
    assert _lazy(four[0]), "the test needs lazy heads"
    assert (kv(four[1])["recomputed_tokens"] - kv(four[0])["recomputed_tokens"]
            == recomputed_tokens(_history(four[0]), four[1]["meta_info"]["prompt_tokens"], sink, page))
    assert kv(four[1])["host_held_bytes"] == 0
    _set_host_budget(engine, 64 << 20)

    # rows short: eight conversations' second turns together need more rows than the pool's spare ones
    first = [_turns(engine, differ, tokenizer, 40 + i, f"short-{i}", 1) for i in range(8)]
    convs = [Conversation(prompt_ids(tokenizer, 600, seed=40 + i, question=QUESTIONS[0]) + out[0]["output_ids"]
                          + follow_up_ids(tokenizer, QUESTIONS[1]), f"short-{i}") for i, out in enumerate(first)]
    # short indeed: in its prefill a request holds every unit of every token (its decision comes after), and the
    # eight together (a token their prompts share counted once) need more rows than the whole pool has
    pool = kv(first[-1][0])
    units = sum(map(len, pool["device_tokens"]))
    tokens = sum(len(c.ids) - max((_common(c.ids, d.ids) for d in convs[:i]), default=0) for i, c in enumerate(convs))
    assert units * tokens > pool["rows"], (units, tokens, pool["rows"])
    got = engine.generate(input_ids=[c.ids for c in convs], sampling_params=[_params(c) for c in convs])
    for c, g in zip(convs, got):
        differ.submit(c.ids, _params(c), g, f"{c.label}, second turn in a batch of 8")
    restored = max(kv(g)["restored_rows"] for g in got) - pool["restored_rows"]
    print("rows short:", {"rows needed": units * tokens, "rows": pool["rows"], "free before": pool["free_rows"],
                          "restored": restored})
    assert restored > 0  # a batch of restores: second turns over histories still cached
    assert max(kv(g)["row_shortfalls"] for g in got) == 0  # admission waited instead

    # an abort while a long prefill over a restored prefix is in its chunks; the same turn afterwards
    _turns(engine, differ, tokenizer, 50, "abort", 1)
    conv = Conversation(prompt_ids(tokenizer, 600, seed=50, question=QUESTIONS[0]), "abort")
    conv.ids = conv.ids + engine.generate(input_ids=conv.ids, sampling_params=_params(conv))["output_ids"]
    conv.ids = conv.ids + prompt_ids(tokenizer, 700, seed=51, question=QUESTIONS[1])[1:]
    stream = engine.generate(input_ids=conv.ids, sampling_params=_params(conv, 50), stream=True, rid="restore-abort")
    engine.tokenizer_manager.abort_request("restore-abort")
    for _ in stream:
        pass
    got = engine.generate(input_ids=conv.ids, sampling_params=_params(conv))
    differ.submit(conv.ids, _params(conv), got, "abort, the turn after the aborted one")
    sizes = _sizes(engine)
    print("recoverable states:", {k: kv(got)[k] for k in ("recomputed_tokens", "restored_rows", "healed_rows",
                                                          "adopted_rows", "host_evictions", "row_shortfalls",
                                                          "failed_requests")}, sizes)
    assert (sizes["ledger_reserved"] == sizes["ledger_promised"] == sizes["tracker_running"] == sizes["slots_miscounted"]
            == sizes["planner_heals"] == 0)
    assert kv(got)["failed_requests"] == 0
    assert differ.finish() == 2 + 1 + 2 + 8 + 8 + 1 + 1  # every answer above, compared


"""The chat API end to end: `slkv serve` (real engine; one server without and one with --slkv-offload) + a real
redis-server that the tests can stop, pause and restart (its own, on a free port: the shared Redis on 6379 is
never touched)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest
import redis

from api.store import LOCK_TTL_MS
from slkv_sglang.tools.corpus import document

from .conftest import CHUNK, TEST_SLKV
from .servers import engine_start_lock, free_port, start_server, stop_server
from .slkv_payloads import SEED, malformed
from .test_api_hostile import hostile_requests

pytestmark = pytest.mark.engine  # every test here starts an SGLang engine or a server with one

KEY_A, KEY_B, KEY_C, ADMIN = "key-alpha", "key-beta", "key-gamma", "key-admin"
MAX_TURNS_PER_KEY = 12
OFFLOAD_BUDGET = 64 << 20
LONG = "Count from 1 to 100, one number per line."  # a long greedy answer: a turn that is still running


class RedisProcess:
    """A redis-server with an append-only file, so a restart keeps the sessions."""

    def __init__(self, workdir: Path):
        self.port, self.dir, self.proc = free_port(), workdir, None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
             "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        for _ in range(100):
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()  # SIGTERM: redis flushes the append-only file and exits
        self.proc.wait(timeout=30)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


def _redis(tmp_path_factory) -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed")
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """The store of the server without offload, which the store-fault tests stop, pause and restart."""
    yield from _redis(tmp_path_factory)


@pytest.fixture(scope="module")
def offload_redis(tmp_path_factory):
    """The offload server's own store: it starts with the module's first test and idles through the store-fault
    tests, whose restarts would leave its pooled connections stale (its next request: 503 store_unavailable)."""
    yield from _redis(tmp_path_factory)


def _start_api(api: dict[str, Any]) -> None:
    """``slkv serve`` with the SimLayerKV settings of the session's engine (``slkv_engine``: the same window and
    prefill chunk, freed KV poisoned with NaN), so that a turn's tokens can be compared with that engine's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLKV_")}
    env.update(TEST_SLKV.to_env())
    cmd = [sys.executable, "-m", "slkv_sglang.cli", "serve", "--port", str(api["port"]), "--model-path",
           api["model_path"], "--redis-url", f"redis://127.0.0.1:{api['redis_port']}/0", "--redis-prefix",
           api["prefix"], "--api-keys", f"{KEY_A},{KEY_B},{KEY_C}", "--admin-keys", ADMIN, "--chunked-prefill-size",
           str(CHUNK), "--max-turns-per-key", str(MAX_TURNS_PER_KEY), *api["flags"]]
    with engine_start_lock():  # the server's in-process engine
        api["proc"] = start_server(cmd, env, f"{api['url']}/healthz")


def _api_server(store: RedisProcess, model_path: str, *flags: str) -> Iterator[dict[str, Any]]:
    port = free_port()
    server = {"port": port, "url": f"http://127.0.0.1:{port}", "prefix": f"slkv-test-{uuid.uuid4().hex[:8]}:",
              "model_path": model_path, "redis_port": store.port, "flags": flags}
    _start_api(server)
    yield server
    stop_server(server["proc"])


@pytest.fixture(scope="module")
def api(redis_server, model_path):
    yield from _api_server(redis_server, model_path)


@pytest.fixture(scope="module")
def offload_api(offload_redis, model_path):
    """An API server whose in-process engine has a host tier (--slkv-offload)."""
    yield from _api_server(offload_redis, model_path, "--slkv-offload", "--slkv-offload-budget", str(OFFLOAD_BUDGET))


def _h(key: str = KEY_A, idem: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **({"Idempotency-Key": idem} if idem else {})}


def _client(api, key=KEY_A):
    from openai import OpenAI

    return OpenAI(base_url=f"{api['url']}/v1", api_key=key, max_retries=0, timeout=300)


def _session(api, key=KEY_A) -> str:
    r = httpx.post(f"{api['url']}/v1/sessions", headers=_h(key))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _body(sid: str | None, text: str, **kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "session_id": sid, "max_tokens": 8, **kw}


def _chat(api, sid, text, key=KEY_A, idem=None, **kw):
    return httpx.post(f"{api['url']}/v1/chat/completions", headers=_h(key, idem), json=_body(sid, text, **kw),
                      timeout=300)


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON events of a server-sent event stream, up to [DONE]."""
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


@contextmanager
def _running_turn(api, sid, idem=None, key=KEY_A, max_tokens=64) -> Iterator[Iterator[dict[str, Any]]]:
    """A streaming turn, entered once its first chunk arrived: the turn runs and holds the session's lock.
    Leaving the block early disconnects the client."""
    with httpx.Client(timeout=300) as http:
        with http.stream("POST", f"{api['url']}/v1/chat/completions", headers=_h(key, idem),
                         json=_body(sid, LONG, max_tokens=max_tokens, stream=True)) as r:
            assert r.status_code == 200, r.read()
            events = _events(r)
            assert next(events)["choices"][0]["delta"]["content"]
            yield events


def _stored(api, redis_server, sid) -> list[dict[str, Any]]:
    """The turns Redis holds for a session, read directly."""
    return [json.loads(t) for t in redis_server.client().lrange(f"{api['prefix']}session:{sid}:turns", 0, -1)]


def _lock_gone(api, redis_server, sid) -> None:
    """Wait for the session's lock to go: it may expire (TTL at most LOCK_TTL_MS) but never be left forever."""
    raw, key = redis_server.client(), f"{api['prefix']}session:{sid}:lock"
    deadline = time.monotonic() + 5 * LOCK_TTL_MS / 1000
    while raw.exists(key):
        assert raw.pttl(key) <= LOCK_TTL_MS, "a lock without a bounded TTL"
        assert time.monotonic() < deadline, "the lock stayed"
        time.sleep(0.1)


def _retry_until_free(api, sid, idem, **kw) -> httpx.Response:
    """A client's retry after a failure: 409 while the old turn's lock has not gone yet, then the answer."""
    deadline = time.monotonic() + 5 * LOCK_TTL_MS / 1000
    while (r := _chat(api, sid, LONG, idem=idem, **kw)).status_code == 409 and time.monotonic() < deadline:
        time.sleep(0.5)
    return r


def _exactly_once(api, redis_server, sid, idem, before: int, **kw) -> None:
    """Retrying ``idem`` (twice) leaves exactly one turn for it after the ``before`` turns the session had."""
    first = _retry_until_free(api, sid, idem, **kw)
    assert first.status_code == 200, first.text
    again = _chat(api, sid, LONG, idem=idem, **kw)
    assert again.status_code == 200 and again.headers.get("idempotent-replayed") == "true", again.text
    assert again.json()["id"] == first.json()["id"]
    stored = _stored(api, redis_server, sid)
    assert len(stored) == before + 1 and stored[-1]["id"] == first.json()["id"]


# Turn 1 carries a ~1K-token document, long enough for lazy layers to trim (sink + recent + last = 292 tokens)
TURNS = [
    "Here is some code:\n\n" + document(3, min_chars=4000)[:4000] + "\n\nHere is a poem line: 'The quiet harbor "
    "keeps its lanterns lit.' Remember it.",
    "Which word in the line names a place by the sea?",
    "What kept its lanterns lit?",
    "Repeat the poem line exactly.",
]
ROW_BYTES = 2 * 3 * 64 * 4  # K and V of one token in one layer: 3 KV heads x 64 dims, float32 (the CPU engine)


TURN_SLKV = {3: {"granularity": "head"}}  # the turns' own SimLayerKV settings (turn 3: single KV heads)


def test_four_turns_with_the_openai_client(offload_api, offload_redis, slkv_engine):
    """Four turns of one session through the OpenAI client (two streamed), on the offload server: each turn's lazy
    layers keep only sink + recent on the device and their middle on the host (the turn record says so, layer by
    layer); the next turn restores that middle and reuses the whole history from the radix cache. Turn 3 asks for
    head granularity: its record has the lazy KV heads, and what it read counts them. Every answer equals the
    session engine's (offload off) for the same token ids and settings."""
    client = _client(offload_api)
    sid = _session(offload_api)
    cached = []
    for turn, text in enumerate(TURNS, start=1):
        messages = [{"role": "user", "content": text}]
        extra = {"session_id": sid, **({"slkv": TURN_SLKV[turn]} if turn in TURN_SLKV else {})}
        if turn % 2:
            resp = client.chat.completions.create(model="default", messages=messages, max_tokens=8,
                                                  extra_body=extra)
            assert resp.choices[0].message.content
            cached.append(resp.usage.prompt_tokens_details.cached_tokens)
        else:
            stream = client.chat.completions.create(model="default", messages=messages, max_tokens=8, stream=True,
                                                    stream_options={"include_usage": True}, extra_body=extra)
            chunks = list(stream)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            cached.append(chunks[-1].usage.prompt_tokens_details.cached_tokens)

    info = httpx.get(f"{offload_api['url']}/v1/sessions/{sid}", headers=_h()).json()
    turns = info["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3, 4]
    assert cached[0] < 100  # the document was new (only the system prompt may have been cached by another test)
    window = TEST_SLKV.sink + TEST_SLKV.recent
    ids = json.loads(offload_redis.client().hget(f"{offload_api['prefix']}session:{sid}", "history"))["ids"]
    slkv_engine.flush_cache()
    for i, t in enumerate(turns):
        lm, kv = t["layer_map"], t["layer_map"]["kv"]
        assert lm["lazy_layers"], "every turn here is long enough to have lazy layers"
        # the engine keeps a row per KV head: each lazy head's middle is on the host
        assert t["kv_location"] == [["host" if lazy else "device" for lazy in heads] for heads in lm["heads"]]
        assert kv["host_tokens"] == [[lm["decided_at"] - window if lazy else 0 for lazy in heads] for heads in lm["heads"]]
        assert t["host_bytes"] == sum(map(sum, kv["host_tokens"])) * ROW_BYTES // len(lm["heads"][0])
        seq = t["prompt_tokens"] + t["completion_tokens"]  # what the turn read: sink + recent in lazy KV heads
        read = sum(sum(min(seq, window) if lazy else seq for lazy in heads) / len(heads) for heads in lm["heads"])
        assert t["device_kv_bytes"] == round(read * ROW_BYTES)
        if t["turn"] in TURN_SLKV:
            assert lm["granularity"] == "head" and len(lm["lazy_heads"]) > 3 * len(lm["lazy_layers"])
        if i:  # the whole history from the radix cache but the last `last` prompt tokens (re-run to score the
            # layers), and what the previous turn offloaded back from the host
            assert cached[i] == t["cached_tokens"] == t["prompt_tokens"] - TEST_SLKV.last
            before = turns[i - 1]["layer_map"]["kv"]
            assert kv["restored_rows"] - before["restored_rows"] == sum(map(sum, before["host_tokens"]))
        # The session engine, offload off, given the turn's prompt ids after the earlier turns' (radix reuse)
        prompt, answer = ids[: t["prompt_tokens"]], ids[t["prompt_tokens"] : seq]
        params = {"max_new_tokens": 8, "temperature": 0.0}
        if t["turn"] in TURN_SLKV:
            params["custom_params"] = {"slkv": TURN_SLKV[t["turn"]]}
        want = slkv_engine.generate(input_ids=prompt, sampling_params=params)
        assert lm["heads"] == want["meta_info"]["slkv"]["heads"], t["turn"]
        assert answer == want["output_ids"], t["turn"]
    stored = _stored(offload_api, offload_redis, sid)
    assert [t["layer_map"]["scores"] for t in stored] == [t["layer_map"]["scores"] for t in turns]
    assert offload_redis.client().ttl(f"{offload_api['prefix']}session:{sid}") > 0
    png = httpx.get(f"{offload_api['url']}/v1/sessions/{sid}/layers.png", headers=_h())
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_openai_fields_with_the_openai_client(api):
    """stop, max_completion_tokens, logprobs/top_logprobs, streaming with usage and JSON mode, as OpenAI answers
    them; n > 1, tools and seeded sampling are refused with a 400 naming the parameter."""
    import openai

    client = _client(api)
    count = [{"role": "user", "content": "Count from 1 to 20, one number per line."}]
    free = client.chat.completions.create(model="default", messages=count, max_completion_tokens=40)
    assert "5" in free.choices[0].message.content
    stopped = client.chat.completions.create(model="default", messages=count, max_completion_tokens=40, stop=["5"])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content
    assert "5" not in stopped.choices[0].message.content

    short = client.chat.completions.create(model="default", messages=count, max_completion_tokens=3, logprobs=True,
                                           top_logprobs=2)
    choice = short.choices[0]
    assert short.usage.completion_tokens == 3 and choice.finish_reason == "length"
    tokens = choice.logprobs.content
    assert len(tokens) == 3 and "".join(t.token for t in tokens) == choice.message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in tokens)  # greedy
    assert all(t.logprob == t.top_logprobs[0].logprob <= 0 for t in tokens)

    stream = client.chat.completions.create(model="default", messages=count, max_completion_tokens=5, stream=True,
                                            logprobs=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "".join(t.token for t in streamed) == text and len(streamed) == 5

    as_json = client.chat.completions.create(model="default", max_completion_tokens=16, seed=7,
                                             response_format={"type": "json_object"},
                                             messages=[{"role": "user", "content": "Describe a cat as JSON."}])
    assert as_json.choices[0].message.content.lstrip().startswith("{")

    for refused, kwargs in [("n", {"n": 3}), ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
                            ("seed", {"seed": 1, "temperature": 0.7})]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="default", messages=count, max_completion_tokens=3, **kwargs)
        assert err.value.body["param"] == refused and err.value.body["code"] == "unsupported_parameter"


def test_keys_cannot_see_each_others_sessions(api):
    sid = _session(api, KEY_A)
    assert _chat(api, sid, "hello", key=KEY_B).status_code == 404
    assert httpx.get(f"{api['url']}/v1/sessions/{sid}", headers=_h(KEY_B)).status_code == 404
    assert httpx.delete(f"{api['url']}/v1/sessions/{sid}", headers=_h(KEY_B)).status_code == 404
    assert _chat(api, sid, "hello", key=KEY_A).status_code == 200


@pytest.mark.parametrize("body, status, code", [
    ({"messages": []}, 400, "invalid_request"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_request"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "invalid_request"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, "invalid_request"),
    ({"messages": [{"role": "user", "content": "hi"}], "session_id": "sess_nope"}, 404, "session_not_found"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wizard"}}}}, 400, "invalid_request"),
])
def test_bad_requests_get_clear_errors(api, body, status, code):
    r = httpx.post(f"{api['url']}/v1/chat/completions", headers=_h(), json=body, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_auth_size_and_closed_sessions(api):
    assert httpx.post(f"{api['url']}/v1/sessions").status_code == 401
    assert httpx.post(f"{api['url']}/v1/sessions", headers={"Authorization": "Bearer wrong"}).status_code == 401
    big = httpx.post(f"{api['url']}/v1/chat/completions", headers=_h(), content=b"x" * (2 << 20))
    assert big.status_code == 413
    sid = _session(api)
    assert httpx.delete(f"{api['url']}/v1/sessions/{sid}", headers=_h()).status_code == 200
    closed = _chat(api, sid, "still there?")
    assert closed.status_code == 410 and closed.json()["error"]["code"] == "session_closed"


def test_one_turn_at_a_time(api):
    sid = _session(api)
    with _running_turn(api, sid) as events:
        second = _chat(api, sid, "And again?")
        assert list(events)[-1]["choices"][0]["finish_reason"]
    assert second.status_code == 409 and second.json()["error"]["code"] == "turn_in_progress"


def test_turns_per_key_are_limited(api):
    """A key running MAX_TURNS_PER_KEY turns gets 429 for one more; other keys are not affected."""

    async def limited() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=api["url"], timeout=300) as http, AsyncExitStack() as running:
            async def start() -> None:  # a turn that runs until this test leaves
                r = await running.enter_async_context(http.stream(
                    "POST", "/v1/chat/completions", headers=_h(KEY_C), json=_body(None, LONG, max_tokens=32, stream=True)))
                assert r.status_code == 200

            await asyncio.gather(*(start() for _ in range(MAX_TURNS_PER_KEY)))
            return (await http.post("/v1/chat/completions", headers=_h(KEY_C), json=_body(None, "hi")),
                    await http.post("/v1/chat/completions", headers=_h(KEY_B), json=_body(None, "hi")))

    over, other = asyncio.run(limited())
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"
    assert other.status_code == 200


def test_admin_keys_apart_from_user_keys(api):
    url = f"{api['url']}/admin/offload"
    assert httpx.put(url, headers=_h(KEY_A), json={"threshold": 0.5}).status_code == 403
    assert httpx.get(url, headers=_h(KEY_A)).status_code == 403
    assert httpx.get(url).status_code == 401
    for bad in ({"threshold": -1}, {"threshold": 1e400}, {"threshold": True}, {"budget_bytes": True},
                {"budget_bytes": 1.5}, {"budget_bytes": -1}, {"budget_bytes": None}, {"bogus": 1}):
        r = httpx.put(url, headers=_h(ADMIN), content=json.dumps(bad).replace("Infinity", "1e400"))
        assert r.status_code == 400 and r.json()["error"]["code"] in ("invalid_request", "invalid_json"), (bad, r.text)
    r = httpx.put(url, headers=_h(ADMIN), json={"threshold": 1.5})
    assert r.json() == {"threshold": 1.5, "budget_bytes": None}  # no host tier: the engine reported no budget
    assert _chat(api, _session(api), "Hello there").json()["slkv"]["threshold"] == 1.5
    refused = httpx.put(url, headers=_h(ADMIN), json={"budget_bytes": 1 << 30, "threshold": 0.7})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "offload_unavailable", refused.text
    reset = httpx.put(url, headers=_h(ADMIN), json={"threshold": None})
    assert reset.json() == {"threshold": 0.9, "budget_bytes": None}  # the start-up threshold; 0.7 never applied
    metrics = httpx.get(f"{api['url']}/metrics").text
    assert "slkv:turns_total" in metrics and "slkv:lazy_layers_per_turn_bucket" in metrics


def test_turn_settings_are_checked_like_the_engine_checks_them(api):
    """A turn's own SimLayerKV settings (body field ``slkv``): seeded malformed values (``slkv_payloads``) are
    each a 400 naming the field before any turn runs (NaN and the infinities are not JSON: refused by the
    body parser, which names where they stood); valid ones reach the engine."""
    payloads = malformed(SEED, 150, num_layers=30)
    print(f"malformed slkv: seed {SEED} (SLKV_HOSTILE_SEED), {len(payloads)} values")
    with httpx.Client(base_url=api["url"], timeout=120) as http:
        for i, bad in enumerate(payloads):
            r = http.post("/v1/chat/completions", content=json.dumps(_body(None, "hi", slkv=bad.value)), headers=_h())
            what = f"#{i} {bad.kind}: {json.dumps(bad.value)[:200]} -> {r.status_code} {r.text[:300]}"
            error = r.json()["error"]
            assert r.status_code == 400 and bad.names_field(error["message"], "slkv"), what
            assert error["code"] == ("invalid_request" if bad.json_ok else "invalid_json"), what
            assert len(r.content) < 2000, what
    refused = _chat(api, None, "hi", slkv={"session": "mine"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "slkv.session"
    long_text = "Here is a list of fruits: " + ", ".join(["apple", "pear", "plum", "fig"] * 40) + ". Name one."
    lazy = _chat(api, _session(api), long_text, slkv={"force_lazy": [4, 0], "threshold": 0.5, "score": "mean"})
    assert lazy.status_code == 200, lazy.text
    layer_map = lazy.json()["slkv"]
    assert layer_map["lazy_layers"] == [0, 4] and layer_map["threshold"] == 0.5 and layer_map["score_mode"] == "mean"
    off = _chat(api, _session(api), long_text, slkv={"enabled": False})
    assert off.status_code == 200 and off.json().get("slkv") is None, off.text


def test_idempotency_key_replays_instead_of_running_twice(api, redis_server):
    sid = _session(api)
    first = _chat(api, sid, "Name a colour.", idem="colour-1")
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    again = _chat(api, sid, "Name a colour.", idem="colour-1")
    assert again.headers["idempotent-replayed"] == "true" and again.json() == first.json()
    with httpx.stream("POST", f"{api['url']}/v1/chat/completions", headers=_h(idem="colour-1"), timeout=60,
                      json=_body(sid, "Name a colour.", stream=True)) as r:
        replayed = list(_events(r))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in replayed if e["choices"]) == \
        first.json()["choices"][0]["message"]["content"]
    reused = _chat(api, sid, "Name a fruit.", idem="colour-1")
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"
    assert _chat(api, sid, "Name a colour.").status_code == 200  # no key: a new turn
    assert [t["id"] for t in _stored(api, redis_server, sid)][0] == first.json()["id"]
    assert len(_stored(api, redis_server, sid)) == 2


def test_close_during_a_turn_wins(api, redis_server):
    sid = _session(api)
    with _running_turn(api, sid) as events:
        assert httpx.delete(f"{api['url']}/v1/sessions/{sid}", headers=_h()).status_code == 200
        last = list(events)[-1]
    assert last["error"]["code"] == "session_closed" and last["error"]["committed"] is False
    info = httpx.get(f"{api['url']}/v1/sessions/{sid}", headers=_h()).json()
    assert info["status"] == "closed" and info["turns"] == [] and _stored(api, redis_server, sid) == []
    _lock_gone(api, redis_server, sid)
    assert _chat(api, sid, "Anyone?").status_code == 410


@pytest.mark.parametrize("stream", [True, False])
def test_disconnected_client_turn_is_committed_and_retrievable(api, redis_server, stream):
    """A client that goes away mid-turn (streaming or not) leaves the turn to finish and commit; its retry
    with the same Idempotency-Key gets that turn back instead of running another."""
    sid = _session(api)
    if stream:
        with _running_turn(api, sid, idem="gone"):
            pass  # disconnects after the first chunk
    else:
        body = json.dumps(_body(sid, LONG, max_tokens=64)).encode()
        with socket.create_connection(("127.0.0.1", api["port"])) as raw:
            raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
                        b"Authorization: Bearer %s\r\nIdempotency-Key: gone\r\nContent-Length: %d\r\n\r\n%s"
                        % (KEY_A.encode(), len(body), body))
            while not redis_server.client().exists(f"{api['prefix']}session:{sid}:lock"):
                time.sleep(0.01)  # the turn runs: now the client goes
    _lock_gone(api, redis_server, sid)  # the turn has ended
    assert len(_stored(api, redis_server, sid)) == 1
    replay = _chat(api, sid, LONG, idem="gone", max_tokens=64)
    assert replay.headers.get("idempotent-replayed") == "true"
    assert replay.json()["id"] == _stored(api, redis_server, sid)[0]["id"]


@pytest.mark.parametrize("mode", ["WRITE", "ALL"])
def test_store_stall_during_commit(api, redis_server, mode):
    """CLIENT PAUSE while a turn generates: its commit stalls and times out. WRITE leaves reads working, so the
    server finds out and says "not committed"; ALL stalls the look-up too ("unknown"). Either way the commit
    queued behind the stall is refused when Redis resumes (it is past its deadline), and retries with the
    key run the turn exactly once."""
    sid = _session(api)
    assert _chat(api, sid, "First turn.").status_code == 200
    raw = redis_server.client()
    with _running_turn(api, sid, idem=f"stall-{mode}") as events:
        raw.execute_command("CLIENT", "PAUSE", 20000 if mode == "ALL" else 120000, mode)
        try:
            last = list(events)[-1]
        finally:
            if mode == "WRITE":  # in ALL mode UNPAUSE itself waits for the pause to end
                raw.execute_command("CLIENT", "UNPAUSE")
    error = last["error"]
    assert error["code"] == "store_unavailable" and error["committed"] in (False, None), error
    assert error["committed"] is False or mode == "ALL"
    _lock_gone(api, redis_server, sid)
    assert len(_stored(api, redis_server, sid)) == 1  # the stalled commit never landed
    _exactly_once(api, redis_server, sid, f"stall-{mode}", before=1, max_tokens=64)


def test_redis_restart_during_a_turn(api, redis_server):
    sid = _session(api)
    with _running_turn(api, sid, idem="restart") as events:
        redis_server.stop()
        try:
            last = list(events)[-1]
        finally:
            redis_server.start()
    assert last["error"]["code"] == "store_unavailable" and last["error"]["committed"] is False
    _lock_gone(api, redis_server, sid)  # written to the append-only file with its TTL: it expires
    assert _stored(api, redis_server, sid) == []
    _exactly_once(api, redis_server, sid, "restart", before=0, max_tokens=64)


def test_redis_stopped_and_restarted(api, redis_server):
    sid = _session(api)
    assert _chat(api, sid, "First turn.").status_code == 200
    redis_server.stop()
    try:
        down = _chat(api, sid, "Second turn.")
        assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable"
        assert httpx.get(f"{api['url']}/readyz").status_code == 503
    finally:
        redis_server.start()
    assert httpx.get(f"{api['url']}/readyz").status_code == 200
    assert len(httpx.get(f"{api['url']}/v1/sessions/{sid}", headers=_h()).json()["turns"]) == 1  # nothing half-written
    again = _chat(api, sid, "Second turn.")
    assert again.status_code == 200
    assert [t["turn"] for t in httpx.get(f"{api['url']}/v1/sessions/{sid}", headers=_h()).json()["turns"]] == [1, 2]


def test_hostile_requests_get_json_4xx(api):
    """Seeded hostile requests (invalid UTF-8, deep nesting, huge numbers, lone surrogates, session ids that
    name other keys, wrong types, refused fields, admin abuse, unknown routes and methods, oversized bodies
    with and without Content-Length, malformed JSON, bad headers): every answer is a JSON 4xx error with a
    short message, and the server still runs a normal turn afterwards."""
    sid = _session(api)
    seen: dict[str, set[int]] = {}
    with httpx.Client(base_url=api["url"], timeout=120) as http:
        for req in hostile_requests(seed=13, sid=sid, count=320, user=KEY_A, admin=ADMIN):
            r = http.request(req.method, req.path, content=req.content(), headers=req.headers)
            what = f"{req.kind}: {req.method} {req.path[:80]} {(req.body or b'')[:120]!r} -> {r.status_code} {r.text[:300]}"
            assert 400 <= r.status_code < 500, what
            error = r.json()["error"]
            assert isinstance(error["code"], str) and isinstance(error["message"], str), what
            assert len(r.content) < 2000, what  # no echo of unbounded input
            seen.setdefault(req.kind, set()).add(r.status_code)
    assert len(seen) == 13, seen  # every category was generated
    assert _chat(api, sid, "Hello after all that.").status_code == 200
    assert httpx.get(f"{api['url']}/v1/sessions/{sid}", headers=_h()).json()["status"] == "open"


def test_request_framed_both_ways_is_refused(api):
    """Content-Length and Transfer-Encoding on one request (request smuggling behind a proxy that trusts the
    other header) get one JSON 400 naming both and a closed connection, so the request hidden after the body
    never runs; the server goes on serving."""
    sid = _session(api)
    body = json.dumps(_body(sid, "Hi.")).encode()
    hidden = b"DELETE /v1/sessions/%s HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer %s\r\n\r\n" % (
        sid.encode(), KEY_A.encode())
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer %s\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"%x\r\n%s\r\n0\r\n\r\n%s" % (KEY_A.encode(), len(body), len(body), body, hidden))
    received = b""
    with socket.create_connection(("127.0.0.1", api["port"]), timeout=60) as raw:
        raw.sendall(request)
        while chunk := raw.recv(65536):  # until the server closes; a connection left open times out here
            received += chunk
    head, _, answer = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and received.count(b"HTTP/1.1 ") == 1, received[:600]
    assert b"connection: close" in head.lower(), head
    error = json.loads(answer)["error"]
    assert error["code"] == "invalid_request", error
    assert "Content-Length" in error["message"] and "Transfer-Encoding" in error["message"], error
    session = httpx.get(f"{api['url']}/v1/sessions/{sid}", headers=_h()).json()
    assert session["status"] == "open" and session["turns"] == [], session  # neither request ran
    assert _chat(api, sid, "Hello after that.").status_code == 200


def test_load_script_runs_clean(api):
    script = Path(__file__).resolve().parents[1] / "scripts" / "load_test.py"
    proc = subprocess.run([sys.executable, str(script), "--url", api["url"], "--api-key", KEY_A, "--sessions", "10",
                           "--turns", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "20 turns, 0 failed" in proc.stdout and "p99" in proc.stdout


def test_host_budget_through_the_admin_channel(offload_api):
    """PUT /admin/offload sends the host budget to the engine (user keys get 403); the next turn's layer map
    reports the engine's new budget, and GET /admin/offload reports what the engine reported."""
    url = f"{offload_api['url']}/admin/offload"
    assert httpx.put(url, headers=_h(KEY_A), json={"budget_bytes": 1 << 20}).status_code == 403
    assert httpx.get(url, headers=_h(ADMIN)).json()["budget_bytes"] == OFFLOAD_BUDGET
    sid = _session(offload_api)
    first = _chat(offload_api, sid, "Name a colour.")
    assert first.status_code == 200 and first.json()["slkv"]["kv"]["host_budget"] == OFFLOAD_BUDGET, first.text
    changed = httpx.put(url, headers=_h(ADMIN), json={"budget_bytes": 3 << 20})
    assert changed.status_code == 200 and changed.json()["budget_bytes"] == 3 << 20, changed.text
    second = _chat(offload_api, sid, "And a number?")
    assert second.status_code == 200 and second.json()["slkv"]["kv"]["host_budget"] == 3 << 20, second.text
    turns = httpx.get(f"{offload_api['url']}/v1/sessions/{sid}", headers=_h()).json()["turns"]
    assert [t["layer_map"]["kv"]["host_budget"] for t in turns] == [OFFLOAD_BUDGET, 3 << 20]
    assert httpx.get(url, headers=_h(ADMIN)).json() == {"budget_bytes": 3 << 20, "threshold": 0.9}


def test_server_killed_mid_turn(api, redis_server):
    """kill -9 of the server while a turn runs: its lock expires within LOCK_TTL_MS, nothing half-written, and
    the client's retry with its key (on the restarted server) runs the turn once. Runs last: it restarts the
    module's server."""
    sid = _session(api)
    proc = psutil.Process(api["proc"].pid)
    with _running_turn(api, sid, idem="killed") as events:
        engine = proc.children(recursive=True)
        raw, lock = redis_server.client(), f"{api['prefix']}session:{sid}:lock"
        assert 0 < raw.pttl(lock) <= LOCK_TTL_MS
        os.kill(proc.pid, signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            list(events)
    api["proc"].wait(timeout=30)
    psutil.wait_procs(engine, timeout=30)  # SGLang's processes follow their parent
    for orphan in (p for p in engine if p.is_running()):
        orphan.kill()
    _lock_gone(api, redis_server, sid)
    assert _stored(api, redis_server, sid) == []
    _start_api(api)
    _exactly_once(api, redis_server, sid, "killed", before=0, max_tokens=64)

"""The chat API end to end: `slkv serve` (real engine) + a real redis-server that the tests can stop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from .servers import free_port, start_server, stop_server

KEY_A, KEY_B = "key-alpha", "key-beta"


class RedisProcess:
    """A redis-server with an append-only file, so a restart keeps the sessions."""

    def __init__(self, workdir: Path):
        self.port, self.dir, self.proc = free_port(), workdir, None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
             "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
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


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed")
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(redis_server, model_path):
    port, prefix = free_port(), f"slkv-test-{uuid.uuid4().hex[:8]}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLKV_")}
    env["SLKV_POISON"] = "1"  # freed KV is NaN: a read of it would show in the tokens
    cmd = [sys.executable, "-m", "slkv_sglang.cli", "serve", "--port", str(port), "--model-path", model_path,
           "--redis-url", f"redis://127.0.0.1:{redis_server.port}/0", "--redis-prefix", prefix,
           "--api-keys", f"{KEY_A},{KEY_B}", "--slkv-recent", "64"]
    url = f"http://127.0.0.1:{port}"
    proc = start_server(cmd, env, f"{url}/healthz")
    yield {"url": url, "prefix": prefix}
    stop_server(proc)


def _client(api, key=KEY_A):
    from openai import OpenAI

    return OpenAI(base_url=f"{api['url']}/v1", api_key=key, max_retries=0, timeout=300)


def _session(api, key=KEY_A) -> str:
    r = httpx.post(f"{api['url']}/v1/sessions", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _chat(api, sid, text, key=KEY_A, **kw):
    return httpx.post(f"{api['url']}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"messages": [{"role": "user", "content": text}], "session_id": sid, "max_tokens": 8, **kw},
                      timeout=300)


TURNS = [
    "Here is a poem line: 'The quiet harbor keeps its lanterns lit.' Remember it.",
    "Which word in the line names a place by the sea?",
    "What kept its lanterns lit?",
    "Repeat the poem line exactly.",
]


def test_four_turns_with_the_openai_client(api, redis_server):
    client = _client(api)
    sid = _session(api)
    cached = []
    for turn, text in enumerate(TURNS, start=1):
        messages = [{"role": "user", "content": text}]
        if turn % 2:
            resp = client.chat.completions.create(model="default", messages=messages, max_tokens=8,
                                                  extra_body={"session_id": sid})
            assert resp.choices[0].message.content
            cached.append(resp.usage.prompt_tokens_details.cached_tokens)
        else:
            stream = client.chat.completions.create(model="default", messages=messages, max_tokens=8, stream=True,
                                                    stream_options={"include_usage": True}, extra_body={"session_id": sid})
            chunks = list(stream)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            cached.append(chunks[-1].usage.prompt_tokens_details.cached_tokens)
    assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached

    info = httpx.get(f"{api['url']}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    assert [t["turn"] for t in info["turns"]] == [1, 2, 3, 4]
    assert all(len(t["layer_map"]["lazy"]) == 30 and t["kv_location"] == ["device"] * 30 for t in info["turns"])
    raw = redis.Redis(port=redis_server.port, decode_responses=True)
    stored = [json.loads(x) for x in raw.lrange(f"{api['prefix']}session:{sid}:turns", 0, -1)]
    assert [t["layer_map"]["scores"] for t in stored] == [t["layer_map"]["scores"] for t in info["turns"]]
    assert raw.ttl(f"{api['prefix']}session:{sid}") > 0
    png = httpx.get(f"{api['url']}/v1/sessions/{sid}/layers.png", headers={"Authorization": f"Bearer {KEY_A}"})
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_keys_cannot_see_each_others_sessions(api):
    sid = _session(api, KEY_A)
    assert _chat(api, sid, "hello", key=KEY_B).status_code == 404
    assert httpx.get(f"{api['url']}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY_B}"}).status_code == 404
    assert httpx.delete(f"{api['url']}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY_B}"}).status_code == 404
    assert _chat(api, sid, "hello", key=KEY_A).status_code == 200


@pytest.mark.parametrize("body, status, code", [
    ({"messages": []}, 400, "invalid_request"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_request"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "invalid_request"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, "invalid_request"),
    ({"messages": [{"role": "user", "content": "hi"}], "session_id": "sess_nope"}, 404, "session_not_found"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "context_length_exceeded"),
])
def test_bad_requests_get_clear_errors(api, body, status, code):
    r = httpx.post(f"{api['url']}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"}, json=body, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_auth_size_and_closed_sessions(api):
    assert httpx.post(f"{api['url']}/v1/sessions").status_code == 401
    assert httpx.post(f"{api['url']}/v1/sessions", headers={"Authorization": "Bearer wrong"}).status_code == 401
    big = httpx.post(f"{api['url']}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"},
                     content=b"x" * (2 << 20))
    assert big.status_code == 413
    sid = _session(api)
    assert httpx.delete(f"{api['url']}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
    closed = _chat(api, sid, "still there?")
    assert closed.status_code == 410 and closed.json()["error"]["code"] == "session_closed"


def test_one_turn_at_a_time(api):
    sid = _session(api)
    results: list[int] = []
    slow = threading.Thread(target=lambda: results.append(_chat(api, sid, "Count to twenty.", max_tokens=64).status_code))
    slow.start()
    time.sleep(1.0)
    second = _chat(api, sid, "And again?")
    slow.join()
    assert results == [200]
    assert second.status_code == 409 and second.json()["error"]["code"] == "turn_in_progress"


def test_admin_offload_settings(api):
    h = {"Authorization": f"Bearer {KEY_A}"}
    assert httpx.put(f"{api['url']}/admin/offload", headers=h, json={"threshold": -1}).status_code == 400
    r = httpx.put(f"{api['url']}/admin/offload", headers=h, json={"threshold": 1.5, "budget_bytes": 1 << 30})
    assert r.json() == {"threshold": 1.5, "budget_bytes": 1 << 30}
    sid = _session(api)
    assert _chat(api, sid, "Hello there").json()["slkv"]["threshold"] == 1.5
    httpx.put(f"{api['url']}/admin/offload", headers=h, json={"threshold": 0.9})
    metrics = httpx.get(f"{api['url']}/metrics").text
    assert "slkv:turns_total" in metrics and "slkv:lazy_layers_per_turn_bucket" in metrics


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
    h = {"Authorization": f"Bearer {KEY_A}"}
    assert httpx.get(f"{api['url']}/readyz").status_code == 200
    assert len(httpx.get(f"{api['url']}/v1/sessions/{sid}", headers=h).json()["turns"]) == 1  # nothing half-written
    again = _chat(api, sid, "Second turn.")
    assert again.status_code == 200
    assert [t["turn"] for t in httpx.get(f"{api['url']}/v1/sessions/{sid}", headers=h).json()["turns"]] == [1, 2]


def test_load_script_runs_clean(api):
    script = Path(__file__).resolve().parents[1] / "scripts" / "load_test.py"
    proc = subprocess.run([sys.executable, str(script), "--url", api["url"], "--api-key", KEY_A, "--sessions", "10",
                           "--turns", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "20 turns, 0 failed" in proc.stdout and "p99" in proc.stdout

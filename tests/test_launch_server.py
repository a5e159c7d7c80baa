"""`python -m sglang.launch_server ... --enable-simlayerkv`: the plugin through SGLang's own HTTP server."""

from __future__ import annotations

import json
import os
import sys

import httpx
import pytest

from slkv_sglang.corpus import prompt_ids

from .servers import free_port, start_server, stop_server


@pytest.fixture(scope="module")
def server(model_path):
    port = free_port()
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("SLKV_")}  # the flags alone configure it
    cmd = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--host", "127.0.0.1",
        "--port", str(port), "--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
        "--dtype", "float32", "--mem-fraction-static", "0.2", "--max-total-tokens", "16384", "--watchdog-timeout", "3600",
        "--skip-server-warmup", "--sleep-on-idle",
        "--enable-simlayerkv", "--slkv-recent", "256", "--slkv-threshold", "0.85", "--slkv-score", "mean",
    ]
    url = f"http://127.0.0.1:{port}"
    proc = start_server(cmd, env, f"{url}/health")
    yield url
    stop_server(proc)


def test_generate_reports_layer_map(server, tokenizer):
    ids = prompt_ids(tokenizer, 1200, seed=7, question="What does this code do?")
    r = httpx.post(f"{server}/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}, timeout=300)
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]["slkv"]
    assert meta["threshold"] == 0.85 and meta["score_mode"] == "mean" and meta["recent"] == 256
    assert meta["decided_at"] == len(ids) and len(meta["lazy"]) == 30
    assert meta["lazy_layers"] == [i for i, s in enumerate(meta["scores"]) if s > 0.85]


def test_bad_override_is_a_client_error(server):
    r = httpx.post(
        f"{server}/generate",
        json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2, "custom_params": {"slkv": {"threshold": "high"}}}},
        timeout=60,
    )
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert "threshold must be a number > 0" in r.text


def test_chat_api_in_front_of_a_remote_server(server, model_path):
    """`slkv serve --sglang-url`: the API without an engine of its own, sessions reuse the remote radix cache."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLKV_")}
    cmd = [sys.executable, "-m", "slkv_sglang.cli", "serve", "--port", str(port), "--model-path", model_path,
           "--sglang-url", server]
    api = f"http://127.0.0.1:{port}"
    proc = start_server(cmd, env, f"{api}/healthz", timeout=120)
    try:
        sid = httpx.post(f"{api}/v1/sessions").json()["id"]
        usage = []
        for text, stream in (("Tell me a colour.", False), ("And a number?", True)):
            body = {"messages": [{"role": "user", "content": text}], "session_id": sid, "max_tokens": 6, "stream": stream,
                    "stream_options": {"include_usage": True}}
            r = httpx.post(f"{api}/v1/chat/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text
            if stream:
                events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data: {")]
                usage.append(events[-1]["usage"])
            else:
                usage.append(r.json()["usage"])
        # turn 2 reuses turn 1 (turn 1 may share the system prompt with the other tests' requests)
        assert usage[1]["prompt_tokens_details"]["cached_tokens"] > usage[0]["prompt_tokens_details"]["cached_tokens"]
        turns = httpx.get(f"{api}/v1/sessions/{sid}").json()["turns"]
        assert [t["layer_map"]["threshold"] for t in turns] == [0.9, 0.9]  # the API's threshold, per request
    finally:
        stop_server(proc)

"""`python -m sglang.launch_server ... --enable-simlayerkv`: the plugin through SGLang's own HTTP server."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import httpx
import pytest

from slkv_sglang.config import SlkvConfig
from slkv_sglang.tools.corpus import prompt_ids

from .conftest import MEM_FRACTION
from .servers import engine_start_lock, free_port, spawn, start_server, stop_server, wait_healthy
from .slkv_payloads import KINDS, SEED, malformed

pytestmark = pytest.mark.engine  # every test here starts an SGLang engine or a server with one


def _worker_cmd(model_path: str, port: int, shared_store: str) -> list[str]:
    return [
        sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--host", "127.0.0.1",
        "--port", str(port), "--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
        "--dtype", "float32", "--mem-fraction-static", str(MEM_FRACTION), "--max-total-tokens", "16384", "--watchdog-timeout", "3600",
        "--skip-server-warmup", "--sleep-on-idle", "--log-level", "warning",
        "--enable-simlayerkv", "--slkv-recent", "256", "--slkv-threshold", "0.85", "--slkv-score", "mean",
        "--slkv-poison-freed", "--slkv-offload", "--slkv-shared-store", shared_store,
    ]


@pytest.fixture(scope="module")
def workers(model_path, mooncake):
    """Two CPU workers (the plugin configured by flags alone, with a host tier and the shared tier on the test's
    Mooncake Store), named w0 and w1, started one after the other (``engine_start_lock``: an engine sizes its
    memory from what is free while it loads)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLKV_")}
    base.update(SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="1")
    ports = [free_port(), free_port()]
    # the RPC deadline of a deployment (MooncakeConfig's default) rather than the store tests' short one: the
    # workers' prefills keep the suite's machine busy
    store = mooncake.client_url(timeout_ms=2000)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs = []
    try:
        for i, (port, url) in enumerate(zip(ports, urls)):
            with engine_start_lock():
                procs.append(spawn(_worker_cmd(model_path, port, store), {**base, "SLKV_WORKER_ID": f"w{i}"}))
                wait_healthy(procs[-1], f"{url}/health")
    except Exception:
        for proc in procs:
            proc.kill()
        raise
    yield dict(zip(("w0", "w1"), zip(urls, procs)))
    for proc in procs:
        stop_server(proc)


@pytest.fixture(scope="module")
def server(workers) -> str:
    return workers["w0"][0]


def test_generate_reports_layer_map(server, tokenizer, reference):
    """The layer map of the flags' settings, equal to the reference implementation's decision."""
    ids = prompt_ids(tokenizer, 1200, seed=7, question="What does this code do?")
    r = httpx.post(f"{server}/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}, timeout=300)
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]["slkv"]
    assert meta["threshold"] == 0.85 and meta["score_mode"] == "mean" and meta["recent"] == 256
    assert meta["decided_at"] == len(ids) and meta["lazy_layers"] == [i for i, lazy in enumerate(meta["lazy"]) if lazy]
    ref = reference.lazy_scores(ids, SlkvConfig(enabled=True, threshold=0.85, score="mean", recent=256))
    assert ref.lazy_layers and not all(ref.lazy), "the comparison needs lazy and non-lazy layers"
    assert meta["scores"] == pytest.approx(list(ref.scores), abs=2e-4)
    assert meta["granularity"] == ref.granularity == "head"  # the default
    for layer, (got, want) in enumerate(zip(meta["heads"], ref.heads)):
        for head, (a, b) in enumerate(zip(got, want)):
            assert a == b or abs(ref.head_scores[layer][head] - 0.85) < 1e-3, (layer, head)


def test_malformed_settings_are_refused_naming_the_field(server, workers, tokenizer):
    """Seeded malformed ``custom_params.slkv`` values (``slkv_payloads``), sent alone, as a batch's second item
    and as streams: each is a 400 whose message starts with the field, and no forward runs. NaN and the
    infinities are not JSON, and integers past a double's range are read as infinite: SGLang's body parser
    refuses them before any field is read (``Engine.generate`` names their field: ``test_engine``). A ``custom_params`` that is not an object is SGLang's own business:
    served without SimLayerKV settings (it used to stop the scheduler). The server then answers normally."""
    payloads = malformed(SEED, 200, num_layers=30)
    print(f"malformed custom_params.slkv: seed {SEED} (SLKV_HOSTILE_SEED), {len(payloads)} values")
    seen: dict[str, int] = {}
    with httpx.Client(base_url=server, timeout=120) as http:
        for i, bad in enumerate(payloads):
            custom = {"max_new_tokens": 2, "custom_params": {"slkv": bad.value}}
            body: dict = {"input_ids": [1, 2, 3], "sampling_params": custom}
            how, where = "alone", "custom_params.slkv"
            if i % 5 == 1:
                how, body["stream"] = "stream", True
            elif i % 5 == 2:
                how, where = "batch", "sampling_params[1].custom_params.slkv"
                body = {"input_ids": [[1, 2, 3], [4, 5, 6]], "sampling_params": [{"max_new_tokens": 2}, custom]}
            r = http.post("/generate", content=json.dumps(body), headers={"Content-Type": "application/json"})
            what = f"#{i} {bad.kind} {how}: {json.dumps(bad.value)[:200]} -> {r.status_code} {r.text[:300]}"
            assert r.status_code == 400, what
            if not (bad.json_ok and bad.fits_double):
                assert "json_invalid" in r.text, what
                continue
            error = r.json()
            message = error["message"] if how == "stream" else error["error"]["message"]
            assert bad.names_field(message, where), what
            assert len(message) < 600, what  # no echo of unbounded input
            seen[bad.kind] = seen.get(bad.kind, 0) + 1
    assert set(seen) == set(KINDS), seen
    for custom in ("slkv", [1], 5):
        r = httpx.post(f"{server}/generate", timeout=120,
                       json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2, "custom_params": custom}})
        assert r.status_code == 200 and "slkv" in r.json()["meta_info"], r.text
    ids = prompt_ids(tokenizer, 1200, seed=8, question="What does this code do?")
    r = httpx.post(f"{server}/generate", timeout=300, json={"input_ids": ids, "sampling_params": {
        "max_new_tokens": 2, "temperature": 0, "custom_params": {"slkv": {"force_lazy": [3, 0], "session": "after"}}}})
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]["slkv"]
    assert len(meta["lazy"]) == 30 and meta["lazy_layers"] == [0, 3]
    assert workers["w0"][1].poll() is None


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
        # Short turns: nothing trimmed, every layer reads every token, in the worker's float32 KV (read from its
        # server info): 2 (K, V) x 3 KV heads x 64 dims x 4 bytes per token and layer, 30 layers.
        for t in turns:
            assert not any(t["layer_map"]["lazy"])
            assert t["device_kv_bytes"] == (t["prompt_tokens"] + t["completion_tokens"]) * 30 * 1536
        # the host budget goes to the worker's /set_internal_state (it has a host tier: --slkv-offload); 2 GiB
        # keeps every later test's middles on the host
        changed = httpx.put(f"{api}/admin/offload", json={"budget_bytes": 2 << 30}, timeout=60)
        assert changed.status_code == 200 and changed.json()["budget_bytes"] == 2 << 30, changed.text
    finally:
        stop_server(proc)


def _turn(api: str, sid: str, text: str) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": text}], "session_id": sid, "max_tokens": 6}
    return httpx.post(f"{api}/v1/chat/completions", json=body, timeout=300)


def _kill(proc) -> None:
    """SIGKILL the server and every process it started: a worker lost, not drained."""
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait(timeout=60)


def _switches(api: str) -> float:
    """The chat API's count of turns served by another worker than their session's last."""
    text = httpx.get(f"{api}/metrics", timeout=10).text
    return float(next(x for x in text.splitlines() if x.startswith("slkv:worker_switches_total ")).split()[1])


def _flush(url: str) -> None:
    """SGLang refuses a flush while any request is pending, and the router's health checks are requests (``/health``
    generates a token every second): retried until one lands between them."""
    deadline = time.time() + 60
    while httpx.post(f"{url}/flush_cache", timeout=60).status_code != 200:
        assert time.time() < deadline, f"{url} never idle enough to flush"
        time.sleep(0.2)


def _written_back(url: str) -> dict:
    """Once the worker's write-back queue is empty (what it wrote is in the store), its shared-tier state."""
    deadline = time.time() + 60
    while True:
        (state,) = httpx.get(f"{url}/server_info", timeout=10).json()["internal_states"]
        if state["slkv"]["shared_queued_bytes"] == 0 or time.time() > deadline:
            return state["slkv"]
        time.sleep(0.2)


def test_router_keeps_sessions_on_their_worker(workers, model_path):
    """sglang-router (manual policy, X-SMG-Routing-Key = session id) in front of two workers: each session's
    turns reach one worker, Redis records it. When a worker is killed, its session's next turn lands on the other
    worker (counted as a switch), which restores the history from the shared tier (Mooncake) instead of
    recomputing it: at least 90% of the prompt cached, every layer's KV whole, and the answer of the same chat run
    before, never interrupted. Runs last in this module: it kills a worker."""
    import redis

    router_port, api_port, prefix = free_port(), free_port(), f"slkv-router-test-{uuid.uuid4().hex[:8]}:"
    router = start_server(
        [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(router_port),
         "--worker-urls", *(url for url, _ in workers.values()), "--policy", "manual", "--assignment-mode", "min_group",
         "--health-check-interval-secs", "1", "--health-failure-threshold", "2",
         # a lost worker refuses at once; a busy one (a long float32 prefill on one core) may answer /health late
         "--health-check-timeout-secs", "60", "--log-level", "warn",
         "--prometheus-port", str(free_port())],
        dict(os.environ), f"http://127.0.0.1:{router_port}/health", timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLKV_")}
    api = f"http://127.0.0.1:{api_port}"
    proc = start_server([sys.executable, "-m", "slkv_sglang.cli", "serve", "--port", str(api_port), "--model-path",
                         model_path, "--sglang-url", f"http://127.0.0.1:{router_port}", "--redis-url",
                         "redis://127.0.0.1:6379/0", "--redis-prefix", prefix], env, f"{api}/healthz", timeout=120)
    # long enough for lazy heads to release middles (sink + recent = 260): the shared tier must bring back host
    # copies as well as device rows
    document = "Here is a long story to remember. " + " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box "
                                                                f"on shelf {i * 7 % 13}." for i in range(100))
    texts = (f"{document} Name a fruit.", "And a vegetable?", "And a colour?")
    try:
        deadline = time.time() + 60  # the router answers /health before its workers are registered
        while sum(w["is_healthy"] for w in httpx.get(f"http://127.0.0.1:{router_port}/workers").json()["workers"]) < 2:
            assert time.time() < deadline, "the router did not see two healthy workers"
            time.sleep(0.5)
        # the chat that is never interrupted: its third turn's answer is what the interrupted one must give
        twin = httpx.post(f"{api}/v1/sessions").json()["id"]
        for text in texts:
            uninterrupted = _turn(api, twin, f"Guest 0 says: {text}")
            assert uninterrupted.status_code == 200, uninterrupted.text
        sessions = [httpx.post(f"{api}/v1/sessions").json()["id"] for _ in range(4)]
        for text in texts[:2]:
            for n, sid in enumerate(sessions):  # distinct histories: no session's KV serves another's
                assert _turn(api, sid, f"Guest {n} says: {text}").status_code == 200
        records = {sid: httpx.get(f"{api}/v1/sessions/{sid}").json()["turns"] for sid in sessions}
        homes = []
        for sid, turns in records.items():
            assert len({t["worker"] for t in turns}) == 1, turns  # every turn of a session on one worker
            assert turns[0]["worker"] in workers
            assert turns[0]["cached_tokens"] < turns[1]["cached_tokens"]
            assert not any(t["worker_switched"] for t in turns)
            homes.append(turns[0]["worker"])
        stored = redis.Redis(decode_responses=True).lrange(f"{prefix}session:{sessions[0]}:turns", 0, -1)
        assert [json.loads(t)["worker"] for t in stored] == [homes[0]] * 2

        # Worker loss: the first session's worker is killed once its write-back is done (what it had not written
        # yet would be recomputed); the session's third turn is served by the other one, whose radix cache is
        # flushed first (it may hold the twin's history: the history must come from the shared tier).
        lost_url, lost_proc = workers[homes[0]]
        assert _written_back(lost_url)["shared_queued_bytes"] == 0
        switches = _switches(api)
        for url, _ in workers.values():
            _flush(url)
        _kill(lost_proc)
        deadline, reply = time.time() + 60, None
        while time.time() < deadline:
            reply = _turn(api, sessions[0], f"Guest 0 says: {texts[2]}")
            if reply.status_code == 200:
                break
            assert reply.status_code == 502 and reply.json()["error"]["code"] == "engine_unavailable", reply.text
            time.sleep(1)
        assert reply is not None and reply.status_code == 200, reply.text if reply else "no reply"
        last = httpx.get(f"{api}/v1/sessions/{sessions[0]}").json()["turns"][-1]
        assert last["turn"] == 3 and last["worker"] != homes[0] and last["worker_switched"]
        assert _switches(api) == switches + 1
        # served from the shared tier: the history written back by the lost worker, restored in every unit
        kv = last["layer_map"]["kv"]
        print("turn 3 after the switch:", last["cached_tokens"], "of", last["prompt_tokens"], "cached;",
              {k: v for k, v in kv.items() if k.startswith("shared")})
        assert last["cached_tokens"] >= 0.9 * last["prompt_tokens"]
        # one lookup restored it (the flushed worker's tree held nothing of it)
        # (Store failures are not asserted: on a loaded machine a write-back's RPC may pass its deadline, which is
        # counted and harmless; the restore below is what the shared tier is for.)
        assert kv["shared_hits"] == 1
        assert kv["shared_restored_tokens"] == last["cached_tokens"]
        # at its decision every (layer, KV head) holds the whole prompt's KV, on the device or (a lazy head's middle)
        # on the host
        whole = {d + h for dev, host in zip(kv["device_tokens"], kv["host_tokens"]) for d, h in zip(dev, host)}
        assert whole == {last["prompt_tokens"]}, whole

        assert reply.json()["choices"][0]["message"] == uninterrupted.json()["choices"][0]["message"]
    finally:
        stop_server(proc)
        stop_server(router)

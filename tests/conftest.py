"""Shared fixtures: one SimLayerKV SGLang engine without and one with a host tier per test session, on the bundled
model."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from slkv_sglang.config import SlkvConfig
from slkv_sglang.model import ensure_bundled_model
from slkv_sglang.runtime import shutdown_engine

# The engines under test. recent=256 (not the paper's 1020) so 1-4K prompts really lose most of their KV in
# lazy layers and a wrong window shows in the tokens; chunked prefill at 1024 so long prompts are chunked.
# poison: every SimLayerKV engine of the suite NaN-fills the KV it frees, so a read of freed KV fails a test.
TEST_SLKV = SlkvConfig(enabled=True, threshold=0.9, sink=4, recent=256, last=32, mode="prefill", score="kvmin",
                       poison=True)
CHUNK = 1024
# The offload engine shared by test_offload_engine and test_bench_serve: TEST_SLKV with a host tier. Overcommit
# 1.5 is bench-serve's simlayerkv-offload setting; in a 32K-token pool none of those tests comes near the pool's
# limit, so it changes nothing there (test_kv_tier has its own small-pool engine for admission). OFFLOAD_BUDGET:
# one ~3K-token conversation's lazy middles (~40-60 MB in float32) fit.
OFFLOAD_BUDGET = 80 << 20
TEST_OFFLOAD = replace(TEST_SLKV, offload=True, offload_budget=OFFLOAD_BUDGET, overcommit=1.5)


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(ensure_bundled_model())


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def reference(model_path):
    """The reference implementation (plain transformers, slkv_sglang/reference.py): the expectation the engine's
    layer maps and tokens are checked against, loaded once per module that uses it."""
    from slkv_sglang.reference import ReferenceModel

    return ReferenceModel(model_path)


def start_engine(slkv: SlkvConfig, model_path: str):
    from slkv_sglang.runtime import make_engine

    return make_engine(model_path, slkv=slkv, chunked_prefill_size=CHUNK)


def set_host_budget(engine, nbytes: int) -> list[bool]:
    """The engine's host budget through the admin channel (``slkv_sglang.admin``), as PUT /admin/offload sets
    it: one answer per scheduler, False where refused."""
    from sglang.srt.managers.io_struct import SetInternalStateReq

    from slkv_sglang.admin import HOST_BUDGET

    return engine.loop.run_until_complete(
        engine.tokenizer_manager.set_internal_state(SetInternalStateReq(server_args={HOST_BUDGET: nbytes})))


@pytest.fixture(scope="session")
def slkv_engine(model_path):
    engine = start_engine(TEST_SLKV, model_path)
    yield engine
    shutdown_engine(engine)
    for key in TEST_SLKV.to_env():
        os.environ.pop(key, None)


@pytest.fixture(scope="session")
def offload_engine(model_path):
    """One SGLang engine with ``--slkv-offload`` (``TEST_OFFLOAD``) for the session: an engine start costs tens of
    seconds on the 2-core CI machine. Its users do not rely on what an earlier test left: each sets the host
    budget it needs and flushes the cache first. (Its users' modules run one after the other, see
    ``pytest_collection_modifyitems``.)"""
    engine = start_engine(TEST_OFFLOAD, model_path)
    yield engine
    shutdown_engine(engine)


def pytest_collection_modifyitems(items):
    """test_bench_serve runs just before test_offload_engine, the other user of the session's ``offload_engine``:
    that engine then starts late and no module in between runs with one engine more alive than before it was
    shared (each engine holds ~4 GB here). Tests do not depend on this order; it is about memory."""
    bench = [item for item in items if item.path.name == "test_bench_serve.py"]
    rest = [item for item in items if item.path.name != "test_bench_serve.py"]
    at = next((i for i, item in enumerate(rest) if item.path.name == "test_offload_engine.py"), None)
    if bench and at is not None:
        items[:] = rest[:at] + bench + rest[at:]

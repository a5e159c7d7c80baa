"""Shared fixtures: one SimLayerKV SGLang engine without and one with a host tier per test session, on the bundled
model."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from slkv_sglang.config import HOST_BUDGET, SlkvConfig
from slkv_sglang.model import ensure_bundled_model
from slkv_sglang.runtime import shutdown_engine

from .servers import EngineGuard, engine_start_lock

# The engines under test. recent=256 (not the paper's 1020) so 1-4K prompts really lose most of their KV in
# lazy layers and a wrong window shows in the tokens; chunked prefill at 1024 so long prompts are chunked.
# poison: every SimLayerKV engine of the suite NaN-fills the KV it frees, so a read of freed KV fails a test.
TEST_SLKV = SlkvConfig(enabled=True, threshold=0.9, sink=4, recent=256, last=32, mode="prefill", score="kvmin",
                       poison=True)
CHUNK = 1024
# The share of the free memory an engine measures at its start that it may take (engine_kwargs: 0.2). On CPU it
# only caps the KV pool: what it leaves, at least max_total_tokens, is that pool. With 0.2 an engine started
# while the other pytest-xdist worker's engines hold their memory would get a smaller pool than max_total_tokens
# (SGLang only warns), or refuse to start; the suite's engines get their max_total_tokens whatever runs beside.
MEM_FRACTION = 0.6
# The offload engine shared by test_offload_engine and test_bench_serve: TEST_SLKV with a host tier. Overcommit
# 1.5 is bench-serve's simlayerkv-offload setting; in a 32K-token pool none of those tests comes near the pool's
# limit, so it changes nothing there (test_kv_tier has its own small-pool engine for admission). OFFLOAD_BUDGET:
# one ~3K-token conversation's lazy middles (~40-60 MB in float32) fit.
OFFLOAD_BUDGET = 80 << 20
TEST_OFFLOAD = replace(TEST_SLKV, offload=True, offload_budget=OFFLOAD_BUDGET)  # slots sized by the plugin


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(ensure_bundled_model())


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def reference(model_path):
    """The reference implementation (plain transformers, slkv_sglang/tools/reference.py): the expectation the engine's
    layer maps and tokens are checked against, loaded once per module that uses it."""
    from slkv_sglang.tools.reference import ReferenceModel

    return ReferenceModel(model_path)


def start_engine(slkv: SlkvConfig, model_path: str, **overrides):
    """``make_engine`` with the suite's prefill chunk and ``MEM_FRACTION``, one start at a time
    (``engine_start_lock``)."""
    from slkv_sglang.runtime import make_engine

    with engine_start_lock():
        return make_engine(model_path, slkv=slkv,
                           **{"chunked_prefill_size": CHUNK, "mem_fraction_static": MEM_FRACTION, **overrides})


# ---- the `engine` marker: `make test-fast` (-m "not engine") must start no engine -----------------------------
ENGINE = "engine"  # registered in pyproject.toml


def _engine_marked(item) -> bool:
    return item.get_closest_marker(ENGINE) is not None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test not marked ``engine`` fails where it starts an engine (``engine_start_lock``, the way every engine of
    the suite starts), in its setup, call or teardown."""
    EngineGuard.forbidden_for = None if _engine_marked(item) else item.nodeid
    try:
        return (yield)
    finally:
        EngineGuard.forbidden_for = None


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Notes the fixtures whose setup starts an engine."""
    before = EngineGuard.starts
    try:
        return (yield)
    finally:
        if EngineGuard.starts > before:
            EngineGuard.fixtures.add(fixturedef.argname)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A test not marked ``engine`` that uses an engine an earlier test started fails too: run alone, or in ``make
    test-fast``, it would start that engine itself."""
    used = sorted(EngineGuard.fixtures.intersection(item.fixturenames))
    if used and not _engine_marked(item):
        pytest.fail(f"{item.nodeid} uses {used}, which start an SGLang engine, but is not marked `engine`: add "
                    "@pytest.mark.engine (or `pytestmark = pytest.mark.engine` for a whole module)", pytrace=False)


def pytest_sessionstart(session):
    """multiprocessing's resource tracker started by this process itself, not by its first engine (whose
    shutdown, ``shutdown_engine``, ends the processes that engine started)."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


def set_host_budget(engine, nbytes: int) -> list[bool]:
    """The engine's host budget through the admin channel (``slkv_sglang.admin``), as PUT /admin/offload sets
    it: one answer per scheduler, False where refused."""
    from sglang.srt.managers.io_struct import SetInternalStateReq

    return engine.loop.run_until_complete(
        engine.tokenizer_manager.set_internal_state(SetInternalStateReq(server_args={HOST_BUDGET: nbytes})))


def page_size(engine) -> int:
    """The engine's KV page, as SGLang resolved it (1 on CPU)."""
    return engine.server_args.resolved_dict()["page_size"]


def recomputed_tokens(history: int, prompt: int, whole: int, page: int) -> int:
    """What a prefill adds to ``recomputed_tokens`` (once per request, however many chunks it takes): its radix match
    (``history`` cached tokens of the conversation: a turn caches its prompt and its output tokens but the last,
    which has no KV yet) capped so that ``TEST_SLKV.last`` prompt tokens are extended and score
    (``hooks.admission.cap_prefix``), cut where some unit's KV is on neither tier (after ``whole`` tokens),
    rounded down to the page (``KvPlanner.match``)."""
    matched = min(history, prompt - TEST_SLKV.last)
    keep = min(whole, matched)
    return matched - (keep - keep % page)


@pytest.fixture(scope="session")
def mooncake():
    """A Mooncake Store on loopback (master and store service) for the session: the shared tier of the engines
    that name it, and the store the store tests talk to. Tests that stop or clear it start it again."""
    from slkv_sglang.tools.local_mooncake import LocalMooncake

    store = LocalMooncake()
    yield store
    store.close()


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


# The suite in two halves, one per pytest-xdist worker (``make test``: ``-n 2 --dist loadgroup``; each engine runs
# with OMP_NUM_THREADS=1, so two workers use both cores of the CI machine). Each half runs its files in the order
# listed here. The split keeps at most two engines (or engine servers) alive per worker at any time (each holds
# ~4 GB; the KV-tier modules' three have small pools), with ``pytest_runtest_teardown`` below, and the halves'
# times about equal: FIRST holds modules that start engines of their own, and test_decode_mode, whose
# ``slkv_engine`` is stopped before test_api starts its servers; SECOND the other users of the session's engines
# (test_api's two tests on its offload server among them, ``TO_SECOND``: the one that compares with ``slkv_engine``
# and the other user of that server; test_bench_serve just before test_offload_engine, the other user of
# ``offload_engine``), then, once those are stopped, the KV tier on the FlashInfer path. A file named in neither
# list runs at the end of SECOND. In each half the files that start no engine (no test marked ``engine``) run
# first. Tests do not depend on this order or split; it is about memory and wall-clock time.
FIRST = ["test_kv_tier.py", "test_decode_mode.py", "test_api.py", "test_launch_server.py", "test_hybrid_engine.py",
         "test_reference.py", "test_startup.py", "test_config.py", "test_api_store.py", "test_api_hostile.py",
         "test_api_server.py", "test_deploy.py", "test_gpu_check.py", "test_gpu_e2e.py", "test_tensor_parallel.py",
         "test_offload.py", "test_profile.py", "test_packaging.py"]
SECOND = ["test_engine.py", "test_heads.py", "test_evaluation.py", "test_bench_serve.py", "test_offload_engine.py",
          "test_api.py", "test_kv_tier_flashinfer.py"]
TO_SECOND = {"test_api.py::test_four_turns_with_the_openai_client",
             "test_api.py::test_host_budget_through_the_admin_channel"}
SHARED_ENGINES = ("slkv_engine", "offload_engine")


def _half(nodeid: str) -> str:
    path, _, test = nodeid.split("@", 1)[0].partition("::")
    name = path.rsplit("/", 1)[-1]
    if f"{name}::{test.split('[', 1)[0]}" in TO_SECOND:
        return "second"
    return "first" if name in FIRST else "second"


def _position(item, engine_files: set[tuple[str, str]]) -> tuple[int, bool, int]:
    name, half = item.path.name, _half(item.nodeid)
    listed = FIRST if half == "first" else SECOND
    return int(half == "second"), (half, name) in engine_files, listed.index(name) if name in listed else len(listed)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """The halves' files, in each half first those whose tests start no engine (none marked ``engine``: quick
    failures come first), then the others, each group in its listed order (a stable sort: the tests of a file keep
    theirs); each test marked with its half as its ``xdist_group``."""
    engine_files = {(_half(x.nodeid), x.path.name) for x in items if _engine_marked(x)}
    items.sort(key=lambda item: _position(item, engine_files))
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_half(item.nodeid)))


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` by this file's halves: each half, whole, to one worker. (pytest-xdist's own loadgroup
    reads the ``xdist_group`` marks by renaming the items' node ids, which pytest 9.2 no longer allows: every
    test would be scheduled on its own, and a module's engines started in both workers.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Halves(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _half(nodeid)

    return Halves(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """Tells the worker that it runs one half, in collection order (``_later_items``)."""
    node.workerinput["slkv_halves"] = node.config.getvalue("dist") == "loadgroup"


def _later_items(item) -> list | None:
    """The tests this process runs after ``item``; None where that is not known (a worker not scheduled by
    ``Halves``)."""
    items = item.session.items
    later = items[items.index(item) + 1 :]
    workerinput = getattr(item.config, "workerinput", None)
    if workerinput is not None:
        if not workerinput.get("slkv_halves"):
            return None
        later = [x for x in later if _half(x.nodeid) == _half(item.nodeid)]
    return later


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop a shared engine (``SHARED_ENGINES``) after the last test of this process that uses it, rather than at
    the end of the session: engines started after it then do not add up in memory. A later test asking for it
    again (a run in another order) would start it anew: pytest sets up a finished fixture again."""
    later = _later_items(item)
    if later is None:
        return
    for name in SHARED_ENGINES:
        fixturedefs = item._fixtureinfo.name2fixturedefs.get(name)
        if not fixturedefs or fixturedefs[-1].cached_result is None:
            continue
        if not any(name in x.fixturenames for x in later):
            fixturedefs[-1].finish(item._request)

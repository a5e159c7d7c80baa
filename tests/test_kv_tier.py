"""The KV tier inside the engine on the torch_native backend: the differential fuzz test (``OPS`` operations), the
soak and each recoverable state (``kv_tier.py`` has what they do and why)."""

from __future__ import annotations

import pytest

from slkv_sglang.runtime import shutdown_engine

from .kv_tier import OPS, SOAK_REQUESTS, fuzz, recoverable_states, soak, start_offload_engine, start_same_without_offload

pytestmark = pytest.mark.engine  # every test here starts an SGLang engine


@pytest.fixture(scope="module")
def fuzz_engine(model_path, mooncake):
    engine = start_offload_engine(model_path, mooncake)
    yield engine
    shutdown_engine(engine)


@pytest.fixture(scope="module")
def same_without_offload(model_path, fuzz_engine):
    engine = start_same_without_offload(model_path)
    yield engine
    shutdown_engine(engine)


def test_offload_engine_matches_the_engine_without_offload(fuzz_engine, same_without_offload, tokenizer, mooncake):
    fuzz(fuzz_engine, same_without_offload, tokenizer, mooncake, OPS)


def test_soak_keeps_every_map_flat(fuzz_engine, tokenizer):
    soak(fuzz_engine, tokenizer, SOAK_REQUESTS)


def test_recoverable_states_recompute(fuzz_engine, same_without_offload, tokenizer, mooncake):
    recoverable_states(fuzz_engine, same_without_offload, tokenizer, mooncake)

"""The KV tier's fuzz, soak and recoverable states (``kv_tier.py``) on the FlashInfer backend's code path:
``--slkv-flashinfer-standin`` runs its plans and per-layer row pages on the CPU engine, with torch kernels in place
of FlashInfer's, so every read goes through the row pool as it would on a GPU. The fuzz runs the seed's first
``STANDIN_OPS`` operations (the torch_native module runs ``OPS``): the paths it asserts are all taken by then, and
the stand-in's kernels are slow."""

from __future__ import annotations

import pytest

from slkv_sglang.runtime import shutdown_engine

from .kv_tier import SOAK_REQUESTS, STANDIN_OPS, fuzz, recoverable_states, soak, start_offload_engine, start_same_without_offload

pytestmark = pytest.mark.engine  # every test here starts an SGLang engine


@pytest.fixture(scope="module")
def standin_engine(model_path, mooncake):
    engine = start_offload_engine(model_path, mooncake, flashinfer_standin=True)
    yield engine
    shutdown_engine(engine)


@pytest.fixture(scope="module")
def same_without_offload(model_path, standin_engine):
    engine = start_same_without_offload(model_path)
    yield engine
    shutdown_engine(engine)


def test_flashinfer_path_matches_the_engine_without_offload(standin_engine, same_without_offload, tokenizer,
                                                            mooncake):
    fuzz(standin_engine, same_without_offload, tokenizer, mooncake, STANDIN_OPS)


def test_soak_keeps_every_map_flat(standin_engine, tokenizer):
    soak(standin_engine, tokenizer, SOAK_REQUESTS)


def test_recoverable_states_recompute(standin_engine, same_without_offload, tokenizer, mooncake):
    recoverable_states(standin_engine, same_without_offload, tokenizer, mooncake)

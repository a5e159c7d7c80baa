"""A hybrid model in the real SGLang CPU engine: Gemma 3 270M, 18 layers, 5 sliding-window (512) layers to 1
full-attention layer. SimLayerKV scores and trims its full-attention layers only; a request naming a sliding
layer is refused where it enters, and the engine keeps serving."""

from __future__ import annotations

import os

import pytest

from slkv_sglang.config import SlkvConfig, SlkvConfigError
from slkv_sglang.tools.corpus import prompt_ids
from slkv_sglang.tools.gemma3 import ensure_gemma3_model
from slkv_sglang.layer_map import LayerMap
from slkv_sglang.runtime import make_engine, shutdown_engine

from .conftest import MEM_FRACTION
from .servers import engine_start_lock

FULL = [5, 11, 17]  # the model config's layer_types: every 6th layer is full attention
# recent 128 so that prompts of 600-800 tokens are trimmable (>= sink + recent + last) and a lazy layer reads
# under a quarter of them; the sliding layers' window (512) is shorter than the prompts.
HYBRID_SLKV = SlkvConfig(enabled=True, threshold=0.9, sink=4, recent=128, last=32, poison=True)
# Full layers score 0.56-0.69 on such prompts at recent 128 (measured: 600, 900, 1300 tokens), so at 0.5 all
# three are lazy, and at 1.5 none is.
LOW, NONE_LAZY = 0.5, 1.5
NEW_TOKENS = 8
QUESTION = "Which functions are defined in the code above?"


@pytest.fixture(scope="module")
def gemma_path() -> str:
    return str(ensure_gemma3_model())


@pytest.fixture(scope="module")
def gemma_engine(gemma_path):
    saved = {key: os.environ.get(key) for key in HYBRID_SLKV.to_env()}
    with engine_start_lock():
        engine = make_engine(gemma_path, slkv=HYBRID_SLKV, mem_fraction_static=MEM_FRACTION)
    yield engine
    shutdown_engine(engine)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def prompts(gemma_path) -> list[list[int]]:
    """Gemma 3 turn-format prompts (the chat template the conversion writes: its GGUF has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_path)
    return [prompt_ids(tokenizer, n, seed=i, question=QUESTION) for i, n in enumerate((640, 800))]


def _greedy(**slkv) -> dict:
    return {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True, "custom_params": {"slkv": slkv}}


def _run(engine, ids: list[int], **slkv) -> tuple[dict, list[float]]:
    out = engine.generate(input_ids=ids, sampling_params=_greedy(**slkv), return_logprob=True)
    return out, [lp for lp, _tok, _txt in out["meta_info"]["output_token_logprobs"]]


@pytest.mark.engine
def test_full_layers_are_scored_and_made_lazy(gemma_engine, prompts):
    """Scores exist for full-attention layers only (null in the JSON map for sliding ones); at a low threshold
    the full layers are lazy and their decode reads sink + recent (the logprobs move), sliding ones never are."""
    for ids in prompts:
        lazy_out, lazy_lp = _run(gemma_engine, ids, threshold=LOW)
        record = lazy_out["meta_info"]["slkv"]
        assert [i for i, s in enumerate(record["scores"]) if s is not None] == FULL
        assert all(record["scores"][i] is None for i in range(18) if i not in FULL)
        layer_map = LayerMap.from_dict(record)
        assert layer_map.decided_at == len(ids)
        assert layer_map.lazy_layers == FULL, layer_map.scores
        _full_out, full_lp = _run(gemma_engine, ids, enabled=False)
        assert lazy_lp[0] == pytest.approx(full_lp[0], abs=1e-4)  # the first token comes from prefill: full attention
        assert max(abs(a - b) for a, b in zip(lazy_lp[1:], full_lp[1:])) > 1e-3


@pytest.mark.engine
def test_nothing_lazy_equals_simlayerkv_off(gemma_engine, prompts):
    """Every full layer kept (threshold above 1): scored, and tokens equal SGLang's own attention path
    (SimLayerKV off for the request) token for token."""
    for ids in prompts:
        kept, _ = _run(gemma_engine, ids, threshold=NONE_LAZY)
        off, _ = _run(gemma_engine, ids, enabled=False)
        layer_map = LayerMap.from_dict(kept["meta_info"]["slkv"])
        assert not any(layer_map.lazy) and all(layer_map.scores[i] is not None for i in FULL)
        assert "slkv" not in off["meta_info"]
        assert kept["output_ids"] == off["output_ids"]


@pytest.mark.engine
def test_force_lazy_on_a_sliding_layer_is_refused(gemma_engine, prompts):
    """Refused in the tokenizer process with the field and the layers named; the engine keeps serving."""
    with pytest.raises(SlkvConfigError, match=r"custom_params.slkv.force_lazy\[0\] names sliding-window layer 0"):
        gemma_engine.generate(input_ids=prompts[0], sampling_params=_greedy(force_lazy=[0, 5]))
    with pytest.raises(SlkvConfigError, match=r"custom_params.slkv.force_lazy\[0\] must be a layer id in \[0, 18\)"):
        gemma_engine.generate(input_ids=prompts[0], sampling_params=_greedy(force_lazy=[18]))
    out = gemma_engine.generate(input_ids=prompts[0], sampling_params=_greedy(force_lazy=[11]))
    assert LayerMap.from_dict(out["meta_info"]["slkv"]).lazy_layers == [11]


def test_offload_on_a_hybrid_model_is_refused_before_spawning(gemma_path, monkeypatch):
    """Refused in the launching process (the hook after SGLang resolves its arguments), with the flag named."""
    import sglang

    from slkv_sglang.runtime import engine_kwargs

    for key, value in SlkvConfig(enabled=True, offload=True).to_env().items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SlkvConfigError, match="--slkv-offload does not support models with sliding-window layers"):
        sglang.Engine(**engine_kwargs(gemma_path))

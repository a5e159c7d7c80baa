"""``slkv serve``'s start-up facts: the KV bytes it reports per token and layer follow the engine's KV dtype."""

from __future__ import annotations

import pytest

from api.server import kv_bytes_per_token_layer

# The bundled SmolLM2-135M: 3 KV heads of 64 dims, a float32 checkpoint; K and V: 2 x 3 x 64 = 384 elements.
ELEMENTS = 384


@pytest.mark.parametrize("dtype, kv_cache_dtype, element_bytes", [
    ("float32", "auto", 4),  # the CPU engine (runtime.engine_kwargs)
    ("bfloat16", "auto", 2),  # a bf16 deployment
    ("auto", "auto", 2),  # SGLang serves a float32 checkpoint in float16 under auto
    ("float32", "bf16", 2),  # the KV pool's own dtype wins over the model's
    ("auto", "fp8_e4m3", 1),
])
def test_kv_bytes_follow_the_kv_dtype(model_path, dtype, kv_cache_dtype, element_bytes):
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_path)
    assert kv_bytes_per_token_layer(hf, dtype, kv_cache_dtype) == ELEMENTS * element_bytes


def test_fp8_kv_checkpoint_and_unknown_kv_dtype(model_path):
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_path)
    hf.quantization_config = {"quant_method": "modelopt", "kv_cache_quant_algo": "FP8"}
    assert kv_bytes_per_token_layer(hf, "bfloat16", "auto") == ELEMENTS
    with pytest.raises(ValueError, match="fp12"):
        kv_bytes_per_token_layer(hf, "bfloat16", "fp12")

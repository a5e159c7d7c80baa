"""Which of a model's layers SimLayerKV scores and may make lazy: its full-attention layers only.

Hybrid models (Gemma 2/3, gpt-oss, ...) interleave sliding-window layers, which already read only their
window: SimLayerKV neither scores nor trims them, and their score in a layer map is null. The facts come from
the model config SGLang loaded (``layer_types``, as SGLang's own hybrid-SWA split reads them), the same way in
every process: the launcher refuses what cannot be served before spawning, the tokenizer process validates
``force_lazy``, the scheduler's tracker masks its decisions. At backend creation the model's attention modules
are checked against these facts, so a model whose attention slides where its config says full attention is
refused at start-up rather than failing mid-request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .config import SlkvConfig, SlkvConfigError

FULL_ATTENTION = "full_attention"  # the transformers ``layer_types`` entry of a full-attention layer


@dataclass(frozen=True)
class ModelLayers:
    num_layers: int
    full: tuple[int, ...]  # the layers SimLayerKV scores and may make lazy; the others slide (or are not attention)
    num_kv_heads: int = 1  # KV heads per layer (the model's total, before any tensor-parallel split)

    @classmethod
    def from_model_config(cls, model_config: Any) -> "ModelLayers":
        """From SGLang's ``ModelConfig``."""
        return cls.from_layer_types(model_config.num_hidden_layers,
                                    getattr(model_config.hf_text_config, "layer_types", None),
                                    model_config.get_total_num_kv_heads())

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelLayers":
        """From a transformers config (the chat API's, which loads no SGLang model config); a multimodal
        config's text model, as SGLang reads it."""
        text = getattr(config, "text_config", None) or config
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return cls.from_layer_types(text.num_hidden_layers, getattr(text, "layer_types", None), heads)

    @classmethod
    def from_layer_types(cls, num_layers: int, layer_types: Sequence[str] | None, num_kv_heads: int = 1) -> "ModelLayers":
        """A config without ``layer_types`` has full attention in every layer."""
        kinds = layer_types or [FULL_ATTENTION] * num_layers
        return cls(num_layers, tuple(i for i, kind in enumerate(kinds[:num_layers]) if kind == FULL_ATTENTION),
                   num_kv_heads)

    @property
    def sliding(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.full)


def check_servable(layers: ModelLayers, cfg: SlkvConfig) -> None:
    """Start-up: refuse a model SimLayerKV has nothing to do in, and offload on a hybrid model (the row pool
    reads every layer in full; a sliding window's reads are not built there)."""
    if not layers.full:
        raise SlkvConfigError("--enable-simlayerkv: this model has no full-attention layer (every layer reads a "
                              "sliding window already), so there is nothing to make lazy: start without it")
    if cfg.offload and layers.sliding:
        raise SlkvConfigError(f"--slkv-offload does not support models with sliding-window layers (this model: "
                              f"{len(layers.sliding)} of {layers.num_layers}): start without --slkv-offload")


def check_attention_modules(layers: ModelLayers, model: Any) -> None:
    """Scheduler start-up: every layer taken as full attention is a plain self-attention over the whole
    sequence in the loaded model (SGLang's ``RadixAttention`` modules)."""
    from sglang.srt.layers.radix_attention import RadixAttention

    full = set(layers.full)
    for module in model.modules():
        if not isinstance(module, RadixAttention) or module.layer_id not in full:
            continue
        if module.is_cross_attention or module.sliding_window_size > -1:
            kind = "cross attention" if module.is_cross_attention else f"a sliding window of {module.sliding_window_size}"
            raise SlkvConfigError(f"--enable-simlayerkv: layer {module.layer_id} has {kind}, but the model config's "
                                  "layer_types call it full attention; SimLayerKV cannot tell which layers to trim "
                                  "in this model: start without it")

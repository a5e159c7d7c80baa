"""SimLayerKV on SGLang's ``torch_native`` backend (CPU and any device without FlashInfer).

Prefill runs unchanged; afterwards each layer scores the requests that decide in this forward from the KV
just written. Decode reads, per request and per layer, either the whole row or only sink + recent slots,
with the same per-request SDPA call as the parent, so non-lazy requests are bit-identical to plain SGLang.
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch.nn.functional import scaled_dot_product_attention

from ..config import SlkvConfig
from .common import ScoringMixin, make_tracker


class SlkvTorchNativeBackend(ScoringMixin, TorchNativeAttnBackend):
    def __init__(self, model_runner: Any, config: SlkvConfig):
        super().__init__(model_runner)
        self.tracker = make_tracker(model_runner, config)

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        self.tracker.plan(forward_batch)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # type: ignore[override]
        restricted = self.tracker.restricted_positions(layer.layer_id)
        if restricted:
            o = self._decode_with_windows(q, k, v, layer, forward_batch, save_kv_cache, set(restricted))
        else:
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        self._score(q, layer)
        return o

    def _decode_with_windows(self, q, k, v, layer, forward_batch, save_kv_cache, restricted: set[int]):
        """The parent's decode loop, with sink + recent slot ids for the restricted requests."""
        if layer.is_cross_attention or (layer.sliding_window_size or -1) > -1:
            raise NotImplementedError("slkv: lazy layers with cross attention or sliding windows")
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        o = torch.empty_like(q) if layer.qk_head_dim == layer.v_head_dim else q.new_empty(
            (q.shape[0], layer.tp_q_head_num * layer.v_head_dim)
        )
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)
        query = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim).movedim(0, 1)  # [H, bs, D]
        out = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        plan = self.tracker.plan_
        assert plan is not None
        for pos, (row, seq_len) in enumerate(zip(plan.rows, plan.seq_lens)):
            if pos in restricted:
                slots = self.tracker.window_indices(pos)
            else:
                slots = self.req_to_token_pool.req_to_token[row, :seq_len]
            key = k_cache[slots].movedim(0, 1)
            value = v_cache[slots].movedim(0, 1)
            per_req = scaled_dot_product_attention(
                query[:, pos : pos + 1, :].unsqueeze(0),
                key.unsqueeze(0),
                value.unsqueeze(0),
                enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
                scale=layer.scaling,
                is_causal=False,
            )
            out[pos : pos + 1] = per_req.squeeze(0).movedim(1, 0)
        return o

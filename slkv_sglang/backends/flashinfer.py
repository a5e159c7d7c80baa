"""SimLayerKV on SGLang's FlashInfer backend (CUDA).

Decode: lazy layers differ per request, so one FlashInfer decode wrapper is planned per distinct *lazy
pattern* (which requests of the batch are restricted in a layer): its ``kv_indices`` hold sink + recent slots
for restricted requests and the whole row for the others. Laziness is mostly a property of the layer
(docs/design.md), so a batch needs few patterns. ``plan()`` runs once per batch in ``init_forward_metadata``;
each layer only picks its wrapper and runs it. Scoring uses FlashInfer's prefill with ``return_lse``
(``flashinfer_ops.LseScorer``), planned once per forward. The calls themselves live in ``flashinfer_ops``,
which the device check (``slkv gpu-check``) runs against torch references without SGLang.

CUDA graphs are off (``startup.py``): the decode windows are planned per step.
"""

from __future__ import annotations

from typing import Any

import torch
from flashinfer import BatchDecodeWithPagedKVCacheWrapper, BatchPrefillWithPagedKVCacheWrapper
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from ..config import SlkvConfig, SlkvConfigError
from ..report import Outbox
from ..tracker import MassFn
from .common import ScoringMixin, make_tracker
from .flashinfer_ops import PREFILL_BACKEND, AttnShape, LseScorer, plan_decode


class SlkvFlashInferBackend(ScoringMixin, FlashInferAttnBackend):
    def __init__(self, model_runner: Any, config: SlkvConfig, outbox: Outbox):
        super().__init__(model_runner, init_new_workspace=model_runner.init_new_workspace)
        self.outbox = outbox
        # SGLang runs this check only for its own class, not for subclasses
        self._check_kv_attention_access("prefill", self.prefill_kv_access)
        self._check_kv_attention_access("decode", self.decode_kv_access)
        if self.prefill_uses_dequant_workspace or self.decode_uses_dequant_workspace:
            raise SlkvConfigError("SimLayerKV reads KV through slot indices; this KV cache dtype makes SGLang's "
                                  "FlashInfer dequantise into a per-request workspace: use --kv-cache-dtype "
                                  "auto, fp8_e4m3 or fp8_e5m2")
        self.tracker = make_tracker(model_runner, config, head_decode=False)  # one wrapper per lazy-layer pattern
        upd = self.indices_updater_decode
        self._shape = AttnShape(upd.num_qo_heads, upd.num_kv_heads, upd.head_dim, upd.q_data_type, upd.data_type)
        self._windowed: dict[int, BatchDecodeWithPagedKVCacheWrapper] = {}  # layer -> wrapper, this batch
        self._wrapper_pool: list[BatchDecodeWithPagedKVCacheWrapper] = []
        self._scorer = LseScorer(
            BatchPrefillWithPagedKVCacheWrapper(self.workspace_buffer, "NHD", backend=PREFILL_BACKEND),
            self._shape, config.sink, config.recent,
        )

    def init_cuda_graph_state(self, *args: Any, **kwargs: Any) -> None:
        raise SlkvConfigError("SimLayerKV plans decode windows per step: start SGLang with --disable-cuda-graph")

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        plan = self.tracker.plan(forward_batch)
        self._windowed = {}
        self._scorer.reset()
        if plan is None or not plan.is_decode or not plan.window:
            return
        patterns: dict[tuple[int, ...], list[int]] = {}
        for layer_id in range(self.tracker.num_layers):
            restricted = tuple(self.tracker.restricted_positions(layer_id))
            if restricted:
                patterns.setdefault(restricted, []).append(layer_id)
        req_to_token = self.req_to_token_pool.req_to_token
        for n, (restricted, layers) in enumerate(patterns.items()):
            kv_rows = [self.tracker.window_indices(pos) if pos in restricted else req_to_token[row, :seq_len]
                       for pos, (row, seq_len) in enumerate(zip(plan.rows, plan.seq_lens))]
            wrapper = self._decode_wrapper(n)
            plan_decode(wrapper, kv_rows, self._shape)
            self._windowed.update(dict.fromkeys(layers, wrapper))

    def _decode_wrapper(self, n: int) -> BatchDecodeWithPagedKVCacheWrapper:
        while len(self._wrapper_pool) <= n:
            self._wrapper_pool.append(BatchDecodeWithPagedKVCacheWrapper(
                self.workspace_buffer, "NHD", backend=self.decode_backend, use_tensor_cores=self.decode_use_tensor_cores))
        return self._wrapper_pool[n]

    def _mass(self, layer: Any) -> MassFn:
        """FlashInfer scoring, planned at the forward's first scored layer; torch when the window is too short."""
        kv_cache = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)

        def mass(queries: list[torch.Tensor], key_slots: list[torch.Tensor],
                 lses: list[torch.Tensor | None]) -> list[torch.Tensor]:
            if not all(self._scorer.supports(len(q)) for q in queries):
                return super(SlkvFlashInferBackend, self)._mass(layer)(queries, key_slots, lses)
            if not self._scorer.matches(queries, key_slots):
                self._scorer.plan([len(q) for q in queries], key_slots, layer.scaling, layer.logit_cap or None)
            return self._scorer.mass(queries, kv_cache, layer.k_scale_float, layer.v_scale_float)

        return mass

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # type: ignore[override]
        wrapper = self._windowed.get(layer.layer_id)
        if wrapper is None:
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        else:
            if k is not None and save_kv_cache:
                loc = KVWriteLoc.for_layer(forward_batch, layer, swa_loc=self.forward_metadata.swa_out_cache_loc)
                self.token_to_kv_pool.set_kv_buffer(layer, loc, k, v, *self._kv_write_scales(layer))
            o = wrapper.forward(  # SGLang's own decode call, through the rewritten indices
                q.contiguous().view(-1, layer.tp_q_head_num, layer.head_dim),
                self.token_to_kv_pool.get_kv_buffer(layer.layer_id),
                sm_scale=layer.scaling,
                logits_soft_cap=layer.logit_cap,
                k_scale=layer.k_scale_float,
                v_scale=layer.v_scale_float,
            ).view(-1, layer.tp_q_head_num * layer.head_dim)
        self._score(q, layer)
        return o

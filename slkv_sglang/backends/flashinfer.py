"""SimLayerKV on SGLang's FlashInfer backend (CUDA).

Decode: lazy heads differ per request, so one FlashInfer decode wrapper is planned per distinct *lazy
pattern* (which KV heads of which requests read only sink + recent in a layer): its ``kv_indices`` hold sink +
recent slots where a request is lazy and all its slots elsewhere; with head granularity a partly lazy request
is planned per (request, KV head) pair (``flashinfer_ops.WindowedDecode``). Laziness is mostly a property of
the layer (docs/design.md), so a batch needs few patterns. ``plan()`` runs once per batch in
``init_forward_metadata``; each layer only picks its wrapper and runs it. Scoring uses FlashInfer's prefill
with ``return_lse`` (``flashinfer_ops.LseScorer``), planned once per forward. The calls themselves live in
``flashinfer_ops``, which the device check (``slkv gpu-check``) runs against torch references without SGLang.

CUDA graphs are off (``startup.py``): the decode windows are planned per step.
"""

from __future__ import annotations

from typing import Any

import torch
from flashinfer import BatchDecodeWithPagedKVCacheWrapper, BatchPrefillWithPagedKVCacheWrapper
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.runtime_context import get_parallel

from ..config import SlkvConfig, SlkvConfigError
from ..report import Outbox
from ..tracker import MassFn
from .common import ScoringMixin, make_tracker
from .flashinfer_ops import PREFILL_BACKEND, AttnShape, LseScorer, WindowedDecode


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
        # single lazy KV heads: on one rank (under tensor parallel a rank's heads are a block of the model's)
        self.tracker = make_tracker(model_runner, config, head_decode=get_parallel().tp_size == 1)
        upd = self.indices_updater_decode
        self._shape = AttnShape(upd.num_qo_heads, upd.num_kv_heads, upd.head_dim, upd.q_data_type, upd.data_type)
        # deterministic inference pins the KV split, as SGLang plans its own decode
        self._windowed = WindowedDecode(self._new_decode_wrapper, self._shape, config.sink, config.recent,
                                        fixed_split_size=self.decode_split_tile_size)
        self._scorer = LseScorer(
            BatchPrefillWithPagedKVCacheWrapper(self.workspace_buffer, "NHD", backend=PREFILL_BACKEND),
            self._shape, config.sink, config.recent,
        )

    def init_cuda_graph_state(self, *args: Any, **kwargs: Any) -> None:
        raise SlkvConfigError("SimLayerKV plans decode windows per step: start SGLang with --disable-cuda-graph")

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        plan = self.tracker.plan(forward_batch)
        self._scorer.reset()
        if plan is None or not plan.is_decode or not plan.window:
            self._windowed.plan([], {}, {})
            return
        req_to_token = self.req_to_token_pool.req_to_token
        self._windowed.plan([req_to_token[idx, :seq_len] for idx, seq_len in zip(plan.req_pool_indices, plan.seq_lens)],
                            plan.window, plan.heads)

    def _new_decode_wrapper(self) -> BatchDecodeWithPagedKVCacheWrapper:
        return BatchDecodeWithPagedKVCacheWrapper(self.workspace_buffer, "NHD", backend=self.decode_backend,
                                                  use_tensor_cores=self.decode_use_tensor_cores)

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
        if not self._windowed.restricts(layer.layer_id):
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        else:
            if k is not None and save_kv_cache:
                loc = KVWriteLoc.for_layer(forward_batch, layer, swa_loc=self.forward_metadata.swa_out_cache_loc)
                self.token_to_kv_pool.set_kv_buffer(layer, loc, k, v, *self._kv_write_scales(layer))
            o = self._windowed.run(  # SGLang's own decode call, through the rewritten indices
                layer.layer_id,
                q.contiguous().view(-1, layer.tp_q_head_num, layer.head_dim),
                self.token_to_kv_pool.get_kv_buffer(layer.layer_id),
                sm_scale=layer.scaling,
                logits_soft_cap=layer.logit_cap,
                k_scale=layer.k_scale_float,
                v_scale=layer.v_scale_float,
            ).view(-1, layer.tp_q_head_num * layer.head_dim)
        self._score(q, layer)
        return o

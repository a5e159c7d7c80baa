"""SimLayerKV on SGLang's FlashInfer backend (CUDA).

Decode: lazy layers differ per request, so one FlashInfer decode wrapper is planned per distinct *lazy
pattern* (which requests of the batch are restricted in a layer) — the index list of each wrapper holds
sink + recent slots for restricted requests and the whole row for the others. Laziness is mostly a property
of the layer (shared/simlayerkv-facts.md), so a batch needs few patterns. ``plan()`` runs once per batch in
``init_forward_metadata``; each layer only picks its wrapper and ``run``s it.

Scoring reuses the tracker (a [H, last, L] logits slice per request and layer). CUDA graphs are refused:
decode windows are planned per step.
"""

from __future__ import annotations

from typing import Any

import torch
from flashinfer import BatchDecodeWithPagedKVCacheWrapper
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from ..config import SlkvConfig
from .common import ScoringMixin, make_tracker


class SlkvFlashInferBackend(ScoringMixin, FlashInferAttnBackend):
    def __init__(self, model_runner: Any, config: SlkvConfig):
        super().__init__(model_runner, init_new_workspace=model_runner.init_new_workspace)
        self.tracker = make_tracker(model_runner, config)
        self._device = model_runner.device
        self._windowed: dict[int, BatchDecodeWithPagedKVCacheWrapper] = {}  # layer -> wrapper, this batch
        self._wrapper_pool: list[BatchDecodeWithPagedKVCacheWrapper] = []

    def init_cuda_graph_state(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("SimLayerKV plans decode windows per step: start SGLang with --disable-cuda-graph")

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        plan = self.tracker.plan(forward_batch)
        self._windowed = {}
        if plan is None or not plan.is_decode or not plan.window:
            return
        patterns: dict[tuple[int, ...], list[int]] = {}
        for layer_id in range(self.tracker.num_layers):
            restricted = tuple(self.tracker.restricted_positions(layer_id))
            if restricted:
                patterns.setdefault(restricted, []).append(layer_id)
        for n, (restricted, layers) in enumerate(patterns.items()):
            wrapper = self._plan_windowed(n, set(restricted))
            self._windowed.update(dict.fromkeys(layers, wrapper))

    def _plan_windowed(self, n: int, restricted: set[int]) -> BatchDecodeWithPagedKVCacheWrapper:
        plan = self.tracker.plan_
        assert plan is not None
        req_to_token = self.req_to_token_pool.req_to_token
        rows = [
            self.tracker.window_indices(pos) if pos in restricted else req_to_token[row, :seq_len]
            for pos, (row, seq_len) in enumerate(zip(plan.rows, plan.seq_lens))
        ]
        lengths = torch.tensor([0] + [len(r) for r in rows], dtype=torch.int32, device=self._device)
        indptr = torch.cumsum(lengths, dim=0, dtype=torch.int32)
        indices = torch.cat(rows).to(torch.int32)
        while len(self._wrapper_pool) <= n:
            self._wrapper_pool.append(
                BatchDecodeWithPagedKVCacheWrapper(
                    self.workspace_buffer, "NHD", use_tensor_cores=self.decode_use_tensor_cores
                )
            )
        wrapper = self._wrapper_pool[n]
        upd = self.indices_updater_decode
        wrapper.plan(
            indptr,
            indices,
            torch.ones(len(rows), dtype=torch.int32, device=self._device),
            upd.num_qo_heads,
            upd.num_kv_heads,
            upd.head_dim,
            1,
            data_type=upd.data_type,
            q_data_type=upd.q_data_type,
        )
        return wrapper

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # type: ignore[override]
        wrapper = self._windowed.get(layer.layer_id)
        if wrapper is None:
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        else:
            if k is not None and save_kv_cache:
                loc = KVWriteLoc.for_layer(forward_batch, layer, swa_loc=self.forward_metadata.swa_out_cache_loc)
                self.token_to_kv_pool.set_kv_buffer(layer, loc, k, v, *self._kv_write_scales(layer))
            o = wrapper.forward(
                q.contiguous().view(-1, layer.tp_q_head_num, layer.head_dim),
                self.token_to_kv_pool.get_kv_buffer(layer.layer_id),
                sm_scale=layer.scaling,
                logits_soft_cap=layer.logit_cap,
                k_scale=layer.k_scale_float,
                v_scale=layer.v_scale_float,
            ).view(-1, layer.tp_q_head_num * layer.head_dim)
        self._score(q, layer)
        return o

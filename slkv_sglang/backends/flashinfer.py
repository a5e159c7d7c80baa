"""SimLayerKV on SGLang's FlashInfer backend (CUDA).

KV is read through the pool the plugin installed (``kv/pool.py``). Where its pages are slot ids (SGLang's buffers)
SGLang's own kernels run every unrestricted read; where each layer's pages differ (``--slkv-offload``'s rows:
``page_map``), every full-attention layer runs the plugin's wrappers (``paged.PagedReads``), planned once per step
or forward over slots, each layer writing its rows into the plan, and the prefill also gives the all-keys
log-sum-exp that scoring needs.

Decode: lazy heads differ per request, so one FlashInfer decode wrapper is planned per distinct *lazy
pattern* (which KV heads of which requests read only sink + recent in a layer): its ``kv_indices`` hold sink +
recent slots where a request is lazy and all its slots elsewhere; with head granularity a partly lazy request
is planned per (request, KV head) pair (``flashinfer_ops.WindowedDecode``). Laziness is mostly a property of
the layer (docs/design.md), so a batch needs few patterns. ``plan()`` runs once per batch in
``init_forward_metadata``; each layer only picks its wrapper and runs it.

Scoring takes the all-keys log-sum-exp from the prefill itself: in a forward where some request decides from its
own last queries, every full-attention layer's prefill is the plugin's (``PagedExtend``, over slot pages as over
rows), which returns it with the output, and torch scores the sink + recent keys of all deciding requests in one
batch (``scoring.window_masses``): a few kernels per layer, not a second pass over all keys. Queries carried over
from an earlier chunk have no log-sum-exp in this forward: FlashInfer's prefill with ``return_lse``
(``flashinfer_ops.LseScorer``) scores them over slot pages. The calls themselves live in
``flashinfer_ops``, which the device check (``slkv gpu-check``) runs against torch references without SGLang.

Decode CUDA graphs: SGLang's breakable backend (``startup.py``). Each full-attention layer's decode attention runs
as an eager break (``paged.PagedForward``); before each replay ``init_forward_metadata_out_graph`` plans the step
from the live batch and points ``forward_metadata`` at the graph's own decode wrappers, which SGLang re-plans
there.

Not yet run on a GPU, graphs or rows (docs/gpu.md): the device check runs the reads through a torch stand-in.
"""

from __future__ import annotations

from typing import Any

import torch
from flashinfer import BatchDecodeWithPagedKVCacheWrapper, BatchPrefillWithPagedKVCacheWrapper
from sglang.srt.layers.attention.flashinfer_backend import DecodeMetadata, FlashInferAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.runtime_context import get_parallel

from ..config import SlkvConfig, SlkvConfigError
from ..report import Outbox
from ..kv.pool import SlotReads, plugin_pool
from ..tracker import MassFn
from .common import ScoringMixin, make_tracker
from .flashinfer_ops import PREFILL_BACKEND, AttnShape, LseScorer
from .paged import PagedForward, PagedReads


class SlkvFlashInferBackend(PagedForward, ScoringMixin, FlashInferAttnBackend):
    caps_logits = True
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
        self.pool: SlotReads = plugin_pool(self.token_to_kv_pool)
        # deterministic inference pins the KV split, as SGLang plans its own decode
        self._paged = PagedReads(self.pool, self.tracker, config, self._shape, self._new_decode_wrapper,
                                 self._new_prefill_wrapper, fixed_split_size=self.decode_split_tile_size)
        # over slot pages FlashInfer scores; over rows the prefill gives the all-keys lse and torch the rest
        self._scorer = None if self.pool.page_map is not None else LseScorer(
            self._new_prefill_wrapper(), self._shape, config.sink, config.recent)

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False) -> None:
        """Before a decode graph's capture or replay. SGLang re-plans the graph's wrappers here but leaves
        ``forward_metadata`` to whatever the last eager forward set, which the breaks' parent decode reads."""
        super().init_forward_metadata_out_graph(forward_batch, in_capture)
        if forward_batch.forward_mode.is_decode():
            bs = forward_batch.batch_size
            swa = self.cuda_graph_swa_out_cache_loc[:bs] if self.use_sliding_window_kv_pool else None
            self.forward_metadata = DecodeMetadata(self.decode_cuda_graph_metadata[bs], swa_out_cache_loc=swa)
            self.plan_graph_step(bs, in_capture)

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        plan = self.tracker.plan(forward_batch)
        if self._scorer is not None:
            self._scorer.reset()
        self._paged.plan(forward_batch, plan, self.req_to_token_pool.req_to_token)

    def _new_prefill_wrapper(self) -> BatchPrefillWithPagedKVCacheWrapper:
        return BatchPrefillWithPagedKVCacheWrapper(self.workspace_buffer, "NHD", backend=PREFILL_BACKEND)

    def _new_decode_wrapper(self) -> BatchDecodeWithPagedKVCacheWrapper:
        return BatchDecodeWithPagedKVCacheWrapper(self.workspace_buffer, "NHD", backend=self.decode_backend,
                                                  use_tensor_cores=self.decode_use_tensor_cores)

    def _mass(self, layer: Any) -> MassFn:
        """Where the plugin's prefill gave the all-keys log-sum-exp (a request deciding from this forward's own
        queries), torch over the sink + recent keys, all requests in one batch (``ScoringMixin``); otherwise (queries
        carried over from an earlier chunk) FlashInfer over slot pages, planned at the forward's first scored layer,
        and torch when the window is too short or over rows."""
        scorer, torch_mass = self._scorer, super()._mass(layer)
        if scorer is None:
            return torch_mass
        kv_cache = self.pool.page_buffers(layer.layer_id)

        def mass(queries: list[torch.Tensor], key_slots: list[torch.Tensor],
                 lses: list[torch.Tensor | None]) -> list[torch.Tensor]:
            if all(lse is not None for lse in lses) or not all(scorer.supports(len(q)) for q in queries):
                return torch_mass(queries, key_slots, lses)
            if not scorer.matches(queries, key_slots):
                scorer.plan([len(q) for q in queries], key_slots, layer.scaling, layer.logit_cap or None)
            return scorer.mass(queries, kv_cache, layer.k_scale_float, layer.v_scale_float)

        return mass

    def _write(self, layer: Any, forward_batch: Any, k: torch.Tensor | None, v: torch.Tensor | None,
               save: bool) -> None:
        if save and k is not None and v is not None:
            loc = KVWriteLoc.for_layer(forward_batch, layer, swa_loc=self.forward_metadata.swa_out_cache_loc)
            self.pool.set_kv_buffer(layer, loc, k, v, *self._kv_write_scales(layer))

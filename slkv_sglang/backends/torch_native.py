"""SimLayerKV on SGLang's ``torch_native`` backend (CPU and any device without FlashInfer).

Prefill attention calls the CPU flash-attention kernel that ``scaled_dot_product_attention`` dispatches to
directly, for its log-sum-exp: scoring then reads only sink + recent keys. Over SGLang's buffers it computes what
the parent computes (the query padded to the whole sequence: the same bits as plain SGLang); over a pool that
restores prefixes (``pads_prefill`` False) only the new tokens' queries. Afterwards each layer scores the requests that decide in this forward from the KV just
written. Decode reads, per request and per layer, either the whole row or only sink + recent slots, with the same
per-request SDPA call as the parent, so non-lazy requests are bit-identical to plain SGLang.

Every read and write goes through the KV pool the plugin installed (``kv/pool.py``): SGLang's buffers, or with
``--slkv-offload`` the rows of a KV tier, which restores a prefill's prefix before each layer reads it, heals
recomputed tokens, and after a decision frees lazy units' middle rows. This file does not know which.
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.runtime_context import get_parallel
from torch.nn.functional import scaled_dot_product_attention

from ..config import SlkvConfig
from ..kv.pool import SlotReads, plugin_pool
from ..report import Outbox
from .common import ScoringMixin, make_tracker
from .flashinfer_ops import AttnShape
from .paged import PagedForward, PagedReads
from .torch_paged import TorchPagedDecode, TorchPagedPrefill


class SlkvTorchNativeBackend(ScoringMixin, TorchNativeAttnBackend):
    def __init__(self, model_runner: Any, config: SlkvConfig, outbox: Outbox):
        super().__init__(model_runner)
        self.config, self.outbox = config, outbox
        # single lazy KV heads: on one rank (under tensor parallel a rank's heads are a block of the model's)
        self.tracker = make_tracker(model_runner, config, head_decode=get_parallel().tp_size == 1)
        self._full = frozenset(self.tracker.full_layers)  # the layers scored (sliding windows are left to SGLang)
        self.pool: SlotReads = plugin_pool(self.token_to_kv_pool)

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        self.tracker.plan(forward_batch)

    # ---- reads and writes ----------------------------------------------------------------------------
    def _write(self, layer: Any, forward_batch: Any, k: torch.Tensor | None, v: torch.Tensor | None, save: bool) -> None:
        if save and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # type: ignore[override]
        if (layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY
                or layer.layer_id not in self._full):
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)  # SGLang's, never offloaded
        pool, lid = self.pool, layer.layer_id
        req_to_token = self.req_to_token_pool.req_to_token
        prefixes, exts = forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu
        pool.restore(lid, req_to_token, prefixes)  # the prefill attends to its whole prefix: bring it back first
        self._write(layer, forward_batch, k, v, save_kv_cache)
        pool.heal(lid, req_to_token, prefixes, exts)
        o = _new_output(q, layer)
        out = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        lse: torch.Tensor | None = torch.zeros(layer.tp_q_head_num, q.shape[0], device=q.device)
        start = 0
        for pos, (row, prefix, ext) in enumerate(zip(forward_batch.req_pool_indices.tolist(), prefixes, exts)):
            kv = pool.read(pos, lid, req_to_token[row, : prefix + ext])
            if kv is None:  # finished with an error: nothing computed from it is served
                out[start : start + ext] = 0
            else:
                out[start : start + ext], req_lse = _attend_new_tokens(q[start : start + ext], *kv, prefix, layer,
                                                                       pad=pool.pads_prefill)
                if req_lse is None or lse is None:
                    lse = None
                else:
                    lse[:, start : start + ext] = req_lse
            start += ext
        self._score(q, layer, lse)
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # type: ignore[override]
        lid = layer.layer_id
        if lid not in self._full:  # a sliding-window layer: SGLang's own (never restricted; offload refuses such models)
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        o = self._decode_with_windows(q, k, v, layer, forward_batch, save_kv_cache,
                                      set(self.tracker.restricted_positions(lid)), self.tracker.partial_heads(lid))
        self._score(q, layer)
        return o

    def _decode_with_windows(self, q, k, v, layer, forward_batch, save_kv_cache, restricted: set[int],
                             partial: dict[int, torch.Tensor]):
        """The parent's decode loop (its per-request SDPA call: an unrestricted request gets the parent's bits),
        with sink + recent slot ids for the restricted requests (in the lazy heads only for ``partial`` ones: batch
        position -> lazy KV heads), reading through the pool. Only full-attention layers are restricted, and
        offload is refused on models with sliding-window layers (``model_layers``), so no sliding window is applied
        here."""
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        o = _new_output(q, layer)
        self._write(layer, forward_batch, k, v, save_kv_cache)
        query = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim).movedim(0, 1)  # [H, bs, D]
        out = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        lid = layer.layer_id
        rows, seq_lens = forward_batch.req_pool_indices.tolist(), forward_batch.seq_lens.tolist()
        for pos, (row, seq_len) in enumerate(zip(rows, seq_lens)):
            q_pos = query[:, pos : pos + 1, :]
            if pos in restricted:
                slots = self.tracker.window_indices(pos)
            else:
                slots = self.req_to_token_pool.req_to_token[row, :seq_len]
            if pos in partial:
                o_pos = self._decode_split_heads(q_pos, pos, lid, slots, self.tracker.window_indices(pos),
                                                 partial[pos], layer)
            else:
                kv = self.pool.read(pos, lid, slots)
                o_pos = None if kv is None else _decode_one(q_pos, *kv, layer)
            out[pos : pos + 1] = 0 if o_pos is None else o_pos  # None: finished with an error, nothing served
        return o

    def _decode_split_heads(self, q: torch.Tensor, pos: int, layer_id: int, full: torch.Tensor, window: torch.Tensor,
                            lazy: torch.Tensor, layer: Any) -> torch.Tensor | None:
        """Decode with head granularity: the query heads of lazy KV heads (``lazy`` ``[kv heads]``) attend to their
        KV at the ``window`` slots (sink + recent), the others to all of it (``full``). The heads split in two, each
        part one attention call over the KV it reads (the layout a FlashInfer decode would plan as two wrappers); with
        offload each reads only its own heads' rows, so lazy heads' middle rows may be gone. None: the request
        failed."""
        q_per_kv = q.shape[0] // lazy.shape[0]
        lazy_q = lazy.repeat_interleave(q_per_kv)
        out = q.new_empty((1, q.shape[0], layer.v_head_dim))
        for kv_heads, q_heads, slots in ((lazy, lazy_q, window), (~lazy, ~lazy_q, full)):
            kv = self.pool.read(pos, layer_id, slots, kv_heads)
            if kv is None:
                return None
            out[:, q_heads] = _decode_one(q[q_heads], *kv, layer)
        return out

class SlkvFlashInferStandinBackend(PagedForward, SlkvTorchNativeBackend):
    """``--slkv-flashinfer-standin``, a check rather than a way to serve: the FlashInfer backend's reads
    (``paged.PagedReads``: restricted decode per lazy pattern, and over rows every full-attention layer's decode
    and prefill through per-layer pages) with torch kernels in place of FlashInfer's (``torch_paged``), so that the
    CPU engine exercises that code path's plans, pages and plan sharing. What FlashInfer's parent backend would
    read over slot ids stays torch_native's."""

    def __init__(self, model_runner: Any, config: SlkvConfig, outbox: Outbox):
        super().__init__(model_runner, config, outbox)
        pool = self.pool
        q_heads = model_runner.model_config.num_attention_heads // get_parallel().tp_size
        shape = AttnShape(q_heads, pool.head_num, pool.head_dim, pool.dtype, pool.dtype)
        self._paged = PagedReads(pool, self.tracker, config, shape, TorchPagedDecode, TorchPagedPrefill)

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        self._paged.plan(forward_batch, self.tracker.plan_, self.req_to_token_pool.req_to_token)


def _new_output(q: torch.Tensor, layer: Any) -> torch.Tensor:
    """Attention output ``[tokens, heads x v_head_dim]`` for queries ``q`` ``[tokens, heads x qk_head_dim]``."""
    if layer.qk_head_dim == layer.v_head_dim:
        return torch.empty_like(q)
    return q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))


def _decode_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layer: Any) -> torch.Tensor:
    """One request's decode attention, as the parent computes it: ``q`` ``[heads, 1, dim]`` over ``keys`` /
    ``values`` ``[n, kv heads, dim]`` -> ``[1, heads, v dim]``."""
    out = scaled_dot_product_attention(
        q.unsqueeze(0), keys.movedim(0, 1).unsqueeze(0), values.movedim(0, 1).unsqueeze(0),
        enable_gqa=q.shape[0] != keys.shape[1], scale=layer.scaling, is_causal=False)
    return out.squeeze(0).movedim(1, 0)


def _attend_new_tokens(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, prefix: int, layer: Any,
                       pad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of one request's new tokens (``q`` ``[ext, heads x dim]``, positions ``prefix..``) over
    its whole KV (``[prefix + ext, kv_heads, dim]``), and its log-sum-exp ``[heads, ext]`` (None off CPU).

    ``pad``: as SGLang's torch_native extend, the query padded to the whole sequence (rows ``< prefix`` are
    computed and dropped): the plugin-off engine's bits. Otherwise only the new queries are computed, with a
    mask: a turn over a long history then costs its own tokens' attention, not a recomputation's, and its rows
    agree with the padded ones to float rounding (the kernel's matmuls see other shapes)."""
    ext = q.shape[0]
    query = q.view(ext, layer.tp_q_head_num, layer.qk_head_dim).movedim(0, 1).unsqueeze(0)
    k, v = keys.movedim(0, 1).unsqueeze(0), values.movedim(0, 1).unsqueeze(0)
    if k.dtype != query.dtype:
        k, v = k.to(query.dtype), v.to(query.dtype)
    mask = None
    if prefix and pad:
        padded = query.new_empty((1, query.shape[1], prefix + ext, query.shape[3]))
        padded[:, :, prefix:] = query
        query = padded
    elif prefix:  # query i sits at position prefix + i and sees keys 0..prefix + i
        mask = torch.arange(prefix + ext, device=q.device) <= torch.arange(prefix, prefix + ext, device=q.device)[:, None]
    out, lse = _attention(query, k, v, mask, layer)
    out, lse = out[:, :, -ext:], None if lse is None else lse[:, -ext:]
    return out.squeeze(0).movedim(1, 0).reshape(ext, layer.tp_q_head_num, layer.v_head_dim), lse


def _attention(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               layer: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``scaled_dot_product_attention`` (causal where ``mask`` is None) and its log-sum-exp ``[heads, queries]``:
    on CPU the flash kernel SDPA dispatches to, called directly (it takes GQA and an additive mask as given)."""
    if query.device.type != "cpu":
        return scaled_dot_product_attention(query, k, v, attn_mask=mask, is_causal=mask is None, scale=layer.scaling,
                                            enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num), None
    additive = None if mask is None else torch.zeros(mask.shape, dtype=query.dtype).masked_fill_(~mask, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, k, v, 0.0, mask is None, attn_mask=additive, scale=layer.scaling)
    return out, lse[0]

"""SimLayerKV on SGLang's ``torch_native`` backend (CPU and any device without FlashInfer).

Prefill runs unchanged; afterwards each layer scores the requests that decide in this forward from the KV
just written. Decode reads, per request and per layer, either the whole row or only sink + recent slots,
with the same per-request SDPA call as the parent, so non-lazy requests are bit-identical to plain SGLang.

With ``offload`` on, KV lives in a ``LayerRowPool`` instead of SGLang's per-layer buffers (which are
released): every read translates slot ids to rows of the pool, a lazy decision gives the middle tokens' rows
of lazy layers back (host copy first), and a prefill restores what its prefix needs first.
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch.nn.functional import scaled_dot_product_attention

from offload import HostArena

from ..config import SlkvConfig
from ..request_params import RequestParams
from ..row_pool import LayerRowPool
from .common import ScoringMixin, make_tracker


class _RowKeys:
    """A layer's keys indexed by slot ids, read through the row pool (what scoring indexes)."""

    def __init__(self, pool: LayerRowPool, layer: int):
        self.pool, self.layer = pool, layer

    def __getitem__(self, slots: torch.Tensor) -> torch.Tensor:
        return self.pool.kv[self.pool.rows(self.layer, slots), 0]


class SlkvTorchNativeBackend(ScoringMixin, TorchNativeAttnBackend):
    def __init__(self, model_runner: Any, config: SlkvConfig):
        super().__init__(model_runner)
        self.config = config
        self.tracker = make_tracker(model_runner, config)
        self.row_pool: LayerRowPool | None = None
        if config.offload:
            self.row_pool = _take_over_kv_pool(self.token_to_kv_pool, config)
            self.tracker.on_decide = self._release_lazy

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        self.tracker.plan(forward_batch)

    # ---- reads and writes ----------------------------------------------------------------------------
    def _key_reader(self, layer_id: int) -> Any:
        if self.row_pool is None:
            return super()._key_reader(layer_id)
        return _RowKeys(self.row_pool, layer_id)

    def _write(self, layer: Any, forward_batch: Any, k: torch.Tensor | None, v: torch.Tensor | None, save: bool) -> None:
        if not save or k is None or v is None:
            return
        if self.row_pool is None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)
        else:
            self.row_pool.write(layer.layer_id, forward_batch.out_cache_loc, k, v)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # type: ignore[override]
        if self.row_pool is None:
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        pool, lid = self.row_pool, layer.layer_id
        req_to_token = self.req_to_token_pool.req_to_token
        reqs = list(zip(forward_batch.req_pool_indices.tolist(), forward_batch.extend_prefix_lens_cpu,
                        forward_batch.extend_seq_lens_cpu))
        for row, prefix, _ in reqs:
            if prefix:  # the prefill attends to the whole prefix: bring back what lazy layers gave away
                pool.restore(lid, req_to_token[row, :prefix], row)
        self._write(layer, forward_batch, k, v, save_kv_cache)
        for row, prefix, ext in reqs:
            if row in pool.heal_at:  # this prefill recomputes cached slots whose KV was lost
                first, cached = pool.heal_at[row]
                lo, hi = max(prefix, first), min(prefix + ext, first + len(cached))
                if lo < hi:
                    pool.heal(lid, cached[lo - first : hi - first], req_to_token[row, lo:hi], row)
        o = _new_output(q, layer)
        out = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        start = 0
        for row, prefix, ext in reqs:
            rows = pool.rows(lid, req_to_token[row, : prefix + ext])
            out[start : start + ext] = _attend_new_tokens(q[start : start + ext], pool.kv[rows, 0], pool.kv[rows, 1],
                                                          prefix, layer)
            start += ext
        self._score(q, layer)
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # type: ignore[override]
        restricted = self.tracker.restricted_positions(layer.layer_id)
        if restricted or self.row_pool is not None:
            o = self._decode_with_windows(q, k, v, layer, forward_batch, save_kv_cache, set(restricted))
        else:
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        self._score(q, layer)
        return o

    def _decode_with_windows(self, q, k, v, layer, forward_batch, save_kv_cache, restricted: set[int]):
        """The parent's decode loop, with sink + recent slot ids for the restricted requests, reading through
        the row pool when offload is on. Only full-attention layers are restricted, and offload is refused on
        models with sliding-window layers (``model_layers``), so no sliding window is applied here."""
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        o = _new_output(q, layer)
        self._write(layer, forward_batch, k, v, save_kv_cache)
        query = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim).movedim(0, 1)  # [H, bs, D]
        out = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        pool, lid = self.row_pool, layer.layer_id
        if pool is None:
            k_cache, v_cache = self.token_to_kv_pool.get_key_buffer(lid), self.token_to_kv_pool.get_value_buffer(lid)
        else:
            k_cache, v_cache = pool.kv[:, 0], pool.kv[:, 1]
        rows, seq_lens = forward_batch.req_pool_indices.tolist(), forward_batch.seq_lens.tolist()
        for pos, (row, seq_len) in enumerate(zip(rows, seq_lens)):
            if pos in restricted:
                slots = self.tracker.window_indices(pos)
            else:
                slots = self.req_to_token_pool.req_to_token[row, :seq_len]
            idx = slots if pool is None else pool.rows(lid, slots)
            per_req = scaled_dot_product_attention(
                query[:, pos : pos + 1, :].unsqueeze(0),
                k_cache[idx].movedim(0, 1).unsqueeze(0),
                v_cache[idx].movedim(0, 1).unsqueeze(0),
                enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
                scale=layer.scaling,
                is_causal=False,
            )
            out[pos : pos + 1] = per_req.squeeze(0).movedim(1, 0)
        return o

    # ---- offload -------------------------------------------------------------------------------------
    def _release_lazy(self, row: int, lazy: torch.Tensor, seq_len: int, params: RequestParams) -> dict:
        """After a decision: lazy layers give back the rows of their middle tokens ``[sink, seq_len - recent)``.

        Slots another running request also reads (a prefix shared through the radix cache) keep their rows.
        Returns the request's KV report (``kv`` in its layer map).
        """
        cfg, pool = self.config, self.row_pool
        assert pool is not None
        if params.offload_budget is not None and params.offload_budget != pool.arena.budget_bytes:
            pool.arena.set_budget(params.offload_budget)  # the chat API's PUT /admin/offload
        if bool(lazy.any()) and seq_len > cfg.sink + cfg.recent:
            self._release_middles(row, lazy, seq_len, params.session)
        return {"kv": pool.report(self._slots(row, seq_len), params.session)}

    def _slots(self, row: int, seq_len: int) -> torch.Tensor:
        """The request's KV slots as the radix tree will keep them: where its prefill recomputed lost KV, the
        cached slots it healed (SGLang frees the recomputed duplicates when it caches the request)."""
        slots = self.req_to_token_pool.req_to_token[row, :seq_len].to(torch.int64)
        heal = self.row_pool.heal_at.get(row) if self.row_pool is not None else None
        if heal is not None:
            first, cached = heal
            n = max(0, min(len(cached), seq_len - first))
            slots[first : first + n] = cached[:n]
        return slots

    def _release_middles(self, row: int, lazy: torch.Tensor, seq_len: int, session: str) -> None:
        cfg, pool = self.config, self.row_pool
        assert pool is not None
        middle = self._slots(row, seq_len)[cfg.sink : seq_len - cfg.recent]
        shared = self.tracker.running_slots(pool.num_slots, exclude=row)
        hits = shared[middle].nonzero()
        skip = int(hits[-1]) + 1 if hits.numel() else 0
        start, middle = cfg.sink + skip, middle[skip:]
        for layer in lazy.nonzero().flatten().tolist():
            pool.release(session, layer, middle, start)


def _new_output(q: torch.Tensor, layer: Any) -> torch.Tensor:
    """Attention output ``[tokens, heads x v_head_dim]`` for queries ``q`` ``[tokens, heads x qk_head_dim]``."""
    if layer.qk_head_dim == layer.v_head_dim:
        return torch.empty_like(q)
    return q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))


def _attend_new_tokens(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, prefix: int, layer: Any) -> torch.Tensor:
    """Causal attention of one request's new tokens (``q`` ``[ext, heads x dim]``, positions ``prefix..``) over
    its whole KV (``[prefix + ext, kv_heads, dim]``). Only the new queries are computed: SGLang's
    torch_native extend pads the query to the whole sequence, which makes a turn over a long history cost
    as much attention as recomputing it."""
    ext = q.shape[0]
    query = q.view(ext, layer.tp_q_head_num, layer.qk_head_dim).movedim(0, 1).unsqueeze(0)
    mask = None
    if prefix:  # query i sits at position prefix + i and sees keys 0..prefix + i
        n = keys.shape[0]
        mask = torch.arange(n, device=q.device) <= torch.arange(prefix, prefix + ext, device=q.device)[:, None]
    out = scaled_dot_product_attention(
        query, keys.movedim(0, 1).unsqueeze(0), values.movedim(0, 1).unsqueeze(0), attn_mask=mask,
        is_causal=not prefix, scale=layer.scaling, enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
    )
    return out.squeeze(0).movedim(1, 0).reshape(ext, layer.tp_q_head_num, layer.v_head_dim)


def _take_over_kv_pool(kv_pool: Any, config: SlkvConfig) -> LayerRowPool:
    """Replace SGLang's per-layer KV buffers (created one page long, ``plugin._no_kv_buffers``) by a row pool
    of the bytes SGLang sized them for: with ``--slkv-overcommit F`` the pool has F times more slots than
    those bytes hold in full-KV tokens."""
    k0 = kv_pool.get_key_buffer(0)
    layers, slots = kv_pool.layer_num, kv_pool.size
    arena = HostArena(config.offload_budget, device=k0.device)
    rows = layers * (int(slots / config.overcommit) + 1)  # the bytes SGLang sized its pool for
    pool = LayerRowPool(layers, slots, num_rows=rows, heads=k0.shape[1], dim=k0.shape[2],
                        dtype=k0.dtype, device=k0.device, arena=arena, poison=config.poison)
    empty = k0.new_empty((0, *k0.shape[1:]))
    kv_pool.k_buffer = [empty] * layers  # nothing else reads them on this backend; their memory goes back
    kv_pool.v_buffer = [empty] * layers
    return pool

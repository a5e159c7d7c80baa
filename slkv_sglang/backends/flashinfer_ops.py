"""The FlashInfer calls of SimLayerKV's CUDA backend, free of SGLang so that a bare CUDA machine can check them.

SGLang's token pool is FlashInfer's paged layout with page size 1: a KV slot id is a page id, so restricting
a request to sink + recent is a rewrite of its ``kv_indices``.

- Decode: ``WindowedDecode`` plans one decode wrapper per *lazy pattern* (which KV heads of which requests
  read only sink + recent in a layer) once per step; every layer with that pattern runs the same wrapper. Where
  a request is lazy in some KV heads of a layer only, each (request, KV head) pair becomes a FlashInfer request
  of its own over the cache viewed with one KV head per page (``head_pages``): one call per layer serves lazy
  and full heads alike, with no copy of q, K or V.
- Scoring: ``LseScorer`` plans one prefill wrapper per forward with two entries per deciding request, its
  last queries against all its keys and against its sink + recent keys, and runs it per layer with
  ``return_lse``. FlashInfer's lse is base 2, so the mass is ``2 ** (lse_sub - lse_all)``. Transient memory
  is O(queries x heads), whatever the context.

Index pointers are built on the host (lengths are host-known), so planning never waits for the device.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from ..scoring import window_slots

# SGLang 0.5.23 builds its wrappers with FlashInfer's fa2 kernels; "auto" may pick fa3 on Hopper (which has
# no fp8 KV path with these arguments), so the plugin names it too.
PREFILL_BACKEND = "fa2"


@dataclass(frozen=True)
class AttnShape:
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    q_dtype: torch.dtype
    kv_dtype: torch.dtype


def _indptr(lengths: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def plan_decode(wrapper: Any, kv_slots: Sequence[torch.Tensor], shape: AttnShape, **plan_kwargs: Any) -> None:
    """Plan ``wrapper`` (a ``BatchDecodeWithPagedKVCacheWrapper``) so request i reads the slots ``kv_slots[i]``."""
    _plan_pages(wrapper, _indptr([len(r) for r in kv_slots]), torch.cat(list(kv_slots)).to(torch.int32), shape,
                **plan_kwargs)


def _plan_pages(wrapper: Any, indptr: torch.Tensor, pages: torch.Tensor, shape: AttnShape, **plan_kwargs: Any) -> None:
    wrapper.plan(
        indptr,
        pages,
        torch.ones(len(indptr) - 1, dtype=torch.int32),
        shape.num_qo_heads,
        shape.num_kv_heads,
        shape.head_dim,
        1,
        q_data_type=shape.q_dtype,
        kv_data_type=shape.kv_dtype,
        **plan_kwargs,
    )


def head_entries(req_slots: Sequence[torch.Tensor], lazy: torch.Tensor, sink: int,
                 recent: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every (request, KV head) pair reads, request-major: its request's sink + recent slots where ``lazy``
    ``[requests, KV heads]`` is set, all of ``req_slots[i]`` (the request's slot ids by position) elsewhere.
    Returns (indptr ``[pairs + 1]`` int32 on the host, slots int64 and KV heads int64 per entry on the slots'
    device). The per-pair facts are host facts (lengths, flags) and go to the device in one asynchronous copy, so
    building the entries never waits for the device: a few vector ops whatever the batch."""
    heads = lazy.shape[1]
    n = torch.tensor([len(r) for r in req_slots])
    kept = n.clamp(max=sink + recent)  # a window covering the whole sequence is the whole sequence
    lens = torch.where(lazy, kept[:, None], n[:, None]).flatten()
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    pairs = torch.arange(len(lens))
    per_pair = torch.stack([
        lens,
        indptr[:-1],  # the pair's first entry
        (n.cumsum(0) - n)[pairs // heads],  # its request's first position in the concatenated slots
        torch.where(lazy.flatten(), (n - kept)[pairs // heads], 0),  # positions a lazy pair skips after the sink
        pairs % heads,
    ])
    device = req_slots[0].device
    if device.type == "cuda":
        per_pair = per_pair.pin_memory()
    lens_d, first, base, skip, head = per_pair.to(device, non_blocking=True)
    pair = torch.repeat_interleave(torch.arange(len(lens), device=device), lens_d, output_size=int(indptr[-1]))
    j = torch.arange(len(pair), device=device) - first[pair]  # position in the pair's read
    slots = torch.cat(list(req_slots)).long()[base[pair] + j + skip[pair] * (j >= sink)]
    return indptr.to(torch.int32), slots, head[pair]


# Where a layer's KV of some slots sits in the buffers a paged kernel reads: ``(layer, slots, units)`` -> page ids
# ``[n]``, ``units`` (or None: unit 0) naming each slot's unit within the layer (``kv.pool.RowKVPool.page_ids``).
# None where a slot's page is its slot id in every layer (SGLang's buffers).
PageMap = Callable[[int, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class _Entries:
    """The slots (and, planned per KV head, the KV head) of a plan's pages, in plan order, on the device."""
    slots: torch.Tensor
    heads: torch.Tensor | None

    def pages(self, layer: int, page_map: PageMap | None, kv_heads: int, heads_per_page: int) -> torch.Tensor:
        """Page ids of ``layer``'s KV in a cache of ``heads_per_page`` KV heads per page, viewed with one head per
        page where the plan is per KV head."""
        if self.heads is None:
            return self.slots if page_map is None else page_map(layer, self.slots, None)
        if page_map is None:
            return self.slots * kv_heads + self.heads
        unit_pages = page_map(layer, self.slots, self.heads // heads_per_page)
        return unit_pages * heads_per_page + self.heads % heads_per_page


def _set_pages(wrapper: Any, pages: torch.Tensor) -> None:
    """A planned wrapper reads other pages with the same lengths: a plan depends on the lengths only, and the
    run reads the wrapper's index buffer (FlashInfer 0.7.2, both wrappers; what SGLang's CUDA-graph path fills)."""
    wrapper._paged_kv_indices_buf[: len(pages)].copy_(pages, non_blocking=True)


# Wrappers one decode step may plan: each holds its own plan buffers (FlashInfer 0.7.2 allocates 8 MiB on the
# device and 8 MiB pinned per wrapper, outside SGLang's memory budget).
MAX_PATTERNS = 16


class WindowedDecode:
    """The restricted reads of one decode batch, FlashInfer-style: ``plan`` once per step, ``run`` per layer.

    ``plan`` sorts the layers by lazy pattern (which KV heads of which requests read only sink + recent) and
    plans one wrapper per pattern. In a pattern where each request is lazy in all or none of a layer's KV heads,
    a request reads its sink + recent slots or all of them. In a pattern where some request is lazy in part of
    them, every (request, KV head) pair is planned as its own request (``head_entries``) and the layer's call
    sees the query as ``[requests x KV heads, q_per_kv, dim]`` (``q_per_kv``: query heads per KV head) and the
    cache as one KV head per page: both are views. Layers without a lazy head are planned only where the pool's
    pages differ per layer (``page_map``; the caller runs its usual decode elsewhere), as one more pattern.

    With a ``page_map`` the wrappers are planned over slots and each layer writes its own pages into the
    wrapper's index buffer before it runs (``_set_pages``): one plan per pattern, one gather per layer. A cache
    of fewer KV heads per page than the layer has (``heads_per_page``: a row per KV head) is read per KV head in
    every pattern.

    At most ``max_patterns`` lazy patterns per step, for the patterns most layers share. A layer whose pattern is
    left out runs the largest planned pattern that restricts only heads it has lazy, or none (it reads
    everything): it may read more than its decision allows, never less. ``coarsened`` counts those layers in the
    last plan. Not with a ``page_map``: there a lazy unit's middle rows are gone, so reading more is reading KV
    that is not there, and every pattern is planned (at most one per layer)."""

    def __init__(self, new_wrapper: Callable[[], Any], shape: AttnShape, sink: int, recent: int,
                 max_patterns: int = MAX_PATTERNS, page_map: PageMap | None = None, heads_per_page: int = 0,
                 **plan_kwargs: Any):
        """``plan_kwargs``: passed to every ``plan`` (SGLang's own, e.g. ``fixed_split_size``)."""
        self._new_wrapper, self.shape, self.sink, self.recent = new_wrapper, shape, sink, recent
        self.max_patterns = max_patterns if page_map is None else 1 << 30
        self._plan_kwargs = plan_kwargs
        self.page_map, self.heads_per_page = page_map, heads_per_page or shape.num_kv_heads
        self._pool: list[Any] = []  # one wrapper per pattern, kept across steps
        self._layers: dict[int, tuple[Any, _Entries]] = {}  # layer -> its pattern's wrapper and entries
        self.coarsened = 0

    def plan(self, req_slots: Sequence[torch.Tensor], windows: dict[int, torch.Tensor],
             lazy: dict[int, torch.Tensor], layers: Sequence[int] = ()) -> None:
        """``req_slots``: each batch request's slot ids by position, in batch order; for the requests that read sink +
        recent in some head, by batch position: ``windows``, those slot ids (the tracker's, built once per step),
        and ``lazy``, ``[layers, KV heads]`` (host). ``layers``: the layers decoded here even without a lazy head,
        with a ``page_map`` (every full-attention layer; without one the caller's own decode reads them)."""
        self._layers, self.coarsened = {}, 0
        if not lazy and (not layers or self.page_map is None):
            return
        positions = sorted(lazy)
        num_layers = max([*layers, -1]) + 1
        if positions:
            stacked = torch.stack([lazy[pos] for pos in positions])  # [P, layers, KV heads]
            num_layers = max(num_layers, stacked.shape[1])
        else:
            stacked = torch.zeros(0, num_layers, self.shape.num_kv_heads, dtype=torch.bool)
        patterns: dict[bytes, list[int]] = {}
        for layer in stacked.any(dim=2).any(dim=0).nonzero().flatten().tolist():
            patterns.setdefault(stacked[:, layer].numpy().tobytes(), []).append(layer)
        ranked = sorted(patterns.values(), key=len, reverse=True)  # stable: ties in layer order
        planned = ranked[: self.max_patterns]
        dense = [] if self.page_map is None else [layer for layer in layers if not bool(stacked[:, layer].any())]
        for group in ranked[self.max_patterns :]:
            own = stacked[:, group[0]]
            fits = [p for p in planned if not bool((stacked[:, p[0]] & ~own).any())]
            if fits:
                max(fits, key=lambda p: int(stacked[:, p[0]].sum())).extend(group)
            elif self.page_map is not None:
                dense.extend(group)
            self.coarsened += len(group)
        if dense:
            planned.append(dense)  # no head lazy: every request reads every slot
        for n, group in enumerate(planned):
            mask = torch.zeros(len(req_slots), stacked.shape[2], dtype=torch.bool)
            mask[positions] = stacked[:, group[0]] if group is not dense else False
            entries = self._plan(self._wrapper(n), req_slots, windows, mask)
            self._layers.update(dict.fromkeys(group, (self._wrapper(n), entries)))

    def _plan(self, wrapper: Any, req_slots: Sequence[torch.Tensor], windows: dict[int, torch.Tensor],
              mask: torch.Tensor) -> _Entries:
        by_head = bool((mask.any(dim=1) != mask.all(dim=1)).any()) or self.heads_per_page < self.shape.num_kv_heads
        if by_head:
            indptr, slots, heads = head_entries(req_slots, mask, self.sink, self.recent)
            entries = _Entries(slots, heads)
            shape = replace(self.shape, num_qo_heads=self.shape.num_qo_heads // self.shape.num_kv_heads,
                            num_kv_heads=1)
        else:
            reads = [windows[i] if bool(m.all()) else r for i, (r, m) in enumerate(zip(req_slots, mask))]
            indptr, entries, shape = _indptr([len(r) for r in reads]), _Entries(torch.cat(reads).long(), None), self.shape
        _plan_pages(wrapper, indptr, entries.pages(-1, None, self.shape.num_kv_heads, 0).to(torch.int32)
                    if self.page_map is None else torch.zeros(int(indptr[-1]), dtype=torch.int32), shape,
                    **self._plan_kwargs)
        return entries

    def restricts(self, layer_id: int) -> bool:
        return layer_id in self._layers

    def run(self, layer_id: int, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
            **run_kwargs: Any) -> torch.Tensor:
        """``q`` ``[requests, qo heads, dim]`` (contiguous), ``kv_cache`` (K, V) ``[pages, KV heads per page, dim]``
        -> ``[requests, qo heads, dim]``; ``run_kwargs`` as SGLang passes them (``sm_scale``, scales, cap)."""
        wrapper, entries = self._layers[layer_id]
        if self.page_map is not None:
            _set_pages(wrapper, entries.pages(layer_id, self.page_map, self.shape.num_kv_heads, self.heads_per_page)
                       .to(torch.int32))
        if entries.heads is None:
            return wrapper.forward(q, kv_cache, **run_kwargs)
        k, v = kv_cache
        q_per_kv = self.shape.num_qo_heads // self.shape.num_kv_heads
        assert k.dim() == 3 and k.is_contiguous() and v.is_contiguous() and k.shape[1] == self.heads_per_page, \
            "per-head decode views an NHD cache [pages, KV heads per page, dim] as one head per page"
        o = wrapper.forward(q.view(-1, q_per_kv, q.shape[2]), (k.view(-1, 1, k.shape[2]), v.view(-1, 1, v.shape[2])),
                            **run_kwargs)
        return o.view(q.shape[0], self.shape.num_qo_heads, -1)

    def _wrapper(self, n: int) -> Any:
        while len(self._pool) <= n:
            self._pool.append(self._new_wrapper())
        return self._pool[n]


class PagedExtend:
    """A prefill's attention over each request's whole KV (its prefix and its new tokens, written before), through
    per-layer pages (a ``page_map``: the rows of ``kv.pool.RowKVPool``; None: pages are slot ids in every layer):
    planned once per forward over slots, run per layer after writing the layer's pages into the wrapper's index
    buffer. It returns the log-sum-exp over all keys too, which scoring then does not compute again.

    Where a page holds fewer KV heads than the layer (``heads_per_page``: a row per KV head), each (KV head,
    request) pair is a FlashInfer request of its own, head-major, over the cache viewed with one head per page:
    the query is regrouped head-major for the call (one copy) and the output back."""

    def __init__(self, wrapper: Any, shape: AttnShape, page_map: PageMap | None, heads_per_page: int = 0):
        """``heads_per_page``: KV heads a page holds (0: all of a layer's)."""
        self.wrapper, self.shape, self.page_map = wrapper, shape, page_map
        self.heads_per_page = heads_per_page or shape.num_kv_heads
        self._entries: _Entries | None = None

    @property
    def by_head(self) -> bool:
        return self.heads_per_page < self.shape.num_kv_heads

    def plan(self, ext_lens: Sequence[int], req_slots: Sequence[torch.Tensor], sm_scale: float,
             logits_soft_cap: float | None = None) -> None:
        """``ext_lens``: each request's new tokens; ``req_slots``: its slot ids by position, prefix and new tokens
        (the new ones last: the causal mask aligns the queries with the last keys)."""
        slots = torch.cat(list(req_slots)).long()
        heads = self.shape.num_kv_heads if self.by_head else 1
        qo = _indptr(list(ext_lens) * heads)
        kv = _indptr([len(r) for r in req_slots] * heads)
        if self.by_head:
            self._entries = _Entries(slots.repeat(heads),
                                     torch.arange(heads, device=slots.device).repeat_interleave(len(slots)))
            shape = replace(self.shape, num_qo_heads=self.shape.num_qo_heads // heads, num_kv_heads=1)
        else:
            self._entries, shape = _Entries(slots, None), self.shape
        self.wrapper.plan(qo, kv, torch.zeros(int(kv[-1]), dtype=torch.int32),
                          torch.ones(len(kv) - 1, dtype=torch.int32), shape.num_qo_heads, shape.num_kv_heads,
                          shape.head_dim, 1, causal=True, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                          q_data_type=shape.q_dtype, kv_data_type=shape.kv_dtype)

    def run(self, layer_id: int, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
            **run_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` ``[tokens, qo heads, dim]`` -> the output ``[tokens, qo heads, dim]`` and the natural log-sum-exp
        over each query's keys ``[qo heads, tokens]`` (FlashInfer's is base 2)."""
        assert self._entries is not None, "plan before run"
        _set_pages(self.wrapper, self._entries.pages(layer_id, self.page_map, self.shape.num_kv_heads,
                                                     self.heads_per_page).to(torch.int32))
        if not self.by_head:
            o, lse = self.wrapper.run(q, kv_cache, return_lse=True, **run_kwargs)
            return o, lse.movedim(0, 1) * math.log(2)
        k, v = kv_cache
        heads, tokens = self.shape.num_kv_heads, q.shape[0]
        q_per_kv = self.shape.num_qo_heads // heads
        grouped = q.view(tokens, heads, q_per_kv, -1).movedim(1, 0).reshape(heads * tokens, q_per_kv, -1)
        o, lse = self.wrapper.run(grouped, (k.view(-1, 1, k.shape[2]), v.view(-1, 1, v.shape[2])), return_lse=True,
                                  **run_kwargs)
        o = o.view(heads, tokens, q_per_kv, -1).movedim(0, 1).reshape(tokens, self.shape.num_qo_heads, -1)
        lse = lse.view(heads, tokens, q_per_kv).movedim(1, 2).reshape(self.shape.num_qo_heads, tokens)
        return o, lse * math.log(2)


class LseScorer:
    """Per-head sink + recent masses of the requests deciding in one forward, from FlashInfer's lse.

    ``plan`` once per forward (the key slots are the same in every layer), ``mass`` per layer.
    """

    def __init__(self, wrapper: Any, shape: AttnShape, sink: int, recent: int):
        self.wrapper, self.shape, self.sink, self.recent = wrapper, shape, sink, recent
        self._planned: tuple[tuple[int, int], ...] | None = None  # (queries, keys) per request, as planned

    def reset(self) -> None:
        """A new forward: its deciding requests are planned again at the first scored layer."""
        self._planned = None

    def supports(self, num_queries: int) -> bool:
        """The causal alignment of the sink + recent entry holds only if the recent window covers the queries."""
        return self.recent >= num_queries

    def plan(self, num_queries: Sequence[int], key_slots: Sequence[torch.Tensor], sm_scale: float,
             logits_soft_cap: float | None = None) -> None:
        kv_slots: list[torch.Tensor] = []
        q_lens: list[int] = []
        for n, slots in zip(num_queries, key_slots):
            kv_slots += [slots, window_slots(slots, len(slots), self.sink, self.recent)]
            q_lens += [n, n]
        self.wrapper.plan(
            _indptr(q_lens),
            _indptr([len(r) for r in kv_slots]),
            torch.cat(kv_slots).to(torch.int32),
            torch.ones(len(kv_slots), dtype=torch.int32),
            self.shape.num_qo_heads,
            self.shape.num_kv_heads,
            self.shape.head_dim,
            1,
            causal=True,
            sm_scale=sm_scale,
            logits_soft_cap=logits_soft_cap,
            q_data_type=self.shape.q_dtype,
            kv_data_type=self.shape.kv_dtype,
        )
        self._planned = tuple((n, len(s)) for n, s in zip(num_queries, key_slots))

    def matches(self, queries: Sequence[torch.Tensor], key_slots: Sequence[torch.Tensor]) -> bool:
        return self._planned == tuple((len(q), len(s)) for q, s in zip(queries, key_slots))

    def mass(self, queries: Sequence[torch.Tensor], kv_cache: Any, k_scale: float | None = None,
             v_scale: float | None = None) -> list[torch.Tensor]:
        """Per request, float32 [H]: the mean over its queries of the mass on sink + recent keys."""
        q = torch.cat([x for q in queries for x in (q, q)]).to(self.shape.q_dtype)
        _, lse = self.wrapper.run(q, kv_cache, k_scale=k_scale, v_scale=v_scale, return_lse=True)
        out, at = [], 0
        for q_req in queries:
            n = len(q_req)
            lse_all, lse_sub = lse[at : at + n], lse[at + n : at + 2 * n]
            out.append(torch.exp2(lse_sub - lse_all).mean(dim=0).float())
            at += 2 * n
        return out

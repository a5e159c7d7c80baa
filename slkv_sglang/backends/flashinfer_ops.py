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


def head_pages(req_slots: Sequence[torch.Tensor], lazy: torch.Tensor, sink: int,
               recent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pages of every (request, KV head) pair, request-major, in a cache viewed with one KV head per page
    (page = slot x KV heads + head): a pair reads its request's sink + recent slots where ``lazy``
    ``[requests, KV heads]`` is set, all of ``req_slots[i]`` (the request's slot ids by position) elsewhere.
    Returns (indptr ``[pairs + 1]`` int32 on the host, pages int32 on the slots' device). The per-pair facts are
    host facts (lengths, flags) and go to the device in one asynchronous copy, so building the pages never waits
    for the device: a few vector ops whatever the batch."""
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
    return indptr.to(torch.int32), (slots * heads + head[pair]).to(torch.int32)


# Wrappers one decode step may plan: each holds its own plan buffers (FlashInfer 0.7.2 allocates 8 MiB on the
# device and 8 MiB pinned per wrapper, outside SGLang's memory budget).
MAX_PATTERNS = 16


class WindowedDecode:
    """The restricted reads of one decode batch, FlashInfer-style: ``plan`` once per step, ``run`` per layer.

    ``plan`` sorts the layers by lazy pattern (which KV heads of which requests read only sink + recent) and
    plans one wrapper per pattern. In a pattern where each request is lazy in all or none of a layer's KV heads,
    a request reads its sink + recent slots or all of them. In a pattern where some request is lazy in part of
    them, every (request, KV head) pair is planned as its own request (``head_pages``) and the layer's call
    sees the query as ``[requests x KV heads, q_per_kv, dim]`` (``q_per_kv``: query heads per KV head) and the
    cache as one KV head per page: both are views. Layers without a lazy head are not planned here (the caller runs its usual decode).

    At most ``max_patterns`` wrappers per step, for the patterns most layers share. A layer whose pattern is left
    out runs the largest planned pattern that restricts only heads it has lazy, or none (it reads everything):
    it may read more than its decision allows, never less. ``coarsened`` counts those layers in the last plan."""

    def __init__(self, new_wrapper: Callable[[], Any], shape: AttnShape, sink: int, recent: int,
                 max_patterns: int = MAX_PATTERNS, **plan_kwargs: Any):
        """``plan_kwargs``: passed to every ``plan`` (SGLang's own, e.g. ``fixed_split_size``)."""
        self._new_wrapper, self.shape, self.sink, self.recent = new_wrapper, shape, sink, recent
        self.max_patterns, self._plan_kwargs = max_patterns, plan_kwargs
        self._pool: list[Any] = []  # one wrapper per pattern, kept across steps
        self._layers: dict[int, tuple[Any, bool]] = {}  # layer -> (its pattern's wrapper, planned per KV head)
        self.coarsened = 0

    def plan(self, req_slots: Sequence[torch.Tensor], windows: dict[int, torch.Tensor],
             lazy: dict[int, torch.Tensor]) -> None:
        """``req_slots``: each batch request's slot ids by position, in batch order; for the requests that read sink +
        recent in some head, by batch position: ``windows``, those slot ids (the tracker's, built once per step),
        and ``lazy``, ``[layers, KV heads]`` (host)."""
        self._layers, self.coarsened = {}, 0
        if not lazy:
            return
        positions = sorted(lazy)
        stacked = torch.stack([lazy[pos] for pos in positions])  # [P, layers, KV heads]
        patterns: dict[bytes, list[int]] = {}
        for layer in stacked.any(dim=2).any(dim=0).nonzero().flatten().tolist():
            patterns.setdefault(stacked[:, layer].numpy().tobytes(), []).append(layer)
        ranked = sorted(patterns.values(), key=len, reverse=True)  # stable: ties in layer order
        planned = ranked[: self.max_patterns]
        for layers in ranked[self.max_patterns :]:
            own = stacked[:, layers[0]]
            fits = [p for p in planned if not bool((stacked[:, p[0]] & ~own).any())]
            if fits:
                max(fits, key=lambda p: int(stacked[:, p[0]].sum())).extend(layers)
            self.coarsened += len(layers)
        for n, layers in enumerate(planned):
            mask = torch.zeros(len(req_slots), stacked.shape[2], dtype=torch.bool)
            mask[positions] = stacked[:, layers[0]]
            by_head = bool((mask.any(dim=1) != mask.all(dim=1)).any())
            wrapper = self._wrapper(n)
            if by_head:
                q_per_kv = self.shape.num_qo_heads // self.shape.num_kv_heads
                _plan_pages(wrapper, *head_pages(req_slots, mask, self.sink, self.recent),
                            replace(self.shape, num_qo_heads=q_per_kv, num_kv_heads=1), **self._plan_kwargs)
            else:
                plan_decode(wrapper,
                            [windows[i] if bool(m.all()) else r for i, (r, m) in enumerate(zip(req_slots, mask))],
                            self.shape, **self._plan_kwargs)
            self._layers.update(dict.fromkeys(layers, (wrapper, by_head)))

    def restricts(self, layer_id: int) -> bool:
        return layer_id in self._layers

    def run(self, layer_id: int, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
            **run_kwargs: Any) -> torch.Tensor:
        """``q`` ``[requests, qo heads, dim]`` (contiguous), ``kv_cache`` (K, V) ``[slots, KV heads, dim]``
        -> ``[requests, qo heads, dim]``; ``run_kwargs`` as SGLang passes them (``sm_scale``, scales, cap)."""
        wrapper, by_head = self._layers[layer_id]
        if not by_head:
            return wrapper.forward(q, kv_cache, **run_kwargs)
        k, v = kv_cache
        heads, q_per_kv = k.shape[1], q.shape[1] // k.shape[1]
        assert k.dim() == 3 and k.is_contiguous() and v.is_contiguous() and heads == self.shape.num_kv_heads, \
            "per-head decode views an NHD cache [slots, KV heads, dim] as one head per page"
        o = wrapper.forward(q.view(-1, q_per_kv, q.shape[2]), (k.view(-1, 1, k.shape[2]), v.view(-1, 1, v.shape[2])),
                            **run_kwargs)
        return o.view(q.shape[0], heads * q_per_kv, -1)

    def _wrapper(self, n: int) -> Any:
        while len(self._pool) <= n:
            self._pool.append(self._new_wrapper())
        return self._pool[n]


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

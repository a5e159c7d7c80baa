"""The FlashInfer calls of SimLayerKV's CUDA backend, free of SGLang so that a bare CUDA machine can check them.

SGLang's token pool is FlashInfer's paged layout with page size 1: a KV slot id is a page id, so restricting
a request to sink + recent is a rewrite of its ``kv_indices``.

- Decode: ``plan_decode`` plans one decode wrapper for one *lazy pattern* (which requests of the batch read
  only sink + recent in a layer); every layer with that pattern ``run``s the same wrapper.
- Scoring: ``LseScorer`` plans one prefill wrapper per forward with two entries per deciding request, its
  last queries against all its keys and against its sink + recent keys, and runs it per layer with
  ``return_lse``. FlashInfer's lse is base 2, so the mass is ``2 ** (lse_sub - lse_all)``. Transient memory
  is O(queries x heads), whatever the context.

Index pointers are built on the host (lengths are host-known), so planning never waits for the device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

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


def plan_decode(wrapper: Any, kv_rows: Sequence[torch.Tensor], shape: AttnShape, **plan_kwargs: Any) -> None:
    """Plan ``wrapper`` (a ``BatchDecodeWithPagedKVCacheWrapper``) so request i reads the slots ``kv_rows[i]``."""
    wrapper.plan(
        _indptr([len(r) for r in kv_rows]),
        torch.cat(list(kv_rows)).to(torch.int32),
        torch.ones(len(kv_rows), dtype=torch.int32),
        shape.num_qo_heads,
        shape.num_kv_heads,
        shape.head_dim,
        1,
        q_data_type=shape.q_dtype,
        kv_data_type=shape.kv_dtype,
        **plan_kwargs,
    )


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
        kv_rows: list[torch.Tensor] = []
        q_lens: list[int] = []
        for n, slots in zip(num_queries, key_slots):
            kv_rows += [slots, window_slots(slots, len(slots), self.sink, self.recent)]
            q_lens += [n, n]
        self.wrapper.plan(
            _indptr(q_lens),
            _indptr([len(r) for r in kv_rows]),
            torch.cat(kv_rows).to(torch.int32),
            torch.ones(len(kv_rows), dtype=torch.int32),
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
        for q_rows in queries:
            n = len(q_rows)
            lse_all, lse_sub = lse[at : at + n], lse[at + n : at + 2 * n]
            out.append(torch.exp2(lse_sub - lse_all).mean(dim=0).float())
            at += 2 * n
        return out

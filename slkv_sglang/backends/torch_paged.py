"""FlashInfer's paged wrappers (page size 1) written in torch: the reference the device check compares FlashInfer
with, and the kernels of ``--slkv-flashinfer-standin``, which runs the FlashInfer backend's code path
(``backends/paged.py``) on the CPU engine so that CI exercises its plans, per-layer pages and plan sharing.
Like FlashInfer's wrappers they read their pages from ``_paged_kv_indices_buf`` at run time, so a plan serves any
pages of the same lengths. Slow (a Python loop per request): for checks, not for serving."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..scoring import gather_keys


def dense_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kv_scale: float = 1.0) -> torch.Tensor:
    """q [H, D], k/v [L, Hkv, D] (stored / kv_scale) -> [H, D], fp32."""
    heads, kv_heads = q.shape[0], k.shape[1]
    kk = k.float().repeat_interleave(heads // kv_heads, dim=1) * kv_scale  # [L, H, D]
    vv = v.float().repeat_interleave(heads // kv_heads, dim=1) * kv_scale
    p = torch.softmax(torch.einsum("hd,lhd->hl", q.float(), kk) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", p, vv)


class TorchPagedDecode:
    """``BatchDecodeWithPagedKVCacheWrapper``'s ``plan`` and ``forward``."""

    def plan(self, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor, num_qo_heads: int,
             num_kv_heads: int, head_dim: int, page_size: int, **_: Any) -> None:
        assert page_size == 1 and bool((last_page_len == 1).all())
        self._indptr = indptr.tolist()
        self._paged_kv_indices_buf = indices.clone()
        self._heads = (num_qo_heads, num_kv_heads)

    def forward(self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], sm_scale: float,
                k_scale: float | None = None, v_scale: float | None = None, logits_soft_cap: float | None = None,
                **_: Any) -> torch.Tensor:
        assert not logits_soft_cap, "the stand-in has no logit soft cap"
        k, v = kv_cache
        pages = self._paged_kv_indices_buf.long()
        assert q.shape[:2] == (len(self._indptr) - 1, self._heads[0]) and k.shape[1] == self._heads[1]
        return torch.stack([dense_decode(q[i], gather_keys(k, pages[a:b]), gather_keys(v, pages[a:b]), sm_scale,
                                          k_scale or 1.0)
                            for i, (a, b) in enumerate(zip(self._indptr, self._indptr[1:]))]).to(q.dtype)


class TorchPagedPrefill:
    """``BatchPrefillWithPagedKVCacheWrapper``'s ``plan`` and ``run`` (causal, ``return_lse``)."""

    def plan(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, indices: torch.Tensor,
             last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
             causal: bool = False, sm_scale: float | None = None, logits_soft_cap: float | None = None,
             **_: Any) -> None:
        assert page_size == 1 and causal and not logits_soft_cap, "the stand-in: page size 1, causal, no soft cap"
        self._qo, self._kv = qo_indptr.tolist(), kv_indptr.tolist()
        self._paged_kv_indices_buf = indices.clone()
        self._heads, self._scale = (num_qo_heads, num_kv_heads), sm_scale

    def run(self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], return_lse: bool = False,
            k_scale: float | None = None, v_scale: float | None = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = kv_cache
        pages = self._paged_kv_indices_buf.long()
        heads, kv_heads = self._heads
        o = torch.empty_like(q)
        lse = torch.empty(q.shape[0], heads, dtype=torch.float32, device=q.device)
        for (qa, qb), (ka, kb) in zip(zip(self._qo, self._qo[1:]), zip(self._kv, self._kv[1:])):
            k = gather_keys(k_cache, pages[ka:kb]).float().repeat_interleave(heads // kv_heads, dim=1) * (k_scale or 1.0)
            v = gather_keys(v_cache, pages[ka:kb]).float().repeat_interleave(heads // kv_heads, dim=1) * (v_scale or 1.0)
            logits = torch.einsum("qhd,khd->hqk", q[qa:qb].float(), k) * self._scale
            n, m = qb - qa, kb - ka  # queries aligned with the last keys
            logits.masked_fill_(torch.arange(m) > torch.arange(m - n, m)[:, None], float("-inf"))
            o[qa:qb] = torch.einsum("hqk,khd->qhd", torch.softmax(logits, dim=-1), v).to(q.dtype)
            lse[qa:qb] = (torch.logsumexp(logits, dim=-1) / math.log(2)).movedim(0, 1)  # FlashInfer's: base 2
        return o, lse

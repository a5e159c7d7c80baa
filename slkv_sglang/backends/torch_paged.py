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


def check_decode_heads(name: str, device: torch.device, kv_dtype: torch.dtype = torch.bfloat16, seed: int = 4,
                       emulate: bool = False) -> dict[str, Any]:
    """``WindowedDecode`` as the backend plans a step: layer 0 has no lazy head (not planned), layer 1 whole
    requests lazy, layers 2 and 3 the same per-(request, KV head) pattern (one wrapper), layer 4 another. Each
    (request, KV head) is compared with dense attention of its query heads over its own slots: sink + recent
    where that head is lazy, all of them elsewhere. Then again with two wrappers allowed, where layer 4 must run
    layer 1's pattern. ``emulate``: torch in place of FlashInfer (dry run)."""
    heads, kv_heads, dim = SHAPES[name]
    q_per_kv = heads // kv_heads
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [300, 1100, 2000, 4100, 3000, 1777]
    slots_total = sum(seq_lens) + 64
    k_cache, v_cache = _rand_cache(slots_total, kv_heads, dim, device, kv_dtype)
    scales = _scales(kv_dtype)
    perm = torch.randperm(slots_total, generator=gen).to(device)
    req_slots = list(perm[: sum(seq_lens)].split(seq_lens))
    q = torch.randn(len(seq_lens), heads, dim, device=device, dtype=torch.bfloat16)
    scale = 1 / math.sqrt(dim)
    lazy = torch.zeros(len(seq_lens), 5, kv_heads, dtype=torch.bool)
    lazy[[1, 3], 1] = True
    lazy[:, 2] = torch.rand(len(seq_lens), kv_heads, generator=gen) < 0.5
    lazy[:, 2, 1] = ~lazy[:, 2, 0]  # every request partly lazy, whatever the draw ...
    lazy[5, 2] = True  # ... but one, lazy in all its heads
    lazy[:, 3] = lazy[:, 2]
    lazy[4, 4, 1:] = True
    lazy[[1, 3], 4] = True  # layer 4's pattern holds layer 1's
    shape = AttnShape(heads, kv_heads, dim, torch.bfloat16, kv_dtype)
    out: dict[str, Any] = {}
    errs, planned, coarsened = [], [], []
    runs = [(tc, None) for tc in ((None,) if emulate else (False, True) if kv_dtype == torch.bfloat16 else (True,))]
    # capped at two wrappers: layers 2-3's pattern (two layers) and layer 1's are planned; layer 4's is left
    # out and runs layer 1's, the planned pattern inside it (request 4's heads read everything)
    runs.append((runs[0][0], 2))
    expected = {None: lazy, 2: lazy.clone()}
    expected[2][:, 4] = lazy[:, 1]
    for tensor_cores, cap in runs:
        shared = None if emulate else _workspace(device)  # the backend's wrappers share SGLang's workspace
        new_wrapper = _TorchPagedDecode if emulate else lambda: _decode_wrapper(device, bool(tensor_cores), shared)
        decode = WindowedDecode(new_wrapper, shape, SINK, RECENT, **({"max_patterns": cap} if cap else {}))
        restricted = [pos for pos in range(len(seq_lens)) if bool(lazy[pos].any())]
        decode.plan(req_slots, {pos: window_slots(req_slots[pos], seq_lens[pos], SINK, RECENT) for pos in restricted},
                    {pos: lazy[pos] for pos in restricted})
        label = "torch emulation" if emulate else "tensor cores" if tensor_cores else "cuda cores"
        label += f", {cap} wrappers" if cap else ""
        if cap:
            out[f"{label}, coarsened layers"] = decode.coarsened
            coarsened.append(decode.coarsened)
        for layer in range(5):
            if not bool(expected[cap][:, layer].any()):  # the backend runs SGLang's own decode here
                out[f"{label}, layer {layer} planned"] = decode.restricts(layer)
                planned.append(decode.restricts(layer))
                continue
            got = decode.run(layer, q, (k_cache, v_cache), sm_scale=scale, **scales).float()
            err = 0.0
            for i, (r, n) in enumerate(zip(req_slots, seq_lens)):
                for h in range(kv_heads):
                    slots = window_slots(r, n, SINK, RECENT) if expected[cap][i, layer, h] else r
                    qh = slice(h * q_per_kv, (h + 1) * q_per_kv)  # the query heads of KV head h
                    ref = dense_decode(q[i, qh], gather_keys(k_cache, slots)[:, h : h + 1],
                                        gather_keys(v_cache, slots)[:, h : h + 1], scale, scales["k_scale"] or 1.0)
                    err = max(err, _rel_err(got[i, qh], ref))
            out[f"{label}, layer {layer}"] = err
            errs.append(err)
    return {"max_rel_err": out, "tolerance": DECODE_TOL,
            "ok": max(errs) <= DECODE_TOL and not any(planned) and coarsened == [1]}

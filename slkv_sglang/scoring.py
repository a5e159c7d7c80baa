"""The lazy score: softmax mass that the last queries put on sink + recent keys.

Computed exactly from two log-sum-exps (subset vs all keys, the same quantity FlashInfer's ``return_lse``
gives), so only the last ``w_last`` rows of logits exist, never the full attention matrix.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from .config import Granularity, ScoreMode


# Keys scored per step: transient memory is ``chunk x Hkv x D`` keys plus ``H x last x chunk`` fp32 logits,
# whatever the context (at 128K tokens the unchunked logits alone would be 0.5 GB for an 8B model's 32 heads).
SCORE_CHUNK = 2048


def window_slots(slots: torch.Tensor, seq_len: int, sink: int, recent: int) -> torch.Tensor:
    """The KV slot ids of a sequence's sink + recent positions: what the score measures mass on, and all that a
    lazy layer's decode reads. ``slots`` holds the sequence's slot ids by position."""
    if seq_len <= sink + recent:
        return slots[:seq_len]
    return torch.cat([slots[:sink], slots[seq_len - recent : seq_len]])


def gather_keys(k_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``k_cache[slots]``; fp8 caches are indexed through their bytes (not every device indexes float8).
    ``index_select`` on tensors: on CPU it is an order of magnitude faster than advanced indexing."""
    if not isinstance(k_cache, torch.Tensor):
        return k_cache[slots]
    if k_cache.dtype.itemsize == 1:
        return k_cache.view(torch.uint8).index_select(0, slots).view(k_cache.dtype)
    return k_cache.index_select(0, slots)


class _Logits:
    """Scaled logits of the last ``n`` queries of a sequence over any run of its keys, causally masked."""

    def __init__(self, q: torch.Tensor, k_cache: torch.Tensor, key_slots: torch.Tensor, scale: float):
        self.n, self.num_heads, self.dim = q.shape
        self.k_cache, self.key_slots = k_cache, key_slots
        self.first_query = key_slots.shape[0] - self.n  # position of the first query
        self.q = q.float() * scale
        self.q_pos = torch.arange(self.first_query, key_slots.shape[0], device=q.device)

    def block(self, lo: int, hi: int) -> torch.Tensor:
        """``[H, n, hi - lo]`` logits over the keys at positions ``lo..hi-1``."""
        k = gather_keys(self.k_cache, self.key_slots[lo:hi]).to(device=self.q.device, dtype=torch.float32)
        kv_heads, n = k.shape[1], self.n
        # GQA without repeating keys: one matmul per KV head over its query heads' queries [Hkv, q_per_kv * n, D]
        qg = self.q.view(n, kv_heads, self.num_heads // kv_heads, self.dim).permute(1, 2, 0, 3)
        logits = torch.matmul(qg.reshape(kv_heads, -1, self.dim), k.permute(1, 2, 0)).view(self.num_heads, n, hi - lo)
        if hi - 1 > self.first_query:  # keys later than some query: only the last n positions can be
            key_pos = torch.arange(lo, hi, device=logits.device)
            logits.masked_fill_((key_pos[None, :] > self.q_pos[:, None])[None], float("-inf"))
        return logits


def head_mass(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    key_slots: torch.Tensor,
    sink: int,
    recent: int,
    scaling: float,
    k_scale: float | None = None,
    chunk: int = SCORE_CHUNK,
    lse_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per query head, the mean over queries of the attention mass on sink + recent keys.

    q: [n, H, D] post-RoPE queries of the last n positions of the sequence; keys of positions 0..L-1 are
    ``k_cache[key_slots]`` ([L] slot ids; ``k_cache`` gives [n, Hkv, D] per slot tensor, any dtype, keys scaled
    by ``k_scale`` if set, as an fp8 KV cache stores them).
    Attention is causal (a query sees keys at positions <= its own, self included, as in the paper's formula).
    ``lse_all`` ([H, n]): the log-sum-exp over all keys, where the attention kernel already gave it (as FlashAttention
    does in the paper); then only the sink + recent keys are read. Otherwise keys are read ``chunk`` at a time into
    two running log-sum-exps (all keys, sink + recent keys), so memory does not grow with L. Returns float32 [H].
    """
    seq_len = key_slots.shape[0]
    logits = _Logits(q, k_cache, key_slots, scaling * (k_scale if k_scale is not None else 1.0))
    window = ((0, min(sink, seq_len)), (max(seq_len - recent, sink), seq_len))  # position ranges, as window_slots
    lse_win = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    if lse_all is None:  # one pass over all keys: both log-sum-exps from the same logits
        lse_all = lse_win.clone()
        for lo in range(0, seq_len, chunk):
            hi = min(seq_len, lo + chunk)
            block = logits.block(lo, hi)
            lse_all = torch.logaddexp(lse_all, torch.logsumexp(block, dim=-1))
            for a, b in ((max(a, lo), min(b, hi)) for a, b in window):  # decided on the host (no device sync)
                if a < b:
                    lse_win = torch.logaddexp(lse_win, torch.logsumexp(block[:, :, a - lo : b - lo], dim=-1))
    else:
        for a, b in window:
            for lo in range(a, b, chunk):
                lse_win = torch.logaddexp(lse_win, torch.logsumexp(logits.block(lo, min(b, lo + chunk)), dim=-1))
    return torch.exp(lse_win - lse_all.to(lse_win.device, torch.float32)).mean(dim=1)


@functools.lru_cache(maxsize=8)
def _window_layout(lengths: tuple[tuple[int, int], ...], sink: int, recent: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For requests of (last queries, tokens) ``lengths``: where each one's sink + recent keys sit in its slots
    concatenated (``[R x width]``, padded with its last window key), which of them each query sees (``[R, n, width]``:
    causal, padding masked) and the query counts. The same in every layer of a forward: built once, on the host with
    a few vector ops, and sent in one asynchronous copy each."""
    n, seq = torch.tensor(lengths).unbind(1)
    head = seq.clamp(max=sink)  # the sink part, then the recent part from ``tail_start``, as ``window_slots``
    tail_start = (seq - recent).clamp(min=sink)
    width_of = head + (seq - tail_start).clamp(min=0)
    j = torch.arange(int(width_of.max()))[None, :]
    at = torch.minimum(j, width_of[:, None] - 1)
    pos = torch.where(at < head[:, None], at, tail_start[:, None] + at - head[:, None])  # [R, width]
    q = torch.arange(int(n.max()))[None, :]
    visible = ((pos[:, None, :] <= (seq - n)[:, None, None] + q[:, :, None]) & (j < width_of[:, None])[:, None, :]
               & (q < n[:, None])[:, :, None])
    index = (pos + (seq.cumsum(0) - seq)[:, None]).flatten()
    out = (index, visible, n.float())
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in out)  # type: ignore[return-value]
    return out


def window_masses(
    queries: Sequence[torch.Tensor],
    k_cache: torch.Tensor,
    key_slots: Sequence[torch.Tensor],
    lses: Sequence[torch.Tensor],
    sink: int,
    recent: int,
    scaling: float,
    k_scale: float | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """``head_mass`` of several requests at once, each with the log-sum-exp over all its keys that its prefill gave
    (``lses[i]`` ``[H, n_i]``, with the kernel's ``soft_cap`` if it had one): one gather of every request's sink +
    recent keys and one batched matmul, so a layer's scoring costs a fixed handful of kernels whatever the number of
    requests (on a GPU, launches are what it costs), and no host sync. Returns float32 ``[R, H]``."""
    heads, dim = queries[0].shape[1], queries[0].shape[2]
    device = queries[0].device
    index, visible, counts = _window_layout(tuple((q.shape[0], s.shape[0]) for q, s in zip(queries, key_slots)),
                                            sink, recent, device)
    requests, n_max, width = visible.shape
    window = torch.cat(list(key_slots))[index]
    keys = gather_keys(k_cache, window).to(device=device, dtype=torch.float32)  # [R x width, Hkv, D]
    kv_heads = keys.shape[1]
    q = torch.nn.utils.rnn.pad_sequence(list(queries), batch_first=True).float()  # [R, n, H, D]
    q = q * (scaling * (k_scale if k_scale is not None else 1.0))
    # GQA without repeating keys: [R, Hkv, q_per_kv * n, D] x [R, Hkv, D, width]
    qg = q.view(requests, n_max, kv_heads, heads // kv_heads, dim).permute(0, 2, 3, 1, 4).flatten(2, 3)
    logits = torch.matmul(qg, keys.view(requests, width, kv_heads, dim).permute(0, 2, 3, 1))
    logits = logits.view(requests, heads, n_max, width)
    if soft_cap:  # as the attention kernel caps its logits (FlashInfer's ``logits_soft_cap``)
        logits = soft_cap * torch.tanh(logits / soft_cap)
    lse_win = torch.logsumexp(logits.masked_fill_(~visible[:, None], float("-inf")), dim=-1)  # [R, H, n]
    lse_all = torch.nn.utils.rnn.pad_sequence([x.movedim(0, 1) for x in lses], batch_first=True).movedim(1, 2)
    return torch.exp(lse_win - lse_all.to(device, torch.float32)).sum(dim=2) / counts[:, None]  # padding: exp(-inf)


def reduce_heads_tensor(per_head: torch.Tensor, mode: ScoreMode, num_kv_heads: int) -> torch.Tensor:
    """Turn per-query-head masses [..., H] into layer scores [...].

    ``mean``: the paper (head mean). ``kvmin``: a layer is only as lazy as its least lazy KV head (query
    heads averaged per KV head), which keeps layers holding a retrieval head. ``headmin``: the
    least lazy query head.
    """
    if mode == "mean":
        return per_head.mean(dim=-1)
    if mode == "kvmin":
        return kv_head_scores(per_head, mode, num_kv_heads).min(dim=-1).values
    if mode == "headmin":
        return per_head.min(dim=-1).values
    raise ValueError(f"unknown score mode {mode!r}")


def kv_head_scores(per_head: torch.Tensor, mode: ScoreMode, num_kv_heads: int) -> torch.Tensor:
    """Per-query-head masses [..., H] to one score per KV head [..., Hkv]: what head granularity decides on. A KV
    head serves its query heads, so it is as lazy as their mean (``headmin``: their least lazy one)."""
    per_kv = per_head.reshape(*per_head.shape[:-1], num_kv_heads, -1)
    return per_kv.min(dim=-1).values if mode == "headmin" else per_kv.mean(dim=-1)


def decide(per_head: torch.Tensor, mode: ScoreMode, threshold: float, num_kv_heads: int, long_enough: bool,
           force_lazy: Sequence[int] | None = None, protect: Sequence[int] = (), granularity: Granularity = "layer",
           force_lazy_heads: Sequence[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decision rule: per-head masses ``[L, H]`` (all of the model's query heads) to (lazy ``[L, Hkv]`` bool,
    layer scores ``[L]``, KV-head scores ``[L, Hkv]``).

    ``layer``: a layer is lazy in every KV head when its score exceeds the threshold. ``head``: each KV head is
    lazy when its own score does. Forced layers (every head) and forced (layer, KV head) pairs replace the scores'
    verdict. Nothing is lazy unless the sequence is long enough to trim, and protected layers never are."""
    scores = reduce_heads_tensor(per_head, mode, num_kv_heads)
    heads = kv_head_scores(per_head, mode, num_kv_heads)
    if force_lazy is not None or force_lazy_heads is not None:
        lazy = torch.zeros(heads.shape, dtype=torch.bool)
        lazy[list(force_lazy or ())] = True
        for layer, head in force_lazy_heads or ():
            lazy[layer, head] = True
    elif granularity == "head":
        lazy = heads > threshold
    else:
        lazy = (scores > threshold)[:, None].expand(heads.shape).clone()
    lazy &= long_enough
    lazy[[layer for layer in protect if layer < len(lazy)]] = False
    return lazy, scores, heads

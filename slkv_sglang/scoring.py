"""The lazy score: softmax mass that the last queries put on sink + recent keys.

Computed exactly from two log-sum-exps (subset vs all keys, the same quantity FlashInfer's ``return_lse``
gives), so only the last ``w_last`` rows of logits exist, never the full attention matrix.
"""

from __future__ import annotations

import torch

from .config import ScoreMode


def subset_mask(seq_len: int, sink: int, recent: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [seq_len]: True for the first ``sink`` and the last ``recent`` key positions."""
    pos = torch.arange(seq_len, device=device)
    return (pos < sink) | (pos >= seq_len - recent)


def head_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    sink: int,
    recent: int,
    scaling: float,
) -> torch.Tensor:
    """Per query head, the mean over queries of the attention mass on sink + recent keys.

    q: [n, H, D] post-RoPE queries at absolute positions ``q_pos`` [n]; k: [L, Hkv, D] post-RoPE keys of
    positions 0..L-1. Attention is causal (a query sees keys at positions <= its own), self included, as in
    the paper's formula. Returns float32 [H].
    """
    seq_len, num_kv_heads = k.shape[0], k.shape[1]
    n, num_heads, dim = q.shape
    qg = q.float().view(n, num_kv_heads, num_heads // num_kv_heads, dim)  # GQA without repeating keys
    logits = torch.einsum("nkgd,lkd->kgnl", qg, k.float()).reshape(num_heads, n, seq_len) * scaling
    key_pos = torch.arange(seq_len, device=k.device)
    hidden = key_pos[None, :] > q_pos[:, None].to(k.device)  # [n, L]: causal mask
    logits.masked_fill_(hidden[None], float("-inf"))
    lse_all = torch.logsumexp(logits, dim=-1)
    keep = subset_mask(seq_len, sink, recent, k.device)
    lse_sub = torch.logsumexp(logits[:, :, keep], dim=-1)
    return torch.exp(lse_sub - lse_all).mean(dim=1)


def reduce_heads_tensor(per_head: torch.Tensor, mode: ScoreMode, num_kv_heads: int) -> torch.Tensor:
    """Turn per-query-head masses [..., H] into layer scores [...].

    ``mean``: the paper (head mean). ``kvmin``: a layer is only as lazy as its least lazy KV head (query
    heads averaged within their KV group), which keeps layers holding a retrieval head. ``headmin``: the
    least lazy query head.
    """
    if mode == "mean":
        return per_head.mean(dim=-1)
    if mode == "kvmin":
        grouped = per_head.reshape(*per_head.shape[:-1], num_kv_heads, -1)
        return grouped.mean(dim=-1).min(dim=-1).values
    if mode == "headmin":
        return per_head.min(dim=-1).values
    raise ValueError(f"unknown score mode {mode!r}")


def reduce_heads(per_head: torch.Tensor, mode: ScoreMode, num_kv_heads: int) -> float:
    """One layer's score from its per-query-head masses [H] (see ``reduce_heads_tensor``)."""
    return float(reduce_heads_tensor(per_head, mode, num_kv_heads))

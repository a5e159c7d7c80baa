"""Tensor parallel: each rank holds a contiguous block of the query heads; a decision needs all of them.

Per-head masses are gathered across the TP group before the head reduction, so every rank reduces the same
global ``[.., H]`` masses with the global KV-head count and takes the same decision (``kvmin`` averages query
heads per global KV head). Blocks may differ in size by one head; the gather pads to the largest block.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

HeadGather = Callable[[torch.Tensor], torch.Tensor]


def head_block(num_heads: int, rank: int, world: int) -> tuple[int, int]:
    """The query heads ``[start, end)`` rank ``rank`` of ``world`` holds (SGLang splits evenly; so does this)."""
    base, extra = divmod(num_heads, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def all_gather_heads(group: Any, num_heads: int) -> HeadGather:
    """``[..., local heads] -> [..., num_heads]`` in global head order, the same on every rank of ``group``."""
    world = dist.get_world_size(group)
    blocks = [head_block(num_heads, r, world) for r in range(world)]
    width = max(end - start for start, end in blocks)

    def gather(local: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(local, (0, width - local.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[..., : end - start] for p, (start, end) in zip(parts, blocks)], dim=-1)

    return gather

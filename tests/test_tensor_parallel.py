"""Tensor parallel decisions with real torch.distributed (gloo, one process per rank): every rank gathers the
per-head masses of all ranks and takes the decision the single-process engine takes."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slkv_sglang.scoring import decide
from slkv_sglang.tensor_parallel import all_gather_heads, head_block

LAYOUTS = {"smollm2-135m": (30, 9, 3), "llama3-8b": (32, 32, 8)}  # layers, query heads, KV heads
# query heads per rank, written out: SGLang splits heads in rank order, evenly where they divide
SPLITS = {(9, 2): [5, 4], (9, 4): [3, 2, 2, 2], (32, 2): [16, 16], (32, 4): [8, 8, 8, 8]}
THRESHOLD = 0.9


def _masses(layers: int, heads: int, requests: int = 3) -> torch.Tensor:
    """[R, L, H] masses around the threshold, so that a head counted under the wrong KV head changes decisions."""
    gen = torch.Generator().manual_seed(layers * heads)
    return (0.8 + 0.2 * torch.rand(requests, layers, heads, generator=gen)).float()


def _decisions(masses: torch.Tensor, kv_heads: int, mode: str) -> list[list[bool]]:
    """Per request, per layer: lazy (in every KV head: layer granularity)."""
    return [decide(m, mode, THRESHOLD, kv_heads, True)[0].all(dim=1).tolist() for m in masses]


MODES = ("kvmin", "mean", "headmin")


def _rank(rank: int, world: int, port: int, out: dict) -> None:
    """Every layout and score mode in one process group (a spawn costs seconds)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for layout, (layers, heads, kv_heads) in LAYOUTS.items():
            full = _masses(layers, heads)
            start = sum(SPLITS[heads, world][:rank])
            end = start + SPLITS[heads, world][rank]
            gathered = all_gather_heads(dist.group.WORLD, heads)(full[..., start:end])
            for mode in MODES:
                out[rank, layout, mode] = (torch.equal(gathered, full), _decisions(gathered, kv_heads, mode))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_agree_with_one_process(world):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank, args=(world, _free_port(), out), nprocs=world, start_method="spawn")
        results = dict(out)
    assert len(results) == world * len(LAYOUTS) * len(MODES)
    for (rank, layout, mode), (same_masses, decisions) in results.items():
        layers, heads, kv_heads = LAYOUTS[layout]
        assert same_masses, f"rank {rank} gathered other masses than the model's ({layout})"
        assert decisions == _decisions(_masses(layers, heads), kv_heads, mode), (rank, layout, mode)


def test_head_blocks_are_the_ranks_heads():
    for (heads, world), sizes in SPLITS.items():
        assert [head_block(heads, r, world) for r in range(world)] == [
            (sum(sizes[:r]), sum(sizes[: r + 1])) for r in range(world)]


def test_a_rank_alone_would_decide_otherwise():
    """Why the gather exists: one rank's heads reduced as if they were the model's miss the retrieval KV head."""
    layers, heads, kv_heads = LAYOUTS["smollm2-135m"]
    full = _masses(layers, heads)
    full[:, :, 6:9] = 0.5  # the last KV head's query heads (a retrieval head) keeps every layer
    start, end = head_block(heads, 0, 2)
    alone = [decide(m[:, start:end], "mean", THRESHOLD, 1, True)[0].all(dim=1).tolist() for m in full]
    assert alone != _decisions(full, kv_heads, "kvmin")
    assert not any(any(d) for d in _decisions(full, kv_heads, "kvmin"))

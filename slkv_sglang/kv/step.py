"""The one object the scheduler side hands the worker side per forward: what each request's KV needs.

Built by ``KvPlanner.plan`` when SGLang builds the ForwardBatch (scheduler process, with the requests' token ids);
read by ``KvExecutor`` inside the attention backend, layer by layer. Nothing flows back through it but its failures:
requests whose KV could not be made whole, which the scheduler side (``KvPlanner.settle``) finishes with an error
instead of serving.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .rows import LostKv

logger = logging.getLogger("slkv.kv")


@dataclass(frozen=True)
class Heal:
    """The prefill recomputes cached positions ``first..`` whose KV was on neither tier; their cached slots
    (the radix tree still points at them) get the recomputed KV in the rows they miss."""

    first: int
    cached: torch.Tensor  # slots of positions first, first + 1, ...


@dataclass(frozen=True)
class RequestStep:
    req: Any  # SGLang's Req: only the scheduler side touches it, to finish it with an error if its KV is lost
    rid: str
    label: str  # reporting label of host copies (the chat session id, else the request id)
    req_pool_idx: int  # the request's index in req_to_token
    fingerprints: torch.Tensor | None  # prefix fingerprints of positions 0..seq_len-1 (None: not needed)
    heal: Heal | None

    def slots(self, req_to_token: torch.Tensor, seq_len: int) -> torch.Tensor:
        """The request's slots as the radix tree keeps them: where the prefill recomputed lost KV, the cached
        slots it heals (SGLang frees the recomputed duplicates when it caches the request)."""
        slots = req_to_token[self.req_pool_idx, :seq_len].to(torch.int64)
        if self.heal is not None:
            n = max(0, min(len(self.heal.cached), seq_len - self.heal.first))
            slots[self.heal.first : self.heal.first + n] = self.heal.cached[:n].to(slots.device)
        return slots


@dataclass(eq=False)  # a step is compared by identity: its fields hold tensors
class KvStep:
    requests: list[RequestStep]  # batch order
    failed: dict[int, str] = field(default_factory=dict)  # batch position -> why its KV could not be made whole
    # page reads that found no KV on the device (a bug of ours), counted on the device as the layers run and read
    # once per forward (``fail_lost_pages``), so that no layer waits for the device to check its pages
    lost_pages: torch.Tensor | None = None
    _counted: Any = None  # a CUDA event after the latest count (the forward may run on another stream)
    _reported: set[int] = field(default_factory=set)  # positions in ``failed`` the scheduler side has been told of

    def fail(self, pos: int, why: str, strict: bool) -> bool:
        """The request at batch position ``pos`` is served nothing from this forward on (strict mode raises
        ``LostKv``). False if it had failed already."""
        if pos in self.failed:
            return False
        message = f"slkv: KV of request {self.requests[pos].rid} could not be made whole ({why})"
        if strict:
            raise LostKv(message)
        logger.error("%s: finished with an error, nothing served from it", message)
        self.failed[pos] = message
        return True

    def count_lost_pages(self, page_ids: torch.Tensor) -> None:
        """A paged kernel reads ``page_ids`` (-1: missing): count the missing ones, on the device."""
        lost = (page_ids < 0).sum()
        self.lost_pages = lost if self.lost_pages is None else self.lost_pages + lost
        if lost.is_cuda:
            self._counted = torch.cuda.Event()
            self._counted.record()

    @property
    def lost_pages_counted(self) -> bool:
        """The device has counted every page read so far: reading the count will not wait."""
        return self._counted is None or self._counted.query()

    def fail_lost_pages(self, strict: bool) -> int:
        """Every request fails if some page read so far found no KV: one wait for the device, for the layers
        counted so far only. Returns how many requests failed now."""
        if self.lost_pages is None:
            return 0
        if self._counted is not None:
            self._counted.synchronize()
        lost, self.lost_pages, self._counted = int(self.lost_pages), None, None
        if not lost:
            return 0
        return sum(self.fail(pos, f"{lost} page reads found no KV on the device", strict)
                   for pos in range(len(self.requests)))

    def unreported(self) -> list[tuple[Any, str]]:
        """SGLang's requests that failed and why, each once."""
        new = [(pos, why) for pos, why in self.failed.items() if pos not in self._reported]
        self._reported.update(pos for pos, _ in new)
        return [(self.requests[pos].req, why) for pos, why in new]

    def position(self, req_pool_idx: int) -> int | None:
        """The batch position of the request holding ``req_pool_idx``, None if it is not in this forward."""
        return next((pos for pos, r in enumerate(self.requests) if r.req_pool_idx == req_pool_idx), None)

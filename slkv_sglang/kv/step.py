"""The one object the scheduler side hands the worker side per forward: what each request's KV needs.

Built by ``KvPlanner.plan`` when SGLang builds the ForwardBatch (scheduler process, with the requests' token ids);
read by ``KvExecutor`` inside the attention backend, layer by layer. Nothing flows back through it but ``failed``:
requests whose KV could not be made whole, which the scheduler side (``KvPlanner.settle``) finishes with an error
instead of serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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


@dataclass
class KvStep:
    requests: list[RequestStep]  # batch order
    failed: dict[int, str] = field(default_factory=dict)  # batch position -> why its KV could not be made whole

    def position(self, req_pool_idx: int) -> int | None:
        """The batch position of the request holding ``req_pool_idx``, None if it is not in this forward."""
        return next((pos for pos, r in enumerate(self.requests) if r.req_pool_idx == req_pool_idx), None)

"""Scheduler side of the KV tier: which cached prefix a request may use, what admission counts, what each forward
restores and heals (the ``KvStep``).

Every state the tier can reach that is not a bug (a copy evicted from the host, refused by the budget, a gap, a
prefix whose tokens differ) is found here, at the prefix match, and falls back to recomputation: the match is cut
where the KV stops being restorable, the prefill recomputes the rest from the token ids (``recomputed_tokens``) and
heals the cached slots it recomputed. The cut is decided again at every match, so no heal outlives its request.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from .fingerprint import prefix_fingerprints
from .step import Heal, KvStep, RequestStep
from .tier import KvTier

logger = logging.getLogger("slkv.kv")

HEAL_ATTR = "slkv_heal"  # on SGLang's Req: its Heal from the latest match (None: nothing recomputed)


class KvPlanner:
    def __init__(self, tier: KvTier, strict: bool):
        self.tier, self.strict = tier, strict

    # ---- prefix match ---------------------------------------------------------------------------------
    def restorable(self, cached: torch.Tensor, fingerprints: torch.Tensor) -> int:
        """How many leading ``cached`` slots have their KV in every unit: on the device, or on the host with the
        reader's prefix fingerprint."""
        rows = self.tier.rows
        if bool((rows.held_by_slot[cached] == rows.num_units).all()):  # all on the device: no host lookup
            return cached.numel()
        on_device = (rows.row_of[:, cached] >= 0).cpu()
        ok = (on_device | self.tier.host.hosted(cached, fingerprints)).all(dim=0)
        bad = (~ok).nonzero()
        return int(bad[0]) if bad.numel() else cached.numel()

    def match(self, req: Any, cached: torch.Tensor, tokens: Sequence[int], page_size: int) -> int:
        """A request matched ``cached`` (its prefix's slots, ``tokens`` their ids): the prefix it may use."""
        setattr(req, HEAL_ATTR, None)
        keep = self.restorable(cached, prefix_fingerprints(tokens))
        keep -= keep % page_size
        if keep < cached.numel():
            setattr(req, HEAL_ATTR, Heal(keep, cached[keep:].clone()))
            logger.debug("slkv: %s recomputes %d cached tokens whose KV is lost", req.rid, cached.numel() - keep)
        return keep

    # ---- admission ------------------------------------------------------------------------------------
    def prefix_rows(self, req: Any, cached: torch.Tensor | None) -> int:
        """Rows a request's prefill takes before it runs: restores of its prefix (``cached``, None when an earlier
        chunk restored it), heals of the cached slots it recomputes."""
        rows = self.tier.rows
        heal: Heal | None = getattr(req, HEAL_ATTR, None)
        missing = 0
        for slots in (cached, None if heal is None else heal.cached):
            if slots is not None:
                missing += rows.num_units * slots.numel() - int(rows.held_by_slot[slots].sum())
        return missing

    def allocate(self, needs: list[int], evict: Callable[[int], None], new_tokens: int, alloc: Callable[[], Any],
                 req_rows: Callable[[], list[int]]) -> Any:
        """Around SGLang's allocation for a prefill batch: evict for and promise the rows its prefixes take (per
        request, ``needs``) so that the forward's restores and heals find them."""
        tier, total = self.tier, sum(needs)
        if total:
            evict(total + new_tokens * tier.rows_per_slot)
            if tier.spare_rows < total:
                tier.stats.row_shortfalls += 1
                message = f"slkv: {total} KV rows needed to restore cached prefixes, {tier.spare_rows} spare"
                if self.strict:
                    raise RuntimeError(message)
                logger.error("%s: requests that cannot take their rows are finished with an error", message)
                needs = _scale(needs, max(0, tier.spare_rows))
                total = sum(needs)
            tier.ledger.hold(total)
        try:
            result = alloc()
        finally:
            tier.ledger.hold(-total)
        for row, n in zip(req_rows(), needs):
            if n:
                tier.ledger.promise(row, n)
        return result

    # ---- per forward ----------------------------------------------------------------------------------
    def plan(self, reqs: Sequence[Any], req_rows: Sequence[int], labels: Sequence[str],
             tokens: Sequence[Sequence[int] | None], first_chunk: Sequence[bool]) -> KvStep:
        """The step of one forward. ``tokens``: per request the ids of positions 0..seq_len-1 where the forward
        restores, heals or offloads (None elsewhere); ``first_chunk``: this forward starts the request's prefill."""
        step = KvStep([])
        for req, req_row, label, ids, first in zip(reqs, req_rows, labels, tokens, first_chunk):
            heal: Heal | None = getattr(req, HEAL_ATTR, None)
            if heal is not None and first:
                self.tier.stats.recomputed_tokens += len(heal.cached)
            step.requests.append(RequestStep(
                req=req, rid=req.rid, label=label, req_row=int(req_row),
                fingerprints=None if ids is None else prefix_fingerprints(ids), heal=heal))
        return step

    def retire(self, req: Any, req_row: int | None) -> None:
        """The request left (finished, aborted or retracted): its promise and its heal go."""
        if req_row is not None:
            self.tier.ledger.retire(req_row)
        setattr(req, HEAL_ATTR, None)


def _scale(needs: list[int], total: int) -> list[int]:
    """Hand ``total`` rows to the requests in order (a shortfall: the last ones get fewer than they need)."""
    out = []
    for n in needs:
        out.append(min(n, total))
        total -= out[-1]
    return out

"""Scheduler side of the KV tier: which cached prefix a request may use, what admission counts, what each forward
restores and heals (the ``KvStep``).

Every state the tier can reach that is not a bug (a copy evicted from the host, refused by the budget, a gap, a
prefix whose tokens differ) is found here, at the prefix match, and falls back to recomputation: the match is cut
where the KV stops being restorable, the prefill recomputes the rest from the token ids (``recomputed_tokens``) and
heals the cached slots it recomputed. The cut is decided again at every match, so no heal outlives its request.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Sequence

import torch

from .fingerprint import prefix_fingerprints
from .step import Heal, KvStep, RequestStep
from .tier import KvTier

logger = logging.getLogger("slkv.kv")

# Results are processed at most one forward late (overlap scheduling) and every result settles the steps handed
# out so far but one the device may still be running; the list is capped all the same, so that it stays bounded
# whatever SGLang calls.
UNSETTLED = 4
HEAL_ATTR = "slkv_heal"  # on SGLang's Req: its Heal from the latest match (None: nothing recomputed)


class KvPlanner:
    def __init__(self, tier: KvTier, strict: bool):
        self.tier, self.strict = tier, strict
        self._handed: list[KvStep] = []  # steps whose results SGLang has not processed yet (``settle``)
        # SGLang's requests whose latest match left a heal (``healing``); weak: a request dropped without a retire
        # (aborted while waiting) leaves with its heal
        self._healing: weakref.WeakSet[Any] = weakref.WeakSet()

    # ---- prefix match ---------------------------------------------------------------------------------
    def restorable(self, cached: torch.Tensor, fingerprints: torch.Tensor) -> int:
        """How many leading ``cached`` slots have their KV in every unit: on the device, or on the host with the
        reader's prefix fingerprint."""
        rows = self.tier.rows
        if bool((rows.held_by_slot[cached] == rows.num_units).all()):  # all on the device: no host lookup
            return cached.numel()
        bad = (~self.tier.whole(cached, fingerprints)).nonzero()
        return int(bad[0]) if bad.numel() else cached.numel()

    def match(self, req: Any, cached: torch.Tensor, tokens: Sequence[int], page_size: int) -> int:
        """A request matched ``cached`` (its prefix's slots, ``tokens`` their ids): the prefix it may use."""
        setattr(req, HEAL_ATTR, None)
        self._healing.discard(req)
        keep = self.restorable(cached, prefix_fingerprints(tokens))
        keep -= keep % page_size
        if keep < cached.numel():
            setattr(req, HEAL_ATTR, Heal(keep, cached[keep:].clone()))
            self._healing.add(req)
            logger.debug("slkv: %s recomputes %d cached tokens whose KV is lost", req.rid, cached.numel() - keep)
        return keep

    @property
    def heals(self) -> int:
        """Live heals (a per-request map that must not grow without bound)."""
        return len(self._healing)

    def healing(self) -> torch.Tensor | None:
        """The cached slots live requests' heals fill: admission promised their missing rows, so they keep the rows
        they hold (``KvTier.demote`` leaves them)."""
        heals = [heal.cached for req in list(self._healing) if (heal := getattr(req, HEAL_ATTR, None)) is not None]
        return torch.cat(heals) if heals else None

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
                 req_pool_indices: Callable[[], list[int]]) -> Any:
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
        for idx, n in zip(req_pool_indices(), needs):
            if n:
                tier.ledger.promise(idx, n)
        return result

    # ---- per forward ----------------------------------------------------------------------------------
    def plan(self, reqs: Sequence[Any], req_pool_indices: Sequence[int], labels: Sequence[str],
             tokens: Sequence[Sequence[int] | None], prefixes: Sequence[int] | None) -> KvStep:
        """The step of one forward. ``tokens``: per request the ids of positions 0..seq_len-1 where the forward
        restores, heals or releases (None elsewhere); ``prefixes``: each request's tokens already computed
        before this forward, None for a decode step.

        A heal's tokens count as recomputed once, in the forward that starts at its first position: the first
        chunk of the prefill (SGLang re-enters a chunked request without a new match, so the heal stays for the
        later chunks, which heal their part of it)."""
        step = KvStep([])
        for i, (req, req_pool_idx, label, ids) in enumerate(zip(reqs, req_pool_indices, labels, tokens)):
            heal: Heal | None = getattr(req, HEAL_ATTR, None)
            if heal is not None and prefixes is not None and prefixes[i] == heal.first:
                self.tier.stats.recomputed_tokens += len(heal.cached)
            step.requests.append(RequestStep(
                req=req, rid=req.rid, label=label, req_pool_idx=int(req_pool_idx),
                fingerprints=None if ids is None else prefix_fingerprints(ids), heal=heal))
        self._handed = [*self._handed[-(UNSETTLED - 1):], step]
        return step

    def settle(self, wait: bool = True) -> list[tuple[Any, str]]:
        """The requests whose KV the forwards handed out so far could not make whole, each once, with why: SGLang
        is about to process those forwards' results, and the caller finishes these requests with an error. Without
        ``wait``, a forward the device is still running (with overlap scheduling, the one after the result
        processed) stays for a later call, its page reads not all counted yet; what it found on the host is
        reported now."""
        failed, running = [], []
        for step in self._handed:
            if wait or step.lost_pages_counted:
                self.tier.stats.failed_requests += step.fail_lost_pages(self.strict)
            else:
                running.append(step)
            failed += step.unreported()
        self._handed = running
        return failed

    def retire(self, req: Any, req_pool_idx: int | None) -> None:
        """The request left (finished, aborted or retracted): its promise and its heal go."""
        if req_pool_idx is not None:
            self.tier.ledger.retire(req_pool_idx)
        setattr(req, HEAL_ATTR, None)
        self._healing.discard(req)


def _scale(needs: list[int], total: int) -> list[int]:
    """Hand ``total`` rows to the requests in order (a shortfall: the last ones get fewer than they need)."""
    out = []
    for n in needs:
        out.append(min(n, total))
        total -= out[-1]
    return out

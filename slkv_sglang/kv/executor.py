"""Worker side of the KV tier: moves KV between device rows and the host tier as the ``KvStep`` says.

Owned by the ``RowKVPool`` (``pool.py``), through which the attention backend calls it per layer (each of its units:
``rows.py``): ``restore`` before a prefill attends to its prefix, ``write`` for new tokens, ``heal`` after it, ``read``
for every read; after the forward's decisions, ``release_lazy`` frees the middle tokens of lazy units.

Reloads are layer-pipelined: layer l's ``restore`` issues the reloads of the layers up to l + ``RELOAD_AHEAD`` not
issued yet (host copies, then the scatter into fresh rows, all on the host tier's copy stream), each layer's
ending in its own fence, and makes the compute stream wait for layer l's fence only; so layer l computes while the
next layers' KV is on its way (SGLang HiCache loads back layer by layer the same way), and the device buffers the
copies land in are those of a few layers at a time, not of the whole prefix. A request whose KV cannot be made whole (a
bug of ours: the planner found it restorable) is never served: in strict mode (``--slkv-poison-freed``) it raises, otherwise the
request finishes with an error, its KV is not cached, and the engine goes on.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .rows import LostKv
from .step import KvStep, RequestStep
from .tier import KvTier

# Layers whose reloads are issued ahead of the one computing: enough to cover a layer's reload with the compute of
# the layers before it, few enough that their staging buffers (a 32K history's lazy half is ~64 MiB per layer of
# Llama-3-8B in bf16) stay small.
RELOAD_AHEAD = 3


class KvExecutor:
    def __init__(self, tier: KvTier, sink: int, recent: int, strict: bool):
        self.tier, self.sink, self.recent, self.strict = tier, sink, recent, strict
        self.step = KvStep([])
        self._fences: dict[int, object] = {}  # this forward's layers whose reloads are issued -> their fence
        self._layer = -1  # the layer restored last in this forward
        # the slots this forward's writes took rows for (``_rows_taken``), the layer written last, and whether
        # the rows were there
        self._new_slots: tuple[int, int] | None = None
        self._written, self._new_rows_ok = -1, True

    def begin(self, step: KvStep) -> None:
        self.step = step
        self._fences, self._layer = {}, -1
        self._new_slots = None

    def failed(self, pos: int) -> bool:
        return pos in self.step.failed

    # ---- prefill ------------------------------------------------------------------------------------
    def restore(self, layer: int, req_to_token: torch.Tensor, prefix_lens: Sequence[int]) -> None:
        """Before a prefill layer reads its prefix: every prefix row this layer's units gave away is back (and the
        next ``RELOAD_AHEAD`` layers' reloads are on their way)."""
        if layer <= self._layer:  # layers come in order: this is another forward's (``begin`` resets them too)
            self._fences = {}
        self._layer = layer
        for lid in range(layer, min(layer + RELOAD_AHEAD + 1, self.tier.rows.num_layers)):
            if lid not in self._fences:
                self._fences[lid] = self._restore_layer(lid, req_to_token, prefix_lens)
        self.tier.host.join(self._fences[layer])

    def _restore_layer(self, layer: int, req_to_token: torch.Tensor, prefix_lens: Sequence[int]) -> Any:
        """Issue the reloads of ``layer``'s missing prefix rows; their fence (None: nothing to wait for)."""
        rows, host = self.tier.rows, self.tier.host
        fence = None
        for pos, (r, prefix) in enumerate(zip(self.step.requests, prefix_lens)):
            if not prefix or self.failed(pos):
                continue
            slots = req_to_token[r.req_pool_idx, :prefix].to(torch.int64)
            missing = rows.rows_of(layer, slots) < 0  # [units of the layer, n]
            if not bool(missing.any()):
                continue
            units = rows.units(layer)
            # one reload per set of units missing the same slots (usually all of the layer's lazy units)
            patterns, which = torch.unique(missing, dim=0, return_inverse=True)
            for p, mask in enumerate(patterns):
                if not bool(mask.any()):
                    continue
                members = [units[i] for i in (which == p).nonzero().flatten().tolist()]
                need = slots[mask]
                taken = rows.take(len(members) * need.numel())
                out = rows.kv.new_empty((len(members) * need.numel(), *rows.row_shape))
                fps = None if r.fingerprints is None else r.fingerprints[:prefix][mask.cpu()]
                if taken is None or fps is None or not host.reload(members, need, fps, out, reader=r.label):
                    if taken is not None:
                        rows.give(taken)
                    self._fail(pos, f"layer {layer}: {need.numel()} prefix rows could not be restored")
                    break
                with host.copy_stream(taken, out):  # the scatter into the rows, after the reload, off the compute stream
                    rows.put(taken, out)
                fence = host.fence()
                for unit, mine in zip(members, taken.view(len(members), -1)):
                    rows.place(unit, need, mine)
                self.tier.ledger.taken(r.req_pool_idx, taken.numel())
                self.tier.stats.restored_rows += taken.numel()
        return fence

    def heal(self, layer: int, req_to_token: torch.Tensor, prefix_lens: Sequence[int], ext_lens: Sequence[int]) -> None:
        """Copy KV this prefill recomputed into the cached slots' missing rows, so the next turn finds them whole:
        a layer's units all at once, or (rows short) none of them."""
        rows = self.tier.rows
        for pos, (r, prefix, ext) in enumerate(zip(self.step.requests, prefix_lens, ext_lens)):
            if r.heal is None or self.failed(pos):
                continue
            first, cached = r.heal.first, r.heal.cached.to(rows.kv.device)
            lo, hi = max(prefix, first), min(prefix + ext, first + len(cached))
            if lo >= hi:
                continue
            targets = cached[lo - first : hi - first]
            at = rows.rows_of(layer, targets)  # [units of the layer, n]: all units at once, as ``write`` fills
            missing = at < 0
            if not bool(missing.any()):
                continue
            fresh = rows.lookup(layer, req_to_token[r.req_pool_idx, lo:hi].to(torch.int64))
            taken = rows.take(int(missing.sum()))
            if taken is None:  # none of the layer's units heals: the next match cuts here again, recomputed
                self.tier.stats.row_shortfalls += 1
                continue
            rows.put(taken, rows.get(fresh[missing]))
            at[missing] = taken
            rows.fill(rows.units(layer), targets, at, missing)
            self.tier.ledger.taken(r.req_pool_idx, taken.numel())
            self.tier.stats.healed_rows += taken.numel()

    # ---- every forward ------------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """KV of new tokens (``k``/``v`` ``[n, heads, dim]`` at ``slots``) into the layer's rows: a scatter, which
        never waits for the device, once the forward's first write took the rows of ``slots`` in every unit."""
        if not self._rows_taken(layer, slots):
            return
        rows = self.tier.rows
        at = rows.rows_of(layer, slots).flatten()
        shape = rows.row_shape[1:]  # a unit's heads, dim
        for part, new in ((0, k), (1, v)):
            per_unit = new.reshape(-1, rows.units_per_layer, *shape).movedim(1, 0)  # unit-major, as ``at``
            rows.kv[part][at] = per_unit.reshape(-1, *shape).to(rows.kv.dtype)

    def _rows_taken(self, layer: int, slots: torch.Tensor) -> bool:
        """Every unit holds a row for each of ``slots`` (False: the step's requests failed, nothing is written).
        The layers of a forward write the same slots in increasing order: the first takes the rows."""
        key = (slots.data_ptr(), slots.numel())
        if key == self._new_slots and layer > self._written:
            self._written = layer
            return self._new_rows_ok
        self._new_slots, self._written = key, layer
        self._new_rows_ok = self._take_new_rows(slots)
        return self._new_rows_ok

    def _take_new_rows(self, slots: torch.Tensor) -> bool:
        """The rows of ``slots`` in every unit at once (``KvTier.take_rows``): the forward's one wait for the device
        on its writes."""
        if self.tier.take_rows(slots) is not None:
            return True
        for pos in range(len(self.step.requests)):
            self._fail(pos, "no rows for new tokens")
        return False

    def read(self, pos: int, layer: int, slots: torch.Tensor,
             heads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values ``[n, heads, dim]`` of ``slots`` in ``layer`` (in ``heads`` only, a mask over its KV
        heads) for batch position ``pos``, or None when some are on neither tier (a bug of ours): the request is
        then finished with an error (strict mode raises) and the caller computes nothing for it."""
        try:
            return self.tier.rows.read(layer, slots, heads)
        except LostKv as exc:
            if pos >= len(self.step.requests):
                raise
            self._fail(pos, str(exc))
            return None

    # ---- after a decision ---------------------------------------------------------------------------
    def release_lazy(self, req_pool_idx: int, lazy: torch.Tensor, seq_len: int, req_to_token: torch.Tensor,
                     shared: torch.Tensor | None) -> dict:
        """Lazy units (``lazy`` ``[layers, KV heads]``: a unit goes when all its heads are lazy) give back the rows
        of their middle tokens ``[sink, seq_len - recent)`` (a host copy first, where the budget allows). Slots in
        ``shared`` (a mask over slots: what other running requests read) keep their rows. Returns the request's KV
        report (``kv`` in its layer map)."""
        pos = self.step.position(req_pool_idx)
        r = None if pos is None else self.step.requests[pos]
        if r is not None:
            slots = r.slots(req_to_token, seq_len)
        else:
            slots = req_to_token[req_pool_idx, :seq_len].to(torch.int64)
        if r is not None:  # nothing is released from a forward that read missing KV
            self.tier.stats.failed_requests += self.step.fail_lost_pages(self.strict)
        if r is None or self.failed(pos) or r.fingerprints is None:
            return {"kv": self.tier.report(slots)}
        self.tier.seen(slots, r.fingerprints)
        units = lazy.view(self.tier.rows.num_layers, self.tier.rows.units_per_layer, -1).all(dim=2).flatten()
        if bool(units.any()) and seq_len > self.sink + self.recent:
            self._release_middle(r, units, slots, seq_len, shared)
        return {"kv": self.tier.report(slots)}

    def _release_middle(self, r: RequestStep, units: torch.Tensor, slots: torch.Tensor, seq_len: int,
                        shared: torch.Tensor | None) -> None:
        tier = self.tier
        middle = slots[self.sink : seq_len - self.recent]
        hits = shared.to(middle.device)[middle].nonzero() if shared is not None else middle[:0]
        skip = int(hits[-1]) + 1 if hits.numel() else 0
        start, middle = self.sink + skip, middle[skip:]
        if middle.numel() == 0:
            return
        assert r.fingerprints is not None
        lazy = units.nonzero().flatten().to(middle.device)
        tier.stats.released_rows += tier.offload(r.label, lazy, middle, r.fingerprints[start : start + middle.numel()])

    # ---- failures -----------------------------------------------------------------------------------
    def pages(self, page_ids: torch.Tensor) -> torch.Tensor:
        """Page ids about to be read (a paged kernel's, or scoring's keys). A missing one (-1) is a bug of ours (the
        planner restores every row a forward reads): it reads row 0 and is counted on the device, and the step's
        requests fail when the count is read (``KvStep.fail_lost_pages``: before a decision releases rows, and when
        the scheduler side settles the forward or caches a chunk), so that no layer waits for the device to check."""
        self.step.count_lost_pages(page_ids)
        return page_ids.clamp(min=0)

    def _fail(self, pos: int, why: str) -> None:
        """Skip the request for the rest of the forward and say why in the step; the scheduler side finishes it
        with an error (``KvPlanner.settle``)."""
        if self.step.fail(pos, why, self.strict):
            self.tier.stats.failed_requests += 1

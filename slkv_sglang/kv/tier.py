"""The KV tier of one attention backend with ``--slkv-offload``: its parts, its counters, its report.

Who owns what (``docs/memory.md``): ``DeviceRows`` the device store and ``row_of``; ``Ledger`` the rows admission
promised; ``offload.HostArena`` the host copies and their index; ``SharedTier`` (``--slkv-shared-store``) the
write-back queue and what the shared store holds; ``TierStats`` the counters. ``KvPlanner``
(scheduler side) decides, ``KvExecutor`` (worker side, inside the attention backend) moves KV; both act on the parts
of one ``KvTier``, and nothing else does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from offload import HostArena

from .ledger import Ledger
from .rows import PAD_SLOT, DeviceRows
from .shared import SharedTier

# Device bytes per (unit, slot) besides KV: ``DeviceRows.row_of`` (int32) and ``Ledger.unwritten`` (bool). The
# pool pays them out of its KV bytes, so a token slot costs this much per unit whether it holds KV or not; and
# 4 more per slot (``DeviceRows.held_by_slot``) and per row (the free stack).
INDEX_BYTES = 5
COUNT_BYTES = 4
# Without ``--slkv-overcommit``: as many slots as keep the index under this share of the KV bytes (so the
# default loses at most ~3% of rows against any hand-picked factor below it), and at most MAX_SLOT_FACTOR
# per full-KV token. A row per KV head of 512 bytes (Llama-3-8B in bf16, the bundled model in float32) gets
# 3.2 slots per full-KV token: room for savings up to 69%.
INDEX_SHARE = 1 / 32
# The label of host copies ``demote`` makes: the radix cache's, no conversation's (``HostArena`` counts a reload
# as shared only between two conversations).
DEMOTED = ""
# What a demotion frees beyond what is needed, as a share of the pool's rows: under steady pressure a demotion (a
# device sync on CUDA) then runs once per that many rows taken, not at every decode step.
DEMOTE_AHEAD = 1 / 64
MAX_SLOT_FACTOR = 8.0


def units_per_layer(granularity: str, heads: int) -> int:
    """A row per KV head with head granularity (each lazy head frees its own), else a row per layer."""
    return heads if granularity == "head" else 1


def slot_factor(row_bytes: int, overcommit: float) -> float:
    """Token slots SGLang gets per full-KV token its KV bytes hold: the operator's ``--slkv-overcommit``, or (0)
    what the index affords at ``row_bytes`` per row."""
    if overcommit:
        return overcommit
    return max(1.0, min(MAX_SLOT_FACTOR, row_bytes * INDEX_SHARE / INDEX_BYTES))


def pool_rows(units: int, slots: int, factor: float, row_bytes: int) -> int:
    """Rows of a pool that SGLang sized at ``slots`` token slots, ``factor`` to a full-KV token of its bytes:
    those bytes, less every slot's index and count and every row's place in the free stack."""
    kv_bytes = units * (int(slots / factor) + 1) * row_bytes
    return (kv_bytes - (units * INDEX_BYTES + COUNT_BYTES) * (slots + 1)) // (row_bytes + COUNT_BYTES)


@dataclass
class TierStats:
    released_rows: int = 0  # rows given back by lazy layers
    restored_rows: int = 0  # rows brought back from the host
    lost_rows: int = 0  # rows given back without a host copy (budget full): recomputed when needed
    recomputed_tokens: int = 0  # cached prefix tokens recomputed because their KV was on neither tier
    healed_rows: int = 0  # missing rows of cached slots filled from recomputed KV
    adopted_rows: int = 0  # rows a cached slot took over from a request's duplicate of it (``adopt``)
    row_shortfalls: int = 0  # batches whose prefix restores found fewer spare rows than admission promised
    demoted_rows: int = 0  # rows of idle cached slots moved to the host to make room (``demote``)
    failed_requests: int = 0  # requests finished with an error because their KV could not be made whole


@dataclass
class KvTier:
    rows: DeviceRows
    ledger: Ledger
    host: HostArena
    stats: TierStats
    shared: SharedTier | None = None
    # per slot, on the host: the prefix fingerprint of its token where a decision or a finished request saw it (-1:
    # not known) and when (the ``sightings`` count then): what ``demote`` needs to copy a slot's KV to the host and
    # pick the idlest
    fingerprints: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    seen_at: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sightings: int = 0

    def __post_init__(self) -> None:
        if self.fingerprints.size == 0:
            self.fingerprints = np.full(self.rows.num_slots + 1, -1, dtype=np.int64)
            self.seen_at = np.zeros(self.rows.num_slots + 1, dtype=np.int64)

    @classmethod
    def build(cls, num_layers: int, units_per_layer: int, num_slots: int, num_rows: int, heads: int, dim: int,
              dtype: torch.dtype, device: torch.device | str, host_budget: int, poison: bool = False,
              host_prepin: int = 0) -> "KvTier":
        """``heads``: KV heads per layer, split into ``units_per_layer`` units (``rows.py``); ``host_prepin``: host
        bytes allocated at once (``HostArena``)."""
        if heads % units_per_layer:
            raise ValueError(f"{heads} KV heads do not split into {units_per_layer} equal units")
        units = num_layers * units_per_layer
        rows = DeviceRows(num_layers, units_per_layer, num_slots, num_rows, heads // units_per_layer, dim, dtype, device,
                          poison)
        return cls(rows, Ledger(units, num_slots, device), HostArena(host_budget, units, num_slots, device, host_prepin),
                   TierStats())

    @property
    def rows_per_slot(self) -> int:
        """Rows a token takes with its KV whole: one per unit."""
        return self.rows.num_units

    @property
    def spare_rows(self) -> int:
        """Free rows nobody was promised: what admission may hand out."""
        return self.rows.free - self.ledger.reserved

    def free_slots(self, slots: torch.Tensor) -> None:
        """SGLang freed these slots: their rows in every unit and their host copies go."""
        slots = slots[slots != PAD_SLOT]  # never allocated by SGLang; its rows stay whatever frees it
        if slots.numel() == 0:
            return
        self.rows.release_slots(slots)
        self.ledger.slots_freed(slots)
        self.host.forget(slots)
        self.fingerprints[slots.cpu().numpy()] = -1

    def adopt(self, own: torch.Tensor, tree: torch.Tensor) -> None:
        """SGLang caches a request whose tokens the radix tree already holds in other slots (it recomputed past a
        capped or cut match, or another request computed them meanwhile): it frees the request's ``own`` slots and
        points the request at the ``tree`` ones. Those take over the rows and host copies they lack, so that what
        the request reads from now on is whole (same tokens, same KV)."""
        self.stats.adopted_rows += self.rows.adopt(own, tree)
        self.host.adopt(own, tree)
        own_at, tree_at = own.cpu().numpy(), tree.cpu().numpy()
        unknown = self.fingerprints[tree_at] < 0
        self.fingerprints[tree_at[unknown]] = self.fingerprints[own_at[unknown]]
        self.seen_at[tree_at] = np.maximum(self.seen_at[tree_at], self.seen_at[own_at])

    def take_rows(self, slots: torch.Tensor) -> torch.Tensor | None:
        """Every unit holds a row for each of ``slots`` (fresh ones take theirs, owed to them in the ``Ledger``);
        returns those rows ``[units, n]``, or None (nothing taken, still owed) if the free rows are too few. One
        wait for the device, for the counts: a forward's new tokens take their rows here once, not per layer."""
        rows, ledger = self.rows, self.ledger
        at = rows.row_of[:, slots]  # [units, n]
        missing = at < 0
        n_missing, n_owed = torch.stack([missing.sum(), ledger.unwritten[:, slots].sum()]).tolist()
        if n_missing:
            taken = rows.take(n_missing)
            if taken is None:
                return None
            order = (missing.flatten().cumsum(0) - 1).clamp(min=0).view_as(at)  # a mask assignment would wait
            at = torch.where(missing, taken[order], at)
            rows.fill(range(rows.num_units), slots, at, missing)
        ledger.written(slots, n_owed)
        return at

    def fill_slots(self, slots: torch.Tensor, kv: torch.Tensor) -> bool:
        """Fresh ``slots`` (allocated, owed their rows) take the KV ``kv`` ``[units, n, 2, heads, dim]`` in every
        unit (a prefix restored from the shared tier). False, nothing taken, if the rows are not there."""
        at = self.take_rows(slots)
        if at is None:
            return False
        self.rows.put(at.flatten(), kv.reshape(-1, *self.rows.row_shape))
        return True

    def seen(self, slots: torch.Tensor, fingerprints: torch.Tensor) -> None:
        """The tokens of ``slots`` (a request's, by position) have these prefix fingerprints: a decision or a
        finished request saw them now."""
        self.sightings += 1
        at = slots.cpu().numpy()[: fingerprints.numel()]
        self.fingerprints[at] = fingerprints[: at.size].numpy()
        self.seen_at[at] = self.sightings

    def whole(self, slots: torch.Tensor, fingerprints: torch.Tensor) -> torch.Tensor:
        """``[n]`` bool: which of ``slots`` have their KV in every unit, on the device or on the host with the
        prefix fingerprint ``fingerprints`` (what a restore can bring back)."""
        on_device = (self.rows.row_of[:, slots.to(self.rows.row_of.device)] >= 0).cpu()
        return (on_device | self.host.hosted(slots, fingerprints)).all(dim=0)

    def offload(self, label: str, units: torch.Tensor, slots: torch.Tensor, fingerprints: torch.Tensor,
                entry: int | None = None) -> int:
        """The rows ``slots`` hold in ``units`` go back to the free rows, a host copy first (under ``entry``, a new
        one if None) where the host does not hold one and the budget allows (the rest is counted in ``lost_rows``:
        recomputed if read again). Returns the rows released."""
        at = self.rows.row_of[units[:, None], slots[None, :]]  # [units, n]
        fresh = (at >= 0).cpu() & ~self.host.holds(units.tolist(), slots)
        entry = self.host.new_entry() if entry is None else entry
        # one host chunk per set of units with the same copies to make (usually all of them: the same tokens)
        patterns, which = torch.unique(fresh, dim=0, return_inverse=True)
        for p, mask in enumerate(patterns):
            if not bool(mask.any()):
                continue
            members = (which == p).nonzero().flatten().to(at.device)
            keep = mask.to(at.device)
            kv = self.rows.get(at[members][:, keep].flatten())
            held = self.host.save(entry, label, units[members].tolist(), slots[keep], fingerprints[mask], kv)
            self.stats.lost_rows += (members.numel() - held) * int(mask.sum())
        return self.rows.release(units, slots)

    def demote(self, rows_needed: int, keep: torch.Tensor) -> int:
        """Free ``rows_needed`` rows (and ``DEMOTE_AHEAD`` of the pool more, so that pressure demotes now and then,
        not at every step) without dropping a cached prefix: idle cached slots move their KV to the host, least
        recently seen first, and the radix cache keeps them, so the next turn that matches them reloads instead of
        recomputing (the planner checks their fingerprints). Idle: their tokens were seen (``seen``), ``keep`` (a
        mask over slots: what running and admitted requests and heals read) does not hold them, and every unit's
        KV of theirs is on one tier (one that lost some is a heal's to fill). Only into the host budget's free
        bytes: evicting other host copies could cut a prefix already matched. Returns the rows freed (0 without
        idle slots or host room: the caller evicts)."""
        rows, host = self.rows, self.host
        room = (host.budget_bytes - host.stats.held_bytes) // rows.row_bytes
        if rows_needed <= 0 or room <= 0:
            return 0
        target = min(room, rows_needed + int(rows.num_rows * DEMOTE_AHEAD))
        held = rows.held_by_slot.cpu().numpy()
        idle = np.flatnonzero((self.fingerprints >= 0) & (held > 0) & ~keep.cpu().numpy())
        idle = idle[np.argsort(self.seen_at[idle], kind="stable")]
        chosen = self._whole_prefix(idle, held, target)
        if chosen.size == 0:
            return 0
        if rows.kv.is_cuda:  # a forward in flight may still write these rows, or read them on another stream
            torch.cuda.synchronize(rows.kv.device)
        chosen = np.sort(chosen)
        slots = torch.from_numpy(chosen).to(rows.row_of.device)
        fingerprints = torch.from_numpy(self.fingerprints[chosen])
        entry, released = host.new_entry(), 0
        for layer in range(rows.num_layers):  # staging one layer's rows at a time, as reloads do
            units = torch.tensor(rows.units(layer), device=rows.row_of.device)
            released += self.offload(DEMOTED, units, slots, fingerprints, entry)
        self.stats.demoted_rows += released
        return released

    def _whole_prefix(self, order: np.ndarray, held: np.ndarray, target: int) -> np.ndarray:
        """The first of ``order`` whose KV every unit holds on one tier, as many as hold at most ``target`` rows
        (never more: ``target`` may be the host's room): checked in growing runs, not over every idle slot."""
        chosen, total, start, step = [], 0, 0, 256
        while start < order.size and total < target:
            run = order[start : start + step]
            whole = self.whole(torch.from_numpy(run), torch.from_numpy(self.fingerprints[run])).numpy()
            for slot, n in zip(run[whole], held[run[whole]]):
                if total + n > target:
                    return np.asarray(chosen, dtype=np.int64)
                chosen.append(slot)
                total += n
                if total >= target:
                    break
            start, step = start + step, step * 2
        return np.asarray(chosen, dtype=np.int64)

    def clear(self) -> None:
        """SGLang cleared its allocator (flush_cache): no slot is live."""
        self.rows.clear()
        self.ledger.clear()
        self.host.clear()
        self.fingerprints.fill(-1)
        self.seen_at.fill(0)

    def sizes(self) -> dict[str, int]:
        """Entries of each per-request map, and what the tier holds (a soak test checks none of them grows)."""
        return {"ledger_promised": len(self.ledger.promised), "ledger_reserved": self.ledger.reserved,
                "host_entries": len(self.host), "host_held_bytes": self.host.stats.held_bytes,
                "device_rows_used": self.rows.num_rows - self.rows.free, "device_rows_peak": self.rows.peak,
                "slots_miscounted": self.rows.miscounted(),
                **({"shared_queued_bytes": self.shared.queued_bytes} if self.shared is not None else {})}

    def report(self, slots: torch.Tensor) -> dict[str, Any]:
        """A request's KV in its layer map: its device and host tokens per (layer, KV head) whatever the rows'
        layout, its host bytes, the totals."""
        rows = self.rows
        host_tokens = self.host.hosted(slots).sum(dim=1)
        per_head = rows.row_shape[1]

        def by_head(per_unit: torch.Tensor) -> list[list[int]]:
            return per_unit.view(rows.num_layers, rows.units_per_layer).repeat_interleave(per_head, dim=1).tolist()

        return {
            "device_tokens": by_head(rows.held(slots)),
            "host_tokens": by_head(host_tokens),
            "host_bytes": int(host_tokens.sum()) * rows.row_bytes,
            "head_bytes": rows.row_bytes // per_head,
            "free_rows": rows.free, "rows": rows.num_rows, "row_bytes": rows.row_bytes,
            "host_budget": self.host.budget_bytes,
            **asdict(self.stats), **{f"host_{k}": v for k, v in asdict(self.host.stats).items()},
            **(self.shared.report() if self.shared is not None else {}),
        }

"""Device KV that follows the layer map: one row of a shared store per (layer, token slot).

SGLang's pool gives a token slot one entry in *every* layer, so a lazy layer cannot give back its middle
tokens. Here SGLang keeps allocating logical slots (radix cache, ``req_to_token`` and admission control are
untouched) while each (layer, slot) that holds KV owns a row of one store ``kv [rows, 2, heads, dim]``:

* writes take rows for new slots (``write``); reads translate slots to rows (``rows``, one gather);
* at a lazy decision, the middle tokens' rows of a lazy layer are copied to the host tier and given back
  (``release``), so any layer of any request can use them; what the host budget cannot take is given back
  all the same (``lost_rows``): device memory follows the layer map whatever the host holds;
* a later prefill that needs them (the session's next turn, or another request sharing the prefix through
  the radix cache) brings them back first (``restore``); a prefix whose KV is on neither tier (never hosted,
  or evicted from the host) is cut where it stops being restorable (``restorable``), the rest is recomputed
  by the prefill, and the recomputed KV fills the cached slots' missing rows (``heal``);
* when SGLang frees a slot, every layer's row of it is freed and host copies of it are dropped (``free_slots``).

A read of a row that is neither on the device nor restorable raises: never silently wrong KV.
``docs/memory.md`` has the design and its limits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from offload import HostArena, OffloadRefused


class PoolExhausted(RuntimeError):
    """No free device rows for KV that must be on the device now."""


@dataclass
class PoolStats:
    released_rows: int = 0  # rows given back by lazy layers
    restored_rows: int = 0  # rows brought back from the host
    lost_rows: int = 0  # rows given back without a host copy (budget full): recomputed when needed
    recomputed_tokens: int = 0  # cached prefix tokens recomputed because their KV was on neither tier
    healed_rows: int = 0  # missing rows of cached slots filled from recomputed KV


class LayerRowPool:
    def __init__(self, num_layers: int, num_slots: int, num_rows: int, heads: int, dim: int, dtype: torch.dtype,
                 device: torch.device | str, arena: HostArena, poison: bool = False):
        self.num_layers, self.num_slots, self.num_rows = num_layers, num_slots, num_rows
        self.kv = torch.zeros(num_rows, 2, heads, dim, dtype=dtype, device=device)
        self.row_of = torch.full((num_layers, num_slots + 1), -1, dtype=torch.int64, device=device)
        self.pos_of = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=device)  # position of a host copy
        # the session whose host copy holds (layer, slot), -1 if none: the host tier's index into the arena
        self.owner_of = torch.full((num_layers, num_slots + 1), -1, dtype=torch.int64, device=device)
        self._owners: dict[int, str] = {}  # owner id (in owner_of) -> session, while it has host copies
        self._owner_ids: dict[str, int] = {}
        self._next_owner = 0
        self.arena, self.poison = arena, poison
        arena.on_evict = self._forget
        self.stats = PoolStats()
        # prefixes cut by ``restorable``: rid -> (first recomputed position, cached slots from there), then
        # keyed by the request's req_to_token row once its batch is built
        self.heal_pending: dict[str, tuple[int, torch.Tensor]] = {}
        self.heal_at: dict[int, tuple[int, torch.Tensor]] = {}
        # Admission: rows promised but not taken yet. A slot SGLang allocates is owed L rows until each layer
        # writes it (``unwritten``); a prefill that restores or heals its prefix is owed those rows until it
        # takes them (``promised``, per req_to_token row).
        self.unwritten = torch.zeros((num_layers, num_slots + 1), dtype=torch.bool, device=device)
        self.promised: dict[int, int] = {}
        self.reserved = 0
        self.reset()

    @property
    def row_bytes(self) -> int:
        return self.kv[0].numel() * self.kv.element_size()

    @property
    def free_rows(self) -> int:
        return self._n_free

    @property
    def spare_rows(self) -> int:
        """Free rows nobody was promised: what admission may hand out."""
        return self._n_free - self.reserved

    # ---- admission ----------------------------------------------------------------------------------------
    def reserve_slots(self, slots: torch.Tensor) -> None:
        """SGLang allocated these slots: each is owed a row in every layer until that layer writes it."""
        self.unwritten[:, slots] = True
        self.reserved += self.num_layers * slots.numel()

    def prefix_needs(self, cached: torch.Tensor) -> int:
        """Rows a prefill over the cached prefix ``cached`` (as matched, before any cut) takes besides its
        new tokens': restores of what lazy layers gave to the host, heals of what was lost."""
        return int((self.row_of[:, cached] < 0).sum())

    def promise(self, row: int, n: int) -> None:
        self.promised[row] = self.promised.get(row, 0) + n
        self.reserved += n

    def release_promise(self, row: int) -> None:
        """The request left (or its prefill is done): what it did not take goes back."""
        self.reserved -= self.promised.pop(row, 0)

    def _consume(self, row: int | None, n: int) -> None:
        if row is not None and row in self.promised:
            used = min(n, self.promised[row])
            self.promised[row] -= used
            self.reserved -= used

    def held_rows(self, slots: torch.Tensor) -> int:
        return int((self.row_of[:, slots] >= 0).sum())

    def rows_used(self) -> list[int]:
        """Device rows held per layer."""
        return (self.row_of >= 0).sum(dim=1).tolist()

    def report(self, slots: torch.Tensor, session: str) -> dict[str, Any]:
        """What a request's layer map carries: its device tokens and its session's host tokens per layer, its
        session's host bytes, and the pool's and host tier's totals."""
        return {
            "device_tokens": (self.row_of[:, slots] >= 0).sum(dim=1).tolist(),
            "host_tokens": [0 if r is None else r[1] - r[0]
                            for r in (self.arena.held(session, layer) for layer in range(self.num_layers))],
            "session_host_bytes": self.arena.session_bytes(session),
            "free_rows": self._n_free, "rows": self.num_rows, "row_bytes": self.row_bytes,
            "host_budget": self.arena.budget_bytes,
            **asdict(self.stats), **{f"host_{k}": v for k, v in asdict(self.arena.stats).items()},
        }

    def reset(self) -> None:
        """Everything free (SGLang cleared its allocator: no slot is live)."""
        self._free = torch.arange(self.num_rows - 1, -1, -1, dtype=torch.int64, device=self.kv.device)
        self._n_free = self.num_rows
        self.row_of.fill_(-1)
        self.owner_of.fill_(-1)
        self.heal_pending.clear()
        self.heal_at.clear()
        self.unwritten.fill_(False)
        self.promised.clear()
        self.reserved = 0
        for owner in self._owners.values():
            self.arena.drop(owner)
        self._owners.clear()
        self._owner_ids.clear()

    # ---- rows -------------------------------------------------------------------------------------------
    def _take(self, n: int) -> torch.Tensor:
        if n > self._n_free:
            raise PoolExhausted(f"slkv: {n} KV rows needed, {self._n_free} free of {self.num_rows}")
        self._n_free -= n
        return self._free[self._n_free : self._n_free + n].clone()

    def _give(self, rows: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        if self.poison:  # a read of a freed row turns into NaN logits, which the tests catch
            self.kv[rows] = float("nan")
        end = self._n_free + rows.numel()
        self._free[self._n_free : end] = rows
        self._n_free = end

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """KV of new tokens: ``k``/``v`` ``[n, heads, dim]`` at ``slots``, taking rows where needed."""
        rows = self.row_of[layer, slots]
        missing = rows < 0
        if bool(missing.any()):
            owed = int(self.unwritten[layer, slots].sum())
            self.reserved -= owed  # these rows were promised to the slots at allocation
            self.unwritten[layer, slots] = False
            rows[missing] = self._take(int(missing.sum()))
            self.row_of[layer, slots] = rows
        self.kv[rows, 0] = k.view(-1, *self.kv.shape[2:]).to(self.kv.dtype)
        self.kv[rows, 1] = v.view(-1, *self.kv.shape[2:]).to(self.kv.dtype)

    def rows(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        rows = self.row_of[layer, slots]
        if bool((rows < 0).any()):
            bad = slots[rows < 0][:4].tolist()
            raise RuntimeError(f"slkv: layer {layer} reads slots {bad}... whose KV is not on the device")
        return rows

    # ---- lazy layers --------------------------------------------------------------------------------------
    def release(self, session: str, layer: int, slots: torch.Tensor, start: int) -> None:
        """A lazy layer's middle tokens (``slots`` at positions ``start..``): host copy, then free the rows.

        Tokens whose host copy exists are not copied again. Rows the host cannot take (budget full, or new
        tokens that do not continue the session's host range) are freed all the same and counted in
        ``lost_rows``: a later prefix match stops before them and the prefill recomputes them.
        """
        rows = self.row_of[layer, slots]
        live = rows >= 0
        if not bool(live.any()):
            return
        fresh = live & (self.owner_of[layer, slots] < 0)
        if bool(fresh.any()):
            first = int(fresh.nonzero()[0])
            tail = slots[first:]
            hosted = bool(fresh[first:].all()) and bool((self.owner_of[layer, slots[:first]] >= 0).all())
            if hosted:
                try:
                    self.arena.offload(session, layer, start + first, self.kv[rows[first:]])
                except (OffloadRefused, ValueError):  # budget full, or the range would leave a gap
                    hosted = False
            if hosted:
                self.pos_of[tail] = torch.arange(start + first, start + len(slots), device=slots.device)
                self.owner_of[layer, tail] = self._owner_id(session)
            else:
                self.stats.lost_rows += int(fresh.sum())
        self._give(rows[live])
        self.row_of[layer, slots[live]] = -1
        self.stats.released_rows += int(live.sum())

    def restorable(self, slots: torch.Tensor) -> int:
        """How many leading ``slots`` (a cached prefix) have their KV in every layer, on the device or host."""
        ok = ((self.row_of[:, slots] >= 0) | (self.owner_of[:, slots] >= 0)).all(dim=0)
        bad = (~ok).nonzero()
        return int(bad[0]) if bad.numel() else slots.numel()

    def heal(self, layer: int, cached: torch.Tensor, fresh: torch.Tensor, row: int | None = None) -> None:
        """A prefill recomputed the KV of ``cached`` slots (the radix tree still points at them) into its own
        ``fresh`` slots: copy it into the cached slots' missing rows, so the next turn finds them whole."""
        missing = self.row_of[layer, cached] < 0
        if not bool(missing.any()):
            return
        rows = self._take(int(missing.sum()))
        self._consume(row, rows.numel())
        self.kv[rows] = self.kv[self.rows(layer, fresh[missing])]
        self.row_of[layer, cached[missing]] = rows
        self.stats.healed_rows += rows.numel()

    def restore(self, layer: int, slots: torch.Tensor, row: int | None = None) -> None:
        """Bring back from the host every row of ``slots`` this layer gave away (before a prefill reads them);
        ``row`` is the request whose promised rows they are."""
        missing = slots[self.row_of[layer, slots] < 0]
        if missing.numel() == 0:
            return
        owners = self.owner_of[layer, missing]
        if bool((owners < 0).any()):
            raise RuntimeError(f"slkv: layer {layer} lost KV of {int((owners < 0).sum())} slots")
        rows = self._take(missing.numel())
        self._consume(row, rows.numel())
        for owner in owners.unique().tolist():
            mine = owners == owner
            pos = self.pos_of[missing[mine]]
            order = torch.argsort(pos)
            pos, mine_rows = pos[order], rows[mine][order]
            out = torch.empty((pos.numel(), *self.kv.shape[1:]), dtype=self.kv.dtype, device=self.kv.device)
            if not bool((pos[1:] - pos[:-1] == 1).all()) or not self.arena.reload(self._owners[owner], layer,
                                                                                  int(pos[0]), out):
                raise RuntimeError(f"slkv: host copy of layer {layer} for {self._owners[owner]} is incomplete")
            self.arena.wait()
            self.kv[mine_rows] = out
        self.row_of[layer, missing] = rows
        self.stats.restored_rows += missing.numel()

    def free_slots(self, slots: torch.Tensor) -> None:
        """SGLang freed these slots: free their rows in every layer and forget their host copies."""
        if slots.numel() == 0:
            return
        rows = self.row_of[:, slots]
        self._give(rows[rows >= 0])
        self.row_of[:, slots] = -1
        self.reserved -= int(self.unwritten[:, slots].sum())
        self.unwritten[:, slots] = False
        for layer in range(self.num_layers):
            owners = self.owner_of[layer, slots]
            hosted = owners >= 0
            for owner in owners[hosted].unique().tolist():
                # a session's host range is a prefix of its middle: drop it from the first freed position on
                cut = int(self.pos_of[slots[hosted & (owners == owner)]].min())
                session = self._owners[owner]
                self.arena.truncate(session, layer, cut)
                if not self.arena.session_bytes(session):
                    self.arena.drop(session)
                    self._forget(session)
                    continue
                dropped = (self.owner_of[layer] == owner) & (self.pos_of >= cut)
                self.owner_of[layer, dropped] = -1
        self.owner_of[:, slots] = -1

    def _forget(self, session: str) -> None:
        """The host tier no longer holds ``session``: its KV that is not on the device is on neither tier."""
        owner = self._owner_ids.get(session)
        if owner is None:
            return
        gone = self.owner_of == owner
        self.owner_of[gone] = -1
        del self._owners[owner], self._owner_ids[session]

    def _owner_id(self, session: str) -> int:
        if session not in self._owner_ids:
            self._owner_ids[session], self._owners[self._next_owner] = self._next_owner, session
            self._next_owner += 1
        return self._owner_ids[session]


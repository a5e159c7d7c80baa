"""Device KV rows: one row of a shared store per (unit, slot) that holds KV.

SGLang's pool gives a token slot one entry in *every* layer, so a lazy layer could not give back its middle
tokens. Here SGLang keeps allocating slots (radix cache, ``req_to_token`` and admission are untouched) while each
(unit, slot) with KV on the device owns one row of ``kv [2, rows, heads per unit, dim]`` (``row_of``): keys and
values each a contiguous ``[rows, heads per unit, dim]`` store, the paged layout FlashInfer reads (a row is a page).

A *unit* is what one row holds of a token: the KV heads of one layer split into ``units_per_layer`` equal parts.
With one unit per layer a row is a whole layer (a layer's middle goes back only when every head of it is lazy);
with one unit per KV head (``--slkv-granularity head``) each lazy KV head gives its own rows back. Unit
``layer * units_per_layer + u`` holds KV heads ``u * heads .. (u + 1) * heads - 1`` of ``layer``.

SGLang's padding slot (``PAD_SLOT``) holds a row in every unit from the start, past the pool's ``num_rows``: a
decode CUDA graph pads its batch with requests on that slot, whose KV each replay writes and reads. Those rows are
never free and never counted.
"""

from __future__ import annotations

import torch


PAD_SLOT = 0  # SGLang's padding slot: never allocated to a request (its allocators hand out slots from 1)


class LostKv(RuntimeError):
    """A read of (layer, slot) KV that is on neither tier: a bug of ours, never served."""


class DeviceRows:
    def __init__(self, num_layers: int, units_per_layer: int, num_slots: int, num_rows: int, heads: int, dim: int,
                 dtype: torch.dtype, device: torch.device | str, poison: bool = False):
        """``heads``: KV heads per unit (a layer has ``units_per_layer * heads``)."""
        self.num_layers, self.units_per_layer = num_layers, units_per_layer
        self.num_slots, self.num_rows = num_slots, num_rows
        self.num_units = num_layers * units_per_layer
        self.kv = torch.zeros(2, num_rows + self.num_units, heads, dim, dtype=dtype, device=device)  # + PAD_SLOT's
        self.row_shape = (2, heads, dim)  # what ``get`` gives per row (and the host tier's pieces hold)
        self.row_of = torch.full((self.num_units, num_slots + 1), -1, dtype=torch.int32, device=device)  # tier.INDEX_BYTES
        # per slot, how many units hold a row for it (``row_of >= 0`` summed over units, kept as it changes):
        # admission reads it per request, which must not scan ``row_of``
        self.held_by_slot = torch.zeros(num_slots + 1, dtype=torch.int32, device=device)
        self.poison = poison  # freed rows are filled with NaN: a read of one shows in the outputs
        # the most rows ever in use: rows are taken last-freed first, so on CPU the pool's resident memory is
        # these rows' (its pages are committed when first written)
        self.peak = 0
        self.clear()

    @property
    def row_bytes(self) -> int:
        return self.kv[:, 0].numel() * self.kv.element_size()

    @property
    def free(self) -> int:
        return self._n_free

    def clear(self) -> None:
        self._stack = torch.arange(self.num_rows - 1, -1, -1, dtype=torch.int32, device=self.kv.device)
        self._n_free = self.num_rows
        self.row_of.fill_(-1)
        self.row_of[:, PAD_SLOT] = torch.arange(self.num_rows, self.num_rows + self.num_units, dtype=torch.int32)
        self.held_by_slot.zero_()
        self.held_by_slot[PAD_SLOT] = self.num_units

    def take(self, n: int) -> torch.Tensor | None:
        """``n`` free rows, or None (nothing taken) if fewer are free."""
        if n > self._n_free:
            return None
        self._n_free -= n
        self.peak = max(self.peak, self.num_rows - self._n_free)
        return self._stack[self._n_free : self._n_free + n].clone()

    def give(self, rows: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        if self.poison:
            self.kv[:, rows] = float("nan")
        end = self._n_free + rows.numel()
        self._stack[self._n_free : end] = rows
        self._n_free = end

    def get(self, rows: torch.Tensor) -> torch.Tensor:
        """The KV of ``rows``, ``[n, 2, heads, dim]`` (a copy)."""
        return self.kv[:, rows].movedim(0, 1)

    def put(self, rows: torch.Tensor, kv: torch.Tensor) -> None:
        """``rows`` take ``kv`` (``[n, 2, heads, dim]``, as ``get`` gives)."""
        self.kv[:, rows] = kv.movedim(1, 0).to(self.kv.device, self.kv.dtype)

    def units(self, layer: int) -> range:
        return range(layer * self.units_per_layer, (layer + 1) * self.units_per_layer)

    def rows_of(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """``[units_per_layer, n]``: the rows of ``slots`` in ``layer``'s units, -1 where there is none."""
        return self.row_of[layer * self.units_per_layer : (layer + 1) * self.units_per_layer, slots]

    def page_ids(self, layer: int, slots: torch.Tensor, units: torch.Tensor | None = None) -> torch.Tensor:
        """The rows of ``slots`` in ``layer``, each in its unit ``units`` (within the layer; None: unit 0), -1
        where there is none: a paged kernel's page ids into ``kv[0]`` and ``kv[1]``."""
        return self.row_of[layer * self.units_per_layer + (0 if units is None else units), slots]

    def held(self, slots: torch.Tensor) -> torch.Tensor:
        """``[units]``: how many of ``slots`` each unit holds on the device."""
        return (self.row_of[:, slots] >= 0).sum(dim=1)

    def fewest(self, candidates: torch.Tensor, k: int) -> int:
        """Rows held by the ``k`` slots holding the fewest among ``candidates`` (a mask over slots): a count per
        number of units held (0..units), not a sort."""
        if k <= 0:
            return 0
        counts = torch.bincount(self.held_by_slot[candidates.to(self.held_by_slot.device)],
                                minlength=self.num_units + 1).tolist()
        rows = 0
        for held, n in enumerate(counts):
            take = min(n, k)
            rows, k = rows + held * take, k - take
            if k == 0:
                break
        return rows

    def miscounted(self) -> int:
        """Slots whose ``held_by_slot`` differs from ``row_of`` (0 unless the count drifted; a full scan, for tests)."""
        return int((self.held_by_slot != (self.row_of >= 0).sum(dim=0)).sum())

    def lookup(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """``[units, n]``: the rows of ``slots`` in the units of ``layer``; ``LostKv`` if some unit has none."""
        return self._held(layer, slots, self.rows_of(layer, slots))

    def read(self, layer: int, slots: torch.Tensor,
             heads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, heads, dim]`` of ``slots`` in ``layer``, contiguous: its KV heads in ``heads`` (a
        mask over them; None: all), read from the units that hold them only."""
        rows = self.rows_of(layer, slots)
        within = None
        if heads is not None:
            per_unit = heads.view(self.units_per_layer, -1)
            used = per_unit.any(dim=1)
            if not bool(used.all()):
                rows = rows[used.to(rows.device)]
            within = per_unit[used].flatten()  # the wanted heads among the units read
            within = None if bool(within.all()) else within.to(self.kv.device)
        rows = self._held(layer, slots, rows)
        k, v = self.gather(rows, 0), self.gather(rows, 1)
        return (k, v) if within is None else (k[:, within], v[:, within])  # a mask index copies: contiguous

    def _held(self, layer: int, slots: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if bool((rows < 0).any()):
            bad = slots[(rows < 0).any(dim=0)][:4].tolist()
            raise LostKv(f"slkv: layer {layer} reads slots {bad}... whose KV is not on the device")
        return rows

    def gather(self, rows: torch.Tensor, part: int) -> torch.Tensor:
        """Keys (``part`` 0) or values (1) ``[n, heads, dim]`` at ``rows`` (``[units, n]``, from ``lookup``)."""
        store = self.kv[part]
        return store.index_select(0, rows[0]) if rows.shape[0] == 1 else store[rows].movedim(0, 1).flatten(1, 2)

    def fill(self, units: range, slots: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> None:
        """``rows`` (``[units, n]``) become the rows of ``slots`` in ``units``, ``new`` (a mask of them) being rows
        the slots did not hold before."""
        self.row_of[units.start : units.stop, slots] = rows
        self.held_by_slot[slots] += new.sum(dim=0, dtype=torch.int32)

    def place(self, unit: int, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """``slots`` (without a row in ``unit``) take ``rows``."""
        self.row_of[unit, slots] = rows
        self.held_by_slot[slots] += 1

    def release(self, units: torch.Tensor, slots: torch.Tensor) -> int:
        """Give back the rows ``slots`` hold in each of ``units``; returns how many there were."""
        at = (units[:, None], slots[None, :])
        rows = self.row_of[at]
        live = rows >= 0
        self.give(rows[live])
        self.row_of[at] = -1
        self.held_by_slot[slots] -= live.sum(dim=0, dtype=torch.int32)
        return int(live.sum())

    def adopt(self, own: torch.Tensor, tree: torch.Tensor) -> int:
        """``tree[i]`` holds the same token as ``own[i]`` (which SGLang is about to free): in every unit where it has
        no row and ``own[i]`` has one, that row moves to it. Returns the rows moved."""
        src, dst = self.row_of[:, own], self.row_of[:, tree]
        move = (dst < 0) & (src >= 0)
        if not bool(move.any()):
            return 0
        dst[move], src[move] = src[move], -1
        self.row_of[:, tree], self.row_of[:, own] = dst, src
        moved = move.sum(dim=0, dtype=torch.int32)
        self.held_by_slot[tree] += moved
        self.held_by_slot[own] -= moved
        return int(moved.sum())

    def release_slots(self, slots: torch.Tensor) -> None:
        """Every unit's rows of ``slots`` go back (SGLang freed the slots)."""
        rows = self.row_of[:, slots]
        self.give(rows[rows >= 0])
        self.row_of[:, slots] = -1
        self.held_by_slot[slots] = 0

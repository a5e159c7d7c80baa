"""Admission in rows: what SGLang admitted but the device has not taken yet.

SGLang admits requests by token slots; the device holds (unit, slot) rows (``rows.py``). A slot SGLang allocates is
owed one row per unit until that unit is written (``unwritten``); a prefill that restores or heals its prefix is
owed those rows until it takes them (``promised``, per ``req_pool_idx``). ``reserved`` sums both, so ``free - reserved``
rows (``spare``) are what admission may hand out.
"""

from __future__ import annotations

import torch


class Ledger:
    def __init__(self, num_units: int, num_slots: int, device: torch.device | str):
        self.num_units = num_units
        self.unwritten = torch.zeros((num_units, num_slots + 1), dtype=torch.bool, device=device)
        self.promised: dict[int, int] = {}  # req_pool_idx -> rows promised and not taken
        self.reserved = 0

    def clear(self) -> None:
        self.unwritten.fill_(False)
        self.promised.clear()
        self.reserved = 0

    def owe_slots(self, slots: torch.Tensor) -> None:
        """SGLang allocated these slots: each is owed a row in every unit until that unit is written."""
        self.unwritten[:, slots] = True
        self.reserved += self.num_units * slots.numel()

    def written(self, slots: torch.Tensor, owed: int) -> None:
        """Every unit holds rows for ``slots`` now; ``owed``: how many of those rows were owed (``unwritten``),
        counted by the caller with whatever else it reads from the device."""
        self.reserved -= owed
        self.unwritten[:, slots] = False

    def slots_freed(self, slots: torch.Tensor) -> None:
        self.reserved -= int(self.unwritten[:, slots].sum())
        self.unwritten[:, slots] = False

    def hold(self, n: int) -> None:
        """Set rows aside while a batch's slots are allocated (``promise`` hands them to its requests after)."""
        self.reserved += n

    def promise(self, req_pool_idx: int, n: int) -> None:
        self.promised[req_pool_idx] = self.promised.get(req_pool_idx, 0) + n
        self.reserved += n

    def taken(self, req_pool_idx: int | None, n: int) -> None:
        """A request took ``n`` of the rows promised to it."""
        if req_pool_idx is not None and req_pool_idx in self.promised:
            used = min(n, self.promised[req_pool_idx])
            self.promised[req_pool_idx] -= used
            self.reserved -= used

    def retire(self, req_pool_idx: int) -> None:
        """The request left (or its prefill is done): what it did not take goes back."""
        self.reserved -= self.promised.pop(req_pool_idx, 0)

"""Counts the places a piece of code reads a tensor's values on the host: on a GPU each is a wait for the device
(the host stops queueing work until the device has caught up), which is what a decode step's per-layer work must
not do. On a CPU nothing waits, but the same calls show where a GPU would.

What counts: a tensor turned into a Python value (``bool``, ``int``, ``float``, ``item``, ``tolist``), ops whose
output size depends on the values (``nonzero``, ``unique``, ``masked_select``) and indexing by a boolean mask
(read or assignment), which is a ``nonzero`` inside.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_VALUE_READS = frozenset({"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "unique",
                          "masked_select", "argwhere", "unique_consecutive"})
_INDEXING = frozenset({"__getitem__", "__setitem__"})


class HostReads(TorchFunctionMode):
    """``with HostReads() as reads``: ``reads.count`` (and ``reads.where``, by op) after the block. ``device``:
    count only reads of tensors on that device type (``"cuda"``: the real waits of a GPU run); None: any."""

    def __init__(self, device: str | None = None):
        super().__init__()
        self.device, self.where = device, Counter[str]()

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in _VALUE_READS or (name in _INDEXING and len(args) > 1 and _has_mask(args[1])):
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if tensor is not None and (self.device is None or tensor.device.type == self.device):
                self.where[name] += 1
        return func(*args, **(kwargs or {}))


def _has_mask(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)

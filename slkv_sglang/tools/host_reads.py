"""Counts the places a piece of code reads a tensor's values on the host: on a GPU each is a wait for the device
(the host stops queueing work until the device has caught up), which is what a decode step's per-layer work must
not do. On a CPU nothing waits, but the same calls show where a GPU would.

What counts: a tensor turned into Python values or copied to the host (``bool``, ``int``, ``float``, ``item``,
``tolist``, ``numpy``, ``cpu``, ``to`` the CPU), ops whose output size depends on the values (``nonzero``,
``unique``, ``masked_select``, ``bincount``, ``where`` with one argument, ``repeat_interleave`` of tensor
repeats without ``output_size``) and indexing by a boolean mask (read or assignment), a ``nonzero`` inside. What it
cannot see: waits that are not tensor calls (a CUDA event's or stream's ``synchronize``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_VALUE_READS = frozenset({"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu",
                          "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount"})
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
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _reads_values(name, args, kwargs):
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if tensor is not None and (self.device is None or tensor.device.type == self.device):
                self.where[name] += 1
        return func(*args, **kwargs)


def _reads_values(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _VALUE_READS:
        return True
    if name in _INDEXING:
        return len(args) > 1 and _has_mask(args[1])
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name == "repeat_interleave":  # repeats given as a tensor (alone: the tensor is the repeats)
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if len(args) == 1 else None)
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None and len(args) < 4
    if name == "to":
        return any(_is_cpu(a) for a in (*args[1:], kwargs.get("device")))
    return False


def _is_cpu(target: Any) -> bool:
    return (target == "cpu" or (isinstance(target, torch.device) and target.type == "cpu")
            or (isinstance(target, torch.Tensor) and target.device.type == "cpu"))


def _has_mask(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)

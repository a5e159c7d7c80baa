"""The host KV tier: lazy layers' middle KV kept in host memory under a byte budget.

A host copy belongs to one (layer, slot). A slot is SGLang's KV slot of one token, and the radix cache maps token
prefixes to slots, so a copy is addressed by content through the slot that owns it. It also carries the
*fingerprint* of the token prefix it was computed for (``slkv_sglang.kv.fingerprint``): a reload compares it with
the reader's own fingerprints and refuses on any difference, so a copy is only ever restored into a sequence whose
tokens match it. No client string takes part. Two requests that share a prefix share its slots, hence its copies.

Memory: each ``offload`` call (one layer's run of tokens) is stored as chunks ``[n, 2, heads, dim]`` that fill
recycled ``BLOCK_BYTES`` blocks, the tail in an allocation of its own. Chunks belong to a *group* (the decision that
offloaded them); eviction drops whole groups, least recently used first (an offload or a reload makes a group
recent). A chunk whose slots SGLang freed (``forget``) is freed with its last slot.

Budget: held bytes plus free blocks never exceed ``budget_bytes``. An offload that does not fit evicts other groups;
one that would not fit even alone is refused (nothing copied, nothing evicted): the caller recomputes later.

On CUDA the host tensors are pinned and copies run on a side stream; ``wait()`` joins them (events).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

# Host memory is recycled in blocks of this size: a fresh host allocation costs a page fault per 4 KiB on
# first touch (on CUDA, a slow pinned registration), which measured as 0.3x a plain copy into memory already
# in use. Each offload fills whole blocks from a free list and only its tail gets an allocation of its own.
BLOCK_BYTES = 1 << 21
# A chunk holds fewer than 2**24 tokens (a block's worth, or one offload when a token is larger than a block);
# chunk ids are never reused and have the other 39 bits.
OFFSET_BITS = 24
OFFSET_MASK = (1 << OFFSET_BITS) - 1
# Slots that break into more runs than this (copies not in slot order) are handled per chunk instead of per run.
MAX_RUNS = 64


def _np(t: torch.Tensor) -> np.ndarray:
    """A host view of an index tensor (a copy only if it lives on a device)."""
    return t.cpu().numpy()


def _counts(ids: np.ndarray) -> list[tuple[int, int]]:
    """(id, occurrences) pairs; ids repeat in runs (a layer's copies of consecutive slots share chunks), so counting
    runs avoids a sort: an id may come in more than one pair."""
    starts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    if starts.size > MAX_RUNS:
        return list(zip(*(a.tolist() for a in np.unique(ids, return_counts=True))))
    bounds = [0, *starts.tolist(), ids.size]
    return list(zip(ids[bounds[:-1]].tolist(), np.diff(bounds).tolist()))


@dataclass
class _Chunk:
    group: int
    layer: int
    slots: np.ndarray  # [n] int64: the slots whose copies these are
    kv: torch.Tensor  # [n, 2, heads, dim] on the host
    block: torch.Tensor | None  # the recycled block ``kv`` is a view of; None: its own allocation
    live: int  # slots of this chunk not forgotten yet

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass
class _Group:
    label: str  # who offloaded it, for reporting (a chat session id, else the request id)
    chunks: set[int] = field(default_factory=set)
    nbytes: int = 0


@dataclass
class ArenaStats:
    held_bytes: int = 0  # bytes the host tier holds now
    offloaded_bytes: int = 0
    reloaded_bytes: int = 0
    shared_tokens: int = 0  # (layer, token) copies reloaded by a request other than the one that offloaded them
    offload_seconds: float = 0.0
    reload_seconds: float = 0.0
    evictions: int = 0  # groups evicted to make room
    evicted_bytes: int = 0
    refused: int = 0  # offloads that did not fit at all
    refused_bytes: int = 0
    mismatches: int = 0  # reloads refused because a copy's fingerprint differs from the reader's


class HostArena:
    def __init__(self, budget_bytes: int, num_layers: int, num_slots: int, device: torch.device | str = "cpu"):
        if budget_bytes < 0:
            raise ValueError(f"offload budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._pin else None
        self._last: torch.cuda.Event | None = None  # of the latest copies; the side stream runs them in order
        # the index, on the host: where the copy of (layer, slot) is, ``chunk id << OFFSET_BITS | offset``, -1 if
        # none. One packed tensor: a reload finds its runs with a handful of vectorised ops, whatever its length.
        # The arena works on numpy views of both (a small numpy index op costs a quarter of torch's).
        self.loc = torch.full((num_layers, num_slots + 1), -1, dtype=torch.int64)
        self.fingerprint_of = torch.zeros(num_slots + 1, dtype=torch.int64)  # of the prefix a slot's copies hold
        self._loc, self._fingerprint_of = self.loc.numpy(), self.fingerprint_of.numpy()
        self._chunks: dict[int, _Chunk] = {}
        self._groups: OrderedDict[int, _Group] = OrderedDict()  # least recently used first
        self._next_chunk = 0
        self._spare: list[torch.Tensor] = []  # free blocks; with the held bytes, never more than the budget
        self.stats = ArenaStats()

    # ---- queries ---------------------------------------------------------------------------------------
    def hosted(self, slots: torch.Tensor, fingerprints: torch.Tensor | None = None) -> torch.Tensor:
        """``[layers, n]``: which layers hold a copy of each slot (whose prefix matches ``fingerprints``)."""
        at = _np(slots)
        held = self._loc[:, at] >= 0
        if fingerprints is not None:
            held &= (self._fingerprint_of[at] == _np(fingerprints))[None, :]
        return torch.from_numpy(held)

    def holds(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """``[n]``: which of ``slots`` have a copy in ``layer`` (any prefix)."""
        return torch.from_numpy(self._loc[layer, _np(slots)] >= 0)

    def group_bytes(self, group: int) -> int:
        g = self._groups.get(group)
        return g.nbytes if g else 0

    def __len__(self) -> int:
        """Groups held (a per-request map that must not grow without bound)."""
        return len(self._groups)

    # ---- lifecycle -------------------------------------------------------------------------------------
    def new_group(self) -> int:
        """An id for the copies of one decision (the group exists once something is offloaded under it)."""
        gid = self._next_chunk  # ids shared with chunks: never reused
        self._next_chunk += 1
        return gid

    def forget(self, slots: torch.Tensor) -> None:
        """SGLang freed these slots: their copies go (a chunk's memory with its last slot)."""
        at = _np(slots)
        loc = self._loc[:, at]
        held = loc >= 0
        if not held.any():
            return
        for cid, n in _counts(loc[held] >> OFFSET_BITS):
            chunk = self._chunks[cid]
            chunk.live -= n
            if chunk.live <= 0:
                self._drop_chunk(cid)
        self._loc[:, at] = -1

    def adopt(self, own: torch.Tensor, tree: torch.Tensor) -> None:
        """``tree[i]`` holds the same token (same prefix) as ``own[i]``, which SGLang is about to free: in every layer
        where it has no copy and ``own[i]`` has one, that copy becomes ``tree[i]``'s."""
        own, tree = _np(own), _np(tree)
        move = (self._loc[:, tree] < 0) & (self._loc[:, own] >= 0)
        if not move.any():
            return
        layers, at = move.nonzero()
        src, dst = own[at], tree[at]
        loc = self._loc[layers, src]
        self._loc[layers, dst] = loc
        self._loc[layers, src] = -1
        self._fingerprint_of[dst] = self._fingerprint_of[src]
        ids, offsets = loc >> OFFSET_BITS, loc & OFFSET_MASK
        for cid in np.unique(ids).tolist():
            mine = ids == cid
            self._chunks[cid].slots[offsets[mine]] = dst[mine]

    def clear(self) -> None:
        """Everything goes (SGLang cleared its allocator: no slot is live)."""
        for gid in list(self._groups):
            self._drop_group(gid)
        self.loc.fill_(-1)

    def set_budget(self, budget_bytes: int) -> None:
        """Change the budget at run time; shrinking evicts groups (LRU) until the arena fits."""
        if budget_bytes < 0:
            raise ValueError(f"offload budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._make_room(0, keep=None)
        self._recycle([])

    # ---- transfers -------------------------------------------------------------------------------------
    def offload(self, group: int, label: str, layer: int, slots: torch.Tensor, fingerprints: torch.Tensor,
                kv: torch.Tensor) -> bool:
        """Keep copies of ``kv`` (``[n, 2, H, D]``, the KV of ``slots`` in ``layer``) under ``group``.

        Slots already held in this layer are not copied again. False (nothing copied, nothing evicted, counted in
        ``refused``) if the group's bytes and these would exceed the whole budget."""
        at, fingerprints = _np(slots), _np(fingerprints)
        fresh = self._loc[layer, at] < 0
        if not fresh.all():
            at, fingerprints, kv = at[fresh], fingerprints[fresh], kv[torch.from_numpy(fresh).to(kv.device)]
        n = at.size
        if n == 0:
            return True
        nbytes = kv.numel() * kv.element_size()
        if self.group_bytes(group) + nbytes > self.budget_bytes:
            self.stats.refused += 1
            self.stats.refused_bytes += nbytes
            return False
        self._make_room(nbytes, keep=group)
        t0 = time.perf_counter()
        g = self._groups.setdefault(group, _Group(label))
        per_block = BLOCK_BYTES // (nbytes // n)  # tokens in a whole block (0: a token is larger)
        step = per_block or n
        first = self._next_chunk
        copies = []
        for i in range(0, n, step):
            piece = kv[i : i + step]
            block = self._block() if piece.shape[0] == per_block else None
            host = (block.view(kv.dtype)[: piece.numel()].view(piece.shape) if block is not None
                    else torch.empty(piece.shape, dtype=kv.dtype, pin_memory=self._pin))
            copies.append((host, piece))
            part = at[i : i + step].astype(np.int64)  # a copy: ``adopt`` rewrites it
            chunk = _Chunk(group, layer, part, host, block, live=part.size)
            self._chunks[self._next_chunk] = chunk
            g.chunks.add(self._next_chunk)
            g.nbytes += chunk.nbytes
            self._next_chunk += 1
        index = np.arange(n)
        self._loc[layer, at] = ((first + index // step) << OFFSET_BITS) | (index % step)
        self._fingerprint_of[at] = fingerprints
        self._copy(copies, kv)
        self._groups.move_to_end(group)
        self.stats.held_bytes += nbytes
        self._trim_spare()
        self.stats.offloaded_bytes += nbytes
        self.stats.offload_seconds += time.perf_counter() - t0
        return True

    def reload(self, layer: int, slots: torch.Tensor, fingerprints: torch.Tensor, out: torch.Tensor,
               reader: str = "") -> bool:
        """Copy the host copies of ``slots`` in ``layer`` into ``out`` (``[n, 2, H, D]``).

        False, with ``out`` untouched, unless every slot has a copy whose prefix fingerprint equals the reader's
        (``fingerprints``): the caller recomputes instead."""
        at = _np(slots)
        loc = self._loc[layer, at]
        if (loc < 0).any():
            return False
        if not np.array_equal(self._fingerprint_of[at], _np(fingerprints)):
            self.stats.mismatches += 1
            return False
        t0 = time.perf_counter()
        # runs: consecutive slots whose copies are consecutive in one chunk (an offload's order: one run per chunk)
        breaks = np.flatnonzero(loc[1:] != loc[:-1] + 1)
        copies = []
        if breaks.size < MAX_RUNS:
            starts = [0] + (breaks + 1).tolist()
            for lo, hi, where in zip(starts, starts[1:] + [loc.size], loc[starts].tolist()):
                off = where & OFFSET_MASK
                chunk = self._reloaded(where >> OFFSET_BITS, hi - lo, reader)
                copies.append((out[lo:hi], chunk.kv[off : off + hi - lo]))
        else:  # scattered: one gather per chunk
            ids = loc >> OFFSET_BITS
            for cid in np.unique(ids).tolist():
                mine = np.flatnonzero(ids == cid)
                chunk = self._reloaded(cid, mine.size, reader)
                rows = torch.from_numpy(mine).to(out.device)
                out[rows] = chunk.kv[torch.from_numpy(loc[mine] & OFFSET_MASK)].to(out.device)
        self._copy(copies, out)
        self.stats.reloaded_bytes += out.numel() * out.element_size()
        self.stats.reload_seconds += time.perf_counter() - t0
        return True

    def _reloaded(self, cid: int, tokens: int, reader: str) -> _Chunk:
        """Chunk ``cid``, whose ``tokens`` copies a reload reads: its group becomes the most recently used."""
        chunk = self._chunks[cid]
        self._groups.move_to_end(chunk.group)
        if self._groups[chunk.group].label != reader:
            self.stats.shared_tokens += tokens
        return chunk

    def wait(self) -> None:
        """Block until every copy issued so far has finished (a no-op on CPU, where copies are synchronous)."""
        if self._last is not None:
            self._last.synchronize()
            self._last = None

    def join(self) -> None:
        """The compute stream waits for every copy issued so far; the host does not, so a reload overlaps the work
        already queued (earlier layers) instead of stalling the next launches (a no-op on CPU)."""
        if self._last is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last)

    def _copy(self, copies: list[tuple[torch.Tensor, torch.Tensor]], device_tensor: torch.Tensor) -> None:
        """Issue ``dst.copy_(src)`` for each pair; on CUDA all on the side stream, joined by one event.

        One stream switch and one event per call, not per chunk: issuing is host time the compute stream
        waits for, and per-chunk bookkeeping measured as long as the transfer itself (docs/gpu.md)."""
        if self._stream is None or device_tensor.device.type == "cpu":
            for dst, src in copies:
                dst.copy_(src)
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # src is written on the compute stream
        with torch.cuda.stream(self._stream):
            for dst, src in copies:
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        device_tensor.record_stream(self._stream)  # its memory is not reused before the copies are done
        self._last = event

    # ---- memory ----------------------------------------------------------------------------------------
    def _drop_chunk(self, cid: int) -> None:
        chunk = self._chunks.pop(cid)
        group = self._groups.get(chunk.group)
        if group is not None:
            group.chunks.discard(cid)
            group.nbytes -= chunk.nbytes
            if not group.chunks:
                del self._groups[chunk.group]
        mine = (self._loc[chunk.layer, chunk.slots] >> OFFSET_BITS) == cid  # not its slots re-offloaded since
        self._loc[chunk.layer, chunk.slots[mine]] = -1
        self.stats.held_bytes -= chunk.nbytes
        self._recycle([chunk])

    def _drop_group(self, gid: int) -> int:
        group = self._groups.get(gid)
        if group is None:
            return 0
        nbytes = group.nbytes
        for cid in list(group.chunks):
            self._drop_chunk(cid)
        self._groups.pop(gid, None)
        return nbytes

    def _block(self) -> torch.Tensor:
        if self._spare:
            return self._spare.pop()
        return torch.empty(BLOCK_BYTES, dtype=torch.uint8, pin_memory=self._pin)

    def _recycle(self, chunks: Iterable[_Chunk]) -> None:
        """Freed chunks' blocks join the free list while held + free bytes stay within the budget."""
        self.wait()  # a copy still in flight must not land in a block that is handed out again
        self._spare.extend(c.block for c in chunks if c.block is not None)
        self._trim_spare()

    def _trim_spare(self) -> None:
        del self._spare[max(0, (self.budget_bytes - self.stats.held_bytes) // BLOCK_BYTES) :]

    def _make_room(self, nbytes: int, keep: int | None) -> None:
        """Evict groups other than ``keep``, least recently used first, until ``nbytes`` more fit."""
        for gid in list(self._groups):
            if self.stats.held_bytes + nbytes <= self.budget_bytes:
                return
            if gid == keep:
                continue
            self.stats.evicted_bytes += self._drop_group(gid)
            self.stats.evictions += 1

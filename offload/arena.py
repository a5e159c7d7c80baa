"""The host KV tier: lazy layers' (or KV heads') middle KV kept in host memory under a byte budget.

A host copy belongs to one (unit, slot): a unit is what one device row holds of a token, a layer's KV heads or one
of them (``slkv_sglang.kv.rows``); the arena only numbers them. A slot is SGLang's KV slot of one token, and the
radix cache maps token prefixes to slots, so a copy is addressed by content through the slot that owns it. It also
carries the *fingerprint* of the token prefix it was computed for (``slkv_sglang.kv.fingerprint``): a reload
compares it with the reader's own fingerprints and refuses on any difference, so a copy is only ever restored into a
sequence whose tokens match it. No client string takes part. Two requests that share a prefix share its slots, hence
its copies.

Memory: each ``save`` call (one decision's run of tokens in one or more units) is one *chunk*, stored as pieces
``[k, 2, heads, dim]`` that fill recycled ``BLOCK_BYTES`` blocks, the tail in an allocation of its own. Chunks
belong to a *host entry* (the copies of the decision that saved them); eviction drops whole entries, least recently
used first (a save or a reload makes an entry recent). A chunk whose slots SGLang freed (``forget``) is freed with
its last slot.

Budget: held bytes plus free blocks never exceed ``budget_bytes``. A save that does not fit evicts other entries;
units of it that would not fit even alone are refused (nothing copied, nothing evicted for them): the caller
recomputes them later.

On CUDA the host tensors are pinned and copies run on a side stream (the *copy stream*), ordered by events: the
compute stream waits only where it reads what a copy wrote (``join`` on that copy's ``fence``), never for a save.
Every copy into or out of a block runs on that one stream, in issue order, so a freed block is handed out again at
once; the host touches a block itself only in a scattered reload, which first waits for the copies in flight. A
share of the budget is allocated (pinned) and touched at start-up (``prepin``), so early saves do not pay first
touch.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

# Host memory is recycled in blocks of this size: a fresh host allocation costs a page fault per 4 KiB on
# first touch (on CUDA, a slow pinned registration), which measured as 0.3x a plain copy into memory already
# in use. Each save fills whole blocks from a free list and only its tail gets an allocation of its own.
# 8 MiB, not 2: a 45 MiB save is 6 copies instead of 23, each with its own launch and tensor views
# (docs/evaluation.md, host tier).
BLOCK_BYTES = 1 << 23
# A chunk (one save call) holds at most 2**24 tokens (a longer save is split); chunk ids are never reused
# and have the other 39 bits.
OFFSET_BITS = 24
OFFSET_MASK = (1 << OFFSET_BITS) - 1
# Slots that break into more runs than this (copies not in slot order) are handled per piece instead of per run.
MAX_RUNS = 64
# Chunks a forget counts one by one before it sorts the rest.
MAX_PEELS = 8


def _np(t: torch.Tensor) -> np.ndarray:
    """A host view of an index tensor (a copy only if it lives on a device)."""
    return t.cpu().numpy()


def _run(ids: np.ndarray | slice) -> slice | np.ndarray:
    """``ids`` as a slice where they are one ascending run (a request's slots mostly are): numpy indexes a slice
    as a view, with no gather or scatter of the index cells."""
    if isinstance(ids, slice):
        return ids
    if ids.size and int(ids[-1]) - int(ids[0]) + 1 == ids.size and (ids.size == 1 or bool((np.diff(ids) == 1).all())):
        return slice(int(ids[0]), int(ids[-1]) + 1)
    return ids


def _cells(units: np.ndarray | slice, slots: np.ndarray | slice) -> tuple:
    """Index of the ``[units, slots]`` block of the arena's index (a view where both are runs)."""
    rows, cols = _run(units), _run(slots)
    if isinstance(rows, slice) or isinstance(cols, slice):
        return rows, cols  # numpy takes a slice with an array as their outer product
    return np.ix_(rows, cols)


def _tally(loc: np.ndarray) -> list[tuple[int, int]]:
    """(chunk id, copies) of the copies that ``loc`` (index cells, -1 for none) names. A forget's slots are
    mostly one chunk or a few: each round peels off the newest chunk with a few passes, no sort and no bincount
    over chunk ids (both measured at several times the cost); many chunks fall back to a sort."""
    rest, out = loc, []
    for _ in range(MAX_PEELS):
        top = int(rest.max()) if rest.size else -1
        if top < 0:
            return out
        floor = top >> OFFSET_BITS << OFFSET_BITS  # every cell from here to ``top`` is in chunk ``top``'s
        # the smallest held entry: -1 (none) is the largest unsigned value
        if int(rest.view(np.uint64).min()) >= floor:
            return out + [(top >> OFFSET_BITS, int(np.count_nonzero(rest >= 0)))]
        newest = rest >= floor
        out.append((top >> OFFSET_BITS, int(np.count_nonzero(newest))))
        rest = rest[~newest]
    ids, counts = np.unique(rest[rest >= 0] >> OFFSET_BITS, return_counts=True)
    return out + list(zip(ids.tolist(), counts.tolist()))


@dataclass
class _Chunk:
    """The copies of one save call, unit-major: copy ``i`` (the KV of ``slots[i % len(slots)]`` in
    ``units[i // len(slots)]``) is row ``i % step`` of ``pieces[i // step]``."""

    entry: int
    units: np.ndarray  # [U] int64
    slots: np.ndarray  # [n] int64 (an adopted copy's new slot; ``adopt``)
    pieces: list[torch.Tensor]  # [step, 2, heads, dim] on the host (the last may be shorter)
    blocks: list[torch.Tensor]  # the recycled blocks the pieces are views of (a short tail has its own allocation)
    step: int
    nbytes: int
    live: int  # copies of this chunk not forgotten yet


@dataclass
class _Entry:
    label: str  # who saved it, for reporting (a chat session id, else the request id; empty: no conversation)
    chunks: set[int] = field(default_factory=set)
    nbytes: int = 0


@dataclass
class ArenaStats:
    held_bytes: int = 0  # bytes the host tier holds now
    saved_bytes: int = 0
    reloaded_bytes: int = 0
    shared_tokens: int = 0  # (unit, token) copies reloaded by a request other than the one that saved them
    save_seconds: float = 0.0
    reload_seconds: float = 0.0
    evictions: int = 0  # entries evicted to make room
    evicted_bytes: int = 0
    refused: int = 0  # saves that did not fit at all
    refused_bytes: int = 0
    mismatches: int = 0  # reloads refused because a copy's fingerprint differs from the reader's


class HostArena:
    def __init__(self, budget_bytes: int, num_units: int, num_slots: int, device: torch.device | str = "cpu",
                 prepin: int = 0):
        """``prepin``: bytes of blocks allocated (pinned on CUDA) and touched now, at most the budget."""
        if budget_bytes < 0:
            raise ValueError(f"offload budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._pin else None
        self._last: torch.cuda.Event | None = None  # of the latest copies; the side stream runs them in order
        # the index, on the host: where the copy of (unit, slot) is, ``chunk id << OFFSET_BITS | offset``, -1 if
        # none. One packed tensor, unit-major as chunks and reloads order their copies, so a run of slots is a
        # contiguous stretch of each unit's row (a save writes it with one broadcast, a reload reads it in
        # order); a reload finds its runs with a handful of vectorised ops, whatever its length. The arena works
        # on numpy views of both (a small numpy index op costs a quarter of torch's).
        self.loc = torch.full((num_units, num_slots + 1), -1, dtype=torch.int64)
        self.fingerprint_of = torch.zeros(num_slots + 1, dtype=torch.int64)  # of the prefix a slot's copies hold
        self._loc, self._fingerprint_of = self.loc.numpy(), self.fingerprint_of.numpy()
        self._offsets = np.arange(0)  # 0, 1, 2, ...: grown on demand
        self._chunks: dict[int, _Chunk] = {}
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._next_chunk = 0
        self._spare: list[torch.Tensor] = []  # free blocks; with the held bytes, never more than the budget
        self.stats = ArenaStats()
        for _ in range(min(prepin, budget_bytes) // BLOCK_BYTES):
            self._spare.append(self._new_block().zero_())  # first touch (and pinning) paid here, not by a save

    # ---- queries ---------------------------------------------------------------------------------------
    def hosted(self, slots: torch.Tensor, fingerprints: torch.Tensor | None = None) -> torch.Tensor:
        """``[units, n]``: which units hold a copy of each slot (whose prefix matches ``fingerprints``)."""
        cols = _run(_np(slots))
        held = self._loc[:, cols] >= 0
        if fingerprints is not None:
            held &= (self._fingerprint_of[cols] == _np(fingerprints))[None, :]
        return torch.from_numpy(held)

    def holds(self, units: list[int], slots: torch.Tensor) -> torch.Tensor:
        """``[units, n]``: which of ``slots`` have a copy in each of ``units`` (any prefix)."""
        return torch.from_numpy(self._loc[_cells(np.asarray(units), _np(slots))] >= 0)

    def entry_bytes(self, entry: int) -> int:
        e = self._entries.get(entry)
        return e.nbytes if e else 0

    def __len__(self) -> int:
        """Entries held (a per-request map that must not grow without bound)."""
        return len(self._entries)

    # ---- lifecycle -------------------------------------------------------------------------------------
    def new_entry(self) -> int:
        """An id for the copies of one decision (the entry exists once something is saved under it)."""
        eid = self._next_chunk  # ids shared with chunks: never reused
        self._next_chunk += 1
        return eid

    def forget(self, slots: torch.Tensor) -> None:
        """SGLang freed these slots: their copies go (a chunk's memory with its last slot)."""
        self._forget(_np(slots))

    def _forget(self, at: np.ndarray) -> None:
        cols = _run(at)
        counts = _tally(self._loc[:, cols])
        if not counts:
            return
        self._loc[:, cols] = -1
        dead = []
        for cid, n in counts:
            chunk = self._chunks[cid]
            chunk.live -= n
            if chunk.live <= 0:
                dead.append(cid)
        if dead:
            self._recycle([self._drop_chunk(cid, indexed=False) for cid in dead])

    def adopt(self, own: torch.Tensor, tree: torch.Tensor) -> None:
        """``tree[i]`` holds the same token (same prefix) as ``own[i]``, which SGLang is about to free: in every unit
        where it has no copy and ``own[i]`` has one, that copy becomes ``tree[i]``'s. The copies ``own`` keeps are
        ones ``tree`` has too; they go now (a chunk names one slot per position for all its units)."""
        own, tree = _np(own), _np(tree)
        move = (self._loc[:, tree] < 0) & (self._loc[:, own] >= 0)
        if move.any():
            self._move(own, tree, move)
        self._forget(own)

    def _move(self, own: np.ndarray, tree: np.ndarray, move: np.ndarray) -> None:
        units, at = move.nonzero()
        src, dst = own[at], tree[at]
        loc = self._loc[units, src]
        self._loc[units, dst] = loc
        self._loc[units, src] = -1
        self._fingerprint_of[dst] = self._fingerprint_of[src]
        ids, offsets = loc >> OFFSET_BITS, loc & OFFSET_MASK
        for cid in np.unique(ids).tolist():
            mine = ids == cid
            chunk = self._chunks[cid]
            chunk.slots[offsets[mine] % chunk.slots.size] = dst[mine]

    def clear(self) -> None:
        """Everything goes (SGLang cleared its allocator: no slot is live)."""
        for eid in list(self._entries):
            self._drop_entry(eid)
        self.loc.fill_(-1)

    def set_budget(self, budget_bytes: int) -> None:
        """Change the budget at run time; shrinking evicts entries (LRU) until the arena fits."""
        if budget_bytes < 0:
            raise ValueError(f"offload budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._make_room(0, keep=None)
        self._recycle([])

    # ---- transfers -------------------------------------------------------------------------------------
    def save(self, entry: int, label: str, units: list[int], slots: torch.Tensor, fingerprints: torch.Tensor,
             kv: torch.Tensor) -> int:
        """Keep copies of ``kv`` (``[units x n, 2, H, D]``, unit-major: the KV of ``slots`` in each of ``units``)
        under ``entry``, as one chunk. Returns how many of ``units`` (the first ones) the arena holds copies of.

        A slot held in any of ``units`` is not copied again (in none of them: the caller sorts units by what they
        hold, ``holds``). Units that would take the entry's bytes past the whole budget are refused (nothing copied
        for them, nothing evicted for them, counted in ``refused``)."""
        at, fingerprints, unit_ids = _np(slots), _np(fingerprints), np.asarray(units, dtype=np.int64)
        held = self._loc[_cells(unit_ids, at)]
        if held.max(initial=-1) >= 0:  # some are held already (usually none are: one pass tells)
            fresh = (held < 0).all(axis=0)
            keep = torch.from_numpy(fresh).to(kv.device)
            at, fingerprints = at[fresh], fingerprints[fresh]
            kv = kv.view(len(units), -1, *kv.shape[1:])[:, keep].flatten(0, 1)
        if at.size == 0:
            return len(units)
        per_unit = kv.numel() * kv.element_size() // len(units)
        fit = min(len(units), max(0, self.budget_bytes - self.entry_bytes(entry)) // per_unit)
        if fit < len(units):
            self.stats.refused += 1
            self.stats.refused_bytes += (len(units) - fit) * per_unit
            if fit == 0:
                return 0
            unit_ids, kv = unit_ids[:fit], kv[: fit * at.size]
        nbytes = fit * per_unit
        self._make_room(nbytes, keep=entry)
        t0 = time.perf_counter()
        span = max(1, (OFFSET_MASK + 1) // fit)  # slots per chunk: a chunk numbers its copies in OFFSET_BITS
        for lo in range(0, at.size, span):
            hi = min(at.size, lo + span)
            part = kv if hi - lo == at.size else kv.view(fit, at.size, *kv.shape[1:])[:, lo:hi].flatten(0, 1)
            self._store(entry, label, unit_ids, at[lo:hi].copy(), part)
        self._fingerprint_of[at] = fingerprints
        self._entries.move_to_end(entry)
        self.stats.held_bytes += nbytes
        self._trim_spare()
        self.stats.saved_bytes += nbytes
        self.stats.save_seconds += time.perf_counter() - t0
        return fit

    def _store(self, entry: int, label: str, units: np.ndarray, at: np.ndarray, kv: torch.Tensor) -> None:
        """One chunk: ``kv`` (unit-major, ``at`` in each of ``units``) copied into recycled blocks (a tail shorter
        than a block into its own allocation)."""
        n, nbytes = units.size * at.size, kv.numel() * kv.element_size()
        per_block = BLOCK_BYTES // (nbytes // n)  # tokens in a whole block (0: a token is larger)
        step = per_block or n
        pieces, blocks, copies = [], [], []
        for i in range(0, n, step):
            src = kv[i : i + step]
            if src.shape[0] == per_block:
                blocks.append(self._block())
                dst = blocks[-1].view(kv.dtype)[: src.numel()].view(src.shape)
            else:
                dst = torch.empty(src.shape, dtype=kv.dtype, pin_memory=self._pin)
            pieces.append(dst)
            copies.append((dst, src))
        cid = self._next_chunk
        self._next_chunk += 1
        self._chunks[cid] = _Chunk(entry, units, at, pieces, blocks, step, nbytes, live=n)
        e = self._entries.get(entry)
        if e is None:
            e = self._entries[entry] = _Entry(label)
        e.chunks.add(cid)
        e.nbytes += nbytes
        if self._offsets.size < n:
            self._offsets = np.arange(max(n, 2 * self._offsets.size))
        self._loc[_cells(units, at)] = self._offsets[:n].reshape(units.size, at.size) + (cid << OFFSET_BITS)
        self._copy(copies, kv)

    def reload(self, units: list[int], slots: torch.Tensor, fingerprints: torch.Tensor, out: torch.Tensor,
               reader: str | None = "") -> bool:
        """Copy the host copies of ``slots`` in each of ``units`` into ``out`` (``[units x n, 2, H, D]``,
        unit-major, as ``save`` takes them). ``reader``: the label of the conversation that reads them (counted in
        ``shared_tokens`` where it is not the saver's); None for a read that is no reload (the shared tier's
        write-back): no counter moves and no entry becomes recent.

        False, with ``out`` untouched, unless every (unit, slot) has a copy whose prefix fingerprint equals the
        reader's (``fingerprints``): the caller recomputes instead."""
        cols = _run(_np(slots))
        loc = self._loc[_cells(np.asarray(units, dtype=np.int64), cols)].reshape(-1)  # unit-major; read only
        if loc.size == 0:
            return True
        if loc.min() < 0:
            return False
        if not np.array_equal(self._fingerprint_of[cols], _np(fingerprints)):
            self.stats.mismatches += 1
            return False
        t0 = time.perf_counter()
        # runs: consecutive index cells (a save's order, unit-major: one run per chunk read whole)
        breaks = np.flatnonzero(np.diff(loc) != 1)
        copies = []
        if breaks.size < MAX_RUNS:
            starts = [0] + (breaks + 1).tolist()
            for lo, hi, where in zip(starts, starts[1:] + [loc.size], loc[starts].tolist()):
                while lo < hi:  # a run goes on into the next chunk where a full chunk's numbering ends
                    cid, off = where >> OFFSET_BITS, where & OFFSET_MASK
                    end = min(hi, lo + OFFSET_MASK + 1 - off)
                    chunk = self._reloaded(cid, end - lo, reader)
                    while lo < end:  # and spans pieces where it crosses a block
                        piece, row = divmod(off, chunk.step)
                        k = min(end - lo, chunk.step - row)
                        copies.append((out[lo : lo + k], chunk.pieces[piece][row : row + k]))
                        lo, off, where = lo + k, off + k, where + k
        else:  # scattered: one gather per piece, read by the host (after the copies still writing blocks)
            self.wait()
            ids = loc >> OFFSET_BITS
            for cid in np.unique(ids).tolist():
                mine = np.flatnonzero(ids == cid)
                chunk = self._reloaded(cid, mine.size, reader)
                piece, row = np.divmod(loc[mine] & OFFSET_MASK, chunk.step)
                for p in np.unique(piece).tolist():
                    sel = piece == p
                    out[torch.from_numpy(mine[sel]).to(out.device)] = \
                        chunk.pieces[p][torch.from_numpy(row[sel])].to(out.device)
        self._copy(copies, out)
        if reader is not None:
            self.stats.reloaded_bytes += out.numel() * out.element_size()
            self.stats.reload_seconds += time.perf_counter() - t0
        return True

    def _reloaded(self, cid: int, tokens: int, reader: str | None) -> _Chunk:
        """Chunk ``cid``, whose ``tokens`` copies a reload reads: its entry becomes the most recently used."""
        chunk = self._chunks[cid]
        if reader is not None:
            self._entries.move_to_end(chunk.entry)
            saver = self._entries[chunk.entry].label
            if saver and saver != reader:  # an unlabelled copy is no conversation's (``KvTier.demote``)
                self.stats.shared_tokens += tokens
        return chunk

    def wait(self) -> None:
        """Block until every copy issued so far has finished (a no-op on CPU, where copies are synchronous)."""
        if self._last is not None:
            self._last.synchronize()
            self._last = None

    def fence(self) -> torch.cuda.Event | None:
        """The event after which every copy issued so far has landed (None on CPU: they have)."""
        return self._last

    def join(self, fence: torch.cuda.Event | None) -> None:
        """The compute stream waits for the copies before ``fence`` (a ``fence()``; None: nothing to wait for); the
        host does not, so a reload overlaps the work already queued instead of stalling the next launches."""
        if fence is not None:
            torch.cuda.current_stream(self.device).wait_event(fence)

    @contextlib.contextmanager
    def copy_stream(self, *inputs: torch.Tensor):
        """Work issued inside runs on the copy stream after the copies so far (e.g. a reload's scatter into its
        rows); ``fence`` then covers it too. ``inputs``: device tensors it reads that the compute stream made
        (their memory is not reused before it ran). Inline on CPU."""
        if self._stream is None:
            yield
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            yield
            self._last = torch.cuda.Event()
            self._last.record(self._stream)
        for tensor in inputs:
            tensor.record_stream(self._stream)

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
    def _drop_chunk(self, cid: int, indexed: bool = True) -> _Chunk:
        """Chunk ``cid`` goes; ``indexed``: its index cells are cleared too (a forget cleared them already).
        Returns it, for ``_recycle``."""
        chunk = self._chunks.pop(cid)
        entry = self._entries.get(chunk.entry)
        if entry is not None:
            entry.chunks.discard(cid)
            entry.nbytes -= chunk.nbytes
            if not entry.chunks:
                del self._entries[chunk.entry]
        if indexed:
            cells = _cells(chunk.units, chunk.slots)
            block = self._loc[cells]
            block[(block >> OFFSET_BITS) == cid] = -1  # not those saved again since
            self._loc[cells] = block
        self.stats.held_bytes -= chunk.nbytes
        return chunk

    def _drop_entry(self, eid: int) -> int:
        entry = self._entries.get(eid)
        if entry is None:
            return 0
        nbytes = entry.nbytes
        self._recycle([self._drop_chunk(cid) for cid in list(entry.chunks)])
        self._entries.pop(eid, None)
        return nbytes

    def _block(self) -> torch.Tensor:
        if self._spare:
            return self._spare.pop()
        return self._new_block()

    def _new_block(self) -> torch.Tensor:
        return torch.empty(BLOCK_BYTES, dtype=torch.uint8, pin_memory=self._pin)

    def _recycle(self, chunks: Iterable[_Chunk]) -> None:
        """Freed chunks' blocks join the free list while held + free bytes stay within the budget (a copy still in
        flight on the copy stream runs before any later copy into the block)."""
        self._spare.extend(block for c in chunks for block in c.blocks)
        self._trim_spare()

    def _trim_spare(self) -> None:
        del self._spare[max(0, (self.budget_bytes - self.stats.held_bytes) // BLOCK_BYTES) :]

    def _make_room(self, nbytes: int, keep: int | None) -> None:
        """Evict entries other than ``keep``, least recently used first, until ``nbytes`` more fit."""
        for eid in list(self._entries):
            if self.stats.held_bytes + nbytes <= self.budget_bytes:
                return
            if eid == keep:
                continue
            self.stats.evicted_bytes += self._drop_entry(eid)
            self.stats.evictions += 1

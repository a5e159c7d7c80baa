"""The host KV tier: lazy layers' middle KV, kept in host memory under a byte budget.

A *segment* is the KV of one (session, layer) over a contiguous token range ``[start, end)``, stored as host
chunks ``[n, 2, heads, dim]`` (K and V interleaved per token, so a token range is one contiguous copy per
chunk): whole ``BLOCK_BYTES`` blocks recycled through a free list, and a tail of its own. KV of a token never
changes, so offload is incremental: a later turn extends a session's range and only the tokens not already
on the host are copied. A reload copies the chunks back into a device tensor, one transfer per chunk.

Budget: the arena never holds more than ``budget_bytes`` (held KV plus free blocks). When an offload would exceed it, whole sessions
other than the offloading one are evicted, least recently used first (an offload or reload makes a session
recent). What is evicted is gone from the host: ``on_evict`` tells the owner, which recomputes it from the
token history when it is needed (slower, never wrong). If the session's bytes and the new ones exceed the
whole budget, the offload is refused: nothing is copied and nothing is evicted.

On CUDA the host tensors are pinned and copies run on a side stream; ``wait()`` joins them (events).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch


class OffloadRefused(RuntimeError):
    """The budget cannot hold these bytes, even after evicting every idle session."""


# Host memory is recycled in blocks of this size: a fresh host allocation costs a page fault per 4 KiB on
# first touch (on CUDA, a slow pinned registration), which measured as 0.3x a plain copy into memory already
# in use. Each offload fills whole blocks from a free list and only its tail gets an allocation of its own.
BLOCK_BYTES = 1 << 21


@dataclass
class _Chunk:
    start: int
    kv: torch.Tensor  # [n, 2, heads, dim] on the host
    block: torch.Tensor | None = None  # the recycled block ``kv`` is a view of; None: its own allocation

    @property
    def end(self) -> int:
        return self.start + self.kv.shape[0]


@dataclass
class _Session:
    layers: dict[int, list[_Chunk]] = field(default_factory=dict)
    nbytes: int = 0


@dataclass
class ArenaStats:
    held_bytes: int = 0  # bytes the host tier holds now
    offloaded_bytes: int = 0
    reloaded_bytes: int = 0
    offload_seconds: float = 0.0
    reload_seconds: float = 0.0
    evictions: int = 0  # sessions evicted to make room
    evicted_bytes: int = 0
    refused: int = 0  # offloads that did not fit at all
    refused_bytes: int = 0


class HostArena:
    def __init__(self, budget_bytes: int, device: torch.device | str = "cpu"):
        if budget_bytes < 0:
            raise ValueError(f"offload budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._pin else None
        self._pending: list[torch.cuda.Event] = []
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently used first
        self._spare: list[torch.Tensor] = []  # free blocks; with the held bytes, never more than the budget
        self.stats = ArenaStats()
        self.on_evict: Callable[[str], None] | None = None  # the owner forgets where an evicted session's KV was

    # ---- queries ---------------------------------------------------------------------------------------
    def held(self, session: str, layer: int) -> tuple[int, int] | None:
        """The token range ``[start, end)`` the host holds for (session, layer), or None."""
        s = self._sessions.get(session)
        chunks = s.layers.get(layer) if s else None
        return (chunks[0].start, chunks[-1].end) if chunks else None

    def session_bytes(self, session: str) -> int:
        s = self._sessions.get(session)
        return s.nbytes if s else 0

    # ---- lifecycle -------------------------------------------------------------------------------------
    def drop(self, session: str) -> None:
        """The session is closed or expired: free its host memory."""
        s = self._sessions.pop(session, None)
        if s is not None:
            self.stats.held_bytes -= s.nbytes
            self._recycle(c for chunks in s.layers.values() for c in chunks)

    def truncate(self, session: str, layer: int, end: int) -> None:
        """Forget tokens from position ``end`` on for (session, layer) (their slots were freed)."""
        s = self._sessions.get(session)
        chunks = s.layers.get(layer) if s else None
        if not chunks or chunks[-1].end <= end:
            return
        kept = [c for c in chunks if c.end <= end]
        cut = [c for c in chunks if c.end > end]
        if cut[0].start < end:
            self.wait()  # the chunk may still be filling on the side stream
            part = cut[0].kv[: end - cut[0].start]
            kept.append(_Chunk(cut[0].start, torch.empty(part.shape, dtype=part.dtype, pin_memory=self._pin).copy_(part)))
        freed = sum(c.kv.numel() * c.kv.element_size() for c in chunks) - sum(
            c.kv.numel() * c.kv.element_size() for c in kept)
        s.layers[layer] = kept
        s.nbytes -= freed
        self.stats.held_bytes -= freed
        self._recycle(cut)

    def set_budget(self, budget_bytes: int) -> None:
        """Change the budget at run time; shrinking evicts sessions (LRU) until the arena fits."""
        if budget_bytes < 0:
            raise ValueError(f"offload budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._make_room(0)
        self._recycle([])

    # ---- transfers -------------------------------------------------------------------------------------
    def offload(self, session: str, layer: int, start: int, kv: torch.Tensor) -> int:
        """Keep tokens ``[start, start + len(kv))`` of (session, layer) on the host; ``kv`` is ``[n, 2, H, D]``.

        Tokens already held are not copied again; the range must continue (or overlap) the held one. Returns
        the bytes copied. Raises ``OffloadRefused`` (and copies nothing) if the budget cannot hold them.
        """
        held = self.held(session, layer)
        end = start + kv.shape[0]
        if held is not None:
            if start > held[1] or start < held[0]:
                raise ValueError(f"offload of {session}/{layer} [{start}, {end}) does not continue [{held[0]}, {held[1]})")
            kv, start = kv[held[1] - start :], held[1]
        if kv.shape[0] == 0:
            return 0
        nbytes = kv.numel() * kv.element_size()
        if self.session_bytes(session) + nbytes > self.budget_bytes:  # would not fit even alone: evict nothing
            self.stats.refused += 1
            self.stats.refused_bytes += nbytes
            raise OffloadRefused(f"host offload budget {self.budget_bytes} B cannot hold {nbytes} B more "
                                 f"({self.session_bytes(session)} B held by {session})")
        self._make_room(nbytes, keep=session)
        t0 = time.perf_counter()
        s = self._sessions.setdefault(session, _Session())
        self._sessions.move_to_end(session)
        chunks = s.layers.setdefault(layer, [])
        per_block = BLOCK_BYTES // (nbytes // kv.shape[0])  # tokens in a whole block (0: a token is larger)
        step = per_block or kv.shape[0]
        copies = []
        for at in range(0, kv.shape[0], step):
            piece = kv[at : at + step]
            block = self._block() if piece.shape[0] == per_block else None
            host = (block.view(kv.dtype)[: piece.numel()].view(piece.shape) if block is not None
                    else torch.empty(piece.shape, dtype=kv.dtype, pin_memory=self._pin))
            copies.append((host, piece))
            chunks.append(_Chunk(start + at, host, block))
        self._copy(copies, kv)
        s.nbytes += nbytes
        self.stats.held_bytes += nbytes
        self._trim_spare()
        self.stats.offloaded_bytes += nbytes
        self.stats.offload_seconds += time.perf_counter() - t0
        return nbytes

    def reload(self, session: str, layer: int, start: int, out: torch.Tensor) -> bool:
        """Copy tokens ``[start, start + len(out))`` of (session, layer) into ``out`` (``[n, 2, H, D]``).

        False when the host does not hold the whole range (evicted or never offloaded): recompute instead.
        """
        held = self.held(session, layer)
        end = start + out.shape[0]
        if held is None or start < held[0] or end > held[1]:
            return False
        t0 = time.perf_counter()
        copies = []
        for chunk in self._sessions[session].layers[layer]:
            lo, hi = max(start, chunk.start), min(end, chunk.end)
            if lo < hi:
                copies.append((out[lo - start : hi - start], chunk.kv[lo - chunk.start : hi - chunk.start]))
        self._copy(copies, out)
        self._sessions.move_to_end(session)
        self.stats.reloaded_bytes += out.numel() * out.element_size()
        self.stats.reload_seconds += time.perf_counter() - t0
        return True

    def wait(self) -> None:
        """Block until every copy issued so far has finished (a no-op on CPU, where copies are synchronous)."""
        for event in self._pending:
            event.synchronize()
        self._pending.clear()

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
        self._pending.append(event)

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

    def _make_room(self, nbytes: int, keep: str | None = None) -> None:
        """Evict sessions other than ``keep``, least recently used first, until ``nbytes`` more fit."""
        for sid in list(self._sessions):
            if self.stats.held_bytes + nbytes <= self.budget_bytes:
                return
            s = self._sessions[sid]
            if sid == keep or not s.nbytes:
                continue
            self.drop(sid)
            self.stats.evictions += 1
            self.stats.evicted_bytes += s.nbytes
            if self.on_evict is not None:
                self.on_evict(sid)

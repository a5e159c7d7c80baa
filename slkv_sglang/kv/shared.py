"""The shared tier: a session's KV in a store every worker reaches (``--slkv-shared-store``), so that a chat whose
worker is drained, restarted or lost continues on another worker without recomputing its history.

Below the device rows and the host arena (``tier.py``). After a request finishes, its KV (every unit's: the rows it
holds on the device and the middles its lazy units saved on the host) is written back in blocks of ``BLOCK``
tokens: the scheduler copies the blocks not written lately to host memory (the one part on its thread), a thread
of its own puts them. A block's key is content addressed: a hash chain over the token ids of every block up to it,
seeded with the model, the unit layout and the dtype (``namespace``) and with what else SGLang's radix cache keys
the request by (its extra key, which carries a LoRA adapter, and its cache salt), so a key names one prefix's KV
and is only ever restored into a sequence whose tokens (and adapter, and salt) match it. A request whose
prefix is not in this worker's radix cache looks up the longest run of blocks past it that the store holds and
restores them into rows of fresh slots (``hooks.admission.restore_shared``); its prefill then computes only the
rest.

The store is an ``offload.KvStore``, one client per thread: a failed, missing or slow store is a miss (counted),
never an error, never wrong KV: a value whose size is not a block's is refused. A lookup waits at most the time
budget; while a read that went past it still runs, every lookup is a miss at once. Tensor parallel size 1 only
(ranks that looked up on their own could restore different prefixes).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from offload import HostArena

from .rows import DeviceRows

if TYPE_CHECKING:
    from offload.store import KvStore

logger = logging.getLogger("slkv.kv")

# Tokens per key. 64 keeps a value in the megabytes for the models served here (SmolLM2-135M in float32: 2.9 MB;
# Llama-3-8B in bf16: 8 MB) and loses at most 63 tokens of a prefix.
BLOCK = 64
# Keys this worker wrote lately: a later turn writes only its new blocks. Bounded in number and in time, since the
# store may lose a value (evicted when full, a restarted master): a block not remembered is gathered again and
# written if the store lacks it. Any store failure forgets them all.
REMEMBERED = 1 << 16
REMEMBER_S = 60.0


@dataclass
class SharedStats:
    written_blocks: int = 0  # blocks put into the store
    written_bytes: int = 0
    write_seconds: float = 0.0
    write_dropped: int = 0  # blocks not written because the write-back queue held its budget
    restored_tokens: int = 0  # prefix tokens restored from the store into rows
    restored_bytes: int = 0
    restore_seconds: float = 0.0
    hits: int = 0  # lookups that restored at least one block
    misses: int = 0  # lookups that found nothing past the radix match
    failures: int = 0  # store operations that failed, timed out or returned a value of the wrong size
    no_room: int = 0  # lookups that found blocks but no free slots or rows for them (recomputed)


def namespace(model: str, tier_rows: DeviceRows, tp_rank: int, tp_size: int) -> bytes:
    """What a key's KV depends on besides the tokens: the model, this rank's share of its KV heads, the layout of a
    unit and the dtype."""
    r = tier_rows
    heads, dim = r.kv.shape[2], r.kv.shape[3]
    return (f"slkv-shared/v1/{model}/tp{tp_rank}of{tp_size}/{r.num_layers}x{r.units_per_layer}x{heads}x{dim}/"
            f"{r.kv.dtype}/{BLOCK}").encode()


def block_keys(seed: bytes, ids: Sequence[int], blocks: int) -> list[str]:
    """The keys of the first ``blocks`` full blocks of ``ids``: key i hashes key i - 1 and block i's token ids."""
    tokens = np.asarray(ids[: blocks * BLOCK], dtype=np.int64)
    h, keys = hashlib.sha256(seed).digest(), []
    for b in range(blocks):
        h = hashlib.sha256(h + tokens[b * BLOCK : (b + 1) * BLOCK].tobytes()).digest()
        keys.append("slkv-" + h.hex())
    return keys


class SharedTier:
    @classmethod
    def open(cls, url: str, model: str, rows: DeviceRows, host: HostArena, timeout_ms: int, queue_bytes: int,
             write_back: bool) -> "SharedTier":
        """The shared tier of this rank's KV tier over the store at ``url`` (``offload.store.open_store``)."""
        from sglang.srt.runtime_context import get_parallel

        from offload.store import open_store

        par = get_parallel()
        if par.tp_size > 1:  # each rank would look up on its own, and ranks whose trees differ hang collectives
            from ..config import SlkvConfigError

            raise SlkvConfigError("--slkv-shared-store serves tensor parallel size 1 only")
        return cls(open_store(url), open_store(url), namespace(model, rows, par.tp_rank, par.tp_size), rows, host,
                   timeout_ms / 1000, queue_bytes, write_back)

    def __init__(self, reads: KvStore, writes: KvStore, seed: bytes, rows: DeviceRows, host: HostArena,
                 timeout_s: float, queue_bytes: int, write_back: bool):
        """``reads`` and ``writes``: two clients of the store, one per thread (a client's transfer buffer bounds
        what one operation moves, and the reader and the writer run at once)."""
        self.reads, self.writes, self.seed, self.rows, self.host = reads, writes, seed, rows, host
        self.timeout_s, self.queue_bytes, self.write_back = timeout_s, queue_bytes, write_back
        self.stats = SharedStats()
        self._lock = threading.Lock()  # guards what both threads touch: the queue, its bytes, ``_written``
        self._queue: deque[tuple[list[str], torch.Tensor]] = deque()
        self._queued_bytes = 0
        self._wake = threading.Condition(self._lock)
        self._written: OrderedDict[str, float] = OrderedDict()  # key -> when it was queued
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="slkv-shared-writer", daemon=True)
        self._writer.start()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="slkv-shared-reader")
        self._pending: Future | None = None  # the latest read

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting to be written (0: every block handed to the store)."""
        with self._lock:
            return self._queued_bytes

    @property
    def block_bytes(self) -> int:
        return self.rows.num_units * BLOCK * self.rows.row_bytes

    # ---- write-back (after a request) ------------------------------------------------------------------
    def save(self, ids: Sequence[int], slots: torch.Tensor, fingerprints: torch.Tensor, salt: str = "") -> int:
        """Queue the KV of the full blocks of ``ids`` (at ``slots``) not written lately, as far as the queue's
        budget allows; returns the blocks queued. Each unit's KV comes from its device rows or, where a lazy unit
        released it, from the host copy with the prefix's ``fingerprints``; blocks from the first that is on
        neither tier on are not written. ``salt``: what else SGLang's radix cache keys the request by (its extra
        key, with the LoRA adapter, and cache salt), so that it takes part in the keys too."""
        if not self.write_back:
            return 0
        blocks = len(ids) // BLOCK
        keys = block_keys(self.seed + salt.encode(), ids, blocks)
        fresh = time.monotonic() - REMEMBER_S
        with self._lock:
            first = next((b for b, k in enumerate(keys) if self._written.get(k, fresh) <= fresh), blocks)
            room = (self.queue_bytes - self._queued_bytes) // self.block_bytes
        if first == blocks:
            return 0
        if room < blocks - first:  # gathered KV the queue cannot take is never copied
            with self._lock:
                self.stats.write_dropped += blocks - first - max(0, room)
            blocks = first + max(0, room)
            if blocks == first:
                return 0
        kv, whole = self._gather(slots[first * BLOCK : blocks * BLOCK], fingerprints[first * BLOCK : blocks * BLOCK])
        keys = keys[first : first + whole // BLOCK]
        if not keys:
            return 0
        if len(keys) * BLOCK < kv.shape[1]:
            kv = kv[:, : len(keys) * BLOCK].clone()  # not a view: the queue's bytes are what it holds
        with self._lock:
            for k in keys:
                self._remember(k)
            self._queue.append((keys, kv))
            self._queued_bytes += len(keys) * self.block_bytes
            self._wake.notify()
        return len(keys)

    def _gather(self, slots: torch.Tensor, fingerprints: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``[units, n, 2, heads, dim]`` on the host: the KV of ``slots`` in every unit, and how many leading slots
        are whole (on the device or on the host)."""
        rows = self.rows
        n = slots.numel()
        out = torch.empty((rows.num_units, n, *rows.row_shape), dtype=rows.kv.dtype)
        at = rows.row_of[:, slots]  # [units, n]
        on_device = at >= 0
        out[on_device.cpu()] = rows.get(at[on_device]).cpu()
        whole = n
        for unit in (~on_device).any(dim=1).nonzero().flatten().tolist():
            miss = (~on_device[unit]).nonzero().flatten().cpu()
            if int(miss[0]) >= whole:
                continue
            miss = miss[miss < whole]
            got = rows.kv.new_empty((miss.numel(), *rows.row_shape))
            if self.host.reload([unit], slots[miss.to(slots.device)], fingerprints[miss], got, reader=None):
                self.host.wait()
                out[unit, miss] = got.cpu()
            else:  # some copy is gone (evicted, refused): write the blocks before it only
                whole = int(miss[0])
        return out, whole - whole % BLOCK

    def _remember(self, key: str) -> None:
        self._written[key] = time.monotonic()
        self._written.move_to_end(key)
        if len(self._written) > REMEMBERED:
            self._written.popitem(last=False)

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                keys, kv = self._queue[0]
            t0 = time.perf_counter()
            failures = self.writes.stats.failures
            held = self.writes.exists_many(keys)  # another worker (or an earlier turn) may have written some
            # token-major ``[tokens, units, 2, heads, dim]`` bytes, one block per value (any dtype, bf16 too)
            raw = kv.movedim(1, 0).contiguous().view(torch.uint8).reshape(len(keys), -1)
            missing = [b for b, h in enumerate(held) if not h]
            done = (self.writes.put_many([keys[b] for b in missing], [memoryview(raw[b].numpy()) for b in missing])
                    if missing else [])
            with self._lock:
                self._queue.popleft()
                self._queued_bytes -= len(keys) * self.block_bytes
                ok = sum(done)
                self.stats.written_blocks += ok
                self.stats.written_bytes += ok * self.block_bytes
                self.stats.write_seconds += time.perf_counter() - t0
                if self.writes.stats.failures > failures:
                    self.stats.failures += 1
                    self._written.clear()

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until every queued block has been handed to the store (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._queue:
                    return True
            time.sleep(0.01)
        return False

    # ---- restore (before a prefix match) --------------------------------------------------------------
    def lookup(self, ids: Sequence[int], start: int, limit: int, salt: str = "") -> torch.Tensor | None:
        """The KV ``[units, n, 2, heads, dim]`` (host) of positions ``start .. start + n`` of ``ids``: the longest
        run of whole blocks the store holds past ``start`` that ends at or before ``limit``; None where it holds
        none, the store fails, or it takes longer than the time budget (then, while that read still runs, every
        lookup is None at once). ``salt`` as for ``save``. The caller counts what it restores (``restored``)."""
        first, last = start // BLOCK, limit // BLOCK
        if last <= first:
            return None
        if self._pending is not None and not self._pending.done():  # a read past its budget still runs
            self._failed()
            return None
        keys = block_keys(self.seed + salt.encode(), ids, last)[first:]
        t0 = time.perf_counter()
        self._pending = self._reader.submit(self._fetch, keys)
        try:
            values, failed = self._pending.result(timeout=self.timeout_s)
        except FutureTimeout:
            self._failed()
            logger.warning("slkv: the shared store took more than %.1fs; the prefix is recomputed", self.timeout_s)
            return None
        self.stats.restore_seconds += time.perf_counter() - t0
        if failed:  # what it answered before failing is still good KV
            self._failed()
        good = 0
        for v in values:
            if v is None:
                break
            if len(v) != self.block_bytes:
                self._failed()
                failed = True
                break
            good += 1
        if good == 0 or (first + good) * BLOCK <= start:
            self.stats.misses += not failed
            return None
        rows = self.rows
        blocks = [torch.frombuffer(bytearray(v), dtype=torch.uint8).view(rows.kv.dtype)
                  .view(BLOCK, rows.num_units, *rows.row_shape) for v in values[:good]]
        kv = torch.cat(blocks).movedim(1, 0)  # [units, tokens, 2, heads, dim]
        return kv[:, start - first * BLOCK :]

    def restored(self, kv: torch.Tensor) -> None:
        """``kv`` (from ``lookup``) is in rows and in the radix cache."""
        self.stats.hits += 1
        self.stats.restored_tokens += kv.shape[1]
        self.stats.restored_bytes += kv.numel() * kv.element_size()

    def _failed(self) -> None:
        """A store operation failed: counted, and the keys written lately are forgotten (the store may have lost
        them)."""
        with self._lock:
            self.stats.failures += 1
            self._written.clear()

    def _fetch(self, keys: list[str]) -> tuple[list[bytes | None], bool]:
        """The leading keys the store holds, fetched, and whether any store operation failed (reader thread)."""
        failures = self.reads.stats.failures
        held = self.reads.exists_many(keys)
        run = next((i for i, h in enumerate(held) if not h), len(keys))
        values = self.reads.get_many(keys[:run]) if run else []
        return values, self.reads.stats.failures > failures

    def report(self) -> dict[str, int | float]:
        return {f"shared_{k}": v for k, v in asdict(self.stats).items()}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._reader.shutdown(wait=False)
        self.reads.close()
        self.writes.close()

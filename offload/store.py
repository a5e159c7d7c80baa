"""The shared store: the third KV tier, behind the host arena, where a chat session's KV outlives the worker that
computed it (issue 24).

A store is a cache of recomputation, like the host arena: whatever it cannot do (master unreachable or hung, a
timeout, a value it has no room for, an exception of its client library) comes back as False or None and counts one
failure per key in ``StoreStats``; it never raises into the caller, who recomputes. Only a misuse by the caller
(batches of unequal length, an empty value) raises, and ``open_store`` raises at start-up on a bad URL or an
unreachable store.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from urllib.parse import urlsplit

logger = logging.getLogger("slkv.store")

Value = bytes | bytearray | memoryview


@dataclass
class StoreStats:
    """What one store did. Counts are keys; ``failures`` counts the keys of any operation that failed because of the
    store (a miss is not a failure)."""

    puts: int = 0  # values stored
    put_bytes: int = 0
    gets: int = 0  # keys asked for
    get_bytes: int = 0
    hits: int = 0
    misses: int = 0  # absent keys
    failures: int = 0
    put_seconds: float = 0.0
    get_seconds: float = 0.0


class KvStore(ABC):
    """Batches of keys to byte values. The public methods keep the contract (no exception from the store, every
    failure counted, time measured); a backend implements the ``_``-methods, which may raise."""

    def __init__(self) -> None:
        self.stats = StoreStats()

    def put_many(self, keys: list[str], values: list[Value]) -> list[bool]:
        """Stores each value under its key; True where it is stored. A key already present keeps its value (keys
        name content, so it is the same)."""
        if len(keys) != len(values):
            raise ValueError(f"put_many: {len(keys)} keys but {len(values)} values")
        sizes = [memoryview(v).nbytes for v in values]
        if 0 in sizes:
            raise ValueError(f"put_many: empty value for key {keys[sizes.index(0)]!r} (a store holds no empty values)")
        start = time.perf_counter()
        try:
            stored = self._put_many(keys, values, sizes)
        except Exception:
            logger.warning("store put of %d keys failed", len(keys), exc_info=True)
            stored = [False] * len(keys)
        self.stats.put_seconds += time.perf_counter() - start
        self.stats.puts += sum(stored)
        self.stats.put_bytes += sum(size for size, ok in zip(sizes, stored) if ok)
        self.stats.failures += stored.count(False)
        return stored

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """Each key's value; None where it is absent or could not be read."""
        start = time.perf_counter()
        try:
            values, failed = self._get_many(keys)
        except Exception:
            logger.warning("store get of %d keys failed", len(keys), exc_info=True)
            values, failed = [None] * len(keys), len(keys)
        self.stats.get_seconds += time.perf_counter() - start
        found = [v for v in values if v is not None]
        self.stats.gets += len(keys)
        self.stats.hits += len(found)
        self.stats.get_bytes += sum(len(v) for v in found)
        self.stats.misses += len(keys) - len(found) - failed
        self.stats.failures += failed
        return values

    def exists_many(self, keys: list[str]) -> list[bool]:
        """Whether each key is present; False where that could not be learnt."""
        try:
            present, failed = self._exists_many(keys)
        except Exception:
            logger.warning("store lookup of %d keys failed", len(keys), exc_info=True)
            present, failed = [False] * len(keys), len(keys)
        self.stats.failures += failed
        return present

    def remove_many(self, keys: list[str]) -> None:
        """Removes the keys, as far as the store allows now (an absent key is not a failure)."""
        try:
            failed = self._remove_many(keys)
        except Exception:
            logger.warning("store remove of %d keys failed", len(keys), exc_info=True)
            failed = len(keys)
        self.stats.failures += failed

    @abstractmethod
    def close(self) -> None:
        """Disconnects; every later call fails (counted)."""

    def __enter__(self) -> KvStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @abstractmethod
    def _put_many(self, keys: list[str], values: list[Value], sizes: list[int]) -> list[bool]:
        """True where stored (``sizes``: the values' byte sizes)."""

    @abstractmethod
    def _get_many(self, keys: list[str]) -> tuple[list[bytes | None], int]:
        """The values (None where absent or failed) and how many of the Nones are failures."""

    @abstractmethod
    def _exists_many(self, keys: list[str]) -> tuple[list[bool], int]:
        """Presence (False where absent or failed) and how many of the Falses are failures."""

    @abstractmethod
    def _remove_many(self, keys: list[str]) -> int:
        """Removes the keys; how many failed."""


def parse_store_url(url: str):
    """The configuration a store URL names, without connecting (for start-up checks); ValueError naming what is
    wrong. Schemes: ``mooncake://`` (``offload.mooncake.MooncakeConfig``)."""
    from .mooncake import MooncakeConfig  # the backends import this module

    scheme = urlsplit(url).scheme
    if scheme == "mooncake":
        return MooncakeConfig.from_url(url)
    raise ValueError(f"store URL {url!r}: unknown scheme {scheme!r} (supported: mooncake://)")


def open_store(url: str) -> KvStore:
    """The store a URL names, connected. ValueError on a bad URL, ConnectionError where the store cannot be reached
    at start-up; once open, a store never raises (module docstring)."""
    from .mooncake import MooncakeStore

    return MooncakeStore(parse_store_url(url))

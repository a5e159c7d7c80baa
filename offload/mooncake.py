"""The shared store on Mooncake Store (``mooncake.store.MooncakeDistributedStore``, TCP transport).

A deployment: one master (``mooncake_master --enable_http_metadata_server``: it also serves the transfer metadata),
store services that hold the memory (``mooncake_client --global_segment_size``), and the workers as clients. A
worker's client holds no memory by default (``segment_mb=0``), so its loss loses no value. The master keeps the only
index of what is stored: restarted without Mooncake's HA mode, it forgets every value, which then reads as absent.

What this module relies on in the binding (mooncake-transfer-engine 0.3.13.post1):

* ``setup(config)`` -> 0, or an error. It reads ``MC_RPC_TIMEOUT_MS`` and ``MC_RPC_CONNECT_TIMEOUT_MS`` (the deadline
  of each master RPC, 30 s by default) and ``MC_STORE_CLIENT_SETUP_RETRIES`` when it builds its master client, and
  only then; without a master it retries for 90 s.
* ``put_batch(keys, values)`` -> one code for the whole batch: 0 (a key already present counts as stored) or a
  negative error. Values travel through the client's local buffer; a batch larger than it fails whole (-600).
* ``get_batch(keys)`` -> bytes per key, ``b""`` where absent, failed, or where the batch did not fit the local
  buffer: no code. So presence (``batch_is_exist``) and sizes (``batch_get_replica_desc``) are asked first.
* ``batch_is_exist(keys)`` -> per key 1, 0, or a negative error (-900 RPC_FAIL, -901 RPC_TIMEOUT).
* A lookup or a read leases the key for the master's ``--default_kv_lease_ttl`` (10 s by default; a put leases
  nothing). A read that takes longer returns ``b""`` (the master may have given the memory to another value).
* ``batch_remove(keys, force=False)`` -> per key 0, -704 OBJECT_NOT_FOUND, -706 OBJECT_HAS_LEASE (the key stays: a
  reader may be copying it), or an error.
* ``health_check()`` -> 0; 1 closed; 2 master unreachable, from the client's own pings (no RPC: it answers at once).

Failure bounds: against a hung master each RPC ends after ``timeout_ms``; against a dead one (connection refused)
the client's connection pool retries for about 4.3 s whatever the timeouts. So after a failed RPC the store answers
at once (failures counted) for ``retry_ms``, and whenever ``health_check`` reports the master unreachable.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import parse_qsl, urlsplit

from .store import KvStore, Value

MB = 1 << 20
# Mooncake's own default master port; the master's built-in metadata server listens on 8080 by default.
MASTER_PORT = 50051
METADATA_PORT = 8080
# Error codes of the binding (mooncake-store's ErrorCode).
OBJECT_NOT_FOUND = -704
OBJECT_HAS_LEASE = -706
NO_ANSWER = frozenset({-900, -901})  # RPC_FAIL, RPC_TIMEOUT: the master did not answer
# The URL's numeric parameters and their least values.
MINIMUM = {"segment_mb": 0, "buffer_mb": 1, "timeout_ms": 1, "retry_ms": 0}


@dataclass(frozen=True)
class MooncakeConfig:
    """A store URL, ``mooncake://MASTER_HOST[:MASTER_PORT][?NAME=VALUE&...]``, with these parameters and defaults:

    * MASTER_PORT: 50051 (Mooncake's default).
    * ``metadata``: the transfer metadata server, ``http://MASTER_HOST:8080/metadata`` (the master's built-in one).
    * ``segment_mb``: memory this client lends the store, 0 (values live in the store services, not in a worker).
    * ``buffer_mb``: the client's transfer buffer, 64: the largest value; one transfer moves at most a quarter of it.
    * ``local``: this client's address as the others reach it, 127.0.0.1 (name the host's address across hosts).
    * ``timeout_ms``: the deadline of each master RPC, 2000.
    * ``retry_ms``: how long the store answers at once with failures after one, 5000.
    """

    master_host: str
    master_port: int = MASTER_PORT
    metadata: str = ""
    segment_mb: int = 0
    buffer_mb: int = 64
    local: str = "127.0.0.1"
    timeout_ms: int = 2000
    retry_ms: int = 5000

    @property
    def master(self) -> str:
        return f"{self.master_host}:{self.master_port}"

    @classmethod
    def from_url(cls, url: str) -> MooncakeConfig:
        """The configuration ``url`` names; ValueError naming what is wrong."""
        parts = urlsplit(url)
        if parts.scheme != "mooncake":
            raise ValueError(f"store URL {url!r}: scheme must be mooncake://")
        if parts.username is not None or parts.path not in ("", "/") or parts.fragment:
            raise ValueError(f"store URL {url!r}: only mooncake://MASTER_HOST:MASTER_PORT?PARAMETERS")
        if not parts.hostname:
            raise ValueError(f"store URL {url!r}: no master host")
        try:
            port = parts.port or MASTER_PORT
        except ValueError:
            raise ValueError(f"store URL {url!r}: master port must be a number in 1..65535") from None
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError:
            raise ValueError(f"store URL {url!r}: parameters must read name=value&name=value") from None
        given = dict(pairs)
        if len(given) != len(pairs):
            raise ValueError(f"store URL {url!r}: a parameter is given twice")
        unknown = sorted(set(given) - {"metadata", "local", *MINIMUM})
        if unknown:
            raise ValueError(f"store URL {url!r}: unknown parameter(s) {unknown} (known: metadata, local, "
                             f"{', '.join(MINIMUM)})")
        numbers = {name: _number(url, name, text) for name, text in given.items() if name in MINIMUM}
        metadata = given.get("metadata", f"http://{parts.hostname}:{METADATA_PORT}/metadata")
        meta = urlsplit(metadata)
        if meta.scheme not in ("http", "https") or not meta.hostname:
            raise ValueError(f"store URL {url!r}: metadata must be an http:// URL, got {metadata!r}")
        if "local" in given and not given["local"]:
            raise ValueError(f"store URL {url!r}: local must name this host's address")
        return cls(master_host=parts.hostname, master_port=port, metadata=metadata,
                   local=given.get("local", cls.local), **numbers)


def _number(url: str, name: str, text: str) -> int:
    if not text.isdigit() or int(text) < MINIMUM[name]:
        raise ValueError(f"store URL {url!r}: {name} must be an integer >= {MINIMUM[name]}, got {text!r}")
    return int(text)


@contextmanager
def _environment(settings: dict[str, str]) -> Iterator[None]:
    """``settings`` in the process environment for the duration (the binding reads them in ``setup`` only)."""
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class MooncakeStore(KvStore):
    """A Mooncake Store client (module docstring: the binding's conventions and the failure bounds)."""

    def __init__(self, config: MooncakeConfig):
        super().__init__()
        # optional at import time: the product loads without it
        from mooncake.store import MooncakeDistributedStore, ReplicaStatus

        self.config = config
        self._complete = ReplicaStatus.COMPLETE
        self._buffer_bytes = config.buffer_mb * MB
        self._down_until = 0.0
        # Without a master, setup would retry for 90 s: a refused connection fails at once here.
        try:
            socket.create_connection((config.master_host, config.master_port), timeout=config.timeout_ms / 1000).close()
        except OSError as e:
            raise ConnectionError(f"Mooncake master {config.master} unreachable: {e}") from None
        client = MooncakeDistributedStore()
        timeout = str(config.timeout_ms)
        with _environment({"MC_RPC_TIMEOUT_MS": timeout, "MC_RPC_CONNECT_TIMEOUT_MS": timeout,
                           "MC_STORE_CLIENT_SETUP_RETRIES": "1"}):
            code = client.setup({"local_hostname": config.local, "metadata_server": config.metadata,
                                 "global_segment_size": config.segment_mb * MB,
                                 "local_buffer_size": self._buffer_bytes, "protocol": "tcp",
                                 "master_server_addr": config.master})
        if code != 0:
            client.close()
            raise ConnectionError(f"Mooncake store setup failed ({code}): master {config.master}, "
                                  f"metadata {config.metadata}")
        self._client = client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _answering(self) -> bool:
        """Whether to ask the store at all: open, no failed RPC within ``retry_ms``, the master answering pings."""
        return (self._client is not None and time.monotonic() >= self._down_until
                and self._client.health_check() == 0)

    def _note(self, codes: list[int]) -> None:
        """Where a code says the master did not answer, the store answers at once for ``retry_ms``."""
        if NO_ANSWER.intersection(codes):
            self._trip()

    def _trip(self) -> None:
        self._down_until = time.monotonic() + self.config.retry_ms / 1000

    def _batches(self, indices: list[int], sizes: list[int]) -> Iterator[list[int]]:
        """``indices`` in runs whose values take at most a quarter of the transfer buffer together (each value fits
        alone: a larger one is a run of its own). A quarter, measured here with 64 values of 2.8 MiB (a 4K-token
        history's blocks) in a 64 MiB buffer: a run of 21 (61.9 MiB) failed whole; runs of half and of a third of
        the buffer failed now and then from the second run on (13 and 14 of 384 values in six rounds: the client's
        allocator rounds sizes up and does not have the previous run's memory back yet); quarters never did."""
        run, held = [], 0
        for i in indices:
            if run and held + sizes[i] > self._buffer_bytes // 4:
                yield run
                run, held = [], 0
            run.append(i)
            held += sizes[i]
        if run:
            yield run

    def _put_many(self, keys: list[str], values: list[Value], sizes: list[int]) -> list[bool]:
        stored = [False] * len(keys)
        if not self._answering():
            return stored
        fitting = [i for i, size in enumerate(sizes) if size <= self._buffer_bytes]
        for run in self._batches(fitting, sizes):
            code = self._client.put_batch([keys[i] for i in run], [values[i] for i in run])
            self._note([code])
            if code == 0:
                for i in run:
                    stored[i] = True
            elif code in NO_ANSWER:
                break
        return stored

    def _get_many(self, keys: list[str]) -> tuple[list[bytes | None], int]:
        values: list[bytes | None] = [None] * len(keys)
        present, failed = self._exists_many(keys)
        wanted = [i for i, here in enumerate(present) if here]
        if not wanted:
            return values, failed
        replicas = self._client.batch_get_replica_desc([keys[i] for i in wanted])
        sizes = [0] * len(keys)
        for i in wanted:
            complete = [r for r in replicas.get(keys[i], ()) if r.is_memory_replica() and r.status == self._complete]
            if complete:
                sizes[i] = complete[0].get_memory_descriptor().buffer_descriptor.size
        readable = [i for i in wanted if 0 < sizes[i] <= self._buffer_bytes]
        for run in self._batches(readable, sizes):
            read = self._client.get_batch([keys[i] for i in run])
            if not any(read):  # nothing of a batch that was present: most likely the master stopped answering
                self._trip()
                break
            for i, value in zip(run, read):
                values[i] = value or None
        # A key present without a complete replica is being written (by another worker, say): absent for now, a
        # miss. Complete a moment ago but not read: gone in between, too large for the buffer, or a failed transfer.
        return values, failed + sum(values[i] is None for i in wanted if sizes[i])

    def _exists_many(self, keys: list[str]) -> tuple[list[bool], int]:
        if not self._answering():
            return [False] * len(keys), len(keys)
        codes = self._client.batch_is_exist(keys)
        self._note(codes)
        return [code == 1 for code in codes], sum(code < 0 for code in codes)

    def _remove_many(self, keys: list[str]) -> int:
        if not self._answering():
            return len(keys)
        codes = self._client.batch_remove(keys, force=False)
        self._note(codes)
        return sum(code not in (0, OBJECT_NOT_FOUND, OBJECT_HAS_LEASE) for code in codes)

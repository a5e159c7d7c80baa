"""A Mooncake Store on loopback, for tests and benchmarks: the master, with its built-in transfer metadata server,
and one store service that holds the memory (a deployment in small: ``offload/mooncake.py``), on free ports.

``url`` opens a store client on them (``offload.store.open_store``, ``--slkv-shared-store``). For failure
injection: ``stop`` / ``start`` end the master and start it again on the same ports (a restarted master knows no
value stored before), ``pause`` / ``resume`` make it hang and answer again, ``clear`` drops every value.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent  # mooncake_master and mooncake_client, installed with the package


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalMooncake:
    """``lease_ms``: the master's lease on a value read or written, during which it cannot be removed;
    ``timeout_ms`` / ``retry_ms``: the clients' RPC deadline and failure cut-off (``MooncakeConfig``)."""

    def __init__(self, segment_mb: int = 512, lease_ms: int = 200, timeout_ms: int = 1000, retry_ms: int = 500):
        self.segment_mb, self.lease_ms = segment_mb, lease_ms
        self.rpc_port, self.metadata_port, self.admin_port, self.service_port = (_free_port() for _ in range(4))
        self.retry_ms = retry_ms
        self.url = self.client_url(timeout_ms)
        self.master: subprocess.Popen | None = None
        self.service: subprocess.Popen | None = None
        self.start()
        self.service = self._spawn([str(BIN / "mooncake_client"), f"--global_segment_size={segment_mb}MB",
                                    "--host=127.0.0.1", f"--port={self.service_port}",
                                    f"--master_server_address=127.0.0.1:{self.rpc_port}",
                                    f"--metadata_server={self.metadata}"])
        self._wait_mounted()

    def client_url(self, timeout_ms: int) -> str:
        """A store URL for clients of this store with RPC deadline ``timeout_ms``."""
        return (f"mooncake://127.0.0.1:{self.rpc_port}?metadata={self.metadata}&buffer_mb=64"
                f"&timeout_ms={timeout_ms}&retry_ms={self.retry_ms}")

    @property
    def metadata(self) -> str:
        return f"http://127.0.0.1:{self.metadata_port}/metadata"

    @property
    def running(self) -> bool:
        return self.master is not None and self.master.poll() is None

    def start(self) -> None:
        """Starts the master (again, on the same ports); returns once it answers and the store service's memory is
        mounted (after a restart the service mounts it again by itself)."""
        self.master = self._spawn([
            str(BIN / "mooncake_master"), f"--rpc_port={self.rpc_port}", "--rpc_address=127.0.0.1",
            "--enable_http_metadata_server", f"--http_metadata_server_port={self.metadata_port}",
            "--http_metadata_server_host=127.0.0.1", f"--metrics_port={self.admin_port}", "--metrics_host=127.0.0.1",
            f"--default_kv_lease_ttl={self.lease_ms}"])
        deadline = time.time() + 30
        while not self._answers():
            if self.master.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mooncake_master did not start: {self._tail(self.master)}")
            time.sleep(0.2)
        if self.service is not None:
            self._wait_mounted()

    def stop(self) -> None:
        self._end(self.master)

    def clear(self) -> None:
        """Every value gone: the master restarted (its index is the only one)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.master is not None
        os.kill(self.master.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.master is not None
        os.kill(self.master.pid, signal.SIGCONT)

    def close(self) -> None:
        self._end(self.service)
        if self.running:
            self.resume()
        self._end(self.master)

    # ---- processes -----------------------------------------------------------------------------------
    @staticmethod
    def _spawn(cmd: list[str]) -> subprocess.Popen:
        log = tempfile.TemporaryFile("w+")  # a pipe nobody reads would fill up and block the process
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        proc.log = log  # type: ignore[attr-defined]
        return proc

    @staticmethod
    def _tail(proc: subprocess.Popen | None) -> str:
        if proc is None:
            return ""
        proc.log.seek(0)  # type: ignore[attr-defined]
        return proc.log.read()[-3000:]  # type: ignore[attr-defined]

    @staticmethod
    def _end(proc: subprocess.Popen | None) -> None:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)

    def _answers(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.admin_port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait_mounted(self, timeout: float = 30) -> None:
        """Until the master counts the store service's memory: only then can a value be put."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.service is not None
            if self.service.poll() is not None:
                raise RuntimeError(f"mooncake_client exited: {self._tail(self.service)}")
            try:
                if self._capacity() >= self.segment_mb << 20:
                    return
            except (httpx.HTTPError, StopIteration):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the store service did not mount its memory in {timeout:.0f} s: "
                           f"{self._tail(self.service)}")

    def _capacity(self) -> int:
        """The memory the master knows of, in bytes (its metrics)."""
        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=2).text
        line = next(x for x in text.splitlines() if x.startswith("master_total_capacity_bytes "))
        return int(float(line.split()[1]))

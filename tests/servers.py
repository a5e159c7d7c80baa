"""Starting HTTP servers under test as subprocesses on free loopback ports."""

from __future__ import annotations

import fcntl
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest


class EngineGuard:
    """Which test may start an engine: ``tests/conftest.py`` sets ``forbidden_for`` to the running test's node id
    around the setup, call and teardown of every test not marked ``engine`` (None otherwise), and counts
    ``starts`` around fixture setups to learn which ``fixtures`` start engines."""

    forbidden_for: str | None = None
    starts = 0
    fixtures: set[str] = set()


@contextmanager
def engine_start_lock() -> Iterator[None]:
    """Held while an engine starts (in this process or in a server's): one start at a time on this machine, across
    the suite's pytest-xdist workers (and any other run of the suite). An SGLang CPU engine sizes its memory from
    the free memory it measures before and after loading the weights, and refuses to start ("Loaded weights leave
    no GPU memory for the KV cache") when another engine allocated its pool in between.

    Every engine start of the suite goes through here, so here a test not marked ``engine`` fails: ``make
    test-fast`` (``-m "not engine"``) would otherwise start engines after all."""
    if EngineGuard.forbidden_for is not None:
        pytest.fail(f"{EngineGuard.forbidden_for} starts an SGLang engine (or a server with one) but is not marked "
                    "`engine`: add @pytest.mark.engine (or `pytestmark = pytest.mark.engine` for a whole module)",
                    pytrace=False)
    EngineGuard.starts += 1
    with open(Path(tempfile.gettempdir()) / "slkv-tests-engine-start.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], env: dict[str, str], health_url: str, timeout: float = 300) -> subprocess.Popen:
    """Start ``cmd`` and wait until ``health_url`` answers 200; fail with the server's stderr tail."""
    proc = spawn(cmd, env)
    wait_healthy(proc, health_url, timeout)
    return proc


def spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start a server with its output in a temporary file: a pipe nobody reads would fill up and block it."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _tail(proc: subprocess.Popen) -> str:
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.log.read()[-3000:]  # type: ignore[attr-defined]


def wait_healthy(proc: subprocess.Popen, health_url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited: {_tail(proc)}")
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{proc.args[:4]} did not become healthy in {timeout:.0f} s: {_tail(proc)}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=60)

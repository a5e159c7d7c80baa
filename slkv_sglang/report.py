"""Layer-map records: built where a decision is taken (the attention backend), shipped by the batch result.

SGLang hands a request's ``customized_info`` to the tokenizer process when it processes the batch's results,
which runs after the forward (one forward later with overlap scheduling). The ``Outbox`` carries the records across
that gap by request id; a record nobody takes (the request was aborted before its results were processed) is
dropped after a few forwards, so the outbox never grows.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from .tracker import Decision

KEEP_FORWARDS = 4  # results are processed at most one forward late (overlap scheduling): 4 is ample


def worker_id() -> str:
    """Which worker holds a request's KV: ``SLKV_WORKER_ID``, else the host name (a StatefulSet pod name).

    Reported with every layer map so the chat API can record where a session's KV lives and count turns
    that land on another worker (they recompute the history)."""
    return os.environ.get("SLKV_WORKER_ID") or socket.gethostname()


def record(decision: Decision, extra: dict[str, Any]) -> dict[str, Any]:
    """What a client gets in ``meta_info["slkv"]``."""
    out = decision.layer_map.to_dict()
    out["timing"] = {"identification_s": decision.identification_s, "prefill_forward_s": decision.forward_s}
    out["worker"] = worker_id()
    out.update(extra)
    return out


class Outbox:
    def __init__(self) -> None:
        self._records: dict[str, tuple[int, dict[str, Any]]] = {}
        self._forward = 0

    def __len__(self) -> int:
        return len(self._records)

    def tick(self) -> None:
        """A forward begins: records older than ``KEEP_FORWARDS`` forwards will never be taken."""
        self._forward += 1
        stale = [rid for rid, (at, _) in self._records.items() if self._forward - at > KEEP_FORWARDS]
        for rid in stale:
            del self._records[rid]

    def put(self, rid: str, rec: dict[str, Any]) -> None:
        self._records[rid] = (self._forward, rec)

    def take(self, rid: str) -> dict[str, Any] | None:
        found = self._records.pop(rid, None)
        return None if found is None else found[1]

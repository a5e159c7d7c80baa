"""Engine-wide SimLayerKV settings, changed at run time through SGLang's admin channel.

A setting that acts on every request (the host tier's budget) is never taken from a request: any client
could change it for everyone. SGLang has an admin channel to its schedulers already: the HTTP route
``/set_internal_state`` (it needs the admin key when the server runs with ``--admin-api-key``) and
``TokenizerManager.set_internal_state`` carry ``{"server_args": {name: number}}`` to every scheduler, which
checks every name with its update handlers before it applies any. The plugin adds its names there::

    curl -X POST $WORKER/set_internal_state -H "Authorization: Bearer $SGLANG_ADMIN_KEY" \\
         -H "Content-Type: application/json" -d '{"server_args": {"slkv_host_budget": 1073741824}}'

SGLang answers ``[true]`` (one per scheduler), or ``[false]`` for a refused value, which leaves the engine
as it was; the scheduler logs why, naming the field. The budget an engine holds is reported in every layer
map (``kv.host_budget``).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, Sequence

from .config import HOST_BUDGET, host_budget_problem

logger = logging.getLogger("slkv.admin")


class HostTier(Protocol):
    budget_bytes: int

    def set_budget(self, nbytes: int) -> None: ...


def add_handlers(handlers: dict[str, Any], tiers: Sequence[HostTier]) -> dict[str, Any]:
    """``SchedulerInternalStateController._update_handlers``: SimLayerKV's names beside SGLang's. ``tiers``:
    the host tiers of this scheduler's backends (none without ``--slkv-offload``)."""
    from sglang.srt.managers.scheduler_components.internal_state import UpdateRejected, _UpdateHandler

    def validate(key: str, value: Any) -> None:
        problem = host_budget_problem(value, bool(tiers))
        if problem is not None:
            raise UpdateRejected(f"{key} {problem}")

    def apply(key: str, value: int) -> None:
        for tier in tiers:
            tier.set_budget(value)
        logger.info("slkv: host budget set to %d bytes (%s)", value, key)

    return {**handlers, HOST_BUDGET: _UpdateHandler(validate, apply)}

"""Scheduler side: the state of SimLayerKV in a scheduler process (``SchedulerSide``), how it gets the attention
backend's parts, and what it hands the backend per forward.

The scheduler process also runs the model (its ModelRunner builds the attention backend). The hand-off between
the two sides is explicit and one way: the backend factory ``attach``es the backend's tracker and KV executor to
the ``SchedulerSide``; before each forward ``stage_forward`` stages every request's settings on the tracker and,
with ``--slkv-offload``, hands the executor the planner's ``KvStep``; before its result is processed,
``settle_failures`` finishes the requests the executor reported in that step. The worker side never touches
SGLang's ``Req``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from http import HTTPStatus
from typing import Any

import torch

from ..config import SlkvConfig, SlkvConfigError
from ..kv.executor import KvExecutor
from ..kv.fingerprint import prefix_fingerprints
from ..kv.planner import KvPlanner
from ..kv.tier import KvTier
from ..report import Outbox
from ..request_params import RequestParams, request_params
from ..tracker import LazyTracker

logger = logging.getLogger("slkv.plugin")


@dataclass
class SchedulerSide:
    """One per process, made by ``register()`` and handed to the hooks that read it; filled in the scheduler
    process when SGLang builds the attention backend (``attach``)."""

    outbox: Outbox = field(default_factory=Outbox)
    tracker: LazyTracker | None = None
    planner: KvPlanner | None = None  # with --slkv-offload
    executor: KvExecutor | None = None  # with --slkv-offload
    # the prefix slots of the requests admitted since the last prefill batch was allocated: admission counted their
    # rows, so no eviction for rows moves them to the host (``admission._evict_for_rows``)
    admitted: list[torch.Tensor] = field(default_factory=list)

    @cached_property
    def config(self) -> SlkvConfig:
        """This process's SimLayerKV config, read once from ``SLKV_*`` (the flags set them before SGLang spawns
        its processes)."""
        return SlkvConfig.from_env()

    @property
    def tier(self) -> KvTier | None:
        return self.executor.tier if self.executor is not None else None

    def attach(self, tracker: LazyTracker, pool: Any) -> None:
        """The attention backend's tracker and the KV pool it reads; with offload the planner shares the pool's
        tier and the executor that moves its KV."""
        self.tracker, self.executor = tracker, pool.executor
        self.planner = None if pool.executor is None else KvPlanner(pool.executor.tier, strict=self.config.poison)


def install_backends(side: SchedulerSide) -> None:
    """Wrap SGLang's torch_native and FlashInfer backend factories (``ATTENTION_BACKENDS`` captured the
    originals before any hook, so they are replaced in the dict): with SimLayerKV on they build ours."""
    from sglang.srt.layers.attention import attention_registry as reg

    plain_torch = reg.ATTENTION_BACKENDS["torch_native"]
    plain_flashinfer = reg.ATTENTION_BACKENDS["flashinfer"]

    def torch_native(runner: Any) -> Any:
        if not side.config.enabled:
            return plain_torch(runner)
        from ..backends.torch_native import SlkvFlashInferStandinBackend, SlkvTorchNativeBackend

        cls = SlkvFlashInferStandinBackend if side.config.flashinfer_standin else SlkvTorchNativeBackend
        backend = cls(runner, side.config, side.outbox)
        side.attach(backend.tracker, backend.pool)
        logger.info("SimLayerKV on torch_native: %s", side.config)
        return backend

    def flashinfer(runner: Any) -> Any:
        if not side.config.enabled or runner.use_mla_backend:
            return plain_flashinfer(runner)
        from ..backends.flashinfer import SlkvFlashInferBackend

        backend = SlkvFlashInferBackend(runner, side.config, side.outbox)
        side.attach(backend.tracker, backend.pool)
        logger.info("SimLayerKV on flashinfer: %s", side.config)
        return backend

    reg.ATTENTION_BACKENDS["torch_native"] = torch_native
    reg.ATTENTION_BACKENDS["flashinfer"] = flashinfer


def shared_salt(req: Any) -> str:
    """What SGLang's radix cache keys a request by besides its tokens (its extra key, which carries the LoRA
    adapter, and its cache salt): the shared tier's keys take it in too."""
    return f"{req.extra_key or ''}|{req.cache_salt or ''}"


def req_pool_idx(req: Any) -> int | None:
    """The request's index in ``req_to_token`` (SGLang 0.5.23 keeps it on ``req.kv``), None once released."""
    return getattr(getattr(req, "kv", None), "req_pool_idx", None)


def stage_forward(side: SchedulerSide, result: Any, _cls: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    """ForwardBatch.init_new: stage each request's settings for the backend's next ``plan``, and with offload
    hand the executor this forward's ``KvStep``.

    The eager runner copies the ForwardBatch into static buffers before planning, dropping extra
    attributes, so the settings go to the tracker, which checks they match the batch it plans.
    """
    if (not side.config.enabled or side.tracker is None
            or not (batch.forward_mode.is_extend() or batch.forward_mode.is_decode())):
        return None
    decode = batch.forward_mode.is_decode()
    params = []
    for req in batch.reqs:
        last = decode or req.extend_end == len(req.full_untruncated_fill_ids)
        try:
            params.append(request_params(side.config, req.rid, req.sampling_params.custom_params, last))
        except SlkvConfigError as exc:  # validated in the tokenizer process; never expected here
            raise RuntimeError(f"slkv: invalid overrides reached the scheduler for {req.rid}: {exc}") from exc
    side.outbox.tick()
    side.tracker.stage(params)
    if side.planner is not None and side.executor is not None:
        # the token ids whose fingerprints the forward's KV work needs: a prefill's positions 0..seq_len-1
        if decode:
            prefixes, tokens = None, [_decode_tokens(req, p) for req, p in zip(batch.reqs, params)]
        else:
            prefixes = [int(n) for n in batch.prefix_lens]
            tokens = [list(req.full_untruncated_fill_ids[: prefix + int(ext)])
                      for req, prefix, ext in zip(batch.reqs, prefixes, batch.extend_lens)]
        step = side.planner.plan(batch.reqs, [int(req_pool_idx(r)) for r in batch.reqs], [p.session for p in params],
                                 tokens, prefixes)
        side.executor.begin(step)
    return None


def _decode_tokens(req: Any, params: RequestParams) -> list[int] | None:
    """In decode, only a request deciding at its first decode step (mode ``decode``) needs its whole sequence's
    fingerprints."""
    if params.enabled and params.mode == "decode" and len(req.output_ids) == 1:
        return list(req.origin_input_ids) + list(req.output_ids)
    return None


def admit_graph(result: bool, runner: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> bool:
    """DecodeCudaGraphRunner.can_run_graph (after): a batch SGLang would replay a decode graph for runs eagerly
    where the SimLayerKV backend cannot serve it from the graph; one it can is kept for the replay's plan
    (``backends.paged.PagedForward.admit_graph``)."""
    from ..backends.paged import PagedForward

    backend = runner.attn_backend
    if not result or not isinstance(backend, PagedForward):
        return result
    return backend.admit_graph(forward_batch)


def settle_failures(side: SchedulerSide, scheduler: Any, _batch: Any = None, result: Any = None, *args: Any,
                    **kwargs: Any) -> None:
    """Scheduler.process_batch_result (before): requests whose KV the executor could not make whole in the forwards
    run so far finish with a 503-style error, and nothing of theirs is cached. The forward whose result this is
    has finished on the device first (SGLang waits for its tokens next: ``copy_done``), so its page reads are all
    counted; with overlap scheduling the next forward, already running, stays for its own result."""
    if side.planner is None:
        return None
    copy_done = getattr(result, "copy_done", None)
    if copy_done is not None:
        copy_done.synchronize()
    _finish(side.planner.settle(wait=not getattr(scheduler, "enable_overlap", False)))
    return None


def settle_before_stash(side: SchedulerSide, _scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """Scheduler.stash_chunked_request (before): with overlap scheduling a chunk is cached before the previous
    forward's result is processed, so every forward handed out settles now, waiting for the device where it must
    (settling twice is a no-op)."""
    if side.planner is not None:
        _finish(side.planner.settle(wait=True))
    return None


def _finish(failed: list[tuple[Any, str]]) -> None:
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    for req, why in failed:
        req.skip_radix_cache_insert = True
        req.discard_output_reason = FINISH_ABORT(f"{why}; retry the request", HTTPStatus.SERVICE_UNAVAILABLE)


def release_request(side: SchedulerSide, req: Any, tree_cache: Any = None, *args: Any, **kwargs: Any) -> None:
    """release_kv_cache: the request leaves (finished, aborted, retracted); its per-request state goes. A finished
    request that SGLang caches is first seen by the KV tier (its tokens' fingerprints) and written back to the
    shared tier (``--slkv-shared-store``)."""
    idx = req_pool_idx(req)
    tier = side.tier
    if (tier is not None and idx is not None and tree_cache is not None and kwargs.get("checkpoint")
            and req.finished() and not req.skip_radix_cache_insert):
        n = req.owned_kv_len()
        ids = [*req.origin_input_ids, *req.output_ids][:n]
        slots = tree_cache.req_to_token_pool.req_to_token[int(idx), :n].to(torch.int64)
        fingerprints = prefix_fingerprints(ids)
        tier.seen(slots, fingerprints)  # its reply too can be demoted to the host while it is idle (``KvTier.demote``)
        if tier.shared is not None:
            tier.shared.save(ids, slots, fingerprints, shared_salt(req))
    if idx is not None and side.tracker is not None:
        side.tracker.release(int(idx))
    if side.planner is not None:
        side.planner.retire(req, None if idx is None else int(idx))
    return None

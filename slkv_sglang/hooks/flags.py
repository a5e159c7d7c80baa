"""Flags and start-up (launcher process): the ``--slkv-*`` flags, and the checks that refuse at start-up what
SimLayerKV does not serve. The decisions themselves are pure functions in ``slkv_sglang.startup``."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from .. import startup
from ..config import DECIDE_MODES, GRANULARITIES, SCORE_MODES, SHARED_WRITE_BACK, SlkvConfig, SlkvConfigError
from ..model_layers import ModelLayers, check_servable

logger = logging.getLogger("slkv.plugin")


class _EnvAction(argparse._StoreAction):
    """Stores the flag and mirrors it into its ``SLKV_*`` variable, which reaches the spawned processes.

    Subclasses ``_StoreAction`` so that SGLang's ``--config`` YAML merging accepts it.
    """

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        super().__call__(parser, namespace, values, option_string)
        env = self.metavar_env  # type: ignore[attr-defined]
        os.environ[env] = "1" if values is True else str(values)  # bare --enable-simlayerkv stores True
        try:
            SlkvConfig.from_env()
        except SlkvConfigError as exc:
            parser.error(str(exc))


def _add_flag(parser: Any, flag: str, env: str, **kw: Any) -> None:
    added = parser.add_argument(flag, action=_EnvAction, **kw)
    added.metavar_env = env  # type: ignore[attr-defined]


def add_cli_args(_result: Any, parser: argparse.ArgumentParser) -> None:
    """ServerArgs.add_cli_args: the ``--slkv-*`` flags (argument groups share the parser's namespace)."""
    parser_ = parser.add_argument_group("SimLayerKV (slkv-sglang plugin)")
    _add_flag(parser_, "--enable-simlayerkv", "SLKV_ENABLE", nargs="?", const=True, default=None,
              help="Per-request lazy layers (SimLayerKV): lazy layers decode from sink + recent KV only.")
    _add_flag(parser_, "--slkv-threshold", "SLKV_THRESHOLD", type=float, default=None,
              help="A layer is lazy when its score exceeds this (default 0.9; > 1 disables trimming).")
    _add_flag(parser_, "--slkv-sink", "SLKV_SINK", type=int, default=None, help="Sink tokens kept (default 4).")
    _add_flag(parser_, "--slkv-recent", "SLKV_RECENT", type=int, default=None,
              help="Recent window kept in lazy layers (default 1020).")
    _add_flag(parser_, "--slkv-last", "SLKV_LAST", type=int, default=None,
              help="Last prompt queries that score a layer (default 32).")
    _add_flag(parser_, "--slkv-mode", "SLKV_MODE", choices=DECIDE_MODES, default=None,
              help="Decide at prefill (last queries) or at the first decode step.")
    _add_flag(parser_, "--slkv-score", "SLKV_SCORE", choices=SCORE_MODES, default=None,
              help="Score reduction over heads: mean (paper), kvmin or headmin (guard retrieval heads).")
    _add_flag(parser_, "--slkv-granularity", "SLKV_GRANULARITY", choices=GRANULARITIES, default=None,
              help="What is lazy: each KV head of a layer on its own (head, the default) or whole layers "
                   "(layer, the paper).")
    _add_flag(parser_, "--slkv-profile", "SLKV_PROFILE", default=None,
              help="A calibrated profile (slkv calibrate): its settings become the defaults; other flags override.")
    _add_flag(parser_, "--slkv-protect", "SLKV_PROTECT", default=None,
              help="Comma-separated layer ids never made lazy (e.g. a model's retrieval layers).")
    _add_flag(parser_, "--slkv-offload", "SLKV_OFFLOAD", nargs="?", const=True, default=None,
              help="Lazy layers give their middle tokens' device KV back, keeping a host copy (torch_native).")
    _add_flag(parser_, "--slkv-offload-budget", "SLKV_OFFLOAD_BUDGET", type=int, default=None,
              help="Host bytes for offloaded KV (default 4 GiB); when full, the least recently used sessions "
                   "are evicted, and what does not fit is recomputed when a later turn needs it.")
    _add_flag(parser_, "--slkv-offload-prepin", "SLKV_OFFLOAD_PREPIN", type=float, default=None,
              help="Share of the host budget allocated (pinned on CUDA) and touched at start-up, so that early "
                   "offloads do not pay first touch (default 0.25).")
    _add_flag(parser_, "--slkv-poison-freed", "SLKV_POISON", nargs="?", const=True, default=None,
              help="Debug: fill freed device KV (SGLang's freed slots, or freed rows with offload) with NaN so "
                   "that any read of it shows in the outputs.")
    _add_flag(parser_, "--slkv-flashinfer-standin", "SLKV_FLASHINFER_STANDIN", nargs="?", const=True, default=None,
              help="Check: on torch_native, run the FlashInfer backend's reads (plans, per-layer pages) with torch "
                   "kernels in place of FlashInfer's (slow; for tests on machines without a GPU).")
    _add_flag(parser_, "--slkv-overcommit", "SLKV_OVERCOMMIT", type=float, default=None,
              help="With --slkv-offload: give SGLang at most this many times the token slots its KV memory holds "
                   "in full KV (default: as many as a 1/32 share of that memory indexes, up to 8); admission counts "
                   "device rows, so rows lazy layers free admit more.")
    _add_flag(parser_, "--slkv-shared-store", "SLKV_SHARED_STORE", default=None,
              help="With --slkv-offload: a store every worker reaches, mooncake://MASTER_HOST:PORT?metadata=URL; "
                   "finished requests' KV is written there and a prefix missing here is restored from it.")
    _add_flag(parser_, "--slkv-shared-timeout-ms", "SLKV_SHARED_TIMEOUT_MS", type=int, default=None,
              help="Time budget of one shared-store lookup (default 2000); past it the prefix is recomputed.")
    _add_flag(parser_, "--slkv-shared-queue-bytes", "SLKV_SHARED_QUEUE_BYTES", type=int, default=None,
              help="Bytes of KV waiting to be written to the shared store (default 1 GiB); past it blocks are "
                   "dropped (counted) and written by a later turn.")
    _add_flag(parser_, "--slkv-shared-write-back", "SLKV_SHARED_WRITE_BACK", choices=SHARED_WRITE_BACK, default=None,
              help="finished (default): write a request's KV when it finishes; off: only read the store.")


def validate_startup(*args: Any, **kwargs: Any) -> None:
    """Engine._launch_subprocesses: a bad ``SLKV_*`` variable stops the engine before it starts anything."""
    cfg = SlkvConfig.from_env()  # raises SlkvConfigError with the offending variable
    if cfg.enabled:
        logger.info("SimLayerKV enabled: %s", cfg)
    return None


def uses_cuda(server_args: Any) -> bool:
    import torch

    return (getattr(server_args, "device", None) != "cpu" and os.environ.get("SGLANG_USE_CPU_ENGINE") != "1"
            and torch.cuda.is_available())


def plan_server_args(server_args: Any, *args: Any, **kwargs: Any) -> None:
    """ServerArgs.resolve_once (before): name the covered backend and the decode CUDA graphs SimLayerKV serves,
    refuse what is not served."""
    cfg = SlkvConfig.from_env()
    if not cfg.enabled or getattr(server_args, "_resolution_finished", False):
        return None
    from sglang.srt.arg_groups.overrides import declare_resolution

    requested = {name: getattr(server_args, name, None) for name in startup.REQUESTED_FIELDS}
    plan = startup.plan_server_args(requested, uses_cuda(server_args), cfg)
    if plan.declarations:
        declare_resolution(server_args, "slkv_sglang", **plan.declarations)
    for note in plan.notes:
        logger.warning(note)
    return None


def check_resolved(_result: Any, server_args: Any, *args: Any, **kwargs: Any) -> None:
    """ServerArgs.resolve_once (after): what SGLang resolved runs on a backend the plugin covers, and the model
    is one SimLayerKV serves (SGLang built and kept its ModelConfig while resolving)."""
    cfg = SlkvConfig.from_env()
    if cfg.enabled:
        from sglang.srt.arg_groups.model_override_base import model_config_of, resolved_view

        view = resolved_view(server_args)
        from sglang.srt.environ import envs
        from sglang.srt.model_executor.cuda_graph_config import Backend

        graphs = view.cuda_graph_config
        graphs_on = {phase: str(getattr(graphs, phase).backend) for phase in ("decode", "prefill")
                     if getattr(graphs, phase).backend != Backend.DISABLED} if uses_cuda(server_args) else {}
        startup.check_resolved({name: getattr(view, name, None) for name in startup.BACKEND_FIELDS}, graphs_on,
                               envs.SGLANG_ENABLE_METADATA_GLUE_GRAPH.get())
        check_servable(ModelLayers.from_model_config(model_config_of(server_args)), cfg)
    return None

"""What SimLayerKV needs from SGLang's server arguments: decided before SGLang resolves them, checked after.

SGLang 0.5.23 resolves its arguments once (``ServerArgs.resolve_once``) in the launching process. Before that,
``plan_server_args`` names the attention backend the plugin covers when the user named none (on Hopper SGLang
would pick fa3, which the plugin does not wrap, and every request would silently run with full KV) and turns
CUDA graphs off (the decode windows are planned per step). After it, ``check_resolved`` refuses what the
resolution chose that the plugin cannot serve. Both take plain mappings so they are testable without CUDA.
Every refusal is a ``SlkvConfigError`` naming the flag to use, raised before any process is spawned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .config import SlkvConfig, SlkvConfigError

COVERED_BACKENDS = ("flashinfer", "torch_native")
BACKEND_FIELDS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")


@dataclass
class StartupPlan:
    declarations: dict[str, Any] = field(default_factory=dict)  # ServerArgs fields SimLayerKV sets
    notes: list[str] = field(default_factory=list)  # one log line per decision


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def plan_server_args(requested: Mapping[str, Any], cuda: bool, cfg: SlkvConfig) -> StartupPlan:
    """The declarations SimLayerKV makes on the user's arguments; raises on what it cannot serve."""
    plan = StartupPlan()
    default = "flashinfer" if cuda else "torch_native"
    for name in BACKEND_FIELDS:
        backend = requested.get(name)
        if backend is not None and backend not in COVERED_BACKENDS:
            raise SlkvConfigError(f"--enable-simlayerkv covers the flashinfer and torch_native attention backends, not "
                                  f"{_flag(name)} {backend}: start with --attention-backend {default}")
    if all(requested.get(name) is None for name in BACKEND_FIELDS):
        plan.declarations["attention_backend"] = default
        plan.notes.append(f"SimLayerKV: --attention-backend {default} (no backend was named; the plugin wraps this one)")
    if requested.get("enable_dp_attention"):
        raise SlkvConfigError("--enable-dp-attention is not supported with --enable-simlayerkv: ranks of the TP group "
                              "then run different batches, and a decision gathers heads across the group")
    if (requested.get("pp_size") or 1) > 1:
        raise SlkvConfigError("--pp-size > 1 is not supported with --enable-simlayerkv: a decision needs every layer's "
                              "scores in one process")
    if requested.get("enable_mixed_chunk"):
        raise SlkvConfigError("--enable-mixed-chunk is not supported with --enable-simlayerkv: SGLang runs a mixed "
                              "batch as one extend, which would score running requests' decode tokens again")
    if requested.get("speculative_algorithm"):
        raise SlkvConfigError(f"--speculative-algorithm {requested['speculative_algorithm']} is not supported with "
                              "--enable-simlayerkv: draft and verify forwards are not scored")
    if cfg.offload and requested.get("enable_hierarchical_cache"):
        raise SlkvConfigError("--enable-hierarchical-cache is not supported with --slkv-offload: SGLang's host tier "
                              "would copy and load back the token slots whose KV the plugin's rows hold; use "
                              "--slkv-offload-budget for the host tier and --slkv-shared-store for a shared one")
    if cuda and not requested.get("disable_cuda_graph"):
        plan.declarations["disable_cuda_graph"] = True
        plan.notes.append("SimLayerKV: CUDA graphs off (decode windows differ per request and step; see docs/gpu.md)")
    return plan


def check_resolved(resolved: Mapping[str, Any], cfg: SlkvConfig, cuda_graphs: Sequence[str] = ()) -> None:
    """After SGLang's resolution: prefill and decode run on one covered backend, and no CUDA graph phase is on
    (``cuda_graphs``: the phases whose graphs the resolution left on)."""
    chosen = {name: resolved.get(name) for name in BACKEND_FIELDS if resolved.get(name) is not None}
    for name, backend in chosen.items():
        if backend not in COVERED_BACKENDS:
            raise SlkvConfigError(f"SGLang resolved {_flag(name)} to {backend}, which --enable-simlayerkv does not "
                                  "cover: start with --attention-backend flashinfer (CUDA) or torch_native")
    base = resolved.get("attention_backend")
    prefill = resolved.get("prefill_attention_backend") or base
    decode = resolved.get("decode_attention_backend") or base
    if prefill != decode:  # SGLang would pair two backends, each with its own tracker: decode would never restrict
        raise SlkvConfigError(f"--enable-simlayerkv needs one backend for prefill and decode, got prefill {prefill} and "
                              f"decode {decode}: start with --attention-backend {decode or prefill} alone")
    if cuda_graphs:
        raise SlkvConfigError(f"CUDA graphs are on for {', '.join(cuda_graphs)} (a --cuda-graph-* flag overrides "
                              "--disable-cuda-graph); SimLayerKV plans decode windows per step: drop those flags")

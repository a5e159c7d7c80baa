"""What SimLayerKV needs from SGLang's server arguments: decided before SGLang resolves them, checked after.

SGLang 0.5.23 resolves its arguments once (``ServerArgs.resolve_once``) in the launching process. Before that,
``plan_server_args`` names the attention backend the plugin covers when the user named none (on Hopper SGLang
would pick fa3, which the plugin does not wrap, and every request would silently run with full KV) and picks
SGLang's *breakable* decode CUDA graphs, prefill graphs off: the plugin's decode attention runs as an eager
break between captured segments, so each step's lazy patterns are planned on the host as without graphs
(``backends/paged.py``), with ``--slkv-offload`` too (its rows include SGLang's padding slot). A full decode graph,
torch.compile or the metadata glue graph would bake the capture step's attention branch and plan into every
replay: refused. After it, ``check_resolved`` refuses what the resolution chose that the plugin cannot serve.
Both take plain mappings so they are testable without CUDA.
Every refusal is a ``SlkvConfigError`` naming the flag to use, raised before any process is spawned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .config import SlkvConfig, SlkvConfigError

COVERED_BACKENDS = ("flashinfer", "torch_native")
DECODE_GRAPH = "breakable"  # the decode CUDA graph backend SimLayerKV serves (SGLang's Backend.BREAKABLE)
_BAKES = ("a captured replay repeats the capture step's attention branch and plan, while SimLayerKV plans lazy "
          "windows per request and step")
BACKEND_FIELDS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")
# every ServerArgs field plan_server_args reads: the launcher's hook passes exactly these
REQUESTED_FIELDS = (*BACKEND_FIELDS, "disable_cuda_graph", "disable_decode_cuda_graph",
                    "cuda_graph_backend_decode", "debug_cuda_graph", "enable_torch_compile", "enable_mixed_chunk",
                    "speculative_algorithm", "enable_dp_attention", "pp_size", "enable_hierarchical_cache")


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
    named = [requested.get(name) for name in BACKEND_FIELDS if requested.get(name) is not None]
    if not cuda or requested.get("disable_cuda_graph") or "torch_native" in named:  # SGLang: no graphs on it
        return plan
    if requested.get("cuda_graph_backend_decode") == "full":
        raise SlkvConfigError(f"--cuda-graph-backend-decode full is not supported with --enable-simlayerkv: {_BAKES}; "
                              f"drop it (SimLayerKV selects {DECODE_GRAPH}) or use --disable-cuda-graph")
    if requested.get("debug_cuda_graph"):  # its one eager break around the whole forward cannot hold the plugin's
        raise SlkvConfigError("--debug-cuda-graph is not supported with --enable-simlayerkv: the plugin's decode "
                              "attention is itself an eager break; drop it or add --disable-cuda-graph")
    if requested.get("enable_torch_compile"):
        raise SlkvConfigError(f"--enable-torch-compile is not supported with --enable-simlayerkv: {_BAKES}; drop it "
                              "or add --disable-cuda-graph")
    plan.declarations["disable_prefill_cuda_graph"] = True
    if requested.get("cuda_graph_backend_decode") is None and not requested.get("disable_decode_cuda_graph"):
        plan.declarations["cuda_graph_backend_decode"] = DECODE_GRAPH
        plan.notes.append(f"SimLayerKV: --cuda-graph-backend-decode {DECODE_GRAPH}, prefill CUDA graphs off (decode "
                          "attention runs eagerly between captured segments; see docs/gpu.md)")
    return plan


def check_resolved(resolved: Mapping[str, Any], cuda_graphs: Mapping[str, str] | None = None,
                   metadata_glue: bool = False) -> None:
    """After SGLang's resolution: prefill and decode run on one covered backend, and CUDA graphs are at most
    breakable decode graphs (``cuda_graphs``: phase -> backend, for the phases whose graphs the resolution left on;
    ``metadata_glue``: ``SGLANG_ENABLE_METADATA_GLUE_GRAPH``)."""
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
    graphs = dict(cuda_graphs or {})
    if "prefill" in graphs:
        raise SlkvConfigError(f"CUDA graphs are on for prefill ({graphs['prefill']}): SimLayerKV scores each prefill "
                              "layer on the host; start with --cuda-graph-backend-prefill disabled")
    if graphs.get("decode", DECODE_GRAPH) != DECODE_GRAPH:
        raise SlkvConfigError(f"decode CUDA graphs are {graphs['decode']}: {_BAKES}; start with "
                              f"--cuda-graph-backend-decode {DECODE_GRAPH} or --disable-cuda-graph")
    if graphs and metadata_glue:
        raise SlkvConfigError(f"SGLANG_ENABLE_METADATA_GLUE_GRAPH=1 captures the replay's metadata step, where "
                              f"SimLayerKV plans each step's lazy windows: {_BAKES}; unset it")

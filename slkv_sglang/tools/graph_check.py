"""Decode CUDA graphs with SimLayerKV, checked without an engine: the FlashInfer code path's decode attention
(``backends/paged.py``) captured once under SGLang's breakable capture, then replayed for batches of other sizes
and other lazy patterns, each step against the eager forward and the project's reference attention.

The engine-level check (``gpu_e2e``, ``graphs_equal_eager``) compares whole generations; this one isolates the
graph machinery: the capture with nothing planned, ``admit_graph`` keeping the live batch, ``plan_graph_step``
planning it padded to the graph's batch, and the breaks reading the graph's buffers.

- On CUDA: SGLang's real ``BreakableCUDAGraphCapture`` and ``BreakableCUDAGraph.replay``, with captured segments
  that hand each break its inputs and take its output (as a model's projections do); restricted layers run
  FlashInfer's decode (``WindowedDecode``) at Llama-3-8B's attention shape in bf16, the shape the FlashInfer
  bundle holds compiled.
- On CPU (``--dry``, CI): no CUDA graph can be captured, so SGLang's capture context variable holds a stub whose
  segments are no-ops; SGLang's ``eager_on_graph`` still records the plugin's breaks (CPU tensors are kept as they
  are), and a replay calls them in order as ``BreakableCUDAGraph.replay`` does between its segments. Restricted
  layers run the torch stand-in kernels (``backends/torch_paged.py``) in float32, so graphed and eager steps must be
  bit-equal.

In both, the layers' unrestricted decode is torch_native's (the stand-in backend's parent), over SGLang's real KV
and request pools.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch

from ..config import SlkvConfig
from ..request_params import request_params
from .host_reads import HostReads

CONFIG = SlkvConfig(enabled=True, sink=2, recent=6, flashinfer_standin=True)
# the pools the FlashInfer code path reads: SGLang's slots, or the plugin's rows (--slkv-offload; a host tier of
# 1 MiB, none of it allocated ahead: nothing is offloaded here)
POOLS = {"slots": CONFIG, "rows": replace(CONFIG, offload=True, offload_budget=1 << 20, offload_prepin=0.0,
                                          overcommit=1.0)}  # rows for every slot: the histories fill most
LAYERS = 3
GRAPH_BS = 4  # the captured graph's batch size
SLOTS = 512  # histories at scattered slots 1-490, the steps' new tokens at 501-505 (slot 0: SGLang's padding)
# Each step: (req_pool_idx, sequence length with the step's token, the token's slot) per request, and the lazy
# [layers, KV heads] of the requests it changes: whole layers, single KV heads, none; the first step 3 requests,
# the second 2, in another order. Patterns are written for 2 KV heads; with more, each stands for a half of them.
STEPS = (
    ([(1, 30, 501), (2, 25, 502), (3, 40, 503)],
     {1: [[1, 1], [0, 0], [1, 0]], 2: [[1, 1], [0, 1], [0, 0]], 3: [[0, 0], [0, 0], [0, 0]]}),
    ([(3, 41, 504), (1, 31, 505)], {3: [[0, 1], [1, 1], [0, 0]], 1: [[0, 0], [0, 0], [0, 0]]}),
)


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    dim: int
    dtype: torch.dtype
    tol: float  # graphed vs eager and vs the reference: |diff| <= tol * (1 + |ref|); 0: graphed equals eager


# CPU: small and float32. CUDA: Llama-3-8B's attention in bf16; tolerance as gpu_check.DECODE_TOL (bf16 output vs
# an fp32 reference), also between graphed and eager steps, which FlashInfer plans with other batch sizes (padded
# to the graph's) and so may split the KV differently.
CPU_SHAPE = Shape(heads=4, kv_heads=2, dim=8, dtype=torch.float32, tol=0.0)
CUDA_SHAPE = Shape(heads=32, kv_heads=8, dim=128, dtype=torch.bfloat16, tol=2e-2)
CPU_REFERENCE_ATOL = 1e-5  # float32 both sides, other summation orders
WINDOW_EFFECT_FACTOR = 10  # a restricted layer's reference output moves by more than this many tolerances


def standin_backend(device: str, shape: Shape, config: SlkvConfig = CONFIG) -> Any:
    """The FlashInfer code path over SGLang's real pools (``SlkvFlashInferStandinBackend``), the pools filled with
    seeded KV and histories at scattered slots; on CUDA its restricted decode runs FlashInfer's kernels. The runner
    is a plain holder of the pools. Build it inside ``one_rank()``."""
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    from ..backends import torch_native
    from ..kv.pool import pool_class
    from ..report import Outbox

    kv = pool_class(config)(size=SLOTS, page_size=1, dtype=shape.dtype, head_num=shape.kv_heads, head_dim=shape.dim,
                            layer_num=LAYERS, device=device, enable_memory_saver=False)
    gen = torch.Generator().manual_seed(0)
    req_to_token = ReqToTokenPool(size=8, max_context_len=64, device=device, enable_memory_saver=False)
    req_to_token.req_to_token[1:, :50].copy_(torch.randperm(490, generator=gen)[: 8 * 50].view(8, 50) + 1)
    history = req_to_token.req_to_token[1:, :50].flatten().long()
    for layer in range(LAYERS):
        keys, values = (torch.randn(len(history), shape.kv_heads, shape.dim, generator=gen).to(device, shape.dtype)
                        for _ in range(2))
        if config.offload:  # KV lives in the tier's rows
            kv.executor.write(layer, history, keys, values)
        else:
            kv.k_buffer[layer][history], kv.v_buffer[layer][history] = keys, values
    layers = [RadixAttention(shape.heads, shape.dim, shape.dim ** -0.5, shape.kv_heads, i) for i in range(LAYERS)]
    model_config = SimpleNamespace(num_hidden_layers=LAYERS, num_attention_heads=shape.heads, hf_text_config=None,
                                   get_total_num_kv_heads=lambda: shape.kv_heads)
    runner = SimpleNamespace(device=device, req_to_token_pool=req_to_token, token_to_kv_pool=kv,
                             model_config=model_config, model=torch.nn.ModuleList(layers))
    backend = torch_native.SlkvFlashInferStandinBackend(runner, config, Outbox())
    backend.layers = layers
    if device == "cuda":
        _use_flashinfer(backend, shape, config)
    return backend


def _use_flashinfer(backend: Any, shape: Shape, config: SlkvConfig) -> None:
    """The restricted decode through FlashInfer's wrappers, made as ``SlkvFlashInferBackend`` makes them at this
    shape: SGLang's decode backend ``fa2``, with tensor cores where SGLang's own rule picks them (at Llama-3-8B's
    shape it does)."""
    from flashinfer import BatchDecodeWithPagedKVCacheWrapper, BatchPrefillWithPagedKVCacheWrapper
    from sglang.srt.layers.attention.flashinfer_backend import should_use_tensor_core

    from ..backends.flashinfer_ops import PREFILL_BACKEND, AttnShape
    from ..backends.paged import PagedReads

    workspace = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    attn = AttnShape(shape.heads, shape.kv_heads, shape.dim, shape.dtype, shape.dtype)
    tensor_cores = should_use_tensor_core(shape.dtype, shape.heads, shape.kv_heads)
    backend._paged = PagedReads(
        backend.pool, backend.tracker, config, attn,
        lambda: BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", backend=PREFILL_BACKEND,
                                                   use_tensor_cores=tensor_cores),
        lambda: BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=PREFILL_BACKEND))


@contextmanager
def one_rank() -> Iterator[None]:
    """SGLang publishes its parallel layout inside an engine; outside one, state a single rank."""
    from sglang.srt.runtime_context import get_parallel

    with get_parallel().override(tp_size=1):
        yield


@dataclass
class Graph:
    """What a capture leaves: the breaks it recorded, and its replay (valid once the capture block is left)."""

    breaks: list[Callable[[], Any]]
    replay: Callable[[], None]


@contextmanager
def capture(device: str) -> Iterator[Graph]:
    """SGLang's breakable capture (a stub on CPU)."""
    from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph import breakable_cuda_graph as bcg
    from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph.context import \
        enable_breakable_cuda_graph

    if device == "cuda":
        graph = bcg.BreakableCUDAGraph()

        def replay() -> None:
            with enable_breakable_cuda_graph():
                graph.replay()
            torch.cuda.synchronize()

        torch.cuda.synchronize()  # the capture stream reads buffers the default stream wrote
        with enable_breakable_cuda_graph(), bcg.BreakableCUDAGraphCapture(
                graph, pool=torch.cuda.graph_pool_handle(), stream=torch.cuda.Stream()):
            yield Graph(graph._break_fns, replay)
        torch.cuda.synchronize()  # the breaks ran once on the capture stream; the default stream refills next
        return
    stub = SimpleNamespace(_end_current_segment=lambda: None, _begin_new_segment=lambda: None, _barrier_fn=None,
                           cuda_graph=SimpleNamespace(_break_fns=[]))

    def replay_breaks() -> None:
        with enable_breakable_cuda_graph():
            for replay_fn in stub.cuda_graph._break_fns:
                replay_fn()

    token = bcg._current_capture_var.set(stub)
    try:
        with enable_breakable_cuda_graph():
            yield Graph(stub.cuda_graph._break_fns, replay_breaks)
    finally:
        bcg._current_capture_var.reset(token)


def decode_batch(indices: list[int], seq_lens: list[int], out_cache_loc: list[int], device: str) -> Any:
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    n = len(indices)
    on = lambda values: torch.tensor(values, device=device)  # noqa: E731
    return ForwardBatch(forward_mode=ForwardMode.DECODE, batch_size=n, input_ids=on([0] * n),
                        req_pool_indices=on(indices), req_pool_indices_cpu=torch.tensor(indices),
                        seq_lens=on(seq_lens), seq_lens_cpu=torch.tensor(seq_lens), out_cache_loc=on(out_cache_loc),
                        seq_lens_sum=sum(seq_lens))


def stage(backend: Any, n: int, config: SlkvConfig = CONFIG) -> None:
    """What ``stage_forward`` does before each forward (ForwardBatch.init_new)."""
    backend.tracker.stage([request_params(config, f"r{i}", None, True) for i in range(n)])


def load(static: Any, raw: Any) -> None:
    """SGLang's ``load_batch``: the live batch into the graph's buffers, padded with req_pool_idx 0, sequence length
    1 (FlashInfer's fill value) and slot 0."""
    n = raw.batch_size
    for name, fill in (("req_pool_indices", 0), ("seq_lens", 1), ("seq_lens_cpu", 1), ("out_cache_loc", 0)):
        buf = getattr(static, name)
        buf.fill_(fill)
        buf[:n].copy_(getattr(raw, name))


def reference_step(backend: Any, shape: Shape, raw: Any, q: list[torch.Tensor], k: list[torch.Tensor],
                   v: list[torch.Tensor], lazy: Any, config: SlkvConfig = CONFIG) -> list[torch.Tensor]:
    """The reference's decode attention (``tools/reference.py``) in float32 on the CPU, per request over its slots
    (the step's own token included), sink + recent in its lazy KV heads."""
    from .reference import decode_attention

    pool, r2t = backend.pool, backend.req_to_token_pool.req_to_token
    outs = []
    for layer in range(LAYERS):
        rows = []
        for pos, (idx, n) in enumerate(zip(raw.req_pool_indices.tolist(), raw.seq_lens.tolist())):
            keys, values = (t.float().cpu() for t in pool.read(pos, layer, r2t[idx, : n - 1].long()))
            keys = torch.cat([keys, k[layer][pos].float().cpu()[None]])  # the step's own token
            values = torch.cat([values, v[layer][pos].float().cpu()[None]])
            query = q[layer][pos].float().cpu().view(shape.heads, shape.dim)
            rows.append(decode_attention(config, lazy[idx][layer].cpu(), query, keys, values, shape.dim ** -0.5)
                        .reshape(-1))
        outs.append(torch.stack(rows))
    return outs


def eager_step(backend: Any, raw: Any, q: list[torch.Tensor], k: list[torch.Tensor],
               v: list[torch.Tensor], config: SlkvConfig = CONFIG) -> list[torch.Tensor]:
    stage(backend, raw.batch_size, config)
    backend.init_forward_metadata(raw)
    n = raw.batch_size
    return [backend.forward_decode(q[layer][:n], k[layer][:n], v[layer][:n], backend.layers[layer], raw).clone()
            for layer in range(LAYERS)]


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / (1 + |want|), in float32 on the CPU; a NaN anywhere counts as infinite."""
    got, want = got.float().cpu(), want.float().cpu()
    return float(((got - want).abs() / (1 + want.abs())).nan_to_num(nan=math.inf).max())


def run(device: str) -> dict[str, Any]:
    """Over each pool (``POOLS``): capture at ``GRAPH_BS`` with nothing planned, replay ``STEPS``; a pool's ``ok``
    holds when each step's graphed output equals the eager one (bit-equal on CPU, within the tolerance on CUDA) and
    the reference within the tolerance, the windows matter, every break was recorded and some layer was
    restricted (over rows every layer is the plugin's)."""
    shape = CUDA_SHAPE if device == "cuda" else CPU_SHAPE
    pools = {}
    with one_rank():
        for name, config in POOLS.items():
            try:
                pools[name] = _replay_steps(standin_backend(device, shape, config), shape, device, config)
            except Exception as exc:  # one pool's failure is its finding; the other still runs
                pools[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    return {"ok": all(p["ok"] for p in pools.values()), "device": device,
            "shape": {"q_heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.dim,
                      "dtype": str(shape.dtype)}, "graph_bs": GRAPH_BS, "captured_segments": device == "cuda",
            "note": ("SGLang's breakable capture and replay, FlashInfer decode in the breaks" if device == "cuda" else
                     "a stub capture (no CUDA): SGLang's eager_on_graph records the breaks, a replay calls them"),
            "pools": pools}


def _replay_steps(backend: Any, shape: Shape, device: str, config: SlkvConfig) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    # the step's queries and new KV, refilled before each replay as SGLang's load_batch refills the graph's inputs
    q_in = [torch.zeros(GRAPH_BS, shape.heads * shape.dim, dtype=shape.dtype, device=device) for _ in range(LAYERS)]
    k_in = [torch.zeros(GRAPH_BS, shape.kv_heads, shape.dim, dtype=shape.dtype, device=device) for _ in range(LAYERS)]
    v_in = [torch.zeros(GRAPH_BS, shape.kv_heads, shape.dim, dtype=shape.dtype, device=device) for _ in range(LAYERS)]
    static = decode_batch([0] * GRAPH_BS, [1] * GRAPH_BS, [0] * GRAPH_BS, device)
    # On CUDA captured segments hand each break its inputs and take its output, as a model's projections do (a
    # copy each side); a stub capture replays no segment, so there the breaks read the inputs themselves.
    segments = device == "cuda"

    def forward() -> list[torch.Tensor]:
        outs = []
        for layer in range(LAYERS):
            q, k, v = (t[layer] * 1 if segments else t[layer] for t in (q_in, k_in, v_in))
            out = backend.forward_decode(q, k, v, backend.layers[layer], static)
            outs.append(out * 1 if segments else out)
        return outs

    if config.offload:  # every free row but those the steps' new tokens take: the padding must need none
        rows = backend.pool.tier.rows
        rows.take(rows.free - sum(len(reqs) for reqs, _ in STEPS) * rows.num_units)
    backend.plan_graph_step(GRAPH_BS, in_capture=True)
    forward()  # warm-up, eager, as SGLang's runner does before a capture (JIT kernels load outside it)
    with capture(device) as graph:
        outs = forward()
    report: dict[str, Any] = {"breaks": len(graph.breaks), "steps": []}
    lazy = backend.tracker.lazy
    reference_tol = shape.tol or CPU_REFERENCE_ATOL
    # on CPU every tensor is the host's: the plan's host-side work cannot be told apart, the replay's reads count
    reads_of = device if device == "cuda" else None
    for reqs, pattern in STEPS:
        for idx, heads in pattern.items():  # each listed head stands for kv_heads / 2 of them
            lazy[idx] = torch.tensor(heads, dtype=torch.bool).repeat_interleave(shape.kv_heads // 2, dim=1)
        indices, seq_lens, new_slots = map(list, zip(*reqs))
        raw = decode_batch(indices, seq_lens, new_slots, device)
        for idx, n, slot in reqs:  # the scheduler's allocation of the step's token
            backend.req_to_token_pool.req_to_token[idx, n - 1] = slot
        for tensors in (q_in, k_in, v_in):
            for t in tensors:
                t.copy_(torch.randn(t.shape, generator=gen))
        stage(backend, raw.batch_size, config)
        admitted = backend.admit_graph(raw)
        load(static, raw)
        with HostReads(reads_of) as plan_reads:
            backend.plan_graph_step(GRAPH_BS, in_capture=False)  # init_forward_metadata_out_graph at replay
        planned = backend.tracker.plan_.req_pool_indices == indices
        restricted = [l for l in range(LAYERS) if backend._paged.restricts(l)]
        with HostReads(reads_of) as replay_reads:
            graph.replay()
        graphed = [o[: raw.batch_size].clone() for o in outs]
        want = reference_step(backend, shape, raw, q_in, k_in, v_in, lazy, config)
        none_lazy = {i: torch.zeros_like(lazy[i]) for i in indices}
        unrestricted = reference_step(backend, shape, raw, q_in, k_in, v_in, none_lazy, config)
        eager = eager_step(backend, raw, q_in, k_in, v_in, config)
        vs_eager = max(_error(g, e) for g, e in zip(graphed, eager))
        vs_reference = max(_error(g, w) for g, w in zip(graphed, want))
        # what the windows change, so that output close to the reference cannot come from ignoring them
        lazy_layers = [l for l in range(LAYERS) if any(bool(lazy[i][l].any()) for i in indices)]
        window_effect = min(_error(unrestricted[l], want[l]) for l in lazy_layers) if lazy_layers else 0.0
        report["steps"].append({
            "batch": raw.batch_size, "admitted": admitted, "planned_live_batch": planned,
            "restricted_layers": restricted, "lazy_layers": lazy_layers, "graphed_vs_eager": vs_eager,
            "graphed_vs_reference": vs_reference, "window_effect": window_effect,
            # on CUDA the host's waits for the device: planning the step, and in the replay's breaks
            "host_reads": {"plan": plan_reads.count if reads_of else None, "replay": replay_reads.count},
            "ok": admitted and planned and bool(lazy_layers) and set(lazy_layers) <= set(restricted)
            and vs_eager <= shape.tol
            and vs_reference <= reference_tol and window_effect > WINDOW_EFFECT_FACTOR * reference_tol})
    report["ok"] = report["breaks"] == LAYERS and all(s["ok"] for s in report["steps"])
    return report


def main(argv: list[str]) -> int:
    """``python -m slkv_sglang.tools.graph_check cpu|cuda``: the report as one JSON line (``gpu_e2e`` runs it in a
    process of its own, so that a CUDA fault here cannot take the engines' checks down with it)."""
    report = run(argv[0] if argv else "cpu")
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

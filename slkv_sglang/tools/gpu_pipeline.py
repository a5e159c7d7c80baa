"""Device-check sections for ``--slkv-offload``'s moves on CUDA (``slkv gpu-check``), run through the plugin's own
``KvTier`` and ``KvExecutor``:

- ``offload_pipeline``: a returning 4K conversation, Llama-3-8B shapes. Its lazy units' middle rows went to the
  host (``release_lazy``); the next turn's prefill reloads them layer-pipelined (``KvExecutor.restore``: every
  reload issued at the first layer on the copy stream, each layer waiting for its own fence) while the layers
  compute. Checked: the rows that come back equal the KV that left, bit for bit, with compute running on the other
  stream. Measured: the reload's bandwidth against one plain pinned copy of the same bytes (goal >= 0.85x), and the
  share of the reload hidden behind the prefill's compute (goal >= 70%).
- ``decode_overhead``: one decode step at batch 64 over the row pool, 4K contexts, half the layers lazy: the
  host planning (``WindowedDecode.plan``) and each layer's page gather into the plan against the step (attention
  plus the layer's matmuls); goal <= 5% of the step.

Without CUDA both run at small sizes with torch in place of FlashInfer, to check their plumbing (their timings
then say nothing about a GPU).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..backends.flashinfer_ops import AttnShape, WindowedDecode, head_entries
from ..kv.executor import KvExecutor
from ..kv.fingerprint import prefix_fingerprints
from ..kv.step import KvStep, RequestStep
from ..kv.tier import KvTier
from ..scoring import window_slots


@dataclass(frozen=True)
class Model:
    """The attention and matmul shapes a section runs at."""

    layers: int
    heads: int
    kv_heads: int
    dim: int
    hidden: int
    mlp: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        assert self.heads * self.dim == self.hidden, "the o projection maps the heads back to the hidden size"

    @property
    def attn(self) -> AttnShape:
        return AttnShape(self.heads, self.kv_heads, self.dim, self.dtype, self.dtype)


LLAMA3_8B = Model(32, 32, 8, 128, 4096, 14336, torch.bfloat16)  # its config.json
TINY = Model(2, 4, 2, 32, 128, 256, torch.float32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms(fn: Callable[[], Any], device: torch.device, iters: int, before: Callable[[], Any] = lambda: None) -> float:
    """Median wall milliseconds of ``fn`` (``before`` runs untimed ahead of each), device work included."""
    times = []
    for _ in range(iters + 1):  # the first run warms up
        before()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


class _Layer:
    """A decoder layer's work without its KV: the q/k/v/o and MLP matmuls over ``tokens`` rows, and (``keys`` > 0)
    causal attention of the new tokens over ``keys`` keys. Weights shared by all layers (only time matters)."""

    def __init__(self, m: Model, tokens: int, keys: int, device: torch.device):
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, device=device, dtype=m.dtype) * 0.02

        self.x = rand(tokens, m.hidden)
        self.qkv, self.o = rand(m.hidden, (m.heads + 2 * m.kv_heads) * m.dim), rand(m.heads * m.dim, m.hidden)
        self.up, self.down = rand(m.hidden, 2 * m.mlp), rand(m.mlp, m.hidden)
        self.q = rand(1, m.heads, tokens, m.dim) if keys else None
        self.kv = rand(1, m.heads, keys, m.dim) if keys else None
        self.mlp = m.mlp

    def __call__(self) -> None:
        self.x @ self.qkv
        if self.q is not None:
            keys = self.kv.shape[2]
            mask = torch.ones(self.q.shape[2], keys, dtype=torch.bool, device=self.x.device).tril(keys - self.q.shape[2])
            torch.nn.functional.scaled_dot_product_attention(self.q, self.kv, self.kv, attn_mask=mask)
        self.x @ self.o
        gate_up = self.x @ self.up
        gate_up[:, : self.mlp] @ self.down


def offload_pipeline(device: torch.device, m: Model = LLAMA3_8B, history: int = 4096, new_tokens: int = 512,
                     sink: int = 4, recent: int = 1020, lazy_share: float = 0.5, iters: int = 5) -> dict[str, Any]:
    """See the module docstring; ``lazy_share`` of each layer's KV heads lazy (a row per KV head)."""
    gen = torch.Generator().manual_seed(7)
    units = m.kv_heads
    slots_total = history + new_tokens + 1
    tier = KvTier.build(m.layers, units, slots_total, m.layers * units * slots_total, heads=m.kv_heads, dim=m.dim,
                        dtype=m.dtype, device=device, host_budget=1 << 40, poison=True,
                        host_prepin=0)
    executor = KvExecutor(tier, sink, recent, strict=True)
    req_to_token = torch.randperm(slots_total - 1, generator=gen).add(1).view(1, -1).to(device)
    slots = req_to_token[0, :history].to(torch.int64)
    ids = torch.randint(0, 32000, (history,), generator=gen)
    step = KvStep([RequestStep(None, "r", "conversation", 0, prefix_fingerprints(ids), None)])
    kv = [(torch.randn(history, m.kv_heads, m.dim, generator=gen).to(device, m.dtype),
           torch.randn(history, m.kv_heads, m.dim, generator=gen).to(device, m.dtype)) for _ in range(m.layers)]
    executor.begin(step)
    for layer, (k, v) in enumerate(kv):
        executor.write(layer, slots, k, v)
    lazy = torch.rand(m.layers, m.kv_heads, generator=gen) < lazy_share

    def release() -> None:  # after the first, the host holds the copies: only the rows go
        executor.begin(step)
        executor.release_lazy(0, lazy, history, req_to_token, None)

    release()
    tier.host.wait()
    layer_work = _Layer(m, new_tokens, history + new_tokens, device)
    restored = tier.stats.restored_rows

    def prefill(reload: bool, compute: bool, check: list[bool] | None = None) -> None:
        executor.begin(step)
        for layer in range(m.layers):
            if reload:
                executor.restore(layer, req_to_token, [history])
            if check is not None:  # read on the compute stream, as the layer's attention would: a missing wait
                got = tier.rows.read(layer, slots)  # reads rows not landed yet (freed rows are NaN: poison)
                check.append(all(torch.equal(a, b) for a, b in zip(got, kv[layer])))
            if compute:
                layer_work()

    checks: list[bool] = []
    prefill(reload=True, compute=True, check=checks)
    _sync(device)
    exact = len(checks) == m.layers and all(checks)
    rows_per_reload = tier.stats.restored_rows - restored
    nbytes = rows_per_reload * tier.rows.row_bytes
    t_reload = _ms(lambda: prefill(reload=True, compute=False), device, iters, before=release)
    t_compute = _ms(lambda: prefill(reload=False, compute=True), device, iters)
    t_both = _ms(lambda: prefill(reload=True, compute=True), device, iters, before=release)
    pin = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    t_plain = _ms(lambda: dst.copy_(src, non_blocking=pin), device, iters)
    hidden = (t_reload + t_compute - t_both) / t_reload
    out = {"history": history, "new_tokens": new_tokens, "layers": m.layers, "lazy_units": int(lazy.sum()),
           "reloaded_bytes": nbytes, "roundtrip_exact": exact, "reload_ms": t_reload, "plain_copy_ms": t_plain,
           "reload_vs_plain": t_plain / t_reload, "compute_ms": t_compute, "both_ms": t_both,
           "hidden_share": max(0.0, min(1.0, hidden))}
    out["ok"] = exact and rows_per_reload == int(lazy.sum()) * (history - sink - recent)
    return out


def decode_overhead(device: torch.device, emulate: bool, m: Model = LLAMA3_8B, batch: int = 64, context: int = 4096,
                    sink: int = 4, recent: int = 1020, iters: int = 5) -> dict[str, Any]:
    """See the module docstring. Every layer's units point at the same rows (the gather's cost is that of its
    index, not of the rows' contents), so the pool holds one layer's KV."""
    from .gpu_check import _decode_wrapper
    from ..backends.torch_paged import TorchPagedDecode
    from ..kv.rows import DeviceRows

    from .gpu_check import _workspace

    gen = torch.Generator().manual_seed(8)
    units, n = m.kv_heads, batch * context
    rows = DeviceRows(m.layers, units, n, units * n, 1, m.dim, m.dtype, device)
    shared = torch.arange(units * n, dtype=torch.int32, device=device).view(units, n)
    rows.row_of[:, :n] = shared.repeat(m.layers, 1)
    req_slots = list(torch.randperm(n, generator=gen).to(device).view(batch, context))
    # laziness is mostly a property of the layer (docs/design.md): half the layers lazy in every KV head for every
    # request, and one request lazy in a single head of two more layers
    lazy_layers = torch.randperm(m.layers, generator=gen)[: m.layers // 2]
    lazy = {pos: torch.zeros(m.layers, m.kv_heads, dtype=torch.bool) for pos in range(batch)}
    for pos in range(batch):
        lazy[pos][lazy_layers] = True
    lazy[0][torch.randperm(m.layers, generator=gen)[:2], 0] = True
    windows = {pos: window_slots(req_slots[pos], context, sink, recent) for pos in range(batch)}
    workspace = None if emulate else _workspace(device)  # one, as SGLang's wrappers share theirs
    new_wrapper = TorchPagedDecode if emulate else (lambda: _decode_wrapper(device, True, workspace))
    decode = WindowedDecode(new_wrapper, m.attn, sink, recent, page_map=rows.page_ids, heads_per_page=1)
    q = torch.randn(batch, m.heads, m.dim, generator=gen).to(device, m.dtype)
    scale = 1 / math.sqrt(m.dim)
    layers = range(m.layers)

    def plan() -> None:
        decode.plan(req_slots, windows, lazy, layers=layers)

    def attend() -> None:
        for layer in layers:
            decode.run(layer, q, (rows.kv[0], rows.kv[1]), sm_scale=scale)

    plan()
    t_plan = _ms(plan, device, iters)
    t_attend = _ms(attend, device, iters)
    # what each layer's run gathers into its plan: the rows of every (request, KV head) pair's entries
    reads = {layer: head_entries(req_slots, torch.stack([lazy[pos][layer] for pos in range(batch)]), sink, recent)[1:]
             for layer in layers}
    t_gather = _ms(lambda: [rows.page_ids(layer, *reads[layer]) for layer in layers], device, iters)
    layer_work = _Layer(m, batch, 0, device)
    t_matmuls = _ms(lambda: [layer_work() for _ in layers], device, iters)
    step = t_plan + t_attend + t_matmuls
    return {"batch": batch, "context": context, "layers": m.layers, "lazy_layers": len(lazy_layers),
            "plan_ms": t_plan, "page_gather_ms": t_gather,
            "attention_ms": t_attend, "matmuls_ms": t_matmuls, "step_ms": step,
            "overhead_share": (t_plan + t_gather) / step, "goal_share": 0.05}

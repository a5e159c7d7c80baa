"""``slkv gpu-check``: what the CUDA path can prove with PyTorch and FlashInfer alone, in one run.

Runs on a bare CUDA machine (no SGLang: its 0.5.23 wheels pin another torch and are ~1.2 GB), against torch
references, on Llama-3-8B's attention shapes (32 q / 8 kv heads, head dim 128, bf16) and the bundled model's
(9 / 3 / 64):

- ``decode``: the restricted decode the backend makes — one decode wrapper per lazy pattern, planned through
  rewritten ``kv_indices`` (``flashinfer_ops.plan_decode``) — equals dense attention over the same slots;
- ``decode_heads``: the backend's per-step plans (``flashinfer_ops.WindowedDecode``) with lazy KV heads, whole
  requests and single (request, KV head) pairs, equal dense attention per KV head over that head's slots;
- ``rows``: ``--slkv-offload``'s reads (``kv.pool.RowKVPool``): decode (``WindowedDecode``) and extend
  (``flashinfer_ops.PagedExtend``, with its log-sum-exp) through per-layer row indices written into one plan per
  pattern, a row per KV head and a row per layer, against torch over the same KV;
- ``scoring``: the backend's scoring (``flashinfer_ops.LseScorer``, prefill with ``return_lse``) equals the
  chunked torch scoring (``scoring.head_mass``) on the same bf16 cache;
- ``scoring_time``: identification per layer against the layer's prefill: ``LseScorer``, torch over all keys, and
  what the backend runs now, torch over the window against the prefill's own log-sum-exp (alone, and as the
  increment it adds to a layer's prefill);
- ``tracker``: the tracker's chunked-prefill decision on the device with that scoring, then decode windows;
- ``decode_time``: decode attention per layer at 4K / 16K / 32K context, lazy (sink + recent) vs full, and the
  per-step attention time with half the layers lazy, plan included;
- ``host_tier``: the host arena's offload / reload GB/s against a plain pinned ``copy_`` and the PCIe link the
  card reports, and how much of an offload hides behind a matmul on the side stream;
- ``offload_pipeline`` and ``decode_overhead`` (``gpu_pipeline``): a 4K conversation's layer-pipelined reload
  through the plugin's executor (bit-exact under compute, bandwidth, share hidden behind the prefill), and the
  row pool's planning and page gathers per decode step at batch 64;
- ``scoring_memory``: peak transient memory of scoring at 32K and 128K keys, unchunked vs chunked vs lse;
- the decode and scoring checks again with an fp8 (e4m3) KV cache and ``k_scale`` / ``v_scale``.

``--dry`` (or no CUDA) runs the parts that need no GPU on the CPU at small sizes and marks the rest skipped.
Writes ``gpu_check.json`` and prints a short table; exit status 1 if a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..backends.flashinfer_ops import (PREFILL_BACKEND, AttnShape, LseScorer, PagedExtend, WindowedDecode,
                                      plan_decode)
from ..backends.torch_paged import TorchPagedDecode, TorchPagedPrefill, dense_decode
from ..scoring import SCORE_CHUNK, gather_keys, head_mass, window_masses, window_slots
from . import gpu_pipeline

SHAPES = {  # name -> (q heads, kv heads, head dim)
    "llama3-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),  # needs FlashInfer to JIT-compile head dim 64 (minutes on first use)
}
SINK, RECENT, LAST = 4, 1020, 32  # the paper's windows (config.py)
DECODE_TOL = 2e-2  # bf16 output vs fp32 reference: |diff| <= tol * (1 + |ref|)
MASS_TOL = 5e-3  # absolute, on masses in [0, 1]: bf16 inputs, fp32 accumulation in both


FP8_SCALE = 0.5  # k_scale = v_scale of the fp8 checks: the cache stores kv / scale, as SGLang's fp8 pool does


def _rand_cache(slots: int, kv_heads: int, dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                hot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random K and V as stored (divided by the fp8 scale); keys at slots ``hot`` are 4x larger."""
    scale = FP8_SCALE if dtype.itemsize == 1 else 1.0
    k, v = (torch.randn(slots, kv_heads, dim, device=device) / scale for _ in range(2))
    if hot is not None:
        k[hot] *= 4
    return k.to(dtype), v.to(dtype)


def _scales(dtype: torch.dtype) -> dict[str, float | None]:
    return {"k_scale": FP8_SCALE, "v_scale": FP8_SCALE} if dtype.itemsize == 1 else {"k_scale": None, "v_scale": None}


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / (1 + |ref|), infinite where ``got`` is NaN (a read of poisoned KV)."""
    return float(((got.float() - ref).abs() / (1 + ref.abs())).nan_to_num(nan=math.inf).max())


def _workspace(device: torch.device) -> torch.Tensor:
    return torch.empty(256 << 20, dtype=torch.uint8, device=device)


def _decode_wrapper(device: torch.device, tensor_cores: bool, workspace: torch.Tensor | None = None) -> Any:
    from flashinfer import BatchDecodeWithPagedKVCacheWrapper

    return BatchDecodeWithPagedKVCacheWrapper(_workspace(device) if workspace is None else workspace, "NHD",
                                              use_tensor_cores=tensor_cores,
                                              backend=PREFILL_BACKEND if tensor_cores else "auto")


def check_decode(name: str, device: torch.device, kv_dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, Any]:
    """Restricted decode through rewritten kv_indices vs dense attention, for three lazy patterns."""
    heads, kv_heads, dim = SHAPES[name]
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [300, 1100, 2000, 4100, 5000, 777]
    slots_total = sum(seq_lens) + 64
    k_cache, v_cache = _rand_cache(slots_total, kv_heads, dim, device, kv_dtype)
    scales = _scales(kv_dtype)
    perm = torch.randperm(slots_total, generator=gen).to(device)  # slots scattered over the pool, like SGLang's
    req_slots, at = [], 0
    for n in seq_lens:
        req_slots.append(perm[at : at + n])
        at += n
    q = torch.randn(len(seq_lens), heads, dim, device=device, dtype=torch.bfloat16)
    scale = 1 / math.sqrt(dim)
    shape = AttnShape(heads, kv_heads, dim, torch.bfloat16, kv_dtype)
    patterns = {"all full": set(), "all lazy": set(range(len(seq_lens))), "mixed": {1, 3, 4}}
    out: dict[str, Any] = {}
    for tensor_cores in (False, True) if kv_dtype == torch.bfloat16 else (True,):  # SGLang: fp8 KV -> tensor cores
        wrapper = _decode_wrapper(device, tensor_cores)
        for label, restricted in patterns.items():
            kv_slots = [window_slots(r, n, SINK, RECENT) if i in restricted else r
                        for i, (r, n) in enumerate(zip(req_slots, seq_lens))]
            plan_decode(wrapper, kv_slots, shape)
            got = wrapper.forward(q, (k_cache, v_cache), sm_scale=scale, **scales).float()  # the backend's call
            err = 0.0
            for i, slots in enumerate(kv_slots):
                ref = dense_decode(q[i], gather_keys(k_cache, slots), gather_keys(v_cache, slots), scale,
                                    scales["k_scale"] or 1.0)
                err = max(err, _rel_err(got[i], ref))
            out[f"{'tensor cores' if tensor_cores else 'cuda cores'}, {label}"] = err
    return {"max_rel_err": out, "tolerance": DECODE_TOL, "ok": all(e <= DECODE_TOL for e in out.values())}


def check_decode_heads(name: str, device: torch.device, kv_dtype: torch.dtype = torch.bfloat16, seed: int = 4,
                       emulate: bool = False) -> dict[str, Any]:
    """``WindowedDecode`` as the backend plans a step: layer 0 has no lazy head (not planned), layer 1 whole
    requests lazy, layers 2 and 3 the same per-(request, KV head) pattern (one wrapper), layer 4 another. Each
    (request, KV head) is compared with dense attention of its query heads over its own slots: sink + recent
    where that head is lazy, all of them elsewhere. Then again with two wrappers allowed, where layer 4 must run
    layer 1's pattern. ``emulate``: torch in place of FlashInfer (dry run)."""
    heads, kv_heads, dim = SHAPES[name]
    q_per_kv = heads // kv_heads
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [300, 1100, 2000, 4100, 3000, 1777]
    slots_total = sum(seq_lens) + 64
    k_cache, v_cache = _rand_cache(slots_total, kv_heads, dim, device, kv_dtype)
    scales = _scales(kv_dtype)
    perm = torch.randperm(slots_total, generator=gen).to(device)
    req_slots = list(perm[: sum(seq_lens)].split(seq_lens))
    q = torch.randn(len(seq_lens), heads, dim, device=device, dtype=torch.bfloat16)
    scale = 1 / math.sqrt(dim)
    lazy = torch.zeros(len(seq_lens), 5, kv_heads, dtype=torch.bool)
    lazy[[1, 3], 1] = True
    lazy[:, 2] = torch.rand(len(seq_lens), kv_heads, generator=gen) < 0.5
    lazy[:, 2, 1] = ~lazy[:, 2, 0]  # every request partly lazy, whatever the draw ...
    lazy[5, 2] = True  # ... but one, lazy in all its heads
    lazy[:, 3] = lazy[:, 2]
    lazy[4, 4, 1:] = True
    lazy[[1, 3], 4] = True  # layer 4's pattern holds layer 1's
    shape = AttnShape(heads, kv_heads, dim, torch.bfloat16, kv_dtype)
    out: dict[str, Any] = {}
    errs, planned, coarsened = [], [], []
    runs = [(tc, None) for tc in ((None,) if emulate else (False, True) if kv_dtype == torch.bfloat16 else (True,))]
    # capped at two wrappers: layers 2-3's pattern (two layers) and layer 1's are planned; layer 4's is left
    # out and runs layer 1's, the planned pattern inside it (request 4's heads read everything)
    runs.append((runs[0][0], 2))
    expected = {None: lazy, 2: lazy.clone()}
    expected[2][:, 4] = lazy[:, 1]
    for tensor_cores, cap in runs:
        shared = None if emulate else _workspace(device)  # the backend's wrappers share SGLang's workspace
        new_wrapper = TorchPagedDecode if emulate else lambda: _decode_wrapper(device, bool(tensor_cores), shared)
        decode = WindowedDecode(new_wrapper, shape, SINK, RECENT, **({"max_patterns": cap} if cap else {}))
        restricted = [pos for pos in range(len(seq_lens)) if bool(lazy[pos].any())]
        decode.plan(req_slots, {pos: window_slots(req_slots[pos], seq_lens[pos], SINK, RECENT) for pos in restricted},
                    {pos: lazy[pos] for pos in restricted})
        label = "torch emulation" if emulate else "tensor cores" if tensor_cores else "cuda cores"
        label += f", {cap} wrappers" if cap else ""
        if cap:
            out[f"{label}, coarsened layers"] = decode.coarsened
            coarsened.append(decode.coarsened)
        for layer in range(5):
            if not bool(expected[cap][:, layer].any()):  # the backend runs SGLang's own decode here
                out[f"{label}, layer {layer} planned"] = decode.restricts(layer)
                planned.append(decode.restricts(layer))
                continue
            got = decode.run(layer, q, (k_cache, v_cache), sm_scale=scale, **scales).float()
            err = 0.0
            for i, (r, n) in enumerate(zip(req_slots, seq_lens)):
                for h in range(kv_heads):
                    slots = window_slots(r, n, SINK, RECENT) if expected[cap][i, layer, h] else r
                    qh = slice(h * q_per_kv, (h + 1) * q_per_kv)  # the query heads of KV head h
                    ref = dense_decode(q[i, qh], gather_keys(k_cache, slots)[:, h : h + 1],
                                        gather_keys(v_cache, slots)[:, h : h + 1], scale, scales["k_scale"] or 1.0)
                    err = max(err, _rel_err(got[i, qh], ref))
            out[f"{label}, layer {layer}"] = err
            errs.append(err)
    return {"max_rel_err": out, "tolerance": DECODE_TOL,
            "ok": max(errs) <= DECODE_TOL and not any(planned) and coarsened == [1]}


def _prefill_wrapper(device: torch.device, workspace: torch.Tensor | None = None) -> Any:
    from flashinfer import BatchPrefillWithPagedKVCacheWrapper

    return BatchPrefillWithPagedKVCacheWrapper(_workspace(device) if workspace is None else workspace, "NHD",
                                               backend=PREFILL_BACKEND)


def check_rows(name: str, device: torch.device, kv_dtype: torch.dtype = torch.bfloat16, seed: int = 5,
               emulate: bool = False) -> dict[str, Any]:
    """Decode and extend through per-layer row indices, as the backend runs them over ``--slkv-offload``'s KV pool
    (``kv.pool.RowKVPool``): ``WindowedDecode`` and ``PagedExtend`` with the page map of a ``DeviceRows``, one plan
    per pattern or forward, each layer's rows written into the plan before it runs. A row per KV head and a row
    per layer; rows differ per layer. The extend is checked (output and log-sum-exp) before the lazy units give
    their middle rows back, the decode after (freed rows are NaN: a read of one shows): every (request, KV head)
    against dense attention over its own slots of the same KV. ``emulate``: torch in place of FlashInfer."""
    from ..kv.rows import DeviceRows

    heads, kv_heads, dim = SHAPES[name]
    q_per_kv, layers = heads // kv_heads, 3
    gen = torch.Generator().manual_seed(seed)
    seq_lens, ext = [300, 1100, 2000, 1500], [1, 64, 200, 37]
    num_slots = sum(seq_lens) + 64
    perm = torch.randperm(num_slots, generator=gen).to(device)
    req_slots = list(perm[: sum(seq_lens)].split(seq_lens))
    used = perm[: sum(seq_lens)]
    caches = [_rand_cache(num_slots, kv_heads, dim, device, kv_dtype) for _ in range(layers)]
    scales = _scales(kv_dtype)
    kv_scale = scales["k_scale"] or 1.0
    scale = 1 / math.sqrt(dim)
    lazy = torch.zeros(len(seq_lens), layers, kv_heads, dtype=torch.bool)  # layer 0: none lazy
    lazy[[1, 3], 1] = True
    lazy[:, 2] = torch.rand(len(seq_lens), kv_heads, generator=gen) < 0.5
    lazy[2, 2] = True
    shape = AttnShape(heads, kv_heads, dim, torch.bfloat16, kv_dtype)
    out: dict[str, Any] = {}
    for per_layer in (kv_heads, 1):
        label = "a row per KV head" if per_layer > 1 else "a row per layer"
        per_unit = kv_heads // per_layer
        rows = DeviceRows(layers, per_layer, num_slots, layers * per_layer * (num_slots + 1), per_unit, dim,
                          kv_dtype, device, poison=True)
        rows.give(rows.take(rows.num_rows)[torch.randperm(rows.num_rows, generator=gen).to(device)])  # scattered
        for layer, (k, v) in enumerate(caches):
            taken = rows.take(per_layer * used.numel()).view(per_layer, -1)
            rows.fill(rows.units(layer), used, taken, torch.ones_like(taken, dtype=torch.bool))
            for u in range(per_layer):
                rows.kv[0][taken[u]] = k[used][:, u * per_unit : (u + 1) * per_unit]
                rows.kv[1][taken[u]] = v[used][:, u * per_unit : (u + 1) * per_unit]
        page_map = rows.page_ids
        # extend: each request's last ``ext`` tokens attend causally to all its KV
        extend = PagedExtend(TorchPagedPrefill() if emulate else _prefill_wrapper(device), shape, page_map, per_unit)
        extend.plan(ext, req_slots, scale)
        q = torch.randn(sum(ext), heads, dim, device=device, dtype=torch.bfloat16)
        o_err = lse_err = 0.0
        for layer, (k, v) in enumerate(caches):
            o, lse = extend.run(layer, q, (rows.kv[0], rows.kv[1]), **scales)
            at = 0
            for r, n in zip(req_slots, ext):
                kk = gather_keys(k, r).float().repeat_interleave(q_per_kv, dim=1) * kv_scale
                vv = gather_keys(v, r).float().repeat_interleave(q_per_kv, dim=1) * kv_scale
                logits = torch.einsum("qhd,khd->hqk", q[at : at + n].float(), kk) * scale
                logits.masked_fill_(torch.arange(len(r), device=device) > torch.arange(len(r) - n, len(r),
                                                                                      device=device)[:, None],
                                    float("-inf"))
                ref = torch.einsum("hqk,khd->qhd", torch.softmax(logits, dim=-1), vv)
                o_err = max(o_err, _rel_err(o[at : at + n], ref))
                lse_err = max(lse_err, float((lse[:, at : at + n].float() - torch.logsumexp(logits, -1)).abs()
                                             .nan_to_num(nan=math.inf).max()))
                at += n
        out[f"{label}, extend"] = o_err
        out[f"{label}, extend lse"] = lse_err
        # lazy units give their middle rows back (NaN), then decode
        for i, (r, n) in enumerate(zip(req_slots, seq_lens)):
            middle = r[SINK : n - RECENT]
            units = lazy[i].view(layers, per_layer, per_unit).all(dim=2).flatten().nonzero().flatten().to(device)
            if middle.numel() and units.numel():
                rows.release(units, middle)
        restricted = [i for i in range(len(seq_lens)) if bool(lazy[i].any())]
        decode = WindowedDecode(TorchPagedDecode if emulate else lambda: _decode_wrapper(device, True), shape,
                                SINK, RECENT, page_map=page_map, heads_per_page=per_unit)
        decode.plan(req_slots, {i: window_slots(req_slots[i], seq_lens[i], SINK, RECENT) for i in restricted},
                    {i: lazy[i] for i in restricted}, layers=range(layers))
        qd = torch.randn(len(seq_lens), heads, dim, device=device, dtype=torch.bfloat16)
        err = 0.0
        for layer, (k, v) in enumerate(caches):
            got = decode.run(layer, qd, (rows.kv[0], rows.kv[1]), sm_scale=scale, **scales).float()
            for i, (r, n) in enumerate(zip(req_slots, seq_lens)):
                for h in range(kv_heads):
                    # where the layer's unit kept its rows (a row per layer: unless every head is lazy) the
                    # decode may read them all; it must read sink + recent where the decision says so
                    slots = window_slots(r, n, SINK, RECENT) if lazy[i, layer, h] else r
                    qh = slice(h * q_per_kv, (h + 1) * q_per_kv)
                    ref = dense_decode(qd[i, qh], gather_keys(k, slots)[:, h : h + 1],
                                        gather_keys(v, slots)[:, h : h + 1], scale, kv_scale)
                    err = max(err, _rel_err(got[i, qh], ref))
        out[f"{label}, decode"] = err
    ok = all(v <= (MASS_TOL * 10 if "lse" in k else DECODE_TOL) for k, v in out.items())
    return {"max_err": out, "tolerance": DECODE_TOL, "lse_tolerance": MASS_TOL * 10, "ok": ok}


def check_scoring(name: str, device: torch.device, kv_dtype: torch.dtype = torch.bfloat16, seed: int = 1) -> dict[str, Any]:
    """LseScorer (FlashInfer prefill, return_lse) vs chunked torch scoring, batched requests, scattered slots."""
    from flashinfer import BatchPrefillWithPagedKVCacheWrapper

    heads, kv_heads, dim = SHAPES[name]
    gen = torch.Generator().manual_seed(seed)
    seq_lens, n_queries = [1500, 4096, 9000, 700], [32, 32, 20, 32]
    slots_total = sum(seq_lens) + 64
    # a few keys that draw most of the attention, so the masses spread over [0, 1] instead of ~ window / L
    hot = torch.randint(0, slots_total, (64,), generator=gen).to(device)
    k_cache, v_cache = _rand_cache(slots_total, kv_heads, dim, device, kv_dtype, hot)
    scales = _scales(kv_dtype)
    perm = torch.randperm(slots_total, generator=gen).to(device)
    key_slots, at = [], 0
    for n in seq_lens:
        key_slots.append(perm[at : at + n])
        at += n
    queries = [torch.randn(n, heads, dim, device=device, dtype=torch.bfloat16) for n in n_queries]
    scale = 1 / math.sqrt(dim)
    scorer = LseScorer(BatchPrefillWithPagedKVCacheWrapper(_workspace(device), "NHD", backend=PREFILL_BACKEND),
                       AttnShape(heads, kv_heads, dim, torch.bfloat16, kv_dtype), SINK, RECENT)
    scorer.plan(n_queries, key_slots, sm_scale=scale)
    got = scorer.mass(queries, (k_cache, v_cache), **scales)
    ref = [head_mass(q, k_cache, s, SINK, RECENT, scale, scales["k_scale"]) for q, s in zip(queries, key_slots)]
    errs = [float((g - r).abs().max()) for g, r in zip(got, ref)]
    return {"max_abs_err": max(errs), "tolerance": MASS_TOL, "ok": max(errs) <= MASS_TOL,
            "mass_range": [float(min(r.min() for r in ref)), float(max(r.max() for r in ref))]}


class _Mode:
    """The two questions the tracker asks of SGLang's ForwardMode."""

    def __init__(self, decode: bool):
        self._decode = decode

    def is_decode(self) -> bool:
        return self._decode

    def is_extend(self) -> bool:
        return not self._decode


def check_tracker(device: torch.device, scorings: tuple[str, ...] = ("lse", "torch")) -> dict[str, Any]:
    """The tracker's prefill decision on the device, as the FlashInfer backend drives it: a 2-chunk prompt
    (the first chunk only keeps its last queries, the second decides), scored with ``LseScorer`` and with the
    torch scoring; then a decode step's windows. The batch object carries what the tracker reads of SGLang's
    ForwardBatch (SGLang itself cannot run on the check machine)."""
    from types import SimpleNamespace

    from ..config import SlkvConfig
    from ..request_params import request_params
    from ..tracker import Decision, LazyTracker

    heads, kv_heads, dim = SHAPES["llama3-8b"]
    layers, prompt, chunk = 4, 6000, 4096
    cfg = SlkvConfig(enabled=True, threshold=0.5)
    scale = 1 / math.sqrt(dim)
    gen = torch.Generator().manual_seed(3)
    req_to_token = torch.zeros(2, 8192, dtype=torch.int32, device=device)
    req_to_token[1, :prompt + 1] = torch.randperm(prompt + 1, generator=gen).to(device, torch.int32)
    caches = [_rand_cache(prompt + 1, kv_heads, dim, device) for _ in range(layers)]
    queries = [torch.randn(prompt, heads, dim, device=device, dtype=torch.bfloat16) for _ in range(layers)]
    for layer in (0, 2):  # lazy layers: every query points at its KV head's sink keys
        u = torch.randn(kv_heads, dim, device=device)
        queries[layer][:] = u.repeat_interleave(heads // kv_heads, dim=0).to(torch.bfloat16)
        caches[layer][0][req_to_token[1, : cfg.sink].long()] = (4 * u).to(torch.bfloat16)
    if "lse" in scorings:
        from flashinfer import BatchPrefillWithPagedKVCacheWrapper

        scorer = LseScorer(BatchPrefillWithPagedKVCacheWrapper(_workspace(device), "NHD", backend=PREFILL_BACKEND),
                           AttnShape(heads, kv_heads, dim, torch.bfloat16, torch.bfloat16), cfg.sink, cfg.recent)

    def forward(tracker: LazyTracker, start: int, end: int, lse: bool) -> list[Decision]:
        last = end == prompt
        tracker.stage([request_params(cfg, "r", None, last)])
        tracker.plan(SimpleNamespace(
            forward_mode=_Mode(False), req_pool_indices=torch.tensor([1], device=device),
            req_pool_indices_cpu=torch.tensor([1]), seq_lens_cpu=torch.tensor([end]), seq_lens=None,
            extend_prefix_lens_cpu=[start], extend_seq_lens_cpu=[end - start]))
        if lse:
            scorer.reset()
        for layer in range(layers):
            k_cache, v_cache = caches[layer]

            def mass(qs: list[torch.Tensor], slots: list[torch.Tensor], lses: list) -> list[torch.Tensor]:
                if not lse:
                    return [head_mass(q, k_cache, s, cfg.sink, cfg.recent, scale) for q, s in zip(qs, slots)]
                if not scorer.matches(qs, slots):
                    scorer.plan([len(q) for q in qs], slots, scale)
                return scorer.mass(qs, (k_cache, v_cache))

            decisions = tracker.score(queries[layer][start:end], layer, mass)
        return decisions

    maps = {}
    for name in scorings:
        tracker = LazyTracker(cfg, layers, kv_heads, 2, req_to_token)
        forward(tracker, 0, chunk, name == "lse")  # nobody decides: the scoring events are read without a sync
        (decision,) = forward(tracker, chunk, prompt, name == "lse")
        maps[name] = decision.layer_map
    tracker.stage([request_params(cfg, "r", None, True)])
    tracker.plan(SimpleNamespace(forward_mode=_Mode(True), req_pool_indices=torch.tensor([1], device=device),
                                 req_pool_indices_cpu=torch.tensor([1]), seq_lens_cpu=torch.tensor([prompt + 1]),
                                 seq_lens=None))
    restricted = [layer for layer in range(layers) if tracker.restricted_positions(layer)]
    window = tracker.window_indices(0) if restricted else None
    expected_window = torch.cat([req_to_token[1, :cfg.sink], req_to_token[1, prompt + 1 - cfg.recent : prompt + 1]])
    first, last = maps[scorings[0]], maps[scorings[-1]]
    score_err = max(abs(a - b) for a, b in zip(first.scores, last.scores))
    return {**{f"lazy_{name}": m.lazy_layers for name, m in maps.items()}, "scores": list(last.scores),
            "score_max_abs_err": score_err, "identification_s": decision.identification_s, "decode_restricted_layers": restricted,
            "ok": (first.lazy == last.lazy and score_err <= MASS_TOL and restricted == last.lazy_layers == [0, 2]
                   and (window is None or torch.equal(window, expected_window)))}


def _cuda_ms(fn: Callable[[], Any], iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _host_ms(fn: Callable[[], Any], iters: int) -> float:
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e3


def decode_time(device: torch.device, batches: tuple[int, ...] = (16, 64), layers: int = 32,
                lazy_share: float = 0.5) -> dict[str, Any]:
    """Per layer decode attention (Llama-3-8B shapes), full vs lazy, and per step with a share of lazy layers."""
    heads, kv_heads, dim = SHAPES["llama3-8b"]
    shape = AttnShape(heads, kv_heads, dim, torch.bfloat16, torch.bfloat16)
    scale = 1 / math.sqrt(dim)
    tensor_cores = heads // kv_heads >= 4  # SGLang's rule for bf16 KV
    out: dict[str, Any] = {"layers": layers, "lazy_share": lazy_share, "tensor_cores": tensor_cores}
    for batch, ctx in ((b, c) for b in batches for c in (4096, 16384, 32768)):
        k_cache, v_cache = _rand_cache(batch * ctx, kv_heads, dim, device)
        req_slots = list(torch.arange(batch * ctx, device=device, dtype=torch.int32).view(batch, ctx))
        q = torch.randn(batch, heads, dim, device=device, dtype=torch.bfloat16)
        full, lazy = _decode_wrapper(device, tensor_cores), _decode_wrapper(device, tensor_cores)
        windows = [window_slots(r, ctx, SINK, RECENT) for r in req_slots]
        plan_decode(full, req_slots, shape)
        plan_decode(lazy, windows, shape)
        t_full = _cuda_ms(lambda: full.forward(q, (k_cache, v_cache), sm_scale=scale), 50)
        t_lazy = _cuda_ms(lambda: lazy.forward(q, (k_cache, v_cache), sm_scale=scale), 50)
        t_plan = _host_ms(lambda: plan_decode(lazy, windows, shape), 20)
        by_head = WindowedDecode(lambda: _decode_wrapper(device, tensor_cores), shape, SINK, RECENT)
        half = {pos: (torch.arange(kv_heads) % 2 == 0).expand(1, kv_heads) for pos in range(batch)}  # half the heads
        by_head.plan(req_slots, dict(enumerate(windows)), half)
        t_heads = _cuda_ms(lambda: by_head.run(0, q, (k_cache, v_cache), sm_scale=scale), 50)
        t_plan_heads = _host_ms(lambda: by_head.plan(req_slots, dict(enumerate(windows)), half), 20)
        n_lazy = round(layers * lazy_share)
        step_full = layers * t_full + t_plan  # SGLang plans its one wrapper per step too
        step_slkv = (layers - n_lazy) * t_full + n_lazy * t_lazy + 2 * t_plan  # + one wrapper per lazy pattern
        out[f"{batch}x{ctx}"] = {"layer_full_ms": t_full, "layer_lazy_ms": t_lazy, "plan_ms": t_plan,
                         "layer_half_heads_lazy_ms": t_heads, "plan_half_heads_ms": t_plan_heads,
                         "step_full_ms": step_full, "step_slkv_ms": step_slkv, "step_speedup": step_full / step_slkv}
        del k_cache, v_cache
        torch.cuda.empty_cache()
    return out


def scoring_time(device: torch.device) -> dict[str, Any]:
    """Identification cost per layer (Llama-3-8B, one request, last 32 queries) against the layer's prefill:
    its causal attention (FlashInfer, as SGLang's extend) plus its dense matmuls (q/k/v/o and the MLP)."""
    from flashinfer import BatchPrefillWithPagedKVCacheWrapper

    heads, kv_heads, dim = SHAPES["llama3-8b"]
    hidden, mlp = 4096, 14336  # Llama-3-8B config
    shape = AttnShape(heads, kv_heads, dim, torch.bfloat16, torch.bfloat16)
    scale = 1 / math.sqrt(dim)
    out: dict[str, Any] = {}
    for ctx in (4096, 32768):
        k_cache, v_cache = _rand_cache(ctx, kv_heads, dim, device)
        slots = torch.arange(ctx, device=device, dtype=torch.int32)
        q_all = torch.randn(ctx, heads, dim, device=device, dtype=torch.bfloat16)
        prefill = BatchPrefillWithPagedKVCacheWrapper(_workspace(device), "NHD", backend=PREFILL_BACKEND)
        prefill.plan(torch.tensor([0, ctx], dtype=torch.int32), torch.tensor([0, ctx], dtype=torch.int32), slots,
                     torch.ones(1, dtype=torch.int32), heads, kv_heads, dim, 1, causal=True, sm_scale=scale,
                     q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        x = torch.randn(ctx, hidden, device=device, dtype=torch.bfloat16)
        weights = [torch.randn(hidden, n, device=device, dtype=torch.bfloat16) / 64
                   for n in ((heads + 2 * kv_heads) * dim, hidden, 2 * mlp)]
        w_down = torch.randn(mlp, hidden, device=device, dtype=torch.bfloat16) / 64
        h = torch.randn(ctx, mlp, device=device, dtype=torch.bfloat16)

        def dense() -> None:
            for w in weights:
                x @ w
            h @ w_down

        scorer = LseScorer(BatchPrefillWithPagedKVCacheWrapper(_workspace(device), "NHD", backend=PREFILL_BACKEND),
                           shape, SINK, RECENT)
        scorer.plan([LAST], [slots], sm_scale=scale)
        q_last = q_all[-LAST:]
        t_attn = _cuda_ms(lambda: prefill.run(q_all, (k_cache, v_cache)), 10)
        t_dense = _cuda_ms(dense, 10)
        t_lse = _cuda_ms(lambda: scorer.mass([q_last], (k_cache, v_cache)), 50)
        t_torch = _cuda_ms(lambda: head_mass(q_last, k_cache, slots, SINK, RECENT, scale), 20)
        t_plan = _host_ms(lambda: scorer.plan([LAST], [slots], sm_scale=scale), 20)
        # what the backend does now: the prefill's own all-keys lse (FlashInfer's is base 2), the window in torch
        _, lse = prefill.run(q_all, (k_cache, v_cache), return_lse=True)
        lse_last = lse[-LAST:].movedim(0, 1).float() * math.log(2)
        long = slots.long()

        def window() -> None:
            window_masses([q_last], k_cache, [long], [lse_last], SINK, RECENT, scale)

        t_window = _cuda_ms(window, 50)
        # inside a forward the host issues ahead of a busy device: the window's cost is its increment there
        t_layer_with = _cuda_ms(lambda: (prefill.run(q_all, (k_cache, v_cache), return_lse=True), dense(), window()), 10)
        layer = t_attn + t_dense
        out[str(ctx)] = {"prefill_attention_ms": t_attn, "prefill_dense_ms": t_dense, "lse_scoring_ms": t_lse,
                         "torch_scoring_ms": t_torch, "lse_plan_ms_per_forward": t_plan,
                         "window_scoring_ms": t_window, "layer_with_window_ms": t_layer_with,
                         "lse_share_of_layer_prefill": t_lse / layer, "torch_share_of_layer_prefill": t_torch / layer,
                         "window_share_of_layer_prefill": t_window / layer,
                         "window_increment_share": (t_layer_with - layer) / layer}
        del k_cache, v_cache, q_all, x, h, weights, w_down
        torch.cuda.empty_cache()
    return out


def _pcie(device: torch.device) -> dict[str, Any]:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        gen, width = pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h), pynvml.nvmlDeviceGetCurrPcieLinkWidth(h)
        max_gen, max_width = pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h), pynvml.nvmlDeviceGetMaxPcieLinkWidth(h)
    except Exception as exc:  # the figure is context only; the check goes on without it
        return {"error": repr(exc)}
    per_lane = {3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}  # GB/s per lane after line coding (PCI-SIG specs)
    return {"gen": gen, "width": width, "max_gen": max_gen, "max_width": max_width,
            "link_GBps": per_lane.get(max_gen, float("nan")) * max_width}


def _roundtrip_exact(device: torch.device, dtype: torch.dtype, kv_heads: int, dim: int) -> bool:
    """Offload in two turns, forget the tail, reload: the bytes that come back are the bytes that went out."""
    from offload import HostArena

    arena = HostArena(1 << 30, num_units=1, num_slots=5000, device=device)
    kv = torch.randn(5000, 2, kv_heads, dim, device=device).to(dtype)
    slots, fps = torch.arange(5000), torch.arange(5000) * 7
    arena.save(arena.new_entry(), "a", [0], slots[4:3000], fps[4:3000], kv[4:3000])
    arena.save(arena.new_entry(), "a", [0], slots[4:4800], fps[4:4800], kv[4:4800])  # only [3000, 4800) copied
    arena.forget(slots[4000:4800])  # while those copies may still be in flight
    back = torch.empty_like(kv[4:4000])
    ok = arena.reload([0], slots[4:4000], fps[4:4000], back, reader="a")
    arena.wait()
    return ok and torch.equal(back, kv[4:4000]) and not bool(arena.hosted(slots[4000:4800]).any())


def host_tier(device: torch.device, tokens: int, layers: int) -> dict[str, Any]:
    """The arena's offload / reload bandwidth vs plain pinned copies, and offload overlapped with a matmul."""
    from offload import HostArena
    from .bench_offload import bandwidth

    kv_heads, dim = SHAPES["llama3-8b"][1:]
    dtype = torch.bfloat16
    nbytes, secs = bandwidth(tokens, RECENT + SINK, layers, kv_heads, dim, 11, device, dtype)
    out: dict[str, Any] = {"bytes": nbytes, "GBps": {k: nbytes / s / 1e9 for k, s in secs.items()},
                           "roundtrip_exact": _roundtrip_exact(device, dtype, kv_heads, dim)}
    out["ok"] = out["roundtrip_exact"]
    if device.type != "cuda":
        return out
    out["pcie"] = _pcie(device)
    kv = [torch.randn(tokens - RECENT - SINK, 2, kv_heads, dim, device=device).to(dtype) for _ in range(layers)]
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    middle = tokens - RECENT - SINK
    arena = HostArena(4 * nbytes, num_units=layers, num_slots=middle, device=device)
    slots, fps = torch.arange(1, middle + 1), torch.arange(middle)

    def matmuls() -> None:
        for _ in range(8):
            a @ a

    def save() -> torch.Tensor:
        entry = arena.new_entry()
        for layer, t in enumerate(kv):
            arena.save(entry, "bench", [layer], slots, fps, t)
        return slots

    def finish(held: torch.Tensor) -> None:
        arena.wait()
        arena.forget(held)

    def both() -> None:
        sid = save()  # copies queue on the side stream first, then the matmuls on the compute stream
        matmuls()
        torch.cuda.synchronize()
        finish(sid)

    finish(save())  # the arena's pinned blocks exist from here on, as in a running engine
    t_mm = _host_ms(lambda: (matmuls(), torch.cuda.synchronize()), 5)
    t_off = _host_ms(lambda: finish(save()), 5)
    t_both = _host_ms(both, 5)
    out["overlap"] = {"matmul_ms": t_mm, "offload_ms": t_off, "both_ms": t_both,
                      "hidden_share": (t_mm + t_off - t_both) / min(t_mm, t_off)}
    return out


def _peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0  # net bytes each op allocated itself, in time order (frees outside ops are "[memory]" events)
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def scoring_memory(device: torch.device, lengths: tuple[int, ...]) -> dict[str, Any]:
    """Scoring's transient memory per layer and request: all keys at once vs chunks vs FlashInfer's lse."""
    heads, kv_heads, dim = SHAPES["llama3-8b"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scale = 1 / math.sqrt(dim)
    out: dict[str, Any] = {"chunk": SCORE_CHUNK}
    for n in lengths:
        k_cache = torch.randn(n, kv_heads, dim, device=device).to(dtype)
        slots = torch.arange(n, device=device)
        q = torch.randn(LAST, heads, dim, device=device).to(dtype)
        rec: dict[str, Any] = {
            "unchunked_MiB": _peak_bytes(lambda: head_mass(q, k_cache, slots, SINK, RECENT, scale, chunk=n), device),
            "chunked_MiB": _peak_bytes(lambda: head_mass(q, k_cache, slots, SINK, RECENT, scale), device),
        }
        same = head_mass(q, k_cache, slots, SINK, RECENT, scale, chunk=n) - head_mass(q, k_cache, slots, SINK, RECENT, scale)
        rec["chunked_vs_unchunked_max_abs"] = float(same.abs().max())
        if device.type == "cuda":
            from flashinfer import BatchPrefillWithPagedKVCacheWrapper

            scorer = LseScorer(BatchPrefillWithPagedKVCacheWrapper(_workspace(device), "NHD", backend=PREFILL_BACKEND),
                               AttnShape(heads, kv_heads, dim, dtype, dtype), SINK, RECENT)
            v_cache = torch.randn_like(k_cache)
            scorer.plan([LAST], [slots], sm_scale=scale)
            rec["lse_MiB"] = _peak_bytes(lambda: scorer.mass([q], (k_cache, v_cache)), device)
        out[str(n)] = {k: (v / 2**20 if k.endswith("MiB") else v) for k, v in rec.items()}
    return out


def run(dry: bool, out_dir: Path, jit_shapes: bool) -> dict[str, Any]:
    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    report: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                              "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)"}
    if cuda:
        import flashinfer

        report["flashinfer"] = flashinfer.__version__
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check.json"

    def section(name: str, fn: Callable[[], Any], needs_cuda: bool = True) -> None:
        if needs_cuda and not cuda:
            report[name] = "skipped: needs CUDA and FlashInfer"
        else:
            t0 = time.perf_counter()
            try:
                report[name] = fn()
            except Exception as exc:  # one broken part must not hide the others' figures
                report[name] = {"error": f"{type(exc).__name__}: {exc}", "ok": False}
            if isinstance(report[name], dict):
                report[name]["seconds"] = time.perf_counter() - t0
        print(f"== {name}: {json.dumps(report[name], default=str)[:600]}", flush=True)
        path.write_text(json.dumps(report, indent=2, default=str))  # what ran survives a timeout later on

    section("decode_llama3-8b", lambda: check_decode("llama3-8b", device))
    section("decode_heads_llama3-8b", lambda: check_decode_heads("llama3-8b", device, emulate=not cuda),
            needs_cuda=False)
    section("rows_llama3-8b", lambda: check_rows("llama3-8b", device, emulate=not cuda), needs_cuda=False)
    section("scoring_llama3-8b", lambda: check_scoring("llama3-8b", device))
    section("tracker_llama3-8b", lambda: check_tracker(device))
    section("decode_time", lambda: decode_time(device))
    section("scoring_time", lambda: scoring_time(device))
    section("host_tier", lambda: host_tier(device, 4096, 16) if cuda else host_tier(device, 2048, 2), needs_cuda=False)
    section("scoring_memory", lambda: scoring_memory(device, (32768, 131072) if cuda else (8192,)), needs_cuda=False)
    small = {} if cuda else {"m": gpu_pipeline.TINY, "recent": 64}  # dry: the plumbing, at small sizes
    section("offload_pipeline", lambda: gpu_pipeline.offload_pipeline(
        device, **small, **({} if cuda else {"history": 600, "new_tokens": 32, "iters": 1})), needs_cuda=False)
    section("decode_overhead", lambda: gpu_pipeline.decode_overhead(
        device, emulate=not cuda, **small, **({} if cuda else {"batch": 4, "context": 600, "iters": 1})),
        needs_cuda=False)
    if jit_shapes:
        section("decode_smollm2-135m", lambda: check_decode("smollm2-135m", device))
        section("decode_heads_smollm2-135m", lambda: check_decode_heads("smollm2-135m", device, emulate=not cuda),
                needs_cuda=False)
        section("scoring_smollm2-135m", lambda: check_scoring("smollm2-135m", device))
        fp8 = torch.float8_e4m3fn
        section("scoring_llama3-8b_fp8", lambda: check_scoring("llama3-8b", device, fp8))
        section("decode_llama3-8b_fp8", lambda: check_decode("llama3-8b", device, fp8))
        section("decode_heads_llama3-8b_fp8", lambda: check_decode_heads("llama3-8b", device, fp8, emulate=not cuda),
                needs_cuda=False)
        section("rows_llama3-8b_fp8", lambda: check_rows("llama3-8b", device, fp8, emulate=not cuda), needs_cuda=False)
    return report


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="slkv gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="run only what needs no GPU, on the CPU, at small sizes")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for gpu_check.json (default: .)")
    p.add_argument("--no-jit-shapes", dest="jit_shapes", action="store_false",
                   help="skip the bundled model's head dim 64 and the fp8 KV checks, which FlashInfer compiles on "
                        "first use (minutes)")
    args = p.parse_args(argv)
    report = run(args.dry, args.out, args.jit_shapes)
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"device: {report['device']}  torch {report['torch']}  flashinfer {report.get('flashinfer', '-')}")
    for key in [k for k, v in report.items() if isinstance(v, dict) and "ok" in v]:
        print(f"  {key:<22} {'ok' if report[key]['ok'] else 'FAILED'}")
    if isinstance(report.get("decode_time"), dict):
        for key, r in report["decode_time"].items():
            if isinstance(r, dict):
                print(f"  decode {key:>8}: layer full {r['layer_full_ms']:.3f} ms, lazy {r['layer_lazy_ms']:.3f} ms, "
                      f"step x{r['step_speedup']:.2f}")
    print("failed: " + (", ".join(failed) if failed else "none"))
    return 1 if failed else 0

"""Decode CUDA graphs with SimLayerKV (SGLang's breakable backend): the FlashInfer code path's decode attention as
an eager break, re-planned per step, and the veto that sends a batch eagerly.

A CUDA graph capture cannot run on CPU, so ``capture`` sets SGLang's capture context variable to a stub capture
(segments are no-ops); SGLang's real ``eager_on_graph`` then records the plugin's break functions over CPU tensors
(``_weak_ref_if_tensor`` leaves them as they are), and a replay calls them in order as
``BreakableCUDAGraph.replay`` does between segments. The backend is the FlashInfer code path with torch kernels
(``SlkvFlashInferStandinBackend``) over SGLang's real pools."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph import breakable_cuda_graph as bcg
from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph.context import enable_breakable_cuda_graph

from slkv_sglang.backends import common, torch_native
from slkv_sglang.config import SlkvConfig
from slkv_sglang.hooks.scheduler import admit_graph
from slkv_sglang.kv.pool import pool_class
from slkv_sglang.report import Outbox
from slkv_sglang.request_params import request_params
from slkv_sglang.tools import reference

CFG = SlkvConfig(enabled=True, sink=2, recent=6, flashinfer_standin=True)
LAYERS, HEADS, KV_HEADS, DIM = 3, 4, 2, 8
BS = 4  # the captured graph's batch size
SLOTS = 512


@pytest.fixture
def backend(monkeypatch):
    """The stand-in backend over SGLang's real pools; the runner is a plain holder of them (its parallel config is
    published only inside an engine: one rank here)."""
    for module in (common, torch_native):
        monkeypatch.setattr(module, "get_parallel", lambda: SimpleNamespace(tp_size=1))
    kv = pool_class(CFG)(size=SLOTS, page_size=1, dtype=torch.float32, head_num=KV_HEADS, head_dim=DIM,
                         layer_num=LAYERS, device="cpu", enable_memory_saver=False)
    gen = torch.Generator().manual_seed(0)
    for layer in range(LAYERS):
        kv.k_buffer[layer].copy_(torch.randn(kv.k_buffer[layer].shape, generator=gen))
        kv.v_buffer[layer].copy_(torch.randn(kv.v_buffer[layer].shape, generator=gen))
    req_to_token = ReqToTokenPool(size=8, max_context_len=64, device="cpu", enable_memory_saver=False)
    rows = req_to_token.req_to_token
    rows[1:, :50].copy_(torch.randperm(490, generator=gen)[: 8 * 50].view(8, 50) + 1)  # scattered; 501+: new tokens
    layers = [RadixAttention(HEADS, DIM, DIM ** -0.5, KV_HEADS, i) for i in range(LAYERS)]
    model_config = SimpleNamespace(num_hidden_layers=LAYERS, num_attention_heads=HEADS, hf_text_config=None,
                                   get_total_num_kv_heads=lambda: KV_HEADS)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=req_to_token, token_to_kv_pool=kv,
                             model_config=model_config, model=torch.nn.ModuleList(layers))
    b = torch_native.SlkvFlashInferStandinBackend(runner, CFG, Outbox())
    b.layers = layers
    return b


@contextmanager
def capture():
    """SGLang's capture context with a stub in place of ``BreakableCUDAGraphCapture`` (no CUDA graph on CPU)."""
    stub = SimpleNamespace(_end_current_segment=lambda: None, _begin_new_segment=lambda: None, _barrier_fn=None,
                           cuda_graph=SimpleNamespace(_break_fns=[]))
    token = bcg._current_capture_var.set(stub)
    try:
        with enable_breakable_cuda_graph():
            yield stub.cuda_graph._break_fns
    finally:
        bcg._current_capture_var.reset(token)


def decode_batch(indices, seq_lens, out_cache_loc, batch_size=None) -> ForwardBatch:
    n = batch_size or len(indices)
    return ForwardBatch(forward_mode=ForwardMode.DECODE, batch_size=n, input_ids=torch.zeros(n, dtype=torch.long),
                        req_pool_indices=torch.tensor(indices), req_pool_indices_cpu=torch.tensor(indices),
                        seq_lens=torch.tensor(seq_lens), seq_lens_cpu=torch.tensor(seq_lens),
                        out_cache_loc=torch.tensor(out_cache_loc), seq_lens_sum=sum(seq_lens))


def stage(backend, n: int, cfg: SlkvConfig = CFG) -> None:
    """What ``stage_forward`` does before each forward (ForwardBatch.init_new)."""
    backend.tracker.stage([request_params(cfg, f"r{i}", None, True) for i in range(n)])


def load(static: ForwardBatch, raw: ForwardBatch) -> None:
    """SGLang's ``load_batch``: the live batch into the graph's buffers, padded with req_pool_idx 0, sequence length
    1 (FlashInfer's fill value) and slot 0."""
    n = raw.batch_size
    for name, fill in (("req_pool_indices", 0), ("seq_lens", 1), ("seq_lens_cpu", 1), ("out_cache_loc", 0)):
        buf = getattr(static, name)
        buf.fill_(fill)
        buf[:n].copy_(getattr(raw, name))


def expected(backend, raw: ForwardBatch, q, k, v, lazy: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """The project's reference decode attention (``tools/reference.py``), per request over its slots (the new
    token's KV included), sink + recent in its lazy KV heads."""
    pool, r2t = backend.pool, backend.req_to_token_pool.req_to_token
    outs = []
    for layer in range(LAYERS):
        rows = []
        for pos, (idx, n) in enumerate(zip(raw.req_pool_indices.tolist(), raw.seq_lens.tolist())):
            slots = r2t[idx, :n].long()
            keys, values = pool.k_buffer[layer][slots].clone(), pool.v_buffer[layer][slots].clone()
            keys[-1], values[-1] = k[layer][pos], v[layer][pos]  # the step's own token
            run = reference._Run(CFG, lazy={layer: lazy[idx][layer]} if bool(lazy[idx][layer].any()) else {})
            out, _ = reference._attention(run, SimpleNamespace(layer_idx=layer), q[layer][pos].view(1, HEADS, 1, DIM),
                                          keys.movedim(0, 1)[None], values.movedim(0, 1)[None], None,
                                          scaling=DIM ** -0.5)
            rows.append(out.reshape(HEADS * DIM))
        outs.append(torch.stack(rows))
    return outs


def eager(backend, raw: ForwardBatch, q, k, v) -> list[torch.Tensor]:
    stage(backend, raw.batch_size)
    backend.init_forward_metadata(raw)
    n = raw.batch_size
    return [backend.forward_decode(q[layer][:n], k[layer][:n], v[layer][:n], backend.layers[layer], raw).clone()
            for layer in range(LAYERS)]


def test_captured_decode_replays_each_steps_lazy_pattern(backend):
    """Captured once at batch 4 with nothing planned, the decode breaks replay two steps of other batches (3, then 2
    requests) and other lazy patterns (whole layers, single KV heads): each step equals the eager forward
    and the reference, and the padded row never reaches a real request's output."""
    gen = torch.Generator().manual_seed(1)
    q = [torch.zeros(BS, HEADS * DIM) for _ in range(LAYERS)]  # the segments' outputs the breaks read
    k = [torch.zeros(BS, KV_HEADS, DIM) for _ in range(LAYERS)]
    v = [torch.zeros(BS, KV_HEADS, DIM) for _ in range(LAYERS)]
    static = decode_batch([0] * BS, [1] * BS, [0] * BS)
    backend.plan_graph_step(BS, in_capture=True)
    with capture() as breaks:
        outs = [backend.forward_decode(q[l], k[l], v[l], backend.layers[l], static) for l in range(LAYERS)]
    assert len(breaks) == LAYERS  # one break per full-attention layer

    lazy = backend.tracker.lazy
    steps = [  # (req_pool_idx, seq_len, new slot), lazy [layers, KV heads] per request
        ([(1, 30, 501), (2, 25, 502), (3, 40, 503)],
         {1: [[1, 1], [0, 0], [1, 0]], 2: [[1, 1], [0, 1], [0, 0]], 3: [[0, 0], [0, 0], [0, 0]]}),
        ([(3, 41, 504), (1, 31, 505)], {3: [[0, 1], [1, 1], [0, 0]], 1: [[0, 0], [0, 0], [0, 0]]}),
    ]
    for reqs, pattern in steps:
        for idx, heads in pattern.items():
            lazy[idx] = torch.tensor(heads, dtype=torch.bool)
        raw = decode_batch(*map(list, zip(*reqs)))
        for idx, n, slot in reqs:  # the scheduler's allocation of the step's token
            backend.req_to_token_pool.req_to_token[idx, n - 1] = slot
        for l in range(LAYERS):
            for t in (q[l], k[l], v[l]):
                t.copy_(torch.randn(t.shape, generator=gen))
        stage(backend, raw.batch_size)
        assert backend.admit_graph(raw)
        load(static, raw)
        backend.plan_graph_step(BS, in_capture=False)  # init_forward_metadata_out_graph at replay
        with enable_breakable_cuda_graph():
            for replay_fn in breaks:
                replay_fn()
        graphed = [o[: raw.batch_size].clone() for o in outs]
        ref = expected(backend, raw, q, k, v, lazy)
        assert backend.tracker._staged is None and backend.tracker.plan_.req_pool_indices == raw.req_pool_indices.tolist()
        for got, want, eager_out in zip(graphed, ref, eager(backend, raw, q, k, v)):
            assert torch.equal(got, eager_out)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert any(backend._paged.restricts(l) for l in range(LAYERS))


def test_replay_needs_an_admitted_batch(backend):
    """A replay whose batch the veto never saw would plan a stale or no batch: it stops instead."""
    with pytest.raises(RuntimeError, match="did not admit"):
        backend.plan_graph_step(BS, in_capture=False)


def test_a_request_deciding_at_its_first_decode_step_runs_eagerly(backend):
    """``--slkv-mode decode``: the first decode step scores (a host sync per decision); that batch goes to the eager
    forward, through SGLang's ``can_run_graph`` hook; after the decision, its batches replay."""
    decode_mode = SlkvConfig(enabled=True, sink=2, recent=6, mode="decode")
    stage(backend, 1, decode_mode)
    backend.tracker.plan(ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=1, input_ids=torch.zeros(30, dtype=torch.long),
        req_pool_indices=torch.tensor([1]), req_pool_indices_cpu=torch.tensor([1]), seq_lens=torch.tensor([30]),
        seq_lens_cpu=torch.tensor([30]), out_cache_loc=torch.arange(30), seq_lens_sum=30,
        extend_prefix_lens_cpu=[0], extend_seq_lens_cpu=[30]))
    runner = SimpleNamespace(attn_backend=backend)
    deciding, other = decode_batch([1, 2], [31, 20], [501, 502]), decode_batch([2], [20], [502])
    assert admit_graph(True, runner, deciding) is False and backend._graph_batch is None
    assert admit_graph(False, runner, other) is False  # SGLang's own no stands
    assert admit_graph(True, runner, other) is True and backend._graph_batch is other
    stage(backend, 2)
    backend.init_forward_metadata(deciding)  # the eager step scores and decides (the tracker no longer awaits)
    assert admit_graph(True, runner, deciding) is True

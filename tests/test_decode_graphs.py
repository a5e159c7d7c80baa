"""Decode CUDA graphs with SimLayerKV (SGLang's breakable backend): the FlashInfer code path's decode attention as
an eager break, re-planned per step (``tools/graph_check.py``, the device run's ``decode_graphs`` section), and
the veto that sends a batch eagerly.

A CUDA graph capture cannot run on CPU: ``graph_check`` sets SGLang's capture context variable to a stub capture
whose segments are no-ops; SGLang's real ``eager_on_graph`` records the plugin's break functions over CPU tensors,
and a replay calls them in order as ``BreakableCUDAGraph.replay`` does between segments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

from slkv_sglang.config import SlkvConfig
from slkv_sglang.hooks.scheduler import admit_graph
from slkv_sglang.tools import graph_check
from slkv_sglang.tools.graph_check import CPU_SHAPE, GRAPH_BS, LAYERS, decode_batch, stage


@pytest.fixture
def backend():
    with graph_check.one_rank():
        yield graph_check.standin_backend("cpu", CPU_SHAPE)


def test_captured_decode_replays_each_steps_lazy_pattern():
    """Captured once at batch 4 with nothing planned, the decode breaks replay two steps of other batches (3, then 2
    requests) and other lazy patterns (whole layers, single KV heads): each step equals the eager forward bit for
    bit and the reference, and the padded row never reaches a real request's output."""
    report = graph_check.run("cpu")
    assert report["ok"] is True, report
    # host reads in the replay's breaks (a wait for the device each, on a GPU): none in the plugin's decode over
    # slots; over rows one per step, the first layer taking the step's new rows in every layer. Step 2 over slots
    # decodes layer 2 with the CPU parent's kernel, torch_native, which reads its lengths (on a GPU: FlashInfer's)
    replay_reads = {"slots": [0, 2], "rows": [1, 1]}
    for pool, restricted in (("slots", [[0, 1, 2], [0, 1]]), ("rows", [[0, 1, 2], [0, 1, 2]])):
        checked = report["pools"][pool]
        assert checked["breaks"] == LAYERS  # one break per full-attention layer
        steps = checked["steps"]
        assert [s["batch"] for s in steps] == [3, 2]
        # step 1: requests 1 and 2 lazy in layers 0-2 between them; step 2: request 3 lazy in layers 0 and 1;
        # over rows every full-attention layer is the plugin's
        assert [s["lazy_layers"] for s in steps] == [[0, 1, 2], [0, 1]]
        assert [s["restricted_layers"] for s in steps] == restricted, pool
        assert all(s["admitted"] and s["planned_live_batch"] for s in steps)
        assert [s["graphed_vs_eager"] for s in steps] == [0.0, 0.0]
        assert all(s["graphed_vs_reference"] <= graph_check.CPU_REFERENCE_ATOL for s in steps)
        assert [s["host_reads"] for s in steps] == [{"plan": None, "replay": n} for n in replay_reads[pool]]


def test_padded_graph_rows_take_no_row_from_the_pool():
    """Over rows (``--slkv-offload``) SGLang's padding slot has rows of its own from the start: a graph padded to 4
    requests writes and reads them, and the pool's free rows, all owed to real tokens here (``_replay_steps`` takes
    the rest), stay theirs."""
    from slkv_sglang.kv.rows import PAD_SLOT

    with graph_check.one_rank():
        backend = graph_check.standin_backend("cpu", CPU_SHAPE, graph_check.POOLS["rows"])
    rows = backend.pool.tier.rows
    assert rows.row_of[:, PAD_SLOT].tolist() == list(range(rows.num_rows, rows.num_rows + rows.num_units))
    free = rows.free
    rows.clear()  # SGLang's flush_cache: the padding keeps its rows
    assert rows.row_of[:, PAD_SLOT].min() == rows.num_rows and rows.free == rows.num_rows and rows.miscounted() == 0
    assert free == rows.num_rows - 400 * rows.num_units  # the histories' 400 slots took theirs, the padding none
    backend.pool.tier.free_slots(torch.tensor([PAD_SLOT]))  # were it ever freed, its rows would stay its own
    assert rows.row_of[:, PAD_SLOT].min() == rows.num_rows and rows.free == rows.num_rows


def test_replay_needs_an_admitted_batch(backend):
    """A replay whose batch the veto never saw would plan a stale or no batch: it stops instead."""
    with pytest.raises(RuntimeError, match="did not admit"):
        backend.plan_graph_step(GRAPH_BS, in_capture=False)


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
    deciding = decode_batch([1, 2], [31, 20], [501, 502], "cpu")
    other = decode_batch([2], [20], [502], "cpu")
    assert admit_graph(True, runner, deciding) is False and backend._graph_batch is None
    assert admit_graph(False, runner, other) is False  # SGLang's own no stands
    assert admit_graph(True, runner, other) is True and backend._graph_batch is other
    stage(backend, 2)
    backend.init_forward_metadata(deciding)  # the eager step scores and decides (the tracker no longer awaits)
    assert admit_graph(True, runner, deciding) is True

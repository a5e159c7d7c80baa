"""The end-to-end device run's dry mode, as CI runs it (``scripts/gpu_e2e.sh --dry``): the real SGLang CPU engine
with the plugin, started as a user starts it, checked against plain SGLang and the reference on a seeded
random-weight Llama, then serving; the CUDA-only parts say they were skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slkv_sglang.tools.gpu_e2e import (DRY, NO_CPU_FP8, NO_CPU_HICACHE, NOT_CHOSEN, PARTS, lazy_share,
                                       serving_points)

pytestmark = pytest.mark.engine  # the script starts SGLang engines

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_e2e")
    # every serving point runs whatever this machine's speed (the dry run's own budget would skip the last ones)
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_e2e.sh"), "--dry", str(out), "--serve-budget-s", "1000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_e2e.json").read_text())
    print(f"gpu-e2e --dry: {data['seconds']}")
    return data


def test_a_run_limited_to_some_parts_says_which_it_skipped(tmp_path):
    """``--parts``: a rerun takes what a run cut short by its time limit did not reach; here the graph section alone,
    no engine started."""
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_e2e.sh"), "--dry", str(tmp_path), "--parts", "decode_graphs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_e2e.json").read_text())
    assert data["decode_graphs"]["ok"] is True
    assert {part: data[part] for part in PARTS if part != "decode_graphs"} == {
        "correctness": NOT_CHOSEN, "serving": NOT_CHOSEN, "serving_hicache": NOT_CHOSEN, "fp8_kv": NOT_CHOSEN}
    assert data["engine_starts"] == {} and "startup" not in data


def test_cuda_only_parts_are_skipped(report):
    assert report["device"] == "cpu (dry run)"
    assert report["kit"].startswith("skipped: needs CUDA")
    assert report["fp8_kv"] == NO_CPU_FP8
    assert report["serving_hicache"] == NO_CPU_HICACHE


def test_plugin_found_and_started_as_a_user_starts_it(report):
    assert report["entry_point"]["ok"] is True
    assert [(f["name"], f["value"]) for f in report["entry_point"]["found"]] == [
        ("simlayerkv", "slkv_sglang.plugin:register")]
    startup = report["startup"]
    assert startup["ok"] is True, startup
    assert startup["attention_backend"] == "torch_native" and startup["decode_cuda_graph"] == "disabled"
    assert startup["plugin_log"] == [
        "SimLayerKV: --attention-backend torch_native (no backend was named; the plugin wraps this one)"]


def test_decode_graphs_replay_each_steps_pattern(report):
    """The dry run's graph section: the stub capture over the FlashInfer code path (tests/test_decode_graphs.py has
    the details), run before any engine."""
    graphs = report["decode_graphs"]
    assert graphs["ok"] is True, graphs
    assert (graphs["device"], graphs["graph_bs"], graphs["captured_segments"]) == ("cpu", 4, False)
    for pool in ("slots", "rows"):  # SGLang's pool, the plugin's rows (--slkv-offload)
        checked = graphs["pools"][pool]
        assert checked["breaks"] == 3  # one per layer of graph_check's own 3-layer pools
        assert [(s["batch"], s["graphed_vs_eager"]) for s in checked["steps"]] == [(3, 0.0), (2, 0.0)]


def test_forced_full_equals_plain_sglang(report):
    check = report["forced_full"]
    assert check["ok"] is True, check
    assert [r["prompt_tokens"] for r in check["runs"]] == list(DRY.prompts)
    assert all(r["equal"] is True and r["lazy_heads"] == 0 for r in check["runs"])


@pytest.mark.parametrize("granularity", ["head", "layer"])
def test_lazy_sets_and_tokens_equal_the_reference(report, granularity):
    check = report[f"lazy_{granularity}"]
    assert check["ok"] is True, check
    assert len(check["runs"]) == len(DRY.prompts)
    for run in check["runs"]:
        assert run["tokens"]["equal"] is True, run  # float32 on both sides: exactly, no tie allowance
        assert run["unexplained_flips"] == [] and run["decided_at"] == run["prompt_tokens"]
        assert 0 < run["lazy_heads"] < run["of_heads"]
        assert run["max_score_diff"] <= DRY.score_tol
    assert any(run["restriction_changes_logprobs"] for run in check["runs"])


def test_batch_radix_and_chunks(report):
    batch = report["batch_equals_alone"]
    assert batch["ok"] is True and batch["distinct_lazy_sets"] == 3, batch
    assert [r["equal"] for r in batch["runs"]] == [True] * 4
    radix = report["radix_hit"]
    assert radix["ok"] is True, radix
    assert radix["repeat"]["cached_tokens"] == DRY.prompts[0] - DRY.slkv.last
    assert radix["second_turn"]["tokens"]["equal"] is True
    chunked = report["chunked_prefill"]
    assert chunked["ok"] is True, chunked
    assert chunked["last_chunk_shorter_than_last"] == [2 * DRY.chunk + 8]
    assert report["graphs_equal_eager"] == {"ok": True, "skipped": "no CUDA graphs without CUDA"}


def test_serving_runs_every_configuration_and_point(report):
    serving = report["serving"]
    assert serving["ok"] is True, serving
    assert set(serving["configs"]) == {"sglang", "simlayerkv", "simlayerkv_offload"}
    assert serving["lazy_layers"] == lazy_share(DRY.model["num_hidden_layers"]) == [1, 3]
    for name, entry in serving["configs"].items():
        assert entry["started"] is True and entry["decode_cuda_graph"] == "disabled"  # CPU: no CUDA graphs
        runs = {(r["history"], r["point"]): r for r in entry["runs"]}
        assert set(runs) == {(h, p) for h in DRY.histories for p in ("compute_bound", "memory_bound")}
        for (history, point), run in runs.items():
            assert run["sessions"] == serving_points(history, DRY.serve_pool_tokens, DRY.reply_tokens)[point]
            assert run["turns_per_s"] > 0 and run["ttft_p99"] >= run["ttft_p50"] > 0
            # histories that fit in half the pool are served from the radix cache on the second turn
            if point == "compute_bound":
                assert run["recomputed_tokens"] == 0, (name, run)
            # every layer the sessions forced lazy is reported lazy; plain SGLang reports no layer map
            assert run["lazy_layers"] == (None if name == "sglang" else 2.0), (name, run)

"""The device check's dry mode, as CI runs it: the CUDA parts say they were skipped, the rest runs on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_dry_run_end_to_end(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([str(root / "scripts" / "gpu_check.sh"), "", str(tmp_path), "--dry"], cwd=root,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "cpu (dry run)"
    for name in ("decode_llama3-8b", "scoring_llama3-8b", "decode_time", "scoring_time"):
        assert report[name] == "skipped: needs CUDA and FlashInfer"
    assert report["host_tier"]["roundtrip_exact"] is True
    # the backend's per-step decode plans with lazy KV heads, run by a torch stand-in for FlashInfer's kernel
    for name in ("decode_heads_llama3-8b", "decode_heads_smollm2-135m", "decode_heads_llama3-8b_fp8"):
        assert report[name]["ok"] is True, report[name]
    # --slkv-offload's reads: decode and extend through per-layer row indices, the same stand-in
    for name in ("rows_llama3-8b", "rows_llama3-8b_fp8"):
        assert report[name]["ok"] is True, report[name]
        assert set(report[name]["max_err"]) == {f"a row per {unit}, {part}" for unit in ("KV head", "layer")
                                                for part in ("extend", "extend lse", "decode")}
    # --slkv-offload's moves through the plugin's executor: a layer-pipelined reload brings back exactly what left
    pipeline = report["offload_pipeline"]
    assert pipeline["ok"] is True and pipeline["roundtrip_exact"] is True, pipeline
    assert pipeline["reloaded_bytes"] == pipeline["lazy_units"] * (600 - 4 - 64) * 2 * 32 * 4  # rows of [2, 1, 32] fp32
    assert report["decode_overhead"]["batch"] == 4 and report["decode_overhead"]["step_ms"] > 0
    memory = report["scoring_memory"]["8192"]
    assert memory["chunked_vs_unchunked_max_abs"] <= 1e-6
    print(f"scoring peak at 8K keys: unchunked {memory['unchunked_MiB']:.1f} MiB, chunked {memory['chunked_MiB']:.1f} MiB")
    assert memory["chunked_MiB"] < memory["unchunked_MiB"]

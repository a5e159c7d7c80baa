"""Start-up decisions: which attention backend and CUDA-graph setting SimLayerKV asks SGLang for, and what it
refuses — as pure functions (no CUDA needed) and through SGLang's own launcher."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slkv_sglang.config import SlkvConfig, SlkvConfigError
from slkv_sglang.runtime import engine_kwargs
from slkv_sglang.startup import check_resolved, plan_server_args

ON = SlkvConfig(enabled=True)
OFFLOAD = SlkvConfig(enabled=True, offload=True)


GRAPHS = {"disable_prefill_cuda_graph": True, "cuda_graph_backend_decode": "breakable"}


@pytest.mark.parametrize("cuda, cfg, requested, declared", [
    # nothing named: the covered backend for the machine; on CUDA breakable decode graphs, prefill graphs off
    (True, ON, {}, {"attention_backend": "flashinfer", **GRAPHS}),
    (False, ON, {}, {"attention_backend": "torch_native"}),
    (True, OFFLOAD, {}, {"attention_backend": "flashinfer", **GRAPHS}),  # rows: the same graphs
    (False, OFFLOAD, {}, {"attention_backend": "torch_native"}),
    # a covered backend named: kept as it is
    (True, ON, {"attention_backend": "flashinfer"}, GRAPHS),
    (True, ON, {"attention_backend": "flashinfer", "disable_cuda_graph": True}, {}),
    (False, ON, {"attention_backend": "torch_native", "disable_cuda_graph": True}, {}),
    (True, ON, {"decode_attention_backend": "flashinfer"}, GRAPHS),
    (True, ON, {"attention_backend": "torch_native"}, {}),  # SGLang runs no CUDA graphs on torch_native
    # decode graphs named: breakable kept, off kept (a declared decode backend would override the user's off)
    (True, ON, {"cuda_graph_backend_decode": "breakable"}, {"attention_backend": "flashinfer",
                                                            "disable_prefill_cuda_graph": True}),
    (True, ON, {"disable_decode_cuda_graph": True}, {"attention_backend": "flashinfer",
                                                     "disable_prefill_cuda_graph": True}),
])
def test_plan_names_a_covered_backend(cuda, cfg, requested, declared):
    assert plan_server_args(requested, cuda, cfg).declarations == declared


@pytest.mark.parametrize("requested, message", [
    ({"attention_backend": "fa3"}, "not --attention-backend fa3: start with --attention-backend flashinfer"),
    ({"attention_backend": "triton"}, "not --attention-backend triton"),
    ({"prefill_attention_backend": "fa3", "attention_backend": "flashinfer"}, "not --prefill-attention-backend fa3"),
    ({"decode_attention_backend": "trtllm_mha"}, "not --decode-attention-backend trtllm_mha"),
    ({"attention_backend": "flashinfer", "enable_mixed_chunk": True}, "--enable-mixed-chunk is not supported"),
    ({"speculative_algorithm": "EAGLE"}, "--speculative-algorithm EAGLE is not supported"),
    ({"enable_dp_attention": True}, "--enable-dp-attention is not supported"),
    ({"pp_size": 2}, "--pp-size > 1 is not supported"),
    # a capture would bake the capture step's attention branch and plan into every replay
    ({"cuda_graph_backend_decode": "full"}, "--cuda-graph-backend-decode full is not supported with "
                                            "--enable-simlayerkv: a captured replay repeats the capture step's"),
    ({"enable_torch_compile": True}, "--enable-torch-compile is not supported with --enable-simlayerkv"),
    ({"debug_cuda_graph": True}, "--debug-cuda-graph is not supported with --enable-simlayerkv"),
])
def test_plan_refuses_what_it_does_not_serve(requested, message):
    with pytest.raises(SlkvConfigError, match=message):
        plan_server_args(requested, True, ON)


def test_plan_refuses_two_host_tiers():
    """SGLang's hierarchical cache beside the plugin's host tier: refused with offload, left alone without."""
    with pytest.raises(SlkvConfigError, match="--enable-hierarchical-cache is not supported with --slkv-offload"):
        plan_server_args({"enable_hierarchical_cache": True}, False, OFFLOAD)
    assert plan_server_args({"enable_hierarchical_cache": True}, False, ON).declarations == {
        "attention_backend": "torch_native"}


def test_check_after_resolution():
    """What SGLang resolved, the same with offload or without (both backends read the pool's rows, both with
    breakable decode graphs)."""
    check_resolved({"attention_backend": "flashinfer"})
    check_resolved({"attention_backend": "torch_native"})
    with pytest.raises(SlkvConfigError, match="resolved --decode-attention-backend to fa3"):
        check_resolved({"attention_backend": "flashinfer", "decode_attention_backend": "fa3"})
    with pytest.raises(SlkvConfigError, match="one backend for prefill and decode, got prefill torch_native and decode flashinfer"):
        check_resolved({"prefill_attention_backend": "torch_native", "decode_attention_backend": "flashinfer"})
    check_resolved({"attention_backend": "flashinfer"}, {"decode": "breakable"})
    for graphs, glue, message in [
        ({"decode": "breakable", "prefill": "breakable"}, False, "CUDA graphs are on for prefill"),
        ({"decode": "full"}, False, "decode CUDA graphs are full: a captured replay repeats"),
        ({"decode": "breakable"}, True, "SGLANG_ENABLE_METADATA_GLUE_GRAPH=1 captures"),
    ]:
        with pytest.raises(SlkvConfigError, match=message):
            check_resolved({"attention_backend": "flashinfer"}, graphs, glue)


def test_declarations_land_in_sglangs_resolution(monkeypatch, model_path):
    """Through SGLang's own resolution: with nothing named, an x86 CPU would get intel_amx; the plugin names
    torch_native, and a phase pair it cannot serve is refused."""
    from sglang.srt.arg_groups.model_override_base import resolved_view
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    monkeypatch.setenv("SLKV_ENABLE", "1")
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    load_plugins()
    args = ServerArgs(model_path=model_path, device="cpu")
    args.resolve_once()
    assert resolved_view(args).attention_backend == "torch_native"
    mixed = ServerArgs(model_path=model_path, device="cpu", prefill_attention_backend="torch_native",
                       decode_attention_backend="flashinfer")
    with pytest.raises(SlkvConfigError, match="one backend for prefill and decode"):
        mixed.resolve_once()
    monkeypatch.setenv("SLKV_OFFLOAD", "1")  # the launcher passes every field the plan reads
    with pytest.raises(SlkvConfigError, match="--enable-hierarchical-cache is not supported with --slkv-offload"):
        ServerArgs(model_path=model_path, device="cpu", enable_hierarchical_cache=True).resolve_once()


def test_decode_graphs_land_in_sglangs_resolution(monkeypatch, model_path):
    """Through SGLang's own resolution, the machine taken for a CUDA one: breakable decode graphs and no prefill
    graphs resolved (FlashInfer named: SGLang turns graphs off for torch_native); a prefill graph named is refused
    after resolution, a full decode graph before it."""
    from sglang.srt.arg_groups.model_override_base import resolved_view
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    from slkv_sglang.hooks import flags

    monkeypatch.setenv("SLKV_ENABLE", "1")
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    monkeypatch.setattr(flags, "uses_cuda", lambda server_args: True)
    load_plugins()
    args = ServerArgs(model_path=model_path, device="cpu", attention_backend="flashinfer")
    args.resolve_once()
    graphs = resolved_view(args).cuda_graph_config
    assert (graphs.decode.backend, graphs.prefill.backend) == ("breakable", "disabled")
    for named, message in [({"cuda_graph_backend_prefill": "breakable"}, "CUDA graphs are on for prefill"),
                           ({"cuda_graph_backend_decode": "full"}, "--cuda-graph-backend-decode full is not supported")]:
        with pytest.raises(SlkvConfigError, match=message):
            ServerArgs(model_path=model_path, device="cpu", attention_backend="flashinfer", **named).resolve_once()


def test_engine_kwargs_per_machine():
    gpu = engine_kwargs("m", cuda=True)
    assert gpu["attention_backend"] == "flashinfer" and "disable_cuda_graph" not in gpu  # the plugin decides graphs
    assert "device" not in gpu and "dtype" not in gpu
    cpu = engine_kwargs("m", cuda=False)
    assert cpu["device"] == "cpu" and cpu["attention_backend"] == "torch_native" and cpu["dtype"] == "float32"


@pytest.mark.parametrize("flags, message", [
    (["--attention-backend", "triton"], "covers the flashinfer and torch_native attention backends, not --attention-backend triton"),
    (["--attention-backend", "triton", "--slkv-offload"], "not --attention-backend triton: start with --attention-backend torch_native"),
])
def test_launch_server_refuses_at_startup(flags, message, model_path):
    """Refused in the launcher, before a scheduler exists, with the flag to use."""
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--device", "cpu",
         "--enable-simlayerkv", *flags],
        capture_output=True, text=True, timeout=300, env={**_clean_env(), "SGLANG_USE_CPU_ENGINE": "1"},
    )
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("SLKV_")}


def test_engine_refuses_before_spawning(monkeypatch, model_path):
    """The in-process API (sglang.Engine, what `slkv serve` uses) goes through the same check."""
    import sglang

    monkeypatch.setenv("SLKV_ENABLE", "1")
    with pytest.raises(SlkvConfigError, match="not --attention-backend triton"):
        sglang.Engine(**engine_kwargs(model_path, cuda=False, attention_backend="triton"))

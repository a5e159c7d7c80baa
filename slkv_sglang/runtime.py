"""How to start SGLang here: device detection and the engine arguments for the bundled model.

On a CUDA machine: FlashInfer with SGLang's CUDA graphs (with SimLayerKV on, the plugin picks the decode graphs
it serves; ``startup.py``). Without CUDA the CPU
engine needs the torch_native backend, no CUDA graphs, float32 (bf16 measured 5-10x slower on the 2-core CI
machine) and one OMP thread.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import SlkvConfig


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_cpu_environment() -> None:
    """Environment the SGLang CPU engine needs; set before the engine spawns its processes."""
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def engine_kwargs(model_path: str | Path, cuda: bool | None = None, **overrides: Any) -> dict[str, Any]:
    """``sglang.Engine`` keyword arguments for this machine (CPU or CUDA; ``cuda`` None: detect)."""
    kwargs: dict[str, Any] = {"model_path": str(model_path), "log_level": "warning"}
    if has_cuda() if cuda is None else cuda:
        # The backend the plugin wraps, named here too so that a plain engine (SimLayerKV off) runs the same
        # attention; its CUDA graphs are SGLang's defaults, SimLayerKV's the breakable decode graphs.
        kwargs.update(attention_backend="flashinfer")
    else:
        prepare_cpu_environment()
        kwargs.update(
            device="cpu",
            attention_backend="torch_native",
            disable_cuda_graph=True,
            dtype="float32",
            # A fixed KV pool (32K tokens, 1.5 GB for the bundled model) instead of a share of whatever
            # memory is free, so several engines (tests, benchmarks) fit and behave the same on any machine.
            mem_fraction_static=0.2,
            max_total_tokens=32768,
            # SGLang kills a scheduler whose forward makes no progress for watchdog_timeout (300 s); a
            # multi-request 4K prefill on a loaded 2-core CPU can legitimately take minutes.
            watchdog_timeout=3600,
            # An idle scheduler busy-polls its sockets by default: on 2 cores one idle engine would halve
            # the speed of another (tests and benchmarks run two side by side).
            sleep_on_idle=True,
        )
    kwargs.update(overrides)
    return kwargs


def apply_slkv_environment(config: SlkvConfig) -> None:
    """Hand a SimLayerKV config to the engine's processes (they read ``SLKV_*`` at start-up)."""
    os.environ.update(config.to_env())


def make_engine(model_path: str | Path | None = None, slkv: SlkvConfig | None = None, **overrides: Any) -> Any:
    """Start an in-process ``sglang.Engine`` with the plugin configured by ``slkv`` (None: from the env).

    Stop it with ``shutdown_engine``, not ``Engine.shutdown``, when other engines or servers are children of
    this process."""
    import psutil
    import sglang

    from .model import ensure_bundled_model

    if slkv is not None:
        apply_slkv_environment(slkv)
    path = model_path or ensure_bundled_model()
    before = {p.pid for p in psutil.Process().children()}
    engine = sglang.Engine(**engine_kwargs(path, **overrides))
    engine.slkv_children = [p.pid for p in psutil.Process().children() if p.pid not in before]
    return engine


def shutdown_engine(engine: Any) -> None:
    """Stop one engine and only the processes it started.

    SGLang 0.5.23's ``Engine.shutdown`` ends with ``kill_process_tree(os.getpid(), include_parent=False)``:
    it SIGKILLs every child of the calling process, so shutting down one of two engines kills the other's
    scheduler (and any server the process started). Here that call is narrowed to this engine's children.
    """
    import sglang.srt.entrypoints.engine as engine_module

    own = getattr(engine, "slkv_children", None)
    if own is None:
        engine.shutdown()
        return
    kill_tree = engine_module.kill_process_tree

    def kill_own(parent_pid: int | None, include_parent: bool = True, **kwargs: Any) -> None:
        if parent_pid == os.getpid() and not include_parent:
            for pid in own:
                kill_tree(pid, include_parent=True, **kwargs)
        else:
            kill_tree(parent_pid, include_parent=include_parent, **kwargs)

    engine_module.kill_process_tree = kill_own
    try:
        engine.shutdown()
    finally:
        engine_module.kill_process_tree = kill_tree

"""``slkv gpu-e2e``: the plugin inside the real SGLang engine, started as a user starts it, checked end to end.

``scripts/gpu_e2e.sh`` runs it on the GPU machine after unpacking the shared kit (SGLang 0.5.23 for that machine's
torch, FlashInfer 0.7.2) and prewarming SGLang's JIT kernels; ``--dry`` runs the same checks on the CPU engine at
small shapes, so CI proves the plumbing. One JSON report, ``gpu_e2e.json``, one key per check, each
``{"ok": bool, ...figures}`` or ``"skipped: <why>"``:

- ``entry_point``: SGLang finds the plugin through its ``sglang.srt.plugins`` entry point;
- ``decode_graphs``: before any engine, the plugin's decode captured once under SGLang's breakable capture and
  replayed for other batches and lazy patterns, vs eager and the reference (``graph_check``; a stub capture on CPU);
- ``startup``: with SimLayerKV on and nothing else named, the backend and CUDA-graph decisions the plugin logs
  (on CUDA: breakable decode graphs, which every later SimLayerKV check runs with);
- correctness on a seeded random-weight Llama written here (``write_checkpoint``) that the engine and the
  reference (``reference.py``, plain transformers) both load: ``forced_full`` (threshold above 1: tokens equal
  plain SGLang's), ``lazy_head`` / ``lazy_layer`` (lazy sets, scores and tokens equal the reference's at each
  granularity), ``batch_equals_alone``, ``radix_hit``, ``chunked_prefill``; ``fp8_kv`` the same on an fp8 cache;
- ``serving``: multi-turn sessions (``serve_driver``) on one device KV budget at Llama-3-8B shape (dummy weights),
  plain SGLang with its CUDA graphs vs SimLayerKV (its breakable decode graphs) vs SimLayerKV with
  ``--slkv-offload`` (the same graphs), compute-bound and memory-bound, per history length: turns/s, TTFT and ITL
  p50/p99, and the decode graph backend each engine resolved; ``serving_hicache``: SGLang's hierarchical
  cache (``direct`` IO backend), whether it started and its figures if it ran.

At most one engine is alive at a time; a check asking for an engine with the settings of the one alive reuses it
(the dry run's correctness and serving share theirs). Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..config import SlkvConfig

NEEDS_CUDA = "skipped: needs CUDA"
# SGLang 0.5.23 serves an fp8 KV cache on a CPU only with Intel AMX and its intel_amx attention backend
# (mem_cache/kv_cache_configurator.py, KVCacheConfigurator.configure); the plugin wraps torch_native there.
NO_CPU_FP8 = (f"{NEEDS_CUDA} (SGLang 0.5.23 refuses an fp8 KV cache on CPU unless the attention backend is "
              "intel_amx: 'CPU FP8 KV cache requires the intel_amx attention backend.', kv_cache_configurator.py)")
NO_CPU_GRAPHS = "CUDA graphs need CUDA: plain SGLang runs without them here"
NO_CPU_HICACHE = f"{NEEDS_CUDA} (SGLang's hierarchical cache copies KV between device and pinned host memory)"
REPORT = "gpu_e2e.json"
FORCED_FULL = 1.5  # a threshold above 1: no score exceeds it, so SimLayerKV is on and nothing is lazy
FOLLOW_UP_TOKENS = 70  # a second turn's user prompt: LMSYS-Chat-1M's mean, 69.5 tokens (serve_workload.STATS)
# What a run can be limited to (--parts), in the order it runs them: a rerun after a run cut short by its time limit
# takes the parts the first did not reach
PARTS = ("decode_graphs", "correctness", "serving", "serving_hicache", "fp8_kv")
NOT_CHOSEN = "skipped: not among --parts"
GRAPH_CHECK_TIMEOUT_S = 300  # decode_graphs' own process: FlashInfer may compile a kernel (0.5-2 min on 16 cores)
PLUGIN_GROUP = "sglang.srt.plugins"  # SGLang 0.5.23, sglang/srt/plugins/__init__.py: GENERAL_PLUGINS_GROUP


@dataclass(frozen=True)
class Scale:
    """The sizes and tolerances of one run (``DRY`` on CPU, ``DEVICE`` on the GPU machine)."""

    model: dict[str, Any]  # the correctness checkpoint's Llama config fields
    dtype: str  # the engine's compute dtype; the reference computes in float32 from the same weights
    slkv: SlkvConfig
    chunk: int  # chunked prefill size
    pool_tokens: int  # device KV of every correctness engine, tokens
    prompts: tuple[int, ...]  # prompt lengths; one of them ends with a chunk shorter than slkv.last
    new_tokens: int
    # engine vs reference tokens: equal, or equal up to a step where the engine's two best tokens were within
    # this many nats (a near tie rounding can tip); 0: exactly equal
    token_margin: float
    score_tol: float  # engine vs reference masses, absolute
    serve_chunk: int | None  # the serving engines' chunked prefill; None: SGLang's own choice
    serve_pool_tokens: int
    histories: tuple[int, ...]
    reply_tokens: int
    serve_budget_s: float  # seconds of serving runs, shared equally by the configurations (the run's 8 minutes)


def _llama(**fields: Any) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "attention_bias": False, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, **fields}


# CI's 2-core CPU: a 4-layer model the torch_native engine runs in float32 (as runtime.engine_kwargs does), windows
# scaled down with it (sink 4 + recent 64 + last 16: prompts of 84 tokens and more trim), a pool of a few thousand
# tokens; float32 on both sides, so tokens must be exactly equal. SimLayerKV runs the FlashInfer backend's code path
# (--slkv-flashinfer-standin: its plans, its prefill with the log-sum-exp, torch kernels in place of FlashInfer's),
# the path the device run takes.
DRY = Scale(
    model=_llama(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=4096),
    dtype="float32", slkv=SlkvConfig(enabled=True, sink=4, recent=64, last=16, flashinfer_standin=True), chunk=128,
    pool_tokens=4096,
    prompts=(200, 2 * 128 + 8, 330, 400), new_tokens=8, token_margin=0.0, score_tol=1e-3,
    serve_chunk=128, serve_pool_tokens=4096, histories=(128, 256, 512), reply_tokens=4, serve_budget_s=60.0)

# Llama-3-8B's attention (32 q / 8 KV heads, head dim 128) and width in 4 layers, bf16: the shapes the FlashInfer
# bundle holds compiled and prewarm_jit.py builds SGLang's kernels for, so bf16 needs few compiles in the run. The
# paper's windows (config.py). Margins: bf16 keeps 8 bits of mantissa (relative rounding 2^-8); logits of size ~10 pass
# through several such roundings, so a top-2 gap under 0.25 nats is a tie either side may break (chosen, not
# measured); masses within 2e-2 (chosen: the KV itself is bf16 here, fp32 in the reference).
DEVICE = Scale(
    model=_llama(hidden_size=4096, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=4096, max_position_embeddings=8192),
    dtype="bfloat16", slkv=SlkvConfig(enabled=True), chunk=1024, pool_tokens=16384,
    prompts=(1500, 2 * 1024 + 16, 2600, 3200), new_tokens=16, token_margin=0.25, score_tol=2e-2,
    serve_chunk=None, serve_pool_tokens=49152, histories=(4096, 16384, 32768), reply_tokens=32,
    serve_budget_s=160.0)
# fp8 e4m3 keeps 3 bits of mantissa (relative rounding 2^-4): masses move by a few hundredths (chosen), and its
# tokens are compared with the reference as a figure only.
FP8_SCORE_TOL = 5e-2

# The random weights: Llama's initializer (std 0.02), except queries and keys drawn so that q.k / sqrt(d) has a
# std of ~QK_LOGIT_STD (std sqrt(QK_LOGIT_STD / hidden) each, after RMSNorm), which makes each head's attention
# peak on a few keys of its own, so heads' masses on sink + recent spread out and some are lazy and some not; and
# the output head drawn so logits have a std of ~LOGIT_STD, so greedy picks clear winners.
INIT_STD = 0.02
QK_LOGIT_STD = 4.0
LOGIT_STD = 4.0


# ---- the checkpoint ---------------------------------------------------------------------------------------------
def write_checkpoint(folder: Path, config: dict[str, Any], dtype: str, seed: int = 0) -> Path:
    """A random-weight Llama from ``seed`` (safetensors + config.json, no tokenizer: requests pass token ids)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    inter = config["intermediate_size"]
    qk_std, out_std = math.sqrt(QK_LOGIT_STD / hidden), LOGIT_STD / math.sqrt(hidden)
    shapes: dict[str, tuple[tuple[int, ...], float]] = {"model.embed_tokens.weight": ((vocab, hidden), INIT_STD),
                                                         "model.norm.weight": ((hidden,), 0.0),
                                                         "lm_head.weight": ((vocab, hidden), out_std)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": ((q_dim, hidden), qk_std),
                   p + "self_attn.k_proj.weight": ((kv_dim, hidden), qk_std),
                   p + "self_attn.v_proj.weight": ((kv_dim, hidden), INIT_STD),
                   p + "self_attn.o_proj.weight": ((hidden, q_dim), INIT_STD),
                   p + "mlp.gate_proj.weight": ((inter, hidden), INIT_STD),
                   p + "mlp.up_proj.weight": ((inter, hidden), INIT_STD),
                   p + "mlp.down_proj.weight": ((hidden, inter), INIT_STD),
                   p + "input_layernorm.weight": ((hidden,), 0.0),
                   p + "post_attention_layernorm.weight": ((hidden,), 0.0)}
    weights = {name: (torch.randn(shape, generator=gen) * std if std else torch.ones(shape)).to(getattr(torch, dtype))
               for name, (shape, std) in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=1))
    return folder


def write_entry_point(folder: Path, root: Path) -> Path:
    """A ``dist-info`` holding the plugin's entry point from ``root``'s pyproject.toml, for a machine where the
    package is not installed: with ``folder`` and ``root`` on PYTHONPATH, SGLang finds the plugin as it finds an
    installed one (``importlib.metadata.entry_points``)."""
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    info = folder / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in eps.items()) + "\n"
        for group, eps in groups.items()))
    return info


# ---- engines ----------------------------------------------------------------------------------------------------
class Engines:
    """At most one SGLang engine alive. ``get`` with the settings of the engine alive returns it; other settings
    stop it and start theirs. Each start's plugin log lines (logger ``slkv.plugin``, the launcher's decisions) and
    seconds are kept by the name it was asked for under."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.key: str | None = None
        self.first_name = ""  # the name the engine alive was started under
        self.engine: Any = None
        self.starts: dict[str, dict[str, Any]] = {}

    def get(self, name: str, slkv: SlkvConfig, **kwargs: Any) -> Any:
        from ..runtime import make_engine

        key = json.dumps([slkv.to_env(), kwargs], sort_keys=True, default=str)
        if key == self.key:
            self.starts.setdefault(name, {**self.starts[self.first_name], "reused": self.first_name})
            return self.engine
        self.close()
        notes: list[str] = []
        handler = _Collect(notes)
        plugin_log = logging.getLogger("slkv.plugin")
        plugin_log.addHandler(handler)
        t = time.perf_counter()
        try:
            self.engine = make_engine(kwargs.pop("model_path"), slkv=slkv, **kwargs)
        finally:
            plugin_log.removeHandler(handler)
        self.key, self.first_name = key, name
        self.starts[name] = {"start_s": round(time.perf_counter() - t, 1), "plugin_log": notes}
        return self.engine

    def close(self) -> None:
        from ..runtime import shutdown_engine

        if self.engine is not None:
            shutdown_engine(self.engine)
        self.engine, self.key = None, None


class _Collect(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.INFO)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


CHECK_GRAPH_BS = 8


def engine_settings(scale: Scale, cuda: bool, model_path: Path, **extra: Any) -> dict[str, Any]:
    """The arguments every engine of a run shares (``runtime.engine_kwargs`` adds the machine's own)."""
    settings: dict[str, Any] = {"model_path": str(model_path), "skip_tokenizer_init": True, "random_seed": 0,
                                "chunked_prefill_size": scale.chunk, "max_total_tokens": scale.pool_tokens,
                                "dtype": scale.dtype}
    if cuda:
        # FlashInfer's sampling kernels are not among the bundle's compiled ones (JIT on first use): torch's
        settings["sampling_backend"] = "pytorch"
        # the checks send at most 4 requests at once: decode graphs captured up to 8, not SGLang's default list
        # (a breakable capture makes a segment per layer and batch size; serving names its own)
        settings["cuda_graph_max_bs_decode"] = CHECK_GRAPH_BS
    return {**settings, **extra}


def as_user() -> dict[str, Any]:
    """What a user running ``--enable-simlayerkv`` names: no attention backend (runtime.engine_kwargs names FlashInfer)
    and no CUDA-graph setting: the plugin must decide both."""
    return {"attention_backend": None}


def decode_graph(engine: Any) -> str:
    """The decode CUDA graph backend the engine resolved: full, breakable or disabled."""
    return engine.server_args.resolved_dict()["cuda_graph_config"]["decode"]["backend"]


# ---- requests ---------------------------------------------------------------------------------------------------
def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    """``n`` seeded token ids, none of them BOS or EOS (0-2)."""
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def greedy(new_tokens: int, **slkv: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True}
    if slkv:
        params["custom_params"] = {"slkv": slkv}
    return params


def generate(engine: Any, ids: list[int] | list[list[int]], params: Any, flush: bool = True) -> Any:
    """A greedy generate with each step's two best log-probabilities (``top_gaps``); ``flush``: on an empty
    radix cache, so the prefill computes the whole prompt."""
    if flush:
        engine.flush_cache()
    return engine.generate(input_ids=ids, sampling_params=params, return_logprob=True, top_logprobs_num=2)


def top_gaps(out: dict[str, Any]) -> list[float]:
    """Per output token, the engine's best log-probability minus its second best."""
    return [top[0][0] - top[1][0] for top in out["meta_info"]["output_top_logprobs"]]


def logprobs(out: dict[str, Any]) -> list[float]:
    return [lp for lp, _token, _text in out["meta_info"]["output_token_logprobs"]]


def tokens_agree(got: list[int], want: list[int], gaps: list[float], margin: float) -> dict[str, Any]:
    """Equal, or equal up to the first difference where ``gaps`` (the side whose top two are known) says the
    step was a tie within ``margin``."""
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if first is None:
        return {"ok": len(got) == len(want), "equal": len(got) == len(want)}
    return {"ok": gaps[first] <= margin, "equal": False, "first_difference": first, "gap": round(gaps[first], 4)}


def layer_map(out: dict[str, Any]) -> Any:
    from ..layer_map import LayerMap

    return LayerMap.from_dict(out["meta_info"]["slkv"])


def split_threshold(scores: list[float]) -> tuple[float, float]:
    """A threshold between two of ``scores`` with the widest gap, with at least a quarter of them on each side,
    and its distance to the nearest score: settings whose lazy set is neither empty nor full, decided far from
    any score so rounding cannot tip a verdict."""
    ordered = sorted(scores)
    n = len(ordered)
    lo, hi = n // 4, max(n // 4 + 1, n - 1 - n // 4)
    i = max(range(max(lo - 1, 0), min(hi, n - 1)), key=lambda k: ordered[k + 1] - ordered[k])
    return (ordered[i] + ordered[i + 1]) / 2, (ordered[i + 1] - ordered[i]) / 2


def compare_maps(got: Any, want: Any, threshold: float, tol: float) -> dict[str, Any]:
    """Engine vs reference layer maps: verdicts per (layer, KV head) equal except where the reference's score is
    within ``tol`` of the threshold, masses within ``tol``."""
    granular = want.granularity == "head"
    flips = [(layer, head) for layer, (a, b) in enumerate(zip(got.heads, want.heads))
             for head, (x, y) in enumerate(zip(a, b)) if x != y]
    unexplained = [pair for pair in flips if abs((want.head_scores[pair[0]][pair[1]] if granular
                                                  else want.scores[pair[0]]) - threshold) >= tol]
    diff = max([abs(a - b) for a, b in zip(got.scores, want.scores)]
               + [abs(a - b) for x, y in zip(got.head_scores, want.head_scores) for a, b in zip(x, y)])
    return {"ok": not unexplained and diff <= tol, "lazy_heads": len(got.lazy_heads),
            "of_heads": sum(map(len, got.heads)), "flips_at_threshold": len(flips) - len(unexplained),
            "unexplained_flips": unexplained, "max_score_diff": float(f"{diff:.3g}")}


# ---- correctness ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    score: float
    token_margin: float
    tokens_vs_reference: bool  # False on fp8: those tokens are a figure, not a check


def correctness(engines: Engines, scale: Scale, model_path: Path, reference: Any, kv_dtype: str | None,
                tol: Tolerance) -> dict[str, Any]:
    """The correctness checks on one KV dtype: plain SGLang first, then one SimLayerKV engine started as a user
    would; returns the checks by name (``startup`` among them)."""
    vocab = scale.model["vocab_size"]
    prompts = [random_ids(n, vocab, seed=i) for i, n in enumerate(scale.prompts)]
    extra = {"kv_cache_dtype": kv_dtype} if kv_dtype else {}
    suffix = f"_{kv_dtype}" if kv_dtype else ""
    plain = engines.get(f"check_plain{suffix}", SlkvConfig(enabled=False),
                        **engine_settings(scale, engines.cuda, model_path, **extra))
    plain_runs = [generate(plain, ids, greedy(scale.new_tokens)) for ids in prompts]
    name = f"check_simlayerkv{suffix}"
    engine = engines.get(name, scale.slkv, **engine_settings(scale, engines.cuda, model_path, **as_user(), **extra))
    checks: dict[str, Any] = {"startup": startup_check(engine, engines.starts[name], engines.cuda)}

    full_runs = [generate(engine, ids, greedy(scale.new_tokens, threshold=FORCED_FULL)) for ids in prompts]
    checks["forced_full"] = _all([{"prompt_tokens": len(ids), "lazy_heads": len(layer_map(off).lazy_heads),
                                   **tokens_agree(off["output_ids"], ref["output_ids"], top_gaps(ref),
                                                  tol.token_margin)}
                                  for ids, off, ref in zip(prompts, full_runs, plain_runs)],
                                 lambda r: r["ok"] and r["lazy_heads"] == 0)

    solo: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}  # granularity -> (output, its settings)
    for granularity in ("head", "layer"):
        runs = [_lazy_vs_reference(engine, reference, scale, ids, granularity, tol, full) for ids, full in
                zip(prompts, full_runs)]
        solo[granularity] = [(r.pop("out"), r["slkv"]) for r in runs]
        checks[f"lazy_{granularity}"] = _all(runs, lambda r: r["ok"])
        checks[f"lazy_{granularity}"]["ok"] &= any(r["restriction_changes_logprobs"] for r in runs)
        checks[f"lazy_{granularity}"]["threshold_margins"] = sorted({round(r["threshold_margin"], 4) for r in runs})

    checks["batch_equals_alone"] = _batch_equals_alone(engine, scale, prompts, solo, full_runs, tol)
    checks["radix_hit"] = _radix_hit(engine, reference, scale, prompts[0], tol)
    chunked = [i for i, n in enumerate(scale.prompts) if n > scale.chunk]
    short_tail = [scale.prompts[i] for i in chunked if scale.prompts[i] % scale.chunk < scale.slkv.last]
    checks["chunked_prefill"] = {
        "ok": bool(short_tail) and all(checks[f"lazy_{g}"]["runs"][i]["ok"] for g in solo for i in chunked),
        "chunk": scale.chunk, "chunked_prompts": [scale.prompts[i] for i in chunked],
        "last_chunk_shorter_than_last": short_tail,
        "note": "each chunked prompt's lazy sets and tokens vs the reference's whole prefill (lazy_head, lazy_layer)"}
    checks["graphs_equal_eager"] = (
        _graphs_equal_eager(engines, scale, model_path, prompts, solo, extra, tol) if not kv_dtype else
        {"ok": True, "skipped": "compared on the bf16 cache: the breaks run the same decode call (its scales "
                                "aside), and the run's 8 minutes have no room for another engine start"})
    return checks


def _graphs_equal_eager(engines: Engines, scale: Scale, model_path: Path, prompts: list[list[int]],
                        solo: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]], extra: dict[str, Any],
                        tol: Tolerance) -> dict[str, Any]:
    """On CUDA the checks above decode through the breakable graphs (each step's lazy pattern planned before the
    replay, its attention an eager break): the same requests on an engine with graphs off give the same lazy sets
    and tokens. Without CUDA there is no graph to compare (``decode_graphs`` replays the breaks under a stub)."""
    if not engines.cuda:
        return {"ok": True, "skipped": "no CUDA graphs without CUDA"}
    suffix = f"_{extra['kv_cache_dtype']}" if extra else ""
    eager = engines.get(f"check_eager{suffix}", scale.slkv, **engine_settings(
        scale, True, model_path, **as_user(), disable_cuda_graph=True, **extra))
    runs = []
    for granularity, pairs in solo.items():
        for (graphed, slkv), ids in zip(pairs, prompts):
            again = generate(eager, ids, greedy(scale.new_tokens, **slkv))
            runs.append({"granularity": granularity, "prompt_tokens": len(ids),
                         "same_lazy_set": layer_map(again).heads == layer_map(graphed).heads,
                         **tokens_agree(graphed["output_ids"], again["output_ids"], top_gaps(again), tol.token_margin)})
    return {"ok": decode_graph(eager) == "disabled" and all(r["ok"] and r["same_lazy_set"] for r in runs),
            "runs": runs}


def decode_graphs(device: str) -> dict[str, Any]:
    """Before any engine: the plugin's decode under SGLang's breakable capture alone (``graph_check``), in a process
    of its own (a CUDA fault there must not end the engines' checks); and whether ``cuda.bindings`` imports (SGLang's
    breakable capture asks the CUDA runtime through it whether a side stream is capturing; the device's torch wheel
    depends on it, the kit does not carry it)."""
    import importlib.util
    import subprocess
    import sys

    try:
        bindings = importlib.util.find_spec("cuda.bindings") is not None
    except ModuleNotFoundError:
        bindings = False
    proc = subprocess.run([sys.executable, "-m", "slkv_sglang.tools.graph_check", device], capture_output=True,
                          text=True, timeout=GRAPH_CHECK_TIMEOUT_S)
    lines = proc.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        report = {"ok": False, "exit_status": proc.returncode, "stderr": proc.stderr[-2000:]}
    return {**report, "cuda_bindings": bindings}


def _all(runs: list[dict[str, Any]], ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return {"ok": bool(runs) and all(ok(r) for r in runs), "runs": runs}


def startup_check(engine: Any, start: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """The plugin's start-up decisions with nothing named: its backend (FlashInfer on CUDA, torch_native on CPU)
    and on CUDA breakable decode graphs, each a logged line; and what SGLang resolved."""
    resolved = engine.server_args.resolved_dict()
    backend = "flashinfer" if cuda else "torch_native"
    notes = [n for n in start["plugin_log"] if n.startswith("SimLayerKV:")]
    want = [f"SimLayerKV: --attention-backend {backend} "]
    want += ["SimLayerKV: --cuda-graph-backend-decode breakable, "] if cuda else []
    logged = all(any(n.startswith(w) for n in notes) for w in want) and len(notes) == len(want)
    graph = decode_graph(engine)
    return {"ok": logged and resolved["attention_backend"] == backend and (graph == "breakable" or not cuda),
            "plugin_log": notes, "attention_backend": resolved["attention_backend"], "decode_cuda_graph": graph,
            "start_s": start["start_s"]}


def _lazy_vs_reference(engine: Any, reference: Any, scale: Scale, ids: list[int], granularity: str, tol: Tolerance,
                       full: dict[str, Any]) -> dict[str, Any]:
    """One prompt at one granularity, at a threshold that splits its reference scores (``split_threshold``)."""
    scores = reference.lazy_scores(ids, scale.slkv)
    values = [s for row in scores.head_scores for s in row] if granularity == "head" else list(scores.scores)
    threshold, margin = split_threshold(values)
    cfg = replace(scale.slkv, granularity=granularity, threshold=threshold)
    want = reference.generate(ids, cfg, max_new_tokens=scale.new_tokens, ignore_eos=True)
    out = generate(engine, ids, greedy(scale.new_tokens, threshold=threshold, granularity=granularity))
    got = layer_map(out)
    maps = compare_maps(got, want.layer_map, threshold, tol.score)
    tokens = tokens_agree(out["output_ids"], want.output_ids, top_gaps(out), tol.token_margin)
    lazy_lp, full_lp = logprobs(out), logprobs(full)
    record = {"prompt_tokens": len(ids), "slkv": {"threshold": threshold, "granularity": granularity},
              "threshold_margin": margin,
              "decided_at": got.decided_at, **{k: v for k, v in maps.items() if k != "ok"}, "maps_ok": maps["ok"],
              "tokens": tokens,
              # guard: lazy decode reads other KV than full decode (the first token comes from the prefill)
              "restriction_changes_logprobs": max(abs(a - b) for a, b in zip(lazy_lp[1:], full_lp[1:])) > 1e-3,
              "out": out}
    record["ok"] = (maps["ok"] and got.decided_at == len(ids) and 0 < maps["lazy_heads"] < maps["of_heads"]
                    and (tokens["ok"] or not tol.tokens_vs_reference))
    return record


def _batch_equals_alone(engine: Any, scale: Scale, prompts: list[list[int]],
                        solo: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]], full_runs: list[dict[str, Any]],
                        tol: Tolerance) -> dict[str, Any]:
    """Four requests with different settings in one batch (lazy per KV head, lazy per layer, nothing lazy,
    SimLayerKV off) give each its output alone (an empty cache each time)."""
    (head_out, head_slkv), (layer_out, layer_slkv) = solo["head"][0], solo["layer"][1]
    off = generate(engine, prompts[3], greedy(scale.new_tokens, enabled=False))
    alone = [head_out, layer_out, full_runs[2], off]
    params = [greedy(scale.new_tokens, **head_slkv), greedy(scale.new_tokens, **layer_slkv),
              greedy(scale.new_tokens, threshold=FORCED_FULL), greedy(scale.new_tokens, enabled=False)]
    together = generate(engine, prompts[:4], params)
    runs = []
    for a, b in zip(alone, together):
        same_map = ("slkv" in a["meta_info"]) == ("slkv" in b["meta_info"]) and (
            "slkv" not in a["meta_info"] or layer_map(a).heads == layer_map(b).heads)
        runs.append({"same_lazy_set": same_map,
                     **tokens_agree(b["output_ids"], a["output_ids"], top_gaps(b), tol.token_margin)})
    lazy_sets = {tuple(layer_map(a).lazy_heads) for a in alone[:3]}
    return {"ok": all(r["ok"] and r["same_lazy_set"] for r in runs) and len(lazy_sets) == 3,
            "distinct_lazy_sets": len(lazy_sets), "runs": runs}


def _radix_hit(engine: Any, reference: Any, scale: Scale, ids: list[int], tol: Tolerance) -> dict[str, Any]:
    """An exact repeat (the radix cache serves all but the last ``last`` tokens) decides and answers as the first
    prefill did; a second turn over the cached first one decides and answers as the reference's whole prefill.
    That first turn has nothing lazy: a lazy turn's decode writes KV computed through restricted layers, which no
    whole prefill reproduces, so only then is the cached history the one the reference computes."""
    last = scale.slkv.last
    scores = reference.lazy_scores(ids, scale.slkv)
    threshold, _ = split_threshold([s for row in scores.head_scores for s in row])
    first = generate(engine, ids, greedy(scale.new_tokens, threshold=threshold))
    again = generate(engine, ids, greedy(scale.new_tokens, threshold=threshold), flush=False)
    repeat = {"cached_tokens": again["meta_info"]["cached_tokens"], "want_cached": len(ids) - last,
              "same_lazy_set": layer_map(again).heads == layer_map(first).heads,
              **tokens_agree(again["output_ids"], first["output_ids"], top_gaps(again), tol.token_margin)}
    repeat["ok"] = repeat["ok"] and repeat["same_lazy_set"] and repeat["cached_tokens"] == len(ids) - last

    history = generate(engine, ids, greedy(scale.new_tokens, threshold=FORCED_FULL))
    turn2 = ids + history["output_ids"] + random_ids(FOLLOW_UP_TOKENS // 2, scale.model["vocab_size"], seed=99)
    threshold2, _ = split_threshold([s for row in reference.lazy_scores(turn2, scale.slkv).head_scores for s in row])
    out = generate(engine, turn2, greedy(scale.new_tokens, threshold=threshold2), flush=False)
    want = reference.generate(turn2, replace(scale.slkv, threshold=threshold2), max_new_tokens=scale.new_tokens,
                              ignore_eos=True)
    maps = compare_maps(layer_map(out), want.layer_map, threshold2, tol.score)
    tokens = tokens_agree(out["output_ids"], want.output_ids, top_gaps(out), tol.token_margin)
    cached = out["meta_info"]["cached_tokens"]
    second = {"prompt_tokens": len(turn2), "cached_tokens": cached, **maps, "tokens": tokens}
    second["ok"] = maps["ok"] and cached >= len(ids) - last and (tokens["ok"] or not tol.tokens_vs_reference)
    return {"ok": repeat["ok"] and second["ok"], "repeat": repeat, "second_turn": second}


# ---- serving ----------------------------------------------------------------------------------------------------
def serving_sessions(count: int, history: int, reply: int, vocab: int, seed: int) -> list[Any]:
    """``count`` two-turn sessions of random ids: a ``history``-token first turn, then a follow-up over it; no
    needle (the dummy weights have no answer to find)."""
    from .serve_workload import Session, Turn

    return [Session(f"s{i}", (Turn(random_ids(history, vocab, seed * 1000 + 2 * i), reply),
                              Turn(random_ids(FOLLOW_UP_TOKENS, vocab, seed * 1000 + 2 * i + 1), reply)),
                    passcode="", start=0.0) for i in range(count)]


def serving_points(history: int, pool: int, reply: int) -> dict[str, int]:
    """Concurrent sessions at which every history fits in half the pool (compute-bound), and at which the
    histories together hold 1.5x the pool, so second turns find theirs partly evicted (memory-bound)."""
    per_session = history + FOLLOW_UP_TOKENS + 2 * reply
    return {"compute_bound": max(1, pool // (2 * per_session)), "memory_bound": math.ceil(1.5 * pool / per_session)}


def lazy_share(num_layers: int) -> list[int]:
    """Every other layer forced lazy: half of them, the share that gives the paper's ~1.6x KV saving at 4K with a
    1,024-token window (1 / (1 - f * 3/4) = 1.6 at f = 1/2; docs/evaluation.md: 'The paper reports ~1.6x without
    quantization on 7-8B models'). Random weights have no lazy layers of their own (``force_lazy``, request_params)."""
    return list(range(1, num_layers, 2))


class Serving:
    """The serving runs: each configuration on its engine (``play``), every history at both points, each
    configuration within an equal share of the time budget, counted over its runs (a point past it is recorded as
    skipped), so a slow one cannot starve the next."""

    def __init__(self, engines: Engines, scale: Scale, model_path: Path, num_layers: int, vocab: int,
                 load_format: str | None):
        self.engines, self.scale, self.vocab = engines, scale, vocab
        self.pool = scale.serve_pool_tokens
        self.lazy = lazy_share(num_layers)
        self.points = {h: serving_points(h, self.pool, scale.reply_tokens) for h in scale.histories}
        self.spent: dict[str, float] = {}
        base = engine_settings(scale, engines.cuda, model_path, max_total_tokens=self.pool,
                               chunked_prefill_size=scale.serve_chunk,
                               **({"load_format": load_format} if load_format else {}))
        if scale.serve_chunk is None:
            del base["chunked_prefill_size"]
        most = max(n for p in self.points.values() for n in p.values())
        graphs = {"cuda_graph_max_bs_decode": most} if engines.cuda else {}  # every point's batch in a graph
        plain = SlkvConfig(enabled=False)
        forced = {"force_lazy": self.lazy}
        self.configs: dict[str, tuple[SlkvConfig, dict[str, Any], dict[str, Any]]] = {
            # runtime.engine_kwargs names FlashInfer on CUDA (SGLang's own choice on Hopper, fa3, is not in the kit)
            "sglang": (plain, {**base, **graphs}, {"enabled": False}),
            "simlayerkv": (scale.slkv, {**base, **graphs, **as_user()}, forced),
            "simlayerkv_offload": (replace(scale.slkv, offload=True), {**base, **graphs, **as_user()}, forced),
            "hicache": (plain, {**base, **graphs, "enable_hierarchical_cache": True, "hicache_io_backend": "direct",
                                "hicache_mem_layout": "layer_first"}, {"enabled": False}),
        }

    def summary(self, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {"ok": all(e["ok"] for e in entries.values()), "pool_tokens": self.pool, "lazy_layers": self.lazy,
                "points": self.points, "reply_tokens": self.scale.reply_tokens,
                "follow_up_tokens": FOLLOW_UP_TOKENS, "budget_s": self.scale.serve_budget_s,
                "run_s": {name: round(s, 1) for name, s in self.spent.items()}, "configs": entries}

    def play(self, name: str) -> dict[str, Any]:
        from .serve_driver import run_sessions
        from .serve_report import figures

        slkv, settings, per_request = self.configs[name]
        cuda = self.engines.cuda
        entry: dict[str, Any] = {"per_request": per_request, "runs": []}
        if not cuda and name == "sglang":
            entry["note"] = NO_CPU_GRAPHS
        try:
            engine = self.engines.get(f"serve_{name}", slkv, **settings)
        except Exception as exc:  # a configuration that cannot start is a finding of the run, not its end
            return {**entry, "ok": False, "started": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        entry |= {"started": True, "start_s": self.engines.starts[f"serve_{name}"]["start_s"],
                  "decode_cuda_graph": decode_graph(engine)}
        share = self.scale.serve_budget_s / (len(self.configs) if cuda else len(self.configs) - 1)  # no hicache
        self.spent[name] = 0.0
        for history, counts in self.points.items():
            for point, sessions in counts.items():
                run = {"history": history, "point": point, "sessions": sessions}
                if any("error" in r for r in entry["runs"]):  # the engine may be gone: waiting on it could hang
                    entry["runs"].append({**run, "skipped": "an earlier run of this configuration failed"})
                    continue
                if self.spent[name] > share:
                    entry["runs"].append({**run, "skipped": "time budget"})
                    continue
                engine.flush_cache()
                played = serving_sessions(sessions, history, self.scale.reply_tokens, self.vocab, seed=history)
                t = time.perf_counter()
                try:
                    wall, records = run_sessions(engine, played, per_request, self.scale.slkv.last)
                except Exception as exc:
                    entry["runs"].append({**run, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                    continue
                finally:
                    self.spent[name] += time.perf_counter() - t
                f = figures(wall, records, {})
                run |= {k: _round(f[k]) for k in ("wall_s", "turns_per_s", "ttft_p50", "ttft_p99", "itl_p50",
                                                  "itl_p99", "cached_ratio", "recomputed_tokens", "lazy_layers")}
                entry["runs"].append(run)
        entry["ok"] = not any("error" in r for r in entry["runs"])
        return entry


def _round(value: Any) -> Any:
    return float(f"{value:.4g}") if isinstance(value, float) else value


# ---- the run ----------------------------------------------------------------------------------------------------
def entry_point_check() -> dict[str, Any]:
    """SGLang loads general plugins from this entry-point group in every process."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name == "simlayerkv"]
    return {"ok": [ep.value for ep in found] == ["slkv_sglang.plugin:register"], "group": PLUGIN_GROUP,
            "found": [{"name": ep.name, "value": ep.value, "dist": ep.dist.name if ep.dist else None} for ep in found]}


def kit_check(items: list[str], cuda: bool) -> dict[str, Any] | str:
    """What ``gpu_e2e.sh`` measured before this process: ``key=value`` pairs; a key ending in ``_rc`` is an exit
    status that must be 0."""
    if not cuda:
        return f"{NEEDS_CUDA} (unpacking the kit and prewarming SGLang's CUDA kernels)"
    values = dict(item.split("=", 1) for item in items)
    return {"ok": bool(values) and all(v == "0" for k, v in values.items() if k.endswith("_rc")), **values}


def save(report: dict[str, Any], out: Path) -> None:
    (out / REPORT).write_text(json.dumps(report, indent=1, default=str))


def _guarded(report: dict[str, Any], out: Path, name: str, check: Callable[[], Any]) -> Any:
    """Run one part of the run; an exception fails that part with its message and the run goes on. The report so
    far is written after each part, so a run stopped by its time limit keeps what it measured."""
    t = time.perf_counter()
    try:
        value = check()
    except Exception as exc:
        logging.getLogger("slkv.gpu_e2e").exception("%s failed", name)
        value = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    report.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 1)
    save({**report, name: value}, out)
    return value


def run(out: Path, dry: bool, kit: list[str], serve_model: Path | None, budget: float | None,
        parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    import torch
    import sglang

    from .reference import ReferenceModel

    cuda = torch.cuda.is_available() and not dry
    scale = DEVICE if cuda else DRY
    if budget is not None:
        scale = replace(scale, serve_budget_s=budget)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "sglang": sglang.__version__},
        "kit": kit_check(kit, cuda), "entry_point": entry_point_check()}
    work = out / "work"
    model = write_checkpoint(work / "random-llama", scale.model, scale.dtype)
    reference = ReferenceModel(model, device="cuda" if cuda else "cpu")
    tol = Tolerance(scale.score_tol, scale.token_margin, tokens_vs_reference=True)
    if cuda and serve_model is not None:
        serve_path, serve_config, load = serve_model, _config(serve_model), "dummy"
    else:  # the dry run serves the correctness checkpoint, so its engines serve both
        serve_path, serve_config, load = model, scale.model, None
    engines = Engines(cuda)
    serve = Serving(engines, scale, serve_path, serve_config["num_hidden_layers"], serve_config["vocab_size"], load)
    entries: dict[str, Any] = {}
    report.update({part: NOT_CHOSEN for part in PARTS if part not in parts})
    if "decode_graphs" in parts:
        report["decode_graphs"] = _guarded(report, out, "decode_graphs",
                                           lambda: decode_graphs("cuda" if cuda else "cpu"))
    try:
        # plain SGLang's serving first: in the dry run its engine is the one the correctness checks start next
        if "serving" in parts:
            entries["sglang"] = _guarded(report, out, "serving_sglang", lambda: serve.play("sglang"))
        if "correctness" in parts:
            checks = _guarded(report, out, "correctness",
                              lambda: correctness(engines, scale, model, reference, None, tol))
            report.update(checks if "startup" in checks else {"correctness": checks})
        if "serving" in parts:
            for name in ("simlayerkv", "simlayerkv_offload"):
                entries[name] = _guarded(report, out, f"serving_{name}", lambda name=name: serve.play(name))
            report["serving"] = serve.summary(entries)
        if "serving_hicache" in parts:
            report["serving_hicache"] = (_guarded(report, out, "serving_hicache", lambda: serve.play("hicache"))
                                         if cuda else NO_CPU_HICACHE)
        if "fp8_kv" in parts and not cuda:
            report["fp8_kv"] = NO_CPU_FP8
        elif "fp8_kv" in parts:
            fp8 = Tolerance(FP8_SCORE_TOL, scale.token_margin, tokens_vs_reference=False)
            checks = _guarded(report, out, "fp8_kv",
                              lambda: correctness(engines, scale, model, reference, "fp8_e4m3", fp8))
            report["fp8_kv"] = {"ok": all(c["ok"] for c in checks.values()), **checks}
    finally:
        engines.close()
    report["engine_starts"] = engines.starts
    report.setdefault("seconds", {})["total"] = round(time.perf_counter() - t0, 1)
    return report


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def failed(report: dict[str, Any]) -> list[str]:
    return [name for name, value in report.items() if isinstance(value, dict) and value.get("ok") is False]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="slkv gpu-e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="the CPU engine at small shapes; CUDA-only parts skipped")
    p.add_argument("--out", type=Path, default=Path("."), help=f"folder for {REPORT} (default: .)")
    p.add_argument("--serve-model", type=Path, default=None,
                   help="on CUDA: a Llama config folder served with dummy weights (the kit's llama3-8b-dummy)")
    p.add_argument("--serve-budget-s", type=float, default=None, help="stop starting serving points after this")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="run only these parts (default: all; correctness includes startup and graphs_equal_eager)")
    p.add_argument("--kit", nargs="*", default=[], metavar="KEY=VALUE", help="figures gpu_e2e.sh measured")
    p.add_argument("--entry-point-dir", type=Path, default=None,
                   help="only write the plugin's entry-point dist-info into this folder and exit")
    args = p.parse_args(argv)
    if args.entry_point_dir is not None:
        print(write_entry_point(args.entry_point_dir, Path(__file__).resolve().parents[2]))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args.out, args.dry, args.kit, args.serve_model, args.serve_budget_s, tuple(args.parts))
    save(report, args.out)
    for name, value in report.items():
        ok = value if isinstance(value, str) else ("ok" if value.get("ok") else "FAILED") if isinstance(value, dict) \
            and "ok" in value else None
        if ok is not None:
            print(f"{name:<20} {ok}")
    print(f"wrote {args.out / REPORT} ({report['seconds']['total']} s)")
    return 1 if failed(report) else 0

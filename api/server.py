"""``slkv serve``: the SGLang engine with the SimLayerKV plugin and the chat API, in one process."""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import replace
from typing import Any

logger = logging.getLogger("slkv.serve")

# Bits per element of SGLang 0.5.23's ``--kv-cache-dtype`` values other than ``auto``
# (``sglang.srt.mem_cache.kv_cache_dtype``); the scales of the fp4 formats are not counted.
KV_CACHE_BITS = {"fp8_e4m3": 8, "fp8_e5m2": 8, "mxfp8": 8, "bf16": 16, "bfloat16": 16, "nvfp4": 4,
                 "fp4_mx_block16": 4}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slkv serve", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--model-path", default=None, help="HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--sglang-url", default=None,
                   help="use a running `python -m sglang.launch_server --enable-simlayerkv` instead of an in-process engine")
    p.add_argument("--sglang-admin-key", default=os.environ.get("SLKV_SGLANG_ADMIN_KEY"),
                   help="the --sglang-url worker's --admin-api-key (env SLKV_SGLANG_ADMIN_KEY), sent when PUT "
                        "/admin/offload sets its host budget")
    p.add_argument("--redis-url", default=os.environ.get("SLKV_REDIS_URL"),
                   help="session store (env SLKV_REDIS_URL); unset: an in-process store (quick start only)")
    p.add_argument("--redis-prefix", default="slkv:", help="key prefix in Redis (default slkv:)")
    p.add_argument("--session-ttl", type=int, default=3600, help="seconds an idle session is kept (default 3600)")
    p.add_argument("--api-keys", default=os.environ.get("SLKV_API_KEYS", ""),
                   help="comma-separated API keys (env SLKV_API_KEYS); unset: no authentication")
    p.add_argument("--admin-keys", default=os.environ.get("SLKV_ADMIN_KEYS", ""),
                   help="comma-separated admin keys for /admin/* (env SLKV_ADMIN_KEYS); user keys get 403 there")
    p.add_argument("--metrics-need-admin", action="store_true", help="/metrics answers admin keys only")
    p.add_argument("--max-turns-per-key", type=int, default=64,
                   help="turns one API key may run at once; more answer 429 (default 64)")
    p.add_argument("--schedule-policy", default="shortest-prefill-first",
                   help="SGLang scheduling policy of the in-process engine (default shortest-prefill-first: short "
                        "prompts are not queued behind long ones)")
    p.add_argument("--chunked-prefill-size", type=int, default=None,
                   help="SGLang's prefill chunk of the in-process engine (default: SGLang's, from the memory size); "
                        "a short turn waits at most about one chunk's forward behind long prompts")
    p.add_argument("--slkv-offload", action="store_true",
                   help="in-process engine: lazy layers free their device KV after a host copy (docs/memory.md)")
    p.add_argument("--slkv-offload-budget", type=int, default=None,
                   help="in-process engine: host bytes for offloaded KV (default 4 GiB); PUT /admin/offload changes it")
    p.add_argument("--slkv-threshold", type=float, default=None, help="lazy-layer threshold (default: SLKV_THRESHOLD or 0.9)")
    p.add_argument("--slkv-score", choices=["mean", "kvmin", "headmin"], default=None, help="score mode (default kvmin)")
    p.add_argument("--slkv-recent", type=int, default=None, help="recent window in lazy layers (default 1020)")
    p.add_argument("--disable-simlayerkv", action="store_true", help="serve with full KV")
    p.add_argument("--worker-name", default=os.uname().nodename, help="recorded in each turn's layer map")
    return p


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_turns_per_key < 1:
        parser.error("--max-turns-per-key must be at least 1")
    import uvicorn
    from transformers import AutoConfig, AutoTokenizer

    from slkv_sglang.config import SlkvConfig
    from slkv_sglang.model import ensure_bundled_model
    from slkv_sglang.model_layers import ModelLayers
    from slkv_sglang.runtime import make_engine, shutdown_engine

    from .app import create_app
    from .auth import Keys
    from .engine import EngineClient, RemoteEngineClient
    from .settings import Settings
    from .store import MemoryStore, RedisStore

    slkv = SlkvConfig.from_env()
    slkv = replace(slkv, enabled=not args.disable_simlayerkv, threshold=args.slkv_threshold or slkv.threshold,
                   score=args.slkv_score or slkv.score, recent=args.slkv_recent or slkv.recent,
                   offload=args.slkv_offload or slkv.offload,
                   offload_budget=slkv.offload_budget if args.slkv_offload_budget is None else args.slkv_offload_budget)
    path = args.model_path or str(ensure_bundled_model())
    hf = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    context_len = hf.max_position_embeddings
    scheduling = {"schedule_policy": args.schedule_policy}
    if args.chunked_prefill_size is not None:
        scheduling["chunked_prefill_size"] = args.chunked_prefill_size
    engine = None if args.sglang_url else make_engine(path, slkv=slkv, **scheduling)
    client = RemoteEngineClient(args.sglang_url, tokenizer, context_len, args.sglang_admin_key) if args.sglang_url \
        else EngineClient(engine, tokenizer, context_len)
    dtype, kv_cache_dtype = ((engine.server_args.dtype, engine.server_args.kv_cache_dtype) if engine is not None
                             else remote_dtypes(args.sglang_url))
    settings = Settings(
        layers=ModelLayers.from_hf_config(hf),
        keys=Keys(users=_keys(args.api_keys), admins=_keys(args.admin_keys)),
        model_name=os.path.basename(path.rstrip("/")),
        threshold=slkv.threshold,
        host_budget=slkv.offload_budget if engine is not None and slkv.enabled and slkv.offload else None,
        worker=args.worker_name,
        kv_bytes_per_token_layer=kv_bytes_per_token_layer(hf, dtype, kv_cache_dtype),
        max_turns_per_key=args.max_turns_per_key,
        metrics_need_admin=args.metrics_need_admin,
    )
    store = RedisStore(args.redis_url, args.redis_prefix, args.session_ttl) if args.redis_url else MemoryStore(args.session_ttl)
    if not args.redis_url:
        logger.warning("no --redis-url / SLKV_REDIS_URL: sessions live in this process only")
    app = create_app(client, store, settings)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if engine is not None:
            shutdown_engine(engine)
    return 0


def kv_bytes_per_token_layer(hf: Any, dtype: str, kv_cache_dtype: str) -> int:
    """Bytes of K and V of one token in one layer of the engine's KV pool, as SGLang types the pool: by
    ``--kv-cache-dtype``, or under ``auto`` by the checkpoint's FP8 KV quantization if it asks for one, else by
    the model's dtype (``--dtype``, ``auto`` resolved from the checkpoint by SGLang's own rule)."""
    text = hf.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    elements = 2 * text.num_key_value_heads * head_dim
    if kv_cache_dtype != "auto":
        if kv_cache_dtype not in KV_CACHE_BITS:
            raise ValueError(f"unknown --kv-cache-dtype {kv_cache_dtype!r}")
        return elements * KV_CACHE_BITS[kv_cache_dtype] // 8
    quant = getattr(hf, "quantization_config", None)
    if isinstance(quant, dict) and str(quant.get("kv_cache_quant_algo", "")).upper() == "FP8":
        return elements
    from sglang.srt.configs.model_config import _get_and_verify_dtype

    return elements * _get_and_verify_dtype(hf, dtype).itemsize


def remote_dtypes(url: str, wait_s: float = 60) -> tuple[str, str]:
    """``(dtype, kv_cache_dtype)`` of the SGLang server at ``url`` from its server info; behind sglang-router,
    whose own server info has no dtype, from the first healthy worker it lists. Waits up to ``wait_s`` for an
    answer: a router lists a worker only once it has registered it."""
    import httpx

    def info(base: str) -> dict[str, Any] | None:
        for path in ("/server_info", "/get_server_info"):  # the current path, then the deprecated one
            try:
                r = httpx.get(base + path, timeout=10)
                found = r.json() if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                continue
            if isinstance(found, dict) and "dtype" in found and "kv_cache_dtype" in found:
                return found
        return None

    def workers(base: str) -> list[str]:
        try:
            listed = httpx.get(base + "/workers", timeout=10).json()["workers"]
            return [w["url"].rstrip("/") for w in listed if w.get("is_healthy") and isinstance(w.get("url"), str)]
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return []

    base, deadline = url.rstrip("/"), time.monotonic() + wait_s
    while True:
        for server in (base, *workers(base)):
            if (found := info(server)) is not None:
                return found["dtype"], found["kv_cache_dtype"]
        if time.monotonic() > deadline:
            raise SystemExit(f"slkv serve: no server info with the KV dtype at {url} (nor at a worker it lists)")
        time.sleep(1)


def _keys(listed: str) -> frozenset[str]:
    return frozenset(k for k in listed.split(",") if k)

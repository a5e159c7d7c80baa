"""``slkv serve``: the SGLang engine with the SimLayerKV plugin and the chat API, in one process."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace

logger = logging.getLogger("slkv.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slkv serve", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--model-path", default=None, help="HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--sglang-url", default=None,
                   help="use a running `python -m sglang.launch_server --enable-simlayerkv` instead of an in-process engine")
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
    p.add_argument("--offload-budget", type=int, default=None,
                   help="host offload budget in bytes sent to the engine with every turn (default: the engine's "
                        "--slkv-offload-budget); changeable at run time with PUT /admin/offload")
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
    from slkv_sglang.runtime import make_engine, shutdown_engine

    from .app import create_app
    from .auth import Keys
    from .engine import EngineClient, RemoteEngineClient
    from .settings import Settings
    from .store import MemoryStore, RedisStore

    slkv = SlkvConfig.from_env()
    slkv = replace(slkv, enabled=not args.disable_simlayerkv, threshold=args.slkv_threshold or slkv.threshold,
                   score=args.slkv_score or slkv.score, recent=args.slkv_recent or slkv.recent)
    path = args.model_path or str(ensure_bundled_model())
    hf = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    context_len = hf.max_position_embeddings
    scheduling = {"schedule_policy": args.schedule_policy}
    if args.chunked_prefill_size is not None:
        scheduling["chunked_prefill_size"] = args.chunked_prefill_size
    engine = None if args.sglang_url else make_engine(path, slkv=slkv, **scheduling)
    client = RemoteEngineClient(args.sglang_url, tokenizer, context_len) if args.sglang_url else \
        EngineClient(engine, tokenizer, context_len)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    settings = Settings(
        keys=Keys(users=_keys(args.api_keys), admins=_keys(args.admin_keys)),
        model_name=os.path.basename(path.rstrip("/")),
        threshold=slkv.threshold,
        offload_budget_bytes=args.offload_budget,
        worker=args.worker_name,
        kv_bytes_per_token_layer=2 * hf.num_key_value_heads * head_dim * 4,  # K and V, float32
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


def _keys(listed: str) -> frozenset[str]:
    return frozenset(k for k in listed.split(",") if k)

"""KV-cache sizing for SimLayerKV (arXiv 2410.13846): device KV per session, full vs lazy layers trimmed.

    python scripts/sizing.py                       # Llama-3-8B, bf16, 8K context, 12 of 32 layers lazy
    python scripts/sizing.py --context 32768 --lazy-layers 16 --sessions 100

A lazy layer keeps only sink + recent tokens (4 + 1020 by default); other layers keep the whole context.
Per token per layer, KV takes 2 (K and V) x KV heads x head dim x dtype bytes. The number of lazy layers
varies per request: read it off the layer maps (``slkv:lazy_layers_per_turn``) of your own traffic. The
default 12 of 32 gives 32/20 = 1.6x at long contexts, the ~1.6x docs/evaluation.md quotes from the paper
for 7-8B models without quantization. Pure standard library; the output is deterministic.
"""

from __future__ import annotations

import argparse
import sys

GIB = 1 << 30


def human(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def sizing(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, context: int, lazy_layers: int,
           sink: int, recent: int, last: int, sessions: int) -> dict[str, float]:
    per_token_layer = 2 * kv_heads * head_dim * dtype_bytes
    # A lazy layer keeps sink + recent tokens; sequences under sink + recent + last are never trimmed.
    kept_lazy = context if context < sink + recent + last else sink + recent
    full = context * layers * per_token_layer
    slkv = ((layers - lazy_layers) * context + lazy_layers * kept_lazy) * per_token_layer
    host = lazy_layers * (context - kept_lazy) * per_token_layer  # what lazy layers stop reading
    return {
        "kv_bytes_per_token_layer": per_token_layer,
        "kv_bytes_per_token": per_token_layer * layers,
        "session_kv_full": full,
        "session_kv_simlayerkv": slkv,
        "compression": full / slkv,
        "sessions_per_gib_full": GIB / full,
        "sessions_per_gib_simlayerkv": GIB / slkv,
        "device_pool_full": sessions * full,
        "device_pool_simlayerkv": sessions * slkv,
        "host_offload_per_session": host,
        "host_offload_budget": sessions * host,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="decoder layers (default 32, Llama-3-8B)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads per layer (default 8, GQA)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per KV element (default 2, bf16)")
    p.add_argument("--context", type=int, default=8192, help="tokens per session (default 8192)")
    p.add_argument("--lazy-layers", type=int, default=12, help="lazy layers per request (default 12)")
    p.add_argument("--sink", type=int, default=4, help="sink tokens a lazy layer keeps (default 4)")
    p.add_argument("--recent", type=int, default=1020, help="recent tokens a lazy layer keeps (default 1020)")
    p.add_argument("--last", type=int, default=32,
                   help="last prompt queries that score a layer (default 32); shorter sequences are not trimmed")
    p.add_argument("--sessions", type=int, default=64, help="concurrent sessions to size for (default 64)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    for name in ("layers", "kv_heads", "head_dim", "dtype_bytes", "context", "recent", "last", "sessions"):
        if getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.sink < 0 or not 0 <= a.lazy_layers <= a.layers:
        parser.error("--sink must be >= 0 and --lazy-layers between 0 and --layers")
    r = sizing(a.layers, a.kv_heads, a.head_dim, a.dtype_bytes, a.context, a.lazy_layers, a.sink, a.recent,
               a.last, a.sessions)
    print("SimLayerKV KV sizing (arXiv 2410.13846)")
    print(f"model: {a.layers} layers, {a.kv_heads} KV heads, head_dim {a.head_dim}, {a.dtype_bytes}-byte KV; "
          f"context {a.context}; {a.lazy_layers} lazy layers keep {a.sink} + {a.recent} tokens; "
          f"{a.sessions} sessions")
    for key, value in r.items():
        if key == "compression":
            print(f"{key:<28} {value:.3f}x")
        elif key.startswith("sessions_per_gib"):
            print(f"{key:<28} {value:.3f}")
        else:
            print(f"{key:<28} {value} B ({human(value)})")
    print("note: the simlayerkv lines are device KV with --slkv-offload, where lazy"
          " layers' middle tokens move to the host tier (host_offload_* lines); without it the engine keeps full KV"
          " for every layer and lazy layers only read less.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

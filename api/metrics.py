"""Prometheus metrics with the ``slkv:`` prefix (SGLang's own use ``sglang:``)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from slkv_sglang.layer_map import LayerMap


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("slkv:sessions_open", "Open chat sessions", registry=r)
        self.turns = Counter("slkv:turns", "Chat turns served", registry=r)
        self.lazy_layers = Histogram("slkv:lazy_layers_per_turn", "Lazy layers per turn", registry=r,
                                     buckets=[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 24, 28, 32])
        self.lazy_heads = Histogram("slkv:lazy_kv_heads_per_turn", "Lazy (layer, KV head) pairs per turn (a lazy "
                                    "layer counts all of its KV heads)", registry=r,
                                    buckets=[0, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256])
        self.cached_tokens = Counter("slkv:cached_prompt_tokens", "Prompt tokens served from the radix cache", registry=r)
        self.device_kv_bytes = Gauge("slkv:device_kv_bytes_last_turn", "KV bytes the last turn reads on the device", registry=r)
        self.full_kv_bytes = Gauge("slkv:full_kv_bytes_last_turn", "KV bytes the last turn would read with full KV", registry=r)
        self.redis_errors = Counter("slkv:redis_errors", "Session store operations that failed", registry=r)
        self.engine_errors = Counter("slkv:engine_errors", "Turns failed by the remote worker or router", registry=r)
        self.replays = Counter("slkv:idempotent_replays", "Turns answered from the stored result of an earlier "
                               "request with the same Idempotency-Key", registry=r)
        self.turn_failures = Counter("slkv:turn_failures", "Chat turns answered with an error, by error code",
                                     ["code"], registry=r)
        self.worker_switches = Counter("slkv:worker_switches", "Turns served by another worker than the session's "
                                       "last one (history recomputed there)", registry=r)

        # The engine's offload counters as of the last turn it reported (--slkv-offload; cumulative there).
        self.engine_kv = {
            key: Gauge(f"slkv:{name}", help_, registry=r) for key, name, help_ in (
                ("host_held_bytes", "host_kv_bytes", "Bytes of KV the host tier holds (engine, last report)"),
                ("host_saved_bytes", "host_saved_bytes", "KV bytes copied to the host so far (engine)"),
                ("host_reloaded_bytes", "reloaded_bytes", "KV bytes copied back from the host so far (engine)"),
                ("host_save_seconds", "host_save_seconds", "Seconds spent copying KV to the host (engine)"),
                ("host_reload_seconds", "reload_seconds", "Seconds spent copying KV back (engine)"),
                ("host_evictions", "host_evictions", "Host entries (one decision's host copies each) evicted, least "
                 "recently used first (engine)"),
                ("host_refused", "host_refusals", "Saves to the host the budget refused in part or whole; that KV is "
                 "recomputed when needed (engine)"),
                ("lost_rows", "lost_kv_rows", "KV rows (one unit's KV of one slot) freed without a host copy (engine)"),
                ("demoted_rows", "demoted_kv_rows", "KV rows of idle cached conversations moved to the host to make "
                 "room; their next turn reloads them (engine)"),
                ("recomputed_tokens", "recomputed_tokens", "Cached tokens recomputed because their KV was on "
                 "neither tier (engine)"),
                ("free_rows", "device_free_kv_rows", "Free KV rows (one unit's KV of one slot) of the device pool (engine)"),
            )
        }
        # The shared tier's counters (--slkv-shared-store), where the engine reports them.
        self.engine_shared = {
            key: Gauge(f"slkv:{key}", help_, registry=r) for key, help_ in (
                ("shared_written_bytes", "KV bytes written back to the shared store so far (engine)"),
                ("shared_restored_tokens", "Prefix tokens restored from the shared store so far (engine)"),
                ("shared_restored_bytes", "KV bytes restored from the shared store so far (engine)"),
                ("shared_hits", "Shared-store lookups that restored a prefix (engine)"),
                ("shared_misses", "Shared-store lookups that found nothing past the radix match (engine)"),
                ("shared_failures", "Shared-store operations that failed or timed out; recomputed (engine)"),
                ("shared_write_dropped", "Blocks not written back because the queue was full (engine)"),
            )
        }

    @staticmethod
    def device_bytes(layer_map: dict[str, Any] | None, seq_len: int, bytes_per_token_layer: int) -> int:
        if layer_map is None:
            return 0
        lm = LayerMap.from_dict(layer_map)
        return round(sum(lm.kept_tokens(layer, seq_len) for layer in range(lm.num_layers)) * bytes_per_token_layer)

    def observe_turn(self, meta: dict[str, Any], layer_map: dict[str, Any] | None, bytes_per_token_layer: int) -> None:
        self.turns.inc()
        self.cached_tokens.inc(meta.get("cached_tokens", 0))
        if layer_map is not None:
            seq = meta["prompt_tokens"] + meta["completion_tokens"]
            self.lazy_layers.observe(len(layer_map["lazy_layers"]))
            self.lazy_heads.observe(len(layer_map.get("lazy_heads", layer_map["lazy_layers"])))
            self.device_kv_bytes.set(self.device_bytes(layer_map, seq, bytes_per_token_layer))
            self.full_kv_bytes.set(seq * len(layer_map["lazy"]) * bytes_per_token_layer)
            if "kv" in layer_map:
                for key, gauge in self.engine_kv.items():
                    gauge.set(layer_map["kv"][key])
                for key, gauge in self.engine_shared.items():
                    if key in layer_map["kv"]:
                        gauge.set(layer_map["kv"][key])

    def render(self) -> bytes:
        return generate_latest(self.registry)

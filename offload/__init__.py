"""Host memory tier for lazy layers' KV (SimLayerKV offload)."""

from .arena import ArenaStats, HostArena

__all__ = ["ArenaStats", "HostArena"]

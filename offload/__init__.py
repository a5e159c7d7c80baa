"""The host tier of lazy layers' KV (SimLayerKV offload) and the shared store behind it."""

from .arena import ArenaStats, HostArena
from .store import KvStore, StoreStats, open_store

__all__ = ["ArenaStats", "HostArena", "KvStore", "StoreStats", "open_store"]

"""The KV pools SimLayerKV installs: SGLang's own KV-cache class, with the reads and writes the plugin's attention
backends make, so that no backend knows where KV lives.

- ``SlotKVPool`` (SimLayerKV without offload): SGLang's per-layer buffers as they are; a token's KV sits at its
  slot id in every layer.
- ``RowKVPool`` (``--slkv-offload``): KV lives in the rows of a ``KvTier`` (``rows.py``), one row per (unit, slot)
  that holds KV, so a lazy unit gives its middle tokens' rows back; SGLang's own buffers are one page long. The
  pool owns the tier and the ``KvExecutor`` that moves KV between its parts.

SGLang's configurator builds the pool with its own class's arguments (``KVCacheConfigurator._resolve_kv_pool_class``,
``hooks/admission.kv_pool_class``); its slot allocator, radix cache and ``req_to_token`` are untouched.

What a backend calls, the same on both:

- ``set_kv_buffer``: new tokens' KV, SGLang's own call;
- ``restore`` before a prefill layer reads its prefix and ``heal`` after it wrote (nothing to do on slots);
- ``read``: one request's K and V at some slots of a layer, contiguous, or None once the request failed;
- ``key_reader``: a layer's keys indexable by slot ids (scoring);
- ``page_map`` / ``page_buffers``: a layer's slots as page ids into the buffers a paged kernel reads (FlashInfer);
- ``release_lazy``: a decision's lazy units give their middle rows back; returns the request's KV report;
- ``read_ends``: where a forward's reads of the pool's state end, for SGLang's overlap scheduler.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from sglang.srt.layers.attention.base_attn_backend import SharedReadEnds
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from ..config import SlkvConfig, SlkvConfigError
from .executor import KvExecutor
from .tier import KvTier, pool_rows, slot_factor, units_per_layer


class SlotReads:
    """The plugin's reads of SGLang's own buffers: a slot's KV in every layer's buffer at the slot id."""

    executor: KvExecutor | None = None  # KV moves between tiers: none here
    # the prefill computes the query padded to the whole history, as SGLang's torch_native extend: the plugin-off
    # engine's bits. A pool that restores a prefix computes only the new tokens' queries
    pads_prefill = True

    def restore(self, layer: int, req_to_token: torch.Tensor, prefix_lens: Sequence[int]) -> None:
        """Bring back the prefix KV a prefill layer is about to read."""

    def heal(self, layer: int, req_to_token: torch.Tensor, prefix_lens: Sequence[int], ext_lens: Sequence[int]) -> None:
        """Copy KV a prefill recomputed into cached slots that lack it."""

    def failed(self, pos: int) -> bool:
        """The request at batch position ``pos`` failed in this forward: nothing computed from it is served."""
        return False

    def read(self, pos: int, layer: int, slots: torch.Tensor,
             heads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values ``[n, heads, dim]`` of one request's ``slots`` in ``layer`` (its KV heads in ``heads``, a
        mask; None: all), contiguous; None when the request at batch position ``pos`` failed."""
        keys = self.get_key_buffer(layer).index_select(0, slots)
        values = self.get_value_buffer(layer).index_select(0, slots)
        if heads is None:
            return keys, values
        return keys[:, heads], values[:, heads]  # a mask index copies: contiguous

    def key_reader(self, layer: int) -> Any:
        """The layer's keys, indexable by slot ids."""
        return self.get_key_buffer(layer)

    def read_ends(self, declared: SharedReadEnds) -> SharedReadEnds:
        """From where on the scheduler's next device work (with overlap scheduling: freeing slots, radix inserts,
        admission) may run beside a forward, given where the backend's own reads end (``shared_read_ends``):
        SGLang's buffers add no reads of their own."""
        return declared

    @property
    def page_map(self) -> Any:
        """Where a paged kernel finds a layer's KV of some slots (``flashinfer_ops.PageMap``); None: at the slot
        ids, in every layer's own buffers."""
        return None

    @property
    def heads_per_page(self) -> int:
        """KV heads one page holds (0: all of a layer's)."""
        return 0

    def page_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[pages, heads_per_page, dim]`` that ``layer``'s pages index."""
        return self.get_key_buffer(layer), self.get_value_buffer(layer)

    def release_lazy(self, req_pool_idx: int, lazy: torch.Tensor, seq_len: int, req_to_token: torch.Tensor,
                     shared: Any) -> dict[str, Any]:
        """After a decision: fields of its record (the request's KV report where the pool has one)."""
        return {}


class SlotKVPool(SlotReads, MHATokenToKVPool):
    """SGLang's pool, the class its configurator builds with SimLayerKV on and no offload."""

    config: SlkvConfig  # set on the class the configurator builds (``pool_class``)


class _SlotView(SlotReads):
    """A pool SGLang composes of sub-pools (a model with sliding-window layers: ``SWAKVPool``, whose full-attention
    sub-pool is a ``SlotKVPool``), read through its own calls."""

    def __init__(self, pool: Any):
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def plugin_pool(pool: Any) -> SlotReads:
    """The KV pool a backend reads: the plugin's, or a view of SGLang's composite one."""
    return pool if isinstance(pool, SlotReads) else _SlotView(pool)


class RowKVPool(SlotKVPool):
    """KV in the rows of a ``KvTier``: SGLang's buffers are created one page long and the tier gets the bytes
    SGLang sized them for, less the slots' index (SGLang's slots are ``slot_factor`` times the full-KV tokens of
    those bytes: ``hooks.admission.overcommit_pool``). With ``--slkv-shared-store`` the tier has its shared tier."""

    pads_prefill = False
    tier: KvTier

    def _create_buffers(self) -> None:
        size, self.size = self.size, 0  # SGLang's buffers: one page, never read
        try:
            super()._create_buffers()
        finally:
            self.size = size
        cfg = self.config
        per_layer = units_per_layer(cfg.granularity, self.head_num)
        row_bytes = 2 * self.head_num // per_layer * self.head_dim * self.dtype.itemsize
        factor = slot_factor(row_bytes, cfg.overcommit)
        rows = pool_rows(self.layer_num * per_layer, size, factor, row_bytes)
        if rows < self.layer_num * per_layer:  # not one token whole
            raise SlkvConfigError(f"--slkv-overcommit {factor:g} leaves {max(rows, 0)} rows of {row_bytes} bytes once "
                                  "the slots' index is paid: lower it, or leave it unset")
        self.tier = KvTier.build(self.layer_num, per_layer, size, rows, heads=self.head_num, dim=self.head_dim,
                                 dtype=self.dtype, device=self.device, host_budget=cfg.offload_budget,
                                 poison=cfg.poison, host_prepin=int(cfg.offload_budget * cfg.offload_prepin))
        if cfg.shared_store:  # the shared tier's keys name the served model
            from sglang.srt.runtime_context import get_serving

            from .shared import SharedTier

            self.tier.shared = SharedTier.open(cfg.shared_store, get_serving().served_model_name, self.tier.rows,
                                               self.tier.host, cfg.shared_timeout_ms, cfg.shared_queue_bytes,
                                               cfg.shared_write_back == "finished")
        self.executor = KvExecutor(self.tier, cfg.sink, cfg.recent, strict=cfg.poison)

    def read_ends(self, declared: SharedReadEnds) -> SharedReadEnds:
        """Every decode layer reads the row index of its requests' slots, so a decode graph's replay is waited for
        whole, not from SGLang's in-graph marker on: slots freed meanwhile (a finished request's, duplicates after an
        insert) would read as missing in later layers, failing the forward's requests, and their rows could be
        taken by a shared-tier restore while the replay still writes its new tokens' KV into them."""
        return SharedReadEnds.POST_REPLAY if declared is SharedReadEnds.IN_REPLAY else declared

    def set_kv_buffer(self, layer: Any, loc_info: Any, cache_k: torch.Tensor, cache_v: torch.Tensor,
                      k_scale: float | None = None, v_scale: float | None = None, **_: Any) -> None:
        from sglang.srt.mem_cache.memory_pool import unwrap_write_loc

        loc, _, _ = unwrap_write_loc(loc_info)
        if k_scale is not None:  # a quantised cache stores KV over its scale, as SGLang's pool does
            cache_k, cache_v = cache_k / k_scale, cache_v / v_scale
        self.executor.write(layer.layer_id, loc, cache_k, cache_v)

    def restore(self, layer: int, req_to_token: torch.Tensor, prefix_lens: Sequence[int]) -> None:
        self.executor.restore(layer, req_to_token, prefix_lens)

    def heal(self, layer: int, req_to_token: torch.Tensor, prefix_lens: Sequence[int], ext_lens: Sequence[int]) -> None:
        self.executor.heal(layer, req_to_token, prefix_lens, ext_lens)

    def failed(self, pos: int) -> bool:
        return self.executor.failed(pos)

    def read(self, pos: int, layer: int, slots: torch.Tensor,
             heads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.executor.failed(pos) else self.executor.read(pos, layer, slots, heads)

    def key_reader(self, layer: int) -> Any:
        return _RowKeys(self.executor, layer)

    @property
    def page_map(self) -> Any:
        return self.page_ids

    @property
    def heads_per_page(self) -> int:
        return self.tier.rows.row_shape[1]

    def page_ids(self, layer: int, slots: torch.Tensor, units: torch.Tensor | None) -> torch.Tensor:
        """Rows of ``slots`` in ``layer`` (``DeviceRows.page_ids``); a missing one fails the step's requests
        (``KvExecutor.pages``)."""
        return self.executor.pages(self.tier.rows.page_ids(layer, slots, units))

    def page_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tier.rows.kv[0], self.tier.rows.kv[1]

    def release_lazy(self, req_pool_idx: int, lazy: torch.Tensor, seq_len: int, req_to_token: torch.Tensor,
                     shared: Any) -> dict[str, Any]:
        """Lazy units give back their middle rows (a host copy first); slots that other running requests read
        (``shared()``, a mask over slots) keep theirs. Returns the request's KV report (``kv``)."""
        return self.executor.release_lazy(req_pool_idx, lazy, seq_len, req_to_token, shared(self.tier.rows.num_slots))


class _RowKeys:
    """A layer's keys indexed by slot ids, read through the tier's rows (what scoring indexes)."""

    def __init__(self, executor: KvExecutor, layer: int):
        self.executor, self.layer = executor, layer

    def __getitem__(self, slots: torch.Tensor) -> torch.Tensor:
        """A missing row is read as row 0 and fails the step (``KvExecutor.pages``) before its decisions act."""
        rows = self.executor.tier.rows
        return rows.gather(self.executor.pages(rows.rows_of(self.layer, slots)), 0)


def pool_class(config: SlkvConfig) -> type[SlotKVPool]:
    """The pool class SGLang's configurator builds for an MHA model with SimLayerKV on."""
    base = RowKVPool if config.offload else SlotKVPool
    return type(base.__name__, (base,), {"config": config, "__module__": __name__})

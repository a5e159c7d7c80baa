"""The FlashInfer backend's reads through the plugin's KV pool, free of FlashInfer's package so that they also run
with torch kernels in its place (``torch_paged``, ``--slkv-flashinfer-standin``).

Decode: restricted layers, and over a pool whose pages differ per layer (``--slkv-offload``'s rows) every
full-attention layer, run ``WindowedDecode``: planned once per step, per lazy pattern. Prefill over such a pool,
and over SGLang's own buffers in a forward where some request decides from its own last queries, runs
``PagedExtend``, planned at the forward's first full-attention layer and reused by the others: after the pool
restored the layer's prefix and took its new tokens, each request's new tokens attend causally to all its KV, and
the all-keys log-sum-exp comes with the output for scoring. Otherwise, over SGLang's own buffers (pages are slot
ids), the backend's parent runs every unrestricted read.

Decode CUDA graphs (SGLang's breakable backend): every full-attention layer's decode attention is an eager break
(SGLang's ``eager_on_graph``) between captured segments, writing into an output the segment before it allocated,
so which layers are restricted and what they read is decided per step on the host, as without graphs. The step
is planned before each replay from the live batch (``admit_graph`` keeps it), padded to the graph's batch size.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph.breakable_cuda_graph import eager_on_graph
from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph.context import is_in_breakable_cuda_graph

from ..config import SlkvConfig
from ..kv.pool import SlotReads
from ..tracker import LazyTracker
from .flashinfer_ops import AttnShape, PagedExtend, WindowedDecode


class PagedReads:
    def __init__(self, pool: SlotReads, tracker: LazyTracker, config: SlkvConfig, shape: AttnShape,
                 new_decode_wrapper: Callable[[], Any], new_prefill_wrapper: Callable[[], Any],
                 **plan_kwargs: Any):
        """``plan_kwargs``: passed to every decode plan (SGLang's own, e.g. ``fixed_split_size``)."""
        self.pool, self.tracker, self.shape = pool, tracker, shape
        self.full = frozenset(tracker.full_layers)
        self.windowed = WindowedDecode(new_decode_wrapper, shape, config.sink, config.recent, page_map=pool.page_map,
                                       heads_per_page=pool.heads_per_page, **plan_kwargs)
        self.extend = PagedExtend(new_prefill_wrapper(), shape, pool.page_map, pool.heads_per_page)
        self._extend_planned = False
        self._wants_lse = False  # this forward's scoring takes the prefill's log-sum-exp

    def plan(self, forward_batch: Any, plan: Any, req_to_token: torch.Tensor, rows: int = 0) -> None:
        """Once per forward (``init_forward_metadata``), after the tracker planned it (``plan``). ``rows``: a decode
        graph's batch size, the batch padded to it with requests reading slot ``req_to_token[0, 0]``, as SGLang pads
        its own graph's batch."""
        self._extend_planned = False
        self._wants_lse = plan is not None and not plan.is_decode and plan.wants_lse
        window = plan.window if plan is not None and plan.is_decode else {}
        if not forward_batch.forward_mode.is_decode() or (not window and self.windowed.page_map is None):
            self.windowed.plan([], {}, {})
            return
        indices = forward_batch.req_pool_indices_cpu
        if indices is None:
            indices = forward_batch.req_pool_indices.tolist()
        seq_lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
        req_slots = [req_to_token[int(idx), :n] for idx, n in zip(indices, seq_lens.tolist())]
        req_slots += [req_to_token[0, :1]] * (rows - len(req_slots))
        self.windowed.plan(req_slots, window, plan.heads if window else {}, layers=sorted(self.full))

    def runs_extend(self, layer: Any) -> bool:
        """This prefill layer is the plugin's (a pool of per-layer pages, or scoring wants its log-sum-exp), not
        the backend parent's."""
        return layer.layer_id in self.full and (self.windowed.page_map is not None or self._wants_lse)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer: Any,
                       forward_batch: Any, write: Callable[[], None]) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's prefill attention ``[tokens, heads x dim]`` and log-sum-exp ``[heads, tokens]``; ``write``
        stores the new tokens' KV (between the pool's restore and heal)."""
        pool, lid = self.pool, layer.layer_id
        req_to_token = self.tracker.req_to_token
        prefixes, exts = forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu
        pool.restore(lid, req_to_token, prefixes)  # the prefill attends to its whole prefix: bring it back first
        write()
        pool.heal(lid, req_to_token, prefixes, exts)
        if not self._extend_planned:  # the same lengths in every layer
            indices = forward_batch.req_pool_indices.tolist()
            self.extend.plan(exts, [req_to_token[idx, : p + e] for idx, p, e in zip(indices, prefixes, exts)],
                             layer.scaling, layer.logit_cap or None)
            self._extend_planned = True
        o, lse = self.extend.run(lid, q.contiguous().view(-1, layer.tp_q_head_num, layer.head_dim),
                                 pool.page_buffers(lid), k_scale=layer.k_scale_float, v_scale=layer.v_scale_float)
        return o.view(-1, layer.tp_q_head_num * layer.head_dim), lse

    def restricts(self, layer_id: int) -> bool:
        """This decode layer is the plugin's: restricted, or reading per-layer pages."""
        return self.windowed.restricts(layer_id)

    def forward_decode(self, q: torch.Tensor, layer: Any) -> torch.Tensor:
        """The layer's decode attention ``[requests, heads x dim]`` (its new KV written before)."""
        return self.windowed.run(  # SGLang's own decode call, through the rewritten indices
            layer.layer_id,
            q.contiguous().view(-1, layer.tp_q_head_num, layer.head_dim),
            self.pool.page_buffers(layer.layer_id),
            sm_scale=layer.scaling,
            logits_soft_cap=layer.logit_cap,
            k_scale=layer.k_scale_float,
            v_scale=layer.v_scale_float,
        ).view(-1, layer.tp_q_head_num * layer.head_dim)


class PagedForward:
    """Put before the backend (and its ``ScoringMixin``): its prefill and decode layers that ``PagedReads`` serves
    run there and are scored; the others go to the backend. Wants ``_paged`` and ``_write(layer, forward_batch, k,
    v, save)`` (the new tokens' KV into the pool)."""

    _paged: PagedReads

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # type: ignore[no-untyped-def]
        if not self._paged.runs_extend(layer):
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)  # type: ignore[misc]
        o, lse = self._paged.forward_extend(q, k, v, layer, forward_batch,
                                            lambda: self._write(layer, forward_batch, k, v, save_kv_cache))
        self._score(q, layer, lse)  # type: ignore[attr-defined]
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # type: ignore[no-untyped-def]
        if not is_in_breakable_cuda_graph() or layer.layer_id not in self._paged.full:
            return self._decode(q, k, v, layer, forward_batch, save_kv_cache)
        # which layers a step restricts changes per step: decided inside the break, never at capture
        out = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        self._decode_break(q, k, v, out, layer, forward_batch, save_kv_cache)
        return out

    @eager_on_graph
    def _decode_break(self, q, k, v, out, layer, forward_batch, save_kv_cache):  # type: ignore[no-untyped-def]
        """Runs eagerly at every replay, with the capture's tensors (the graph's buffers, refilled per step) and
        the step's plan (``plan_graph_step``); writes ``out`` in place, so the graph holds no output of its own."""
        out.copy_(self._decode(q, k, v, layer, forward_batch, save_kv_cache).view_as(out))

    def _decode(self, q, k, v, layer, forward_batch, save_kv_cache):  # type: ignore[no-untyped-def]
        if not self._paged.restricts(layer.layer_id):
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)  # type: ignore[misc]
        self._write(layer, forward_batch, k, v, save_kv_cache)  # type: ignore[attr-defined]
        o = self._paged.forward_decode(q, layer)
        self._score(q, layer)  # type: ignore[attr-defined]
        return o

    # ---- decode CUDA graphs ----------------------------------------------------------------------------
    _graph_batch: Any = None  # the live batch of the replay about to run (``admit_graph``)

    def admit_graph(self, forward_batch: Any) -> bool:
        """A decode batch SGLang would replay a graph for: False sends it to the eager forward. A request deciding
        at its first decode step (``--slkv-mode decode``) scores in it, with a host sync: eager. Otherwise the
        batch is kept for ``plan_graph_step``."""
        indices = forward_batch.req_pool_indices_cpu
        if indices is None:
            indices = forward_batch.req_pool_indices.tolist()
        if self.tracker.decides_in_decode(indices):  # type: ignore[attr-defined]
            self._graph_batch = None
            return False
        self._graph_batch = forward_batch
        return True

    def plan_graph_step(self, rows: int, in_capture: bool) -> None:
        """Before a decode graph's capture or replay (``init_forward_metadata_out_graph``): at capture nothing is
        planned (every break then runs the parent's decode); at replay the step is planned, once, from the batch
        ``admit_graph`` kept, padded to the graph's ``rows``."""
        tracker = self.tracker  # type: ignore[attr-defined]
        if in_capture:
            tracker.idle()
            self._paged.windowed.plan([], {}, {})
            return
        forward_batch, self._graph_batch = self._graph_batch, None
        if forward_batch is None:
            raise RuntimeError("slkv: a decode graph replays a batch that DecodeCudaGraphRunner.can_run_graph "
                               "did not admit")
        plan = tracker.plan(forward_batch)
        self._paged.plan(forward_batch, plan, tracker.req_to_token, rows=rows)

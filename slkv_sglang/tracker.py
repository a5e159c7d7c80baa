"""Backend-independent SimLayerKV state: per-request lazy maps, scoring during prefill, decode windows.

An attention backend owns one ``LazyTracker``. Per forward it calls ``plan(forward_batch)`` once (host-side
metadata, FlashInfer-style), then per layer ``score(...)`` after attention and, in decode,
``restricted_positions(layer)`` / ``window_indices(i)`` to know which requests read only sink + recent KV
(``partial_heads(layer)``: which read it in some KV heads only, with head granularity).
State is keyed by ``req_pool_idx`` (the request's index in ``req_to_token``). A decision leaves the tracker once,
as the ``Decision`` that ``score`` returns after the last layer: the backend acts on it and reports it; nothing calls back into the tracker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .config import SlkvConfig
from .layer_map import LayerMap
from .request_params import RequestParams
from .scoring import decide, window_slots
from .tensor_parallel import HeadGather

logger = logging.getLogger("slkv.tracker")

# A backend's scoring: per deciding request, its last queries [n, H, D], its key slots [L] and, where the attention
# kernel gave it, the queries' log-sum-exp over all keys [H, n] -> masses [H].
MassFn = Callable[[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]], list[torch.Tensor]]


@dataclass
class _Scorer:
    """One request that takes its lazy decision in this forward."""

    pos: int  # position in the batch
    req_pool_idx: int  # the request's index in req_to_token
    params: RequestParams
    q_start: int  # index of this request's first query in the forward's q
    q_end: int
    seq_len: int  # keys 0..seq_len-1 (including this forward's tokens)
    prompt_len: int  # for the short-sequence rule
    key_slots: torch.Tensor  # KV slot ids of positions 0..seq_len-1
    carry: dict[int, torch.Tensor] | None  # per layer, queries carried over from the previous chunk
    keep_tail: bool  # not the prompt's last chunk: keep the last queries for the next one
    decide: bool
    per_head: list[torch.Tensor | None] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    """A request's lazy layers and heads, decided in this forward."""

    rid: str
    req_pool_idx: int
    lazy: torch.Tensor  # [layers, KV heads] bool: the heads decode reads sink + recent from
    seq_len: int
    layer_map: LayerMap
    identification_s: float  # scoring time over the request's prefill
    forward_s: float  # the prefill's forward time


@dataclass
class _Tail:
    end: int  # sequence length after the chunk that produced it
    q: dict[int, torch.Tensor]  # layer -> [n, H, D]


@dataclass
class _AwaitingDecode:
    params: RequestParams
    prompt_len: int


@dataclass
class BatchPlan:
    is_decode: bool
    req_pool_indices: list[int]
    seq_lens: list[int]
    scorers: list[_Scorer]
    window: dict[int, torch.Tensor]  # decode: batch position -> KV slot ids of sink + recent
    started: float
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # decode: batch position -> lazy [layers, KV heads]
    whole: dict[int, list[bool]] = field(default_factory=dict)  # decode: batch position -> per layer, all heads lazy
    some: dict[int, list[bool]] = field(default_factory=dict)  # decode: batch position -> per layer, some head lazy
    clocks: list["_Clock"] = field(default_factory=list)  # scoring time per layer

    @property
    def wants_lse(self) -> bool:
        """Requests decide in this forward, all from its own last queries: the prefill's all-keys log-sum-exp serves
        their scores (queries carried over from an earlier chunk have none here, and are scored otherwise)."""
        deciding = [s for s in self.scorers if s.decide]
        return bool(deciding) and all(s.carry is None for s in deciding)


class _Clock:
    """Scoring time of one layer: host time on CPU, CUDA events on a GPU (read after the decision's sync)."""

    def __init__(self, device: torch.device):
        self._events = None
        if device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._t0, self._t1 = time.perf_counter(), 0.0

    def stop(self) -> "_Clock":
        if self._events is not None:
            self._events[1].record()
        self._t1 = time.perf_counter()
        return self

    def seconds(self) -> float:
        if self._events is not None:
            # a no-op after the decision's sync; a forward where nobody decides (a prompt's earlier chunk) waits
            # for its scoring here, once per forward
            self._events[1].synchronize()
            return self._events[0].elapsed_time(self._events[1]) / 1e3
        return self._t1 - self._t0


class LazyTracker:
    def __init__(self, config: SlkvConfig, num_layers: int, num_kv_heads: int, req_pool_size: int,
                 req_to_token: torch.Tensor, gather_heads: HeadGather | None = None,
                 full_layers: Sequence[int] | None = None, head_decode: bool = True):
        """``num_kv_heads``: the model's total; ``gather_heads``: under tensor parallel, this rank's per-head masses
        to all of the model's heads (``tensor_parallel.all_gather_heads``), so every rank decides alike.
        ``full_layers``: the layers scored and made lazy (``ModelLayers.full``; None: every layer); the others
        (sliding windows) are never scored, never lazy, and their score in the layer map is None.
        ``head_decode``: the backend's decode can read sink + recent in some KV heads of a layer and everything in
        the others; without it a layer is lazy only when all of its heads are (a partly lazy layer keeps full KV)."""
        self.config = config
        self.num_layers = num_layers
        self.full_layers = list(range(num_layers) if full_layers is None else full_layers)
        self.is_full = torch.zeros(num_layers, dtype=torch.bool)
        self.is_full[self.full_layers] = True
        self.num_kv_heads = num_kv_heads
        self.gather_heads = gather_heads
        self.req_to_token = req_to_token
        self.head_decode = head_decode
        # per req_pool_idx; a host copy, read per forward
        self.lazy = torch.zeros(req_pool_size, num_layers, num_kv_heads, dtype=torch.bool)
        self._tails: dict[int, _Tail] = {}
        self._awaiting: dict[int, _AwaitingDecode] = {}
        self._timing: dict[int, list[float]] = {}  # req_pool_idx -> [identification s, forward s] over its prefill
        self.plan_: BatchPlan | None = None
        self._staged: list[RequestParams] | None = None
        self.running: dict[int, int] = {}  # req_pool_idx -> sequence length, every request seen and not yet released
        self._running_mask: torch.Tensor | None = None  # running_slots() of all of them, until ``running`` changes

    # ---- per forward -------------------------------------------------------------------------------
    def stage(self, params: list[RequestParams]) -> None:
        """The settings of the requests in the batch about to be planned (same order)."""
        self._staged = params

    def plan(self, fb) -> BatchPlan | None:
        """Host-side metadata for one forward; None when SimLayerKV has nothing to do in it."""
        mode = fb.forward_mode
        params, self._staged = self._staged, None
        if params is None or not (mode.is_extend() or mode.is_decode()):  # (mixed batches: refused at start-up)
            self.plan_ = None
            return None
        # host copies where SGLang keeps them, so that planning does not wait for the device
        indices = fb.req_pool_indices_cpu if fb.req_pool_indices_cpu is not None else fb.req_pool_indices
        req_pool_indices = indices.tolist()
        if len(params) != len(req_pool_indices):
            raise RuntimeError(f"slkv: staged settings for {len(params)} requests, batch has {len(req_pool_indices)}")
        seq_lens = (fb.seq_lens_cpu if fb.seq_lens_cpu is not None else fb.seq_lens).tolist()
        self.running.update(zip(req_pool_indices, seq_lens))
        self._running_mask = None
        plan = BatchPlan(mode.is_decode(), req_pool_indices, seq_lens, [], {}, time.perf_counter())
        if plan.is_decode:
            self._plan_decode(plan, params)
        else:
            self._plan_extend(plan, params, fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)
        self.plan_ = plan
        return plan

    def idle(self) -> None:
        """The forward about to run does no SimLayerKV work (a decode graph's capture): no plan, nothing staged
        taken."""
        self.plan_ = None

    def decides_in_decode(self, req_pool_indices: Sequence[int]) -> bool:
        """Some of these requests decide at this decode step (``--slkv-mode decode``, their first)."""
        return any(int(idx) in self._awaiting for idx in req_pool_indices)

    def _plan_extend(self, plan: BatchPlan, params: list[RequestParams], prefix_lens: list[int], ext_lens: list[int]) -> None:
        cfg = self.config
        q_start = 0
        for pos, (idx, seq_len, p) in enumerate(zip(plan.req_pool_indices, plan.seq_lens, params)):
            ext, prefix = int(ext_lens[pos]), int(prefix_lens[pos])
            tail = self._tails.pop(idx, None)
            carry = tail.q if tail is not None and tail.end == prefix else None
            if carry is None:
                self._timing[idx] = [0.0, 0.0]
            if p.last_chunk:
                self.lazy[idx] = False
                self._awaiting.pop(idx, None)
            if p.enabled and p.mode == "prefill":
                plan.scorers.append(
                    _Scorer(
                        pos=pos, req_pool_idx=idx, params=p, q_start=q_start + max(0, ext - cfg.last), q_end=q_start + ext,
                        seq_len=seq_len, prompt_len=seq_len, key_slots=self.req_to_token[idx, :seq_len],
                        carry=carry if ext < cfg.last else None, keep_tail=not p.last_chunk,
                        decide=p.last_chunk, per_head=[None] * self.num_layers,
                    )
                )
            elif p.enabled and p.last_chunk:  # decode variant: decide at the first decode step
                self._awaiting[idx] = _AwaitingDecode(p, prompt_len=seq_len)
            q_start += ext

    def _plan_decode(self, plan: BatchPlan, params: list[RequestParams]) -> None:
        cfg = self.config
        for pos, (idx, seq_len) in enumerate(zip(plan.req_pool_indices, plan.seq_lens)):
            waiting = self._awaiting.pop(idx, None)
            if waiting is not None:
                plan.scorers.append(
                    _Scorer(
                        pos=pos, req_pool_idx=idx, params=waiting.params, q_start=pos, q_end=pos + 1, seq_len=seq_len,
                        prompt_len=waiting.prompt_len, key_slots=self.req_to_token[idx, :seq_len], carry=None,
                        keep_tail=False, decide=True, per_head=[None] * self.num_layers,
                    )
                )
            if seq_len > cfg.kept_tokens and bool(self.lazy[idx].any()):
                plan.window[pos] = window_slots(self.req_to_token[idx], seq_len, cfg.sink, cfg.recent)
                lazy = plan.heads[pos] = self.lazy[idx].clone()
                plan.whole[pos], plan.some[pos] = lazy.all(dim=1).tolist(), lazy.any(dim=1).tolist()

    # ---- per layer ---------------------------------------------------------------------------------
    def restricted_positions(self, layer_id: int) -> list[int]:
        """Batch positions that read only sink + recent KV in every head of this layer (decode)."""
        plan = self.plan_
        if plan is None or not plan.window:
            return []
        return [pos for pos in plan.window if plan.whole[pos][layer_id]]

    def partial_heads(self, layer_id: int) -> dict[int, torch.Tensor]:
        """Batch positions that read only sink + recent KV in some KV heads of this layer (decode), with those
        heads' flags ``[KV heads]``."""
        plan = self.plan_
        if plan is None or not plan.window:
            return {}
        return {pos: plan.heads[pos][layer_id] for pos in plan.window
                if plan.some[pos][layer_id] and not plan.whole[pos][layer_id]}

    def window_indices(self, pos: int) -> torch.Tensor:
        assert self.plan_ is not None
        return self.plan_.window[pos]

    def score(self, q: torch.Tensor, layer_id: int, mass: MassFn, lse: torch.Tensor | None = None) -> list[Decision]:
        """After a layer's attention (its KV is written): score the requests deciding in this forward; after the
        last layer, their decisions.

        ``mass(queries, key_slots, lses)`` is the backend's per-head mass for each deciding request; ``lse``
        (``[H, tokens]``, optional) the attention's log-sum-exp of this forward's queries over all their keys.
        """
        plan = self.plan_
        if plan is None or not plan.scorers:
            return []
        if not self.is_full[layer_id]:  # a sliding layer: nothing to score
            return self._finish(plan) if layer_id == self.num_layers - 1 else []
        clock = _Clock(q.device)
        cfg = self.config
        deciding: list[tuple[_Scorer, torch.Tensor, torch.Tensor | None]] = []
        for s in plan.scorers:
            q_last = q[s.q_start : s.q_end]
            lse_last = None if lse is None else lse[:, s.q_start : s.q_end]
            if s.carry is not None:  # queries of an earlier forward: their log-sum-exp is not in this one's
                q_last, lse_last = torch.cat([s.carry[layer_id], q_last])[-cfg.last :], None
            if s.keep_tail:
                self._tails.setdefault(s.req_pool_idx, _Tail(s.seq_len, {})).q[layer_id] = q_last[-cfg.last :].clone()
            if s.decide:
                deciding.append((s, q_last, lse_last))
        if deciding:
            masses = mass([d[1] for d in deciding], [d[0].key_slots for d in deciding], [d[2] for d in deciding])
            for (s, _, _), per_head in zip(deciding, masses):
                s.per_head[layer_id] = per_head
        plan.clocks.append(clock.stop())
        return self._finish(plan) if layer_id == self.num_layers - 1 else []

    def _finish(self, plan: BatchPlan) -> list[Decision]:
        deciding = [s for s in plan.scorers if s.decide]
        masses: list[torch.Tensor] = []
        if deciding:
            for s in deciding:
                if any(s.per_head[layer] is None for layer in self.full_layers):
                    raise RuntimeError(f"slkv: request {s.params.rid} was not scored in every full-attention layer")
            stacked = torch.stack([torch.stack([s.per_head[layer] for layer in self.full_layers])  # type: ignore[misc]
                                   for s in deciding])  # [R, full layers, H]
            if self.gather_heads is not None:
                stacked = self.gather_heads(stacked)
            masses = list(self._all_layers(stacked).cpu())  # the decision's one host sync
        elapsed = time.perf_counter() - plan.started  # after the sync: the forward has run
        spent = sum(clock.seconds() for clock in plan.clocks)
        for s in plan.scorers:
            timing = self._timing.setdefault(s.req_pool_idx, [0.0, 0.0])
            timing[0] += spent / len(plan.scorers)
            timing[1] += elapsed
        decisions = []
        for s, per_head in zip(deciding, masses):
            timing = self._timing[s.req_pool_idx]
            p = s.params
            lazy, scores, heads = decide(per_head, p.score, p.threshold, self.num_kv_heads,
                                         s.prompt_len >= self.config.min_trim_len, p.force_lazy, self.config.protect,
                                         p.granularity, p.force_lazy_heads)
            lazy &= self.is_full[:, None]  # where requests enter, forcing a sliding layer is refused
            if not self.head_decode:
                lazy &= lazy.all(dim=1, keepdim=True)
            self.lazy[s.req_pool_idx] = lazy
            layer_map = LayerMap.from_decision(
                lazy.tolist(), scores.tolist(), heads.tolist(), self.is_full.tolist(), threshold=p.threshold,
                score_mode=p.score, decide_mode=p.mode, sink=self.config.sink, recent=self.config.recent,
                decided_at=s.seq_len, granularity=p.granularity)
            decisions.append(Decision(p.rid, s.req_pool_idx, lazy, s.seq_len, layer_map, timing[0], timing[1]))
            logger.debug("slkv decision rid=%s lazy=%s", p.rid, layer_map.lazy_heads)
        return decisions

    def _all_layers(self, masses: torch.Tensor) -> torch.Tensor:
        """Per-head masses ``[R, full layers, H]`` as ``[R, L, H]``, NaN in sliding layers (never above a threshold)."""
        if len(self.full_layers) == self.num_layers:
            return masses
        out = masses.new_full((masses.shape[0], self.num_layers, masses.shape[2]), float("nan"))
        out[:, self.full_layers] = masses
        return out

    # ---- request lifecycle ---------------------------------------------------------------------------
    def sizes(self) -> dict[str, int]:
        """Entries of each per-request map (a soak test checks none of them grows)."""
        return {"tracker_tails": len(self._tails), "tracker_awaiting": len(self._awaiting),
                "tracker_timing": len(self._timing), "tracker_running": len(self.running)}

    def running_slots(self, num_slots: int, exclude: int | None = None) -> torch.Tensor:
        """Mask over KV slots ``[num_slots + 1]``: those a running request (other than the one at req_pool_idx
        ``exclude``) reads. Read-only: without ``exclude`` it is kept for the admission checks until the next forward
        or ``slots_moved``."""
        if exclude is None and self._running_mask is not None:
            return self._running_mask
        mask = torch.zeros(num_slots + 1, dtype=torch.bool)
        for idx, n in self.running.items():
            if idx != exclude:
                mask[self.req_to_token[idx, :n]] = True
        if exclude is None:
            self._running_mask = mask
        return mask

    def slots_moved(self) -> None:
        """SGLang pointed running requests at other slots (a radix insert found their tokens cached under other
        slots and freed theirs): ``running_slots`` recomputes."""
        self._running_mask = None

    def release(self, req_pool_idx: int) -> None:
        """The request at ``req_pool_idx`` is done: drop its carried queries and pending decode decision."""
        self._tails.pop(req_pool_idx, None)
        self._awaiting.pop(req_pool_idx, None)
        self._timing.pop(req_pool_idx, None)
        if self.running.pop(req_pool_idx, None) is not None:
            self._running_mask = None

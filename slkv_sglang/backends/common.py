"""What both backends share: the tracker built from a ModelRunner, scoring after each extend layer, and the
records of the decisions it takes."""

from __future__ import annotations

from typing import Any

import torch

from sglang.srt.runtime_context import get_parallel

from ..config import SlkvConfig
from ..model_layers import ModelLayers, check_attention_modules
from ..report import Outbox, record
from ..scoring import head_mass, window_masses
from ..tensor_parallel import all_gather_heads
from ..tracker import Decision, LazyTracker, MassFn


def make_tracker(model_runner: Any, config: SlkvConfig, head_decode: bool) -> LazyTracker:
    """The tracker of one backend; under tensor parallel it decides on all ranks' heads (``tensor_parallel``).
    It scores the model's full-attention layers only, once the loaded model is checked to attend as its config
    says (a refusal here stops start-up). ``head_decode``: the backend's decode restricts single KV heads."""
    hf = model_runner.model_config
    layers = ModelLayers.from_model_config(hf)
    check_attention_modules(layers, model_runner.model)
    req_to_token = model_runner.req_to_token_pool.req_to_token
    gather = None
    if get_parallel().tp_size > 1:
        from sglang.srt.distributed.parallel_state import get_tp_group

        gather = all_gather_heads(get_tp_group().device_group, hf.num_attention_heads)
    return LazyTracker(
        config,
        num_layers=hf.num_hidden_layers,
        num_kv_heads=hf.get_total_num_kv_heads(),
        req_pool_size=req_to_token.shape[0],
        req_to_token=req_to_token,
        gather_heads=gather,
        full_layers=layers.full,
        head_decode=head_decode,
    )


class ScoringMixin:
    """Put before an SGLang backend class: after each layer wrote its KV, score the deciders; their decisions'
    records go to the ``outbox`` the batch result ships them from."""

    tracker: LazyTracker
    pool: Any  # the KV pool the backend reads (``kv.pool.plugin_pool``)
    caps_logits = False  # the prefill's kernel applies the layer's logit soft cap (so its log-sum-exp has it)
    req_to_token_pool: Any
    outbox: Outbox

    def shared_read_ends(self, fm: Any) -> Any:
        """SGLang's declaration of where this backend's reads of shared state end, with the pool's own reads
        (``read_ends``)."""
        return self.pool.read_ends(super().shared_read_ends(fm))  # type: ignore[misc]

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # type: ignore[no-untyped-def]
        o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)  # type: ignore[misc]
        self._score(q, layer)
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # type: ignore[no-untyped-def]
        o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)  # type: ignore[misc]
        self._score(q, layer)
        return o

    def _mass(self, layer: Any) -> MassFn:
        """Per-head masses of the deciding requests in this layer, in torch over the key cache: where the prefill
        gave each request's all-keys log-sum-exp, only sink + recent keys are read, every request in one batch;
        otherwise each request's keys are read in chunks."""
        k_cache = self.pool.key_reader(layer.layer_id)  # indexable by slot ids, whatever the pool
        cfg = self.tracker.config

        def mass(queries: list[torch.Tensor], key_slots: list[torch.Tensor],
                 lses: list[torch.Tensor | None]) -> list[torch.Tensor]:
            if all(lse is not None for lse in lses):
                return list(window_masses(queries, k_cache, key_slots, lses, cfg.sink, cfg.recent,  # type: ignore[arg-type]
                                          layer.scaling, layer.k_scale_float,
                                          (layer.logit_cap or None) if self.caps_logits else None))
            return [head_mass(q, k_cache, slots, cfg.sink, cfg.recent, layer.scaling, layer.k_scale_float, lse_all=lse)
                    for q, slots, lse in zip(queries, key_slots, lses)]

        return mass

    def _score(self, q: torch.Tensor, layer: Any, lse: torch.Tensor | None = None) -> None:
        """``lse``: the layer's attention log-sum-exp ``[H, tokens]``, where its kernel gave it."""
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        for decision in self.tracker.score(q_, layer.layer_id, self._mass(layer), lse):
            self.outbox.put(decision.rid, record(decision, self._act_on(decision)))

    def _act_on(self, decision: Decision) -> dict[str, Any]:
        """Beyond restricting decode: lazy units free their middle rows where the pool holds rows (slots other
        running requests read keep theirs); returns fields for the decision's record (the request's KV report)."""
        idx = decision.req_pool_idx
        return self.pool.release_lazy(idx, decision.lazy, decision.seq_len, self.req_to_token_pool.req_to_token,
                                      lambda slots: self.tracker.running_slots(slots, exclude=idx))

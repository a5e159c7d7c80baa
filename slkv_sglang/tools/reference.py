"""Reference SimLayerKV in plain PyTorch + transformers (no SGLang), to check the engine against.

Independent of the engine's code path on purpose: the score is the explicit softmax probability mass of
the last queries (materialised ``[H, n, L]`` probabilities, summed over sink + recent keys), not the engine's
log-sum-exp difference; decode restriction indexes the HF cache's keys (lazy layers) or masks the middle keys of
lazy heads (head granularity), where the engine splits the heads into two attention calls. Batch size 1, greedy
decoding. Shared with the engine: only the decision rule (``scoring.decide``: head reduction, threshold, protected
and forced layers and heads), which *defines* the algorithm; the masses it decides on are computed independently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..config import SlkvConfig
from ..layer_map import LayerMap
from ..scoring import decide

_IMPL = "slkv_reference"


@dataclass
class ReferenceResult:
    output_ids: list[int]
    logprobs: list[float]  # log-probability of each output token where it was chosen
    layer_map: LayerMap | None  # None when SimLayerKV is off
    per_head: list[list[float]]  # per layer, per query head mass at the decision point


@dataclass
class _Run:
    """What the attention function needs to know during one generate call."""

    config: SlkvConfig
    score_now: bool = False  # this forward takes the decision
    lazy: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its lazy KV heads, where any is
    per_head: dict[int, torch.Tensor] = field(default_factory=dict)


def _mass(query: torch.Tensor, key: torch.Tensor, n: int, sink: int, recent: int, scaling: float) -> torch.Tensor:
    """Per head, the mean over the last ``n`` queries of their softmax probability on sink + recent keys."""
    q = query[0, :, -n:, :]  # [H, n, D]
    k = key[0].repeat_interleave(q.shape[0] // key.shape[1], dim=0)  # [H, S, D]
    seq = k.shape[1]
    logits = (q @ k.transpose(1, 2)) * scaling  # [H, n, S]
    q_pos = torch.arange(seq - n, seq)[:, None]
    k_pos = torch.arange(seq)[None, :]
    probs = torch.softmax(logits.masked_fill(k_pos > q_pos, float("-inf")), dim=-1)
    in_window = (k_pos[0] < sink) | (k_pos[0] >= seq - recent)
    return probs[:, :, in_window].sum(dim=-1).mean(dim=-1)


def _attention(run: _Run | None, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query [1, H, q, D], key/value [1, Hkv, S, D] (cache included); ``run``:
    the generate call in progress."""
    layer = module.layer_idx
    assert run is not None and query.shape[0] == 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q_len, seq = query.shape[2], key.shape[2]
    cfg = run.config
    if q_len > 1:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
        n = min(cfg.last, q_len)
    else:
        k_sel, v_sel, mask = key, value, None
        heads = run.lazy.get(layer)
        if heads is not None and seq > cfg.sink + cfg.recent:
            keep = torch.cat([torch.arange(cfg.sink), torch.arange(seq - cfg.recent, seq)])
            if bool(heads.all()):
                k_sel, v_sel = key[:, :, keep], value[:, :, keep]
            else:  # the query heads of lazy KV heads see only the kept keys
                lazy_q = heads.repeat_interleave(query.shape[1] // heads.shape[0])
                kept = torch.zeros(seq, dtype=torch.bool)
                kept[keep] = True
                mask = torch.zeros(1, query.shape[1], 1, seq)
                mask[0, lazy_q, 0, :] = torch.where(kept, 0.0, float("-inf"))
        out = F.scaled_dot_product_attention(query, k_sel, v_sel, attn_mask=mask, scale=scale, enable_gqa=True)
        n = 1
    if run.score_now:
        run.per_head[layer] = _mass(query, key, n, cfg.sink, cfg.recent, scale)
    return out.transpose(1, 2).contiguous(), None


def decode_attention(config: SlkvConfig, lazy_heads: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, scaling: float) -> torch.Tensor:
    """One decode step of the reference's attention outside a model: ``query`` ``[heads, dim]`` over ``keys`` /
    ``values`` ``[n, kv heads, dim]`` (its own token last), sink + recent in the ``lazy_heads`` (``[kv heads]``
    bool); returns ``[heads, dim]``."""
    run = _Run(config, lazy={0: lazy_heads} if bool(lazy_heads.any()) else {})
    out, _ = _attention(run, SimpleNamespace(layer_idx=0), query[None, :, None], keys.movedim(0, 1)[None],
                        values.movedim(0, 1)[None], None, scaling=scaling)
    return out.view(query.shape)


class ReferenceModel:
    def __init__(self, model_path: str | Path, device: str = "cpu"):
        from transformers import AttentionInterface, AutoModelForCausalLM

        self._run: _Run | None = None  # the generate call in progress, read by this model's attention function
        impl = f"{_IMPL}_{id(self)}"  # transformers keeps attention functions by name: one per model
        AttentionInterface.register(impl, lambda *args, **kwargs: _attention(self._run, *args, **kwargs))
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=torch.float32, attn_implementation=impl
        ).to(device).eval()
        self.device = device
        cfg = self.model.config
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        eos = cfg.eos_token_id
        self.eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def _decide(self, run: _Run, prompt_len: int, decided_at: int, force_lazy: Sequence[int] | None,
                force_lazy_heads: Sequence[tuple[int, int]] | None) -> LayerMap:
        cfg = run.config
        per_head = torch.stack([run.per_head[layer] for layer in range(self.num_layers)])
        lazy, scores, heads = decide(per_head, cfg.score, cfg.threshold, self.num_kv_heads,
                                     prompt_len >= cfg.min_trim_len, force_lazy, cfg.protect, cfg.granularity,
                                     force_lazy_heads)
        run.lazy = {layer: lazy[layer] for layer in range(self.num_layers) if bool(lazy[layer].any())}
        return LayerMap.from_decision(
            lazy.tolist(), scores.tolist(), heads.tolist(), [True] * self.num_layers, threshold=cfg.threshold,
            score_mode=cfg.score, decide_mode=cfg.mode, sink=cfg.sink, recent=cfg.recent, decided_at=decided_at,
            granularity=cfg.granularity)

    @torch.no_grad()
    def _forward(self, ids: list[int], cache: Any) -> tuple[int, float, Any]:
        out = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache, use_cache=True)
        logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        token = int(logprobs.argmax())
        return token, float(logprobs[token]), out.past_key_values

    def generate(
        self,
        input_ids: list[int],
        config: SlkvConfig,
        max_new_tokens: int,
        stop_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        force_lazy: Sequence[int] | None = None,
        force_lazy_heads: Sequence[tuple[int, int]] | None = None,
    ) -> ReferenceResult:
        stops = set() if ignore_eos else set(self.eos_ids if stop_ids is None else stop_ids)
        run = _Run(config, score_now=config.enabled and config.mode == "prefill")
        self._run = run
        layer_map: LayerMap | None = None
        try:
            token, logprob, cache = self._forward(list(input_ids), None)
            if run.score_now:
                layer_map = self._decide(run, len(input_ids), len(input_ids), force_lazy, force_lazy_heads)
                run.score_now = False
            output, logprobs = [token], [logprob]
            while len(output) < max_new_tokens and token not in stops:
                decide_here = config.enabled and config.mode == "decode" and layer_map is None
                run.score_now = decide_here
                token, logprob, cache = self._forward([token], cache)
                if decide_here:
                    layer_map = self._decide(run, len(input_ids), len(input_ids) + 1, force_lazy, force_lazy_heads)
                    run.score_now = False
                output.append(token)
                logprobs.append(logprob)
        finally:
            self._run = None
        per_head = [run.per_head[layer].tolist() for layer in sorted(run.per_head)]
        return ReferenceResult(output, logprobs, layer_map, per_head)

    def lazy_scores(self, input_ids: list[int], config: SlkvConfig) -> LayerMap:
        """The prefill-time decision alone (one forward, no generation)."""
        from dataclasses import replace

        result = self.generate(input_ids, replace(config, enabled=True, mode="prefill"), max_new_tokens=1)
        assert result.layer_map is not None
        return result.layer_map

"""The per-request layer map: which layers (and KV heads) are lazy, why, and what they keep.

One small immutable record shared by the engine hook (which fills it), the offload tier, the session store
and metrics (which read it), and clients (it is returned in ``meta_info["slkv"]``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LayerMap:
    lazy: tuple[bool, ...]  # one flag per layer: every KV head of it is lazy
    # the reduced lazy score per layer (NaN where the sequence was too short); None (JSON null) in a sliding-window
    # layer, which SimLayerKV neither scores nor makes lazy (``model_layers``)
    scores: tuple[float | None, ...]
    threshold: float
    score_mode: str  # mean | kvmin | headmin
    decide_mode: str  # prefill | decode
    sink: int
    recent: int
    decided_at: int  # sequence length (tokens) when the decision was taken
    granularity: str = "layer"  # layer | head: what the decision rule made lazy
    # per layer, one flag per KV head (a layer is in ``lazy`` when all of its heads are); None in records written
    # before heads were reported: then every head of a layer is as the layer
    heads: tuple[tuple[bool, ...], ...] | None = None
    head_scores: tuple[tuple[float | None, ...], ...] | None = None  # the per-KV-head score (None: not scored)

    @property
    def num_layers(self) -> int:
        return len(self.lazy)

    @property
    def lazy_layers(self) -> list[int]:
        return [i for i, v in enumerate(self.lazy) if v]

    @property
    def lazy_heads(self) -> list[tuple[int, int]]:
        """(layer, KV head) pairs that are lazy."""
        if self.heads is None:
            return [(layer, 0) for layer in self.lazy_layers]
        return [(layer, h) for layer, flags in enumerate(self.heads) for h, v in enumerate(flags) if v]

    def _lazy_fraction(self, layer: int) -> float:
        if self.heads is None:
            return float(self.lazy[layer])
        return sum(self.heads[layer]) / len(self.heads[layer])

    def kept_tokens(self, layer: int, seq_len: int) -> float:
        """KV tokens a layer keeps at ``seq_len``, averaged over its KV heads: sink + recent in lazy heads,
        everything in the others."""
        trimmed = min(seq_len, self.sink + self.recent)
        lazy = self._lazy_fraction(layer)
        return lazy * trimmed + (1 - lazy) * seq_len

    def compression(self, seq_len: int) -> float:
        """Full KV (tokens x layers x heads) over kept KV at ``seq_len``."""
        kept = sum(self.kept_tokens(layer, seq_len) for layer in range(self.num_layers))
        return seq_len * self.num_layers / max(kept, 1)

    @classmethod
    def from_decision(cls, heads: list[list[bool]], scores: list[float], head_scores: list[list[float]],
                      scored: list[bool], **fields: Any) -> "LayerMap":
        """The record of ``scoring.decide``'s verdict (as lists); ``scored``: per layer, whether it was scored (not a
        sliding-window layer); ``fields``: the settings it was taken under."""
        return cls(
            lazy=tuple(all(row) for row in heads),
            scores=tuple(float(x) if ok else None for x, ok in zip(scores, scored)),
            heads=tuple(tuple(bool(x) for x in row) for row in heads),
            head_scores=tuple(tuple(float(x) if ok else None for x in row) for row, ok in zip(head_scores, scored)),
            **fields)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lazy"] = list(self.lazy)
        d["scores"] = [None if s is None else round(s, 6) for s in self.scores]
        d["lazy_layers"] = self.lazy_layers
        if self.heads is not None:
            d["heads"] = [list(flags) for flags in self.heads]
            d["lazy_heads"] = [list(pair) for pair in self.lazy_heads]
        if self.head_scores is not None:
            d["head_scores"] = [[None if s is None else round(s, 6) for s in row] for row in self.head_scores]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerMap":
        """Fields this record does not have are dropped: session stores hold older records (e.g. with ``turn``)
        and the engine adds its own (``lazy_layers``, ``kv``, ``timing``)."""
        keys = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in keys}
        kw["lazy"] = tuple(bool(x) for x in kw["lazy"])
        kw["scores"] = tuple(None if x is None else float(x) for x in kw["scores"])
        if kw.get("heads") is not None:
            kw["heads"] = tuple(tuple(bool(x) for x in row) for row in kw["heads"])
        if kw.get("head_scores") is not None:
            kw["head_scores"] = tuple(tuple(None if x is None else float(x) for x in row) for row in kw["head_scores"])
        return cls(**kw)


def layer_map_record(meta_info: dict[str, Any]) -> dict[str, Any] | None:
    """The ``meta_info["slkv"]`` record of a generate result, or None when SimLayerKV was off.

    Non-streaming results carry the record itself; SGLang's streaming path re-attaches request-level custom
    info to later chunks as the accumulated list, so there it arrives as a one-element list.
    """
    value = meta_info.get("slkv")
    if isinstance(value, list):
        return value[-1] if value else None
    return value

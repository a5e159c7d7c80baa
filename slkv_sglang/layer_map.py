"""The per-request layer map: which layers are lazy, why, and what they keep.

One small immutable record shared by the engine hook (which fills it), the offload tier, the session store
and metrics (which read it), and clients (it is returned in ``meta_info["slkv"]``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LayerMap:
    lazy: tuple[bool, ...]  # one flag per layer
    # the reduced lazy score per layer (NaN where the sequence was too short); None (JSON null) in a sliding-window
    # layer, which SimLayerKV neither scores nor makes lazy (``model_layers``)
    scores: tuple[float | None, ...]
    threshold: float
    score_mode: str  # mean | kvmin | headmin
    decide_mode: str  # prefill | decode
    sink: int
    recent: int
    decided_at: int  # sequence length (tokens) when the decision was taken

    @property
    def num_layers(self) -> int:
        return len(self.lazy)

    @property
    def lazy_layers(self) -> list[int]:
        return [i for i, v in enumerate(self.lazy) if v]

    def kept_tokens(self, layer: int, seq_len: int) -> int:
        """KV tokens a layer keeps at ``seq_len``: sink + recent in lazy layers, everything elsewhere."""
        if self.lazy[layer]:
            return min(seq_len, self.sink + self.recent)
        return seq_len

    def compression(self, seq_len: int) -> float:
        """Full KV (tokens x layers) over kept KV at ``seq_len``."""
        kept = sum(self.kept_tokens(layer, seq_len) for layer in range(self.num_layers))
        return seq_len * self.num_layers / max(kept, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lazy"] = list(self.lazy)
        d["scores"] = [None if s is None else round(s, 6) for s in self.scores]
        d["lazy_layers"] = self.lazy_layers
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerMap":
        """Fields this record does not have are dropped: session stores hold older records (e.g. with ``turn``)
        and the engine adds its own (``lazy_layers``, ``kv``, ``timing``)."""
        keys = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in keys}
        kw["lazy"] = tuple(bool(x) for x in kw["lazy"])
        kw["scores"] = tuple(None if x is None else float(x) for x in kw["scores"])
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

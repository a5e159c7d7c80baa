"""Seeded malformed ``custom_params.slkv`` values, each with the field its refusal must name.

Every value has exactly one defect (the rest of it is valid settings), so the field is known: wrong types,
booleans for numbers, thresholds that are NaN, infinite, negative or zero, layer ids out of range or
negative, duplicates, lists longer than the model has layers, (layer, KV head) pairs that are not pairs or name a
head the model does not have, unknown granularities, unknown keys (the per-request host budget that is no longer
one among them), nested junk, values that are not objects, labels too long or unprintable.
"""

from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

SEED = int(os.environ.get("SLKV_HOSTILE_SEED", "9"))  # printed by the tests that use it
KINDS = ("not_object", "unknown_key", "engine_wide", "wrong_type", "bool_for_number", "bad_threshold",
         "bad_layer", "duplicate_layer", "huge_list", "nested_junk", "bad_label", "bad_head")
KV_HEADS = 3  # the bundled model's


@dataclass(frozen=True)
class Malformed:
    kind: str
    value: Any  # the custom_params.slkv value
    field: str  # what follows custom_params.slkv in the refusal's field name: "", ".threshold", ".force_lazy[3]"
    exact: bool = True  # False: the field is shown clipped (an odd key), so ``field`` is its start only

    @property
    def json_ok(self) -> bool:
        """JSON can carry it (NaN and the infinities are not JSON)."""
        return not _has_non_finite(self.value)

    @property
    def fits_double(self) -> bool:
        """Every number is within a double's range: a JSON parser that reads numbers as doubles (SGLang's HTTP
        server) refuses the body otherwise, before any field is read (the chat API's parser takes it)."""
        return not _has_huge_int(self.value)

    def names_field(self, message: str, where: str = "custom_params.slkv") -> bool:
        """``message`` is a refusal that starts with this value's field, ``where`` standing for the value."""
        field = f"{where}{self.field}"
        return message.startswith(field) and (not self.exact or message[len(field):len(field) + 1] in (" ", ":"))


class _Defect(NamedTuple):
    value: Any
    field: str
    exact: bool = True


def malformed(seed: int, count: int, num_layers: int) -> list[Malformed]:
    """``count`` values for a model of ``num_layers`` full-attention layers; every kind at least once."""
    rng = random.Random(seed)
    makers = {kind: globals()[f"_{kind}"] for kind in KINDS}
    kinds = list(KINDS) + [rng.choice(KINDS) for _ in range(count - len(KINDS))]
    rng.shuffle(kinds)
    out = []
    for kind in kinds:
        bad: _Defect = makers[kind](rng, num_layers)
        value = bad.value
        if isinstance(value, dict):  # valid settings beside the defect, in random order
            filler = {k: v for k, v in _valid(rng, num_layers).items() if k not in value}
            items = list({**filler, **value}.items())
            rng.shuffle(items)
            value = dict(items)
        out.append(Malformed(kind, value, bad.field, bad.exact))
    return out


def _valid(rng: random.Random, num_layers: int) -> dict[str, Any]:
    settings = {"enabled": rng.random() < 0.8, "threshold": round(rng.uniform(0.5, 1.5), 3),
                "score": rng.choice(["mean", "kvmin", "headmin"]),
                "force_lazy": rng.sample(range(num_layers), rng.randint(0, 3)),
                "granularity": rng.choice(["layer", "head"]),
                "force_lazy_heads": sorted({(rng.randrange(num_layers), rng.randrange(KV_HEADS)) for _ in range(3)})}
    return {k: v for k, v in settings.items() if rng.random() < 0.5}


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    return False


def _has_huge_int(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) > sys.float_info.max
    if isinstance(value, dict):
        return any(_has_huge_int(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_huge_int(v) for v in value)
    return False


def _nest(rng: random.Random, depth: int) -> Any:
    value: Any = rng.choice([1, "x", None, True, 2.5])
    for _ in range(depth):
        value = {rng.choice("abc"): value} if rng.random() < 0.5 else [value]
    return value


def _not_object(rng: random.Random, n: int) -> _Defect:
    return _Defect(rng.choice([[], [0.9], "threshold=0.8", "", 0.8, 7, True, False, [{"threshold": 0.8}],
                               [_nest(rng, rng.randint(2, 30))]]), "")


def _unknown_key(rng: random.Random, n: int) -> _Defect:
    key = rng.choice(["windows", "Threshold", "threshold ", "force-lazy", "forceLazy", "lazy", "recent", "sink",
                      "protect", "offload", "mode", "slkv", "budget", "thresh\u00f6ld", "__class__", "0"])
    if rng.random() < 0.15:  # odd keys are shown clipped, as their repr
        key = rng.choice(["", "k" * rng.randint(41, 5000), "tab\there", "new\nline"])
        return _Defect({key: rng.choice([1, "x", None])}, ".'", exact=False)
    return _Defect({key: rng.choice([1, 0.5, "x", None, [1], {"a": 1}])}, f".{key}")


def _engine_wide(rng: random.Random, n: int) -> _Defect:
    return _Defect({"offload_budget": rng.choice([0, 1 << 20, 1 << 30, -1, "big", None])}, ".offload_budget")


def _wrong_type(rng: random.Random, n: int) -> _Defect:
    field, value = rng.choice([
        ("enabled", rng.choice([0, 1, "true", "yes", None, [], {}, 1.0])),
        ("threshold", rng.choice(["0.9", "", None, [0.9], {"value": 0.9}])),
        ("score", rng.choice([1, None, ["mean"], {"mode": "mean"}, "MEAN", "max", "mean "])),
        ("force_lazy", rng.choice(["0,1", 3, {"0": True}, "all", 1.5])),
        ("session", rng.choice([1, None, [], {"id": "x"}, 2.5])),
        ("granularity", rng.choice([1, None, ["head"], "heads", "Layer", "", {"g": "head"}])),
        ("force_lazy_heads", rng.choice(["0:1", 3, {"0": 1}, 1.5, True])),
    ])
    return _Defect({field: value}, f".{field}")


def _bool_for_number(rng: random.Random, n: int) -> _Defect:
    if rng.random() < 0.5:
        return _Defect({"threshold": rng.choice([True, False])}, ".threshold")
    ids = rng.sample(range(n), rng.randint(0, 3))
    at = rng.randint(0, len(ids))
    return _Defect({"force_lazy": ids[:at] + [rng.choice([True, False])] + ids[at:]}, f".force_lazy[{at}]")


def _bad_threshold(rng: random.Random, n: int) -> _Defect:
    value = rng.choice([math.nan, math.inf, -math.inf, 0, 0.0, -0.0, -1, -0.5, -1e300, 10**400, -(10**30), 1e-400])
    return _Defect({"threshold": value}, ".threshold")


def _bad_layer(rng: random.Random, n: int) -> _Defect:
    ids = rng.sample(range(n), rng.randint(0, 4))
    bad = rng.choice([n, n + 1, 99, 2**31, 2**63, 10**30, -1, -n, -(2**63), 1.0, 2.5, "3", None, [1], {"layer": 1}])
    at = rng.randint(0, len(ids))
    return _Defect({"force_lazy": ids[:at] + [bad] + ids[at:]}, f".force_lazy[{at}]")


def _duplicate_layer(rng: random.Random, n: int) -> _Defect:
    ids = rng.sample(range(n), rng.randint(1, 5))
    again = rng.randrange(len(ids))
    at = rng.randint(again + 1, len(ids))
    return _Defect({"force_lazy": ids[:at] + [ids[again]] + ids[at:]}, f".force_lazy[{at}]")


def _huge_list(rng: random.Random, n: int) -> _Defect:
    size = rng.choice([n + 1, 2 * n, 1000, 50_000])
    value = rng.choice([list(range(n)) + [0] * (size - n), [rng.randrange(-5, 2 * n) for _ in range(size)],
                        ["x"] * size])
    return _Defect({"force_lazy": value}, ".force_lazy")


def _nested_junk(rng: random.Random, n: int) -> _Defect:
    field = rng.choice(["enabled", "threshold", "score", "force_lazy", "session"])
    junk = _nest(rng, rng.randint(2, 40))
    if field == "force_lazy":
        if isinstance(junk, list):  # a list is the right type: its first entry is the junk
            return _Defect({field: [junk]}, ".force_lazy[0]")
        return _Defect({field: junk}, ".force_lazy")
    return _Defect({field: junk}, f".{field}")


def _bad_label(rng: random.Random, n: int) -> _Defect:
    label = rng.choice(["", "x" * 257, "y" * rng.randint(258, 100_000), "line\nbreak", "nul\x00", "bell\x07",
                        "right\u202eleft", "tab\t", "\x7f"])
    return _Defect({"session": label}, ".session")


def _bad_head(rng: random.Random, n: int) -> _Defect:
    pairs = [[rng.randrange(n), rng.randrange(KV_HEADS)] for _ in range(rng.randint(0, 3))]
    pairs = [list(p) for p in sorted({tuple(p) for p in pairs})]
    at = rng.randint(0, len(pairs))
    field = f".force_lazy_heads[{at}]"
    bad, where = rng.choice([
        ([1], ""), ([1, 2, 0], ""), (7, ""), ("1,2", ""), ({"layer": 1, "head": 0}, ""), ([], ""),
        ([rng.choice([n, -1, 2**63, 1.0, "3", None, True]), 0], "[0]"),
        ([rng.randrange(n), rng.choice([KV_HEADS, KV_HEADS + 5, -1, 2**40, 0.5, "0", None, False])], "[1]"),
    ])
    return _Defect({"force_lazy_heads": pairs[:at] + [bad] + pairs[at:]}, field + where)

"""SimLayerKV settings: one typed record, read from ``SLKV_*`` environment variables.

Environment variables are the one channel that reaches every SGLang process (the launcher, the spawned
scheduler, ``sglang.Engine``); the ``--slkv-*`` CLI flags only write them (see ``hooks/flags.py``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Literal, Mapping

ScoreMode = Literal["mean", "kvmin", "headmin"]
DecideMode = Literal["prefill", "decode"]
Granularity = Literal["layer", "head"]

SCORE_MODES: tuple[str, ...] = ("mean", "kvmin", "headmin")
DECIDE_MODES: tuple[str, ...] = ("prefill", "decode")
GRANULARITIES: tuple[str, ...] = ("layer", "head")

# Defaults. sink 4, recent 1020 and last 32 are the paper's (arXiv 2410.13846, rebuttal code snippet:
# w_sink=4, w_recent=1020, w_last=32). Threshold 0.9 is the official code's value for Llama-3, the family of
# the bundled Llama-architecture model; docs/evaluation.md has the measurement behind it and behind the
# default score mode.
DEFAULT_THRESHOLD = 0.9
DEFAULT_SINK = 4
DEFAULT_RECENT = 1020
DEFAULT_LAST = 32
DEFAULT_SCORE: ScoreMode = "kvmin"
DEFAULT_MODE: DecideMode = "prefill"
# Each KV head decided on its own: with kvmin@0.9 it kept every needle full KV finds on the evaluator's 24 cases and
# saved 1.54x KV at 4K against 1.29x for whole layers (docs/evaluation.md, "Head granularity").
DEFAULT_GRANULARITY: Granularity = "head"
DEFAULT_OFFLOAD_BUDGET = 4 << 30
# The share of the host budget allocated (pinned on CUDA) and touched at start-up: a save into fresh host memory
# measured 33 ms against 11 ms into memory already touched (docs/evaluation.md, host tier), so the first sessions'
# offloads would pay 3x; a quarter of the default budget (1 GiB) costs well under a second at start.
DEFAULT_OFFLOAD_PREPIN = 0.25
# The shared tier (kv/shared.py): how long a prefix lookup may take before the prefill recomputes instead (a
# 4K-token SmolLM2 prefix is ~190 MB in float32, read from Mooncake over loopback TCP in well under a second), and
# the bytes the write-back queue may hold before it drops blocks (written again by a later turn).
DEFAULT_SHARED_TIMEOUT_MS = 2000
DEFAULT_SHARED_QUEUE_BYTES = 1 << 30
SHARED_WRITE_BACK: tuple[str, ...] = ("finished", "off")

# The host budget changes at run time through SGLang's admin channel under this internal-state name. Kept here,
# not in ``admin.py``, so the chat API takes the name and the limit from the config it shares with the engine;
# the check the engine's handler runs stays beside the limit it enforces.
HOST_BUDGET = "slkv_host_budget"
MAX_HOST_BUDGET = 1 << 50  # far past any host's memory, and an integer every JSON client reads exactly


def host_budget_problem(value: object, has_host_tier: bool = True) -> str | None:
    """Why ``value`` cannot become the host budget, or None."""
    if not has_host_tier:
        return "cannot be set: this engine has no host tier (start it with --slkv-offload)"
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_HOST_BUDGET:
        shown = "a larger integer" if isinstance(value, int) and abs(value) >> 64 else f"{value!r:.40}"
        return f"must be a whole number of bytes in [0, 2**50], got {shown}"
    return None


class SlkvConfigError(ValueError):
    """A SimLayerKV setting is invalid; raised at start-up, never mid-request."""


@dataclass(frozen=True)
class SlkvConfig:
    enabled: bool = False
    threshold: float = DEFAULT_THRESHOLD
    sink: int = DEFAULT_SINK
    recent: int = DEFAULT_RECENT
    last: int = DEFAULT_LAST
    mode: DecideMode = DEFAULT_MODE
    score: ScoreMode = DEFAULT_SCORE
    # what is lazy: a whole layer (the paper), or each (layer, KV head) on its own (docs/evaluation.md)
    granularity: Granularity = DEFAULT_GRANULARITY
    protect: tuple[int, ...] = ()  # layers never made lazy (e.g. a calibrated retrieval layer)
    offload: bool = False  # lazy layers give their middle tokens' device rows back (host copy first)
    offload_budget: int = DEFAULT_OFFLOAD_BUDGET  # host bytes for those copies
    offload_prepin: float = DEFAULT_OFFLOAD_PREPIN  # share of that budget allocated and touched at start-up
    poison: bool = False  # debug: freed device KV (slots, or rows with offload) is NaN-filled; any read shows
    # check: on torch_native, run the FlashInfer backend's reads with torch kernels in place of FlashInfer's
    flashinfer_standin: bool = False
    # with offload: SGLang gets this many times more token slots than its KV bytes hold in full-KV tokens;
    # admission then counts device rows, so the rows lazy layers free admit more tokens (docs/memory.md).
    # 0: as many as the slots' index affords (``kv.tier.slot_factor``), an operator's value is an upper bound
    overcommit: float = 0.0
    # the shared tier: a store every worker reaches (``mooncake://...``, ``offload.store.open_store``); needs offload
    shared_store: str = ""
    shared_timeout_ms: int = DEFAULT_SHARED_TIMEOUT_MS  # time budget of one prefix lookup
    shared_queue_bytes: int = DEFAULT_SHARED_QUEUE_BYTES  # write-back queue bound
    shared_write_back: str = "finished"  # write a request's KV when it finishes, or never (a read-only worker)
    # a calibrated profile (``slkv calibrate``): its settings are the defaults that the other SLKV_* variables override
    profile: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold:
            raise SlkvConfigError(f"slkv threshold must be > 0 (values > 1 make no layer lazy), got {self.threshold}")
        if self.sink < 0:
            raise SlkvConfigError(f"slkv sink must be >= 0, got {self.sink}")
        if self.recent < 1:
            raise SlkvConfigError(f"slkv recent window must be >= 1, got {self.recent}")
        if self.last < 1:
            raise SlkvConfigError(f"slkv last-queries window must be >= 1, got {self.last}")
        if self.mode not in DECIDE_MODES:
            raise SlkvConfigError(f"slkv mode must be one of {DECIDE_MODES}, got {self.mode!r}")
        if any(layer < 0 for layer in self.protect):
            raise SlkvConfigError(f"slkv protected layers must be >= 0, got {self.protect}")
        if self.offload_budget < 0:
            raise SlkvConfigError(f"slkv offload budget must be >= 0 bytes, got {self.offload_budget}")
        if not 0.0 <= self.offload_prepin <= 1.0:
            raise SlkvConfigError(f"slkv offload prepin must be a share in [0, 1], got {self.offload_prepin}")
        if not (self.overcommit == 0.0 or self.overcommit >= 1.0):
            raise SlkvConfigError(f"slkv overcommit must be >= 1 (or 0: sized by the plugin), got {self.overcommit}")
        if self.overcommit > 1.0 and not self.offload:
            raise SlkvConfigError("slkv overcommit > 1 needs offload (--slkv-offload): only then do lazy layers free rows")
        if self.shared_store and not self.offload:
            raise SlkvConfigError("slkv shared store needs offload (--slkv-offload): the shared tier writes and "
                                  "restores the KV tier's rows")
        if self.shared_store:
            from offload.store import parse_store_url

            try:
                parse_store_url(self.shared_store)
            except ValueError as exc:
                raise SlkvConfigError(f"slkv shared store: {exc}") from None
        if self.shared_timeout_ms < 1:
            raise SlkvConfigError(f"slkv shared timeout must be >= 1 ms, got {self.shared_timeout_ms}")
        if self.shared_queue_bytes < 0:
            raise SlkvConfigError(f"slkv shared queue must be >= 0 bytes, got {self.shared_queue_bytes}")
        if self.shared_write_back not in SHARED_WRITE_BACK:
            raise SlkvConfigError(f"slkv shared write-back must be one of {SHARED_WRITE_BACK}, "
                                  f"got {self.shared_write_back!r}")
        if self.granularity not in GRANULARITIES:
            raise SlkvConfigError(f"slkv granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.score not in SCORE_MODES:
            raise SlkvConfigError(f"slkv score must be one of {SCORE_MODES}, got {self.score!r}")

    @property
    def min_trim_len(self) -> int:
        """Sequences shorter than this are never trimmed (paper: w_sink + w_recent + w_last)."""
        return self.sink + self.recent + self.last

    @property
    def kept_tokens(self) -> int:
        return self.sink + self.recent

    def to_env(self) -> dict[str, str]:
        return {_env_name(k): _env_value(v) for k, v in asdict(self).items()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "SlkvConfig":
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, kind in types.items():
            raw = env.get(_env_name(name))
            if raw is None or raw == "":
                continue
            values[name] = _parse(name, raw, kind)
        if values.get("profile"):
            from .profile import ProfileError, read_profile

            try:
                profile = read_profile(str(values["profile"]))
            except ProfileError as exc:
                raise SlkvConfigError(str(exc)) from None
            for name, value in profile.items():
                values.setdefault(name, _parse(name, _env_value(value), types[name]))
        return cls(**values)  # type: ignore[arg-type]


def _env_name(field_name: str) -> str:
    return "SLKV_ENABLE" if field_name == "enabled" else f"SLKV_{field_name.upper()}"


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _parse(name: str, raw: str, annotation: object) -> object:
    kind = str(annotation)
    try:
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "float":
            return float(raw)
        if kind == "int":
            return int(raw)
        if kind.startswith("tuple"):
            return tuple(sorted({int(x) for x in raw.split(",") if x.strip()}))
    except ValueError:
        raise SlkvConfigError(f"{_env_name(name)}={raw!r} is not a valid {kind}") from None
    return raw

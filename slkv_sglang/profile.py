"""Calibrated profiles: a model's SimLayerKV settings as ``slkv calibrate`` measured them, in a JSON file.

``--slkv-profile FILE`` (``SLKV_PROFILE``) makes the profile's settings the engine's defaults; any ``--slkv-*``
flag or ``SLKV_*`` variable given beside it still wins. ``FILE`` may also name a profile shipped in
``slkv_sglang/profiles`` (``smollm2-135m-instruct``: the bundled model's, measured on 2026-11-27). Only settings that shape the decision are taken from a
profile; anything else in its ``settings`` is refused at start-up, so a typo does not pass silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROFILE_SETTINGS = ("threshold", "score", "granularity", "sink", "recent", "last", "mode")
SHIPPED = Path(__file__).parent / "profiles"


class ProfileError(ValueError):
    """The profile file cannot be used; raised at start-up."""


def read_profile(path: str | Path) -> dict[str, Any]:
    """The ``settings`` of the profile at ``path``, or of the shipped profile of that name (checked by
    ``SlkvConfig`` when applied)."""
    shipped = SHIPPED / f"{path}.json"
    if not Path(path).exists() and shipped.is_file():
        path = shipped
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ProfileError(f"slkv profile {path}: cannot read it as JSON ({exc})") from None
    settings = data.get("settings") if isinstance(data, dict) else None
    if not isinstance(settings, dict):
        raise ProfileError(f"slkv profile {path}: no \"settings\" object")
    unknown = sorted(set(settings) - set(PROFILE_SETTINGS))
    if unknown:
        raise ProfileError(f"slkv profile {path}: {unknown} are not profile settings; they are {list(PROFILE_SETTINGS)}")
    return settings


def write_profile(path: str | Path, model: str, settings: dict[str, Any], measured: dict[str, Any],
                  sweep: list[dict[str, Any]]) -> None:
    unknown = sorted(set(settings) - set(PROFILE_SETTINGS))
    if unknown:
        raise ProfileError(f"not profile settings: {unknown}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"model": model, "settings": settings, "measured": measured, "sweep": sweep},
                                     indent=1) + "\n")

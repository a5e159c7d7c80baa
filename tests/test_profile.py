"""Calibrated profiles: written by ``slkv calibrate``, loaded by ``--slkv-profile`` / ``SLKV_PROFILE``."""

from __future__ import annotations

import json

import pytest

from slkv_sglang.tools.calibrate import choose, pareto
from slkv_sglang.config import SlkvConfig, SlkvConfigError
from slkv_sglang.profile import write_profile


def _row(compression: float, correct: int, lost: int, threshold: float, family: str = "simlayerkv") -> dict:
    return {"family": family, "compression": compression, "correct": correct, "lost_vs_full": ["c"] * lost,
            "threshold": threshold}


def test_profile_settings_are_defaults_that_variables_override(tmp_path):
    path = tmp_path / "p.json"
    write_profile(path, "smollm2", {"threshold": 0.85, "granularity": "head", "recent": 512, "score": "kvmin"},
                  {"compression": 1.6}, [])
    loaded = SlkvConfig.from_env({"SLKV_PROFILE": str(path)})
    assert (loaded.threshold, loaded.granularity, loaded.recent) == (0.85, "head", 512)
    mine = SlkvConfig.from_env({"SLKV_PROFILE": str(path), "SLKV_THRESHOLD": "0.95", "SLKV_GRANULARITY": "layer"})
    assert (mine.threshold, mine.granularity, mine.recent) == (0.95, "layer", 512)
    assert SlkvConfig.from_env(mine.to_env()) == mine  # what reaches SGLang's other processes


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read it as JSON"),
    (json.dumps({"model": "x"}), 'no "settings" object'),
    (json.dumps({"settings": {"threshold": 0.9, "offload_budget": 1}}), "are not profile settings"),
    (json.dumps({"settings": {"threshold": -1}}), "threshold must be > 0"),
    (json.dumps({"settings": {"granularity": "token"}}), "granularity must be one of"),
])
def test_bad_profiles_are_refused_at_start_up(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(SlkvConfigError, match=message):
        SlkvConfig.from_env({"SLKV_PROFILE": str(path)})
    with pytest.raises(SlkvConfigError, match="cannot read"):
        SlkvConfig.from_env({"SLKV_PROFILE": str(tmp_path / "missing.json")})


def test_calibration_keeps_the_largest_saving_that_loses_no_needle():
    rows = [_row(1.0, 10, 0, 0.0, family="full"), _row(3.0, 4, 6, 0.0, family="streaming"),
            _row(1.3, 10, 0, 0.95), _row(1.5, 10, 0, 0.9), _row(1.5, 10, 0, 0.85), _row(1.8, 8, 2, 0.8)]
    best = choose(rows)
    assert (best["compression"], best["threshold"]) == (1.5, 0.9)  # a tie goes to the higher threshold
    assert [(r["compression"], r["correct"]) for r in pareto(rows)] == [(1.5, 10), (1.5, 10), (1.8, 8)]
    assert choose([r for r in rows if r["lost_vs_full"] or r["family"] != "simlayerkv"]) is None


def test_the_bundled_models_profile_is_the_default():
    """``slkv calibrate`` on the bundled model chose the engine's default settings (docs/evaluation.md,
    "Calibration"); a default changed without calibrating again shows here."""
    shipped = SlkvConfig.from_env({"SLKV_PROFILE": "smollm2-135m-instruct"})
    default = SlkvConfig()
    for name in ("threshold", "score", "granularity", "sink", "recent", "last"):
        assert getattr(shipped, name) == getattr(default, name), name

"""Settings: flags, environment, per-request overrides — bad values fail early with a clear message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slkv_sglang.config import SlkvConfig, SlkvConfigError
from slkv_sglang.layer_map import LayerMap
from slkv_sglang.model_layers import ModelLayers, check_servable
from slkv_sglang.request_params import check_generate, parse_overrides


def test_env_round_trip():
    cfg = SlkvConfig(enabled=True, threshold=0.8, recent=512, score="mean", protect=(18, 3))
    assert SlkvConfig.from_env(cfg.to_env()) == SlkvConfig(enabled=True, threshold=0.8, recent=512, score="mean", protect=(3, 18))


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SLKV_THRESHOLD": "abc"}, "SLKV_THRESHOLD='abc' is not a valid float"),
        ({"SLKV_THRESHOLD": "0"}, "threshold must be > 0"),
        ({"SLKV_RECENT": "0"}, "recent window must be >= 1"),
        ({"SLKV_SCORE": "max"}, "score must be one of"),
        ({"SLKV_MODE": "later"}, "mode must be one of"),
        ({"SLKV_ENABLE": "maybe"}, "SLKV_ENABLE='maybe' is not a valid bool"),
        ({"SLKV_PROTECT": "x"}, "SLKV_PROTECT='x' is not a valid"),
        ({"SLKV_OFFLOAD": "1", "SLKV_OVERCOMMIT": "0.5"}, r"overcommit must be >= 1 \(or 0: sized by the plugin\), got 0.5"),
        ({"SLKV_OVERCOMMIT": "2"}, "overcommit > 1 needs offload"),
    ],
)
def test_bad_env_is_rejected(env, message):
    with pytest.raises(SlkvConfigError, match=message):
        SlkvConfig.from_env(env)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"threshold": -1}, "custom_params.slkv.threshold must be a finite number > 0"),
        ({"threshold": True}, "custom_params.slkv.threshold must be a finite number > 0"),
        ({"threshold": float("nan")}, "custom_params.slkv.threshold must be a finite number > 0"),
        ({"threshold": 10**400}, "custom_params.slkv.threshold must be a finite number > 0"),
        ({"enabled": 1}, "custom_params.slkv.enabled must be true or false"),
        ({"score": "max"}, "custom_params.slkv.score must be one of"),
        ({"force_lazy": [0, "a"]}, r"custom_params.slkv.force_lazy\[1\] must be a layer id \(an integer\)"),
        ({"force_lazy": [3, -1]}, r"custom_params.slkv.force_lazy\[1\] must be a layer id in \[0, 30\), got -1"),
        ({"force_lazy": [3, 10**5000]}, r"force_lazy\[1\] must be a layer id in \[0, 30\), got an integer too long"),
        ({"force_lazy": [3, 4, 3]}, r"custom_params.slkv.force_lazy\[2\] names layer 3 a second time"),
        ({"force_lazy": list(range(31))}, r"custom_params.slkv.force_lazy names 31 layers; this model has 30"),
        ({"session": ""}, "custom_params.slkv.session must be a label of 1 to 256 printable characters"),
        ({"session": "a\nb"}, "custom_params.slkv.session must be a label"),
        ({"session": "x" * 257}, r"custom_params.slkv.session must be a label.*got 'xxxxxxxxxxxx\.\.\.xxxxxxxxxxxxx'"),
        ({"windows": 3}, r"custom_params.slkv.windows is not a SimLayerKV setting"),
        ({"offload_budget": 1 << 30}, "custom_params.slkv.offload_budget is not a per-request setting: the host "
                                      "budget is engine-wide"),
        ("fast", "custom_params.slkv must be an object, got a string"),
    ],
)
def test_bad_overrides_are_rejected(raw, message):
    with pytest.raises(SlkvConfigError, match=message):
        parse_overrides(raw, ModelLayers(30, tuple(range(30))))


def test_what_passes_where_requests_enter_passes_in_the_scheduler():
    """The scheduler parses without the model's layers: everything the entry check passed, unchanged."""
    layers = ModelLayers(30, tuple(range(30)))
    for raw in ({"enabled": False}, {"threshold": 2, "score": "headmin"}, {"force_lazy": [29, 0]},
                {"force_lazy": None, "session": "chat 42"}, {"force_lazy": []}, None):
        assert parse_overrides(raw) == parse_overrides(raw, layers)
    check_generate([{"custom_params": "not ours"}, {"custom_params": {"other": 1}}, 7], layers)
    with pytest.raises(SlkvConfigError, match=r"^sampling_params\[1\].custom_params.slkv.threshold must be"):
        check_generate([{}, {"custom_params": {"slkv": {"threshold": "x"}}}], layers)


def test_force_lazy_names_only_full_attention_layers():
    """A hybrid model (Gemma 3 270M's layout: layers 5, 11, 17 full, the rest sliding) takes full layers only."""
    hybrid = ModelLayers(18, (5, 11, 17))
    assert parse_overrides({"force_lazy": [17, 5]}, hybrid) == {"force_lazy": (5, 17)}
    with pytest.raises(SlkvConfigError, match=r"force_lazy\[0\] names sliding-window layer 0.*are \[5, 11, 17\]"):
        parse_overrides({"force_lazy": [0, 5, 4]}, hybrid)
    with pytest.raises(SlkvConfigError, match=r"force_lazy\[0\] must be a layer id in \[0, 18\), got 18"):
        parse_overrides({"force_lazy": [18]}, hybrid)


@pytest.mark.parametrize("layers, cfg, message", [
    (ModelLayers(4, ()), SlkvConfig(enabled=True), "no full-attention layer"),
    (ModelLayers(18, (5, 11, 17)), SlkvConfig(enabled=True, offload=True), "--slkv-offload does not support models "
                                                                             "with sliding-window layers"),
])
def test_models_refused_at_startup(layers, cfg, message):
    with pytest.raises(SlkvConfigError, match=message):
        check_servable(layers, cfg)
    check_servable(ModelLayers(4, (0, 1, 2, 3)), cfg)  # the same settings serve a model of full layers


def test_layer_map_compression():
    lm = LayerMap(lazy=(True, False, True, False), scores=(0.95, 0.5, 0.99, 0.1), threshold=0.9, score_mode="kvmin",
                  decide_mode="prefill", sink=4, recent=1020, decided_at=4096)
    assert lm.lazy_layers == [0, 2]
    assert lm.compression(4096) == pytest.approx(4 * 4096 / (2 * 4096 + 2 * 1024))
    assert LayerMap.from_dict(lm.to_dict()) == lm
    assert "turn" not in lm.to_dict()
    assert LayerMap.from_dict({**lm.to_dict(), "turn": 3}) == lm  # a record stored before `turn` was dropped
    sliding = LayerMap(lazy=(False, True), scores=(None, 0.95), threshold=0.9, score_mode="kvmin",
                       decide_mode="prefill", sink=4, recent=1020, decided_at=4096)
    assert sliding.to_dict()["scores"] == [None, 0.95]  # a sliding layer is not scored: null in JSON
    assert LayerMap.from_dict(sliding.to_dict()) == sliding


@pytest.mark.parametrize("flag, message", [
    (["--slkv-threshold", "-1"], "slkv threshold must be > 0"),
    (["--slkv-score", "max"], "invalid choice: 'max'"),
    (["--slkv-recent", "ten"], "invalid int value"),
])
def test_launch_server_rejects_bad_flags(flag, message):
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", "unused", *flag],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert message in proc.stderr


def test_engine_rejects_bad_env_before_spawning(monkeypatch, model_path):
    import sglang

    from slkv_sglang.runtime import engine_kwargs

    monkeypatch.setenv("SLKV_ENABLE", "1")
    monkeypatch.setenv("SLKV_RECENT", "-5")
    with pytest.raises(SlkvConfigError, match="recent window must be >= 1"):
        sglang.Engine(**engine_kwargs(model_path))

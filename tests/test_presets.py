"""Method presets: one lookup in MethodConfig, the loaded backbone's own tuning by default, recorded per adapter."""
from __future__ import annotations

import dataclasses
import json

import pytest

from ops.methods.registry import available_methods, get_method

WITH_PRESETS = [m for m in available_methods() if get_method(m).config_cls.presets]


def test_every_diffusion_method_has_demo_paper_and_forge_base_presets():
    assert {"apo", "o2mag", "anogen", "bgdisentangle", "cadiff"} <= set(WITH_PRESETS)
    for m in WITH_PRESETS:
        assert {"demo", "paper", "forge-base"} <= set(get_method(m).config_cls.presets), m


@pytest.mark.parametrize("method", WITH_PRESETS)
def test_the_backbone_picks_the_default_preset_and_explicit_options_win(method):
    m = get_method(method)
    presets = m.config_cls.presets
    assert m.config({}, "tiny").preset == "demo"  # no preset named like the backbone: demo
    fb = m.config({}, "forge-base")
    assert fb.preset == "forge-base"
    for key, value in presets["forge-base"].items():
        assert getattr(fb, key) == (tuple(value) if isinstance(value, list) else value), (method, key)
    assert m.config({"preset": "paper"}, "forge-base").preset == "paper"  # an explicit preset wins
    key = sorted(presets["forge-base"])[0]
    base = dataclasses.asdict(m.config({"preset": "demo"}))[key]
    assert getattr(m.config({key: base}, "forge-base"), key) == base  # an explicit option beats the preset
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        m.config({"preset": "fast"})
    with pytest.raises(ValueError, match="unknown option"):
        m.config({"presett": "demo"}, "forge-base")


def test_generation_hands_the_loaded_backbone_to_the_config(demo_split, bb, tmp_path):
    """fit_adapter builds the method's config for the backbone it was given: a backbone whose id names a preset
    gets that preset, recorded in the adapter row's config."""
    from ops.generation import fit_adapter
    from ops.storage import Storage

    as_forge = dataclasses.replace(bb, model_id="forge-base")
    df = fit_adapter(Storage(tmp_path), "brick", "apo", demo_split, as_forge,
                     {"train_steps": 0, "lora_layers": "attention"}, progress=lambda *a: None)
    assert json.loads(df.iloc[0].config_json)["preset"] == "forge-base"
    df = fit_adapter(Storage(tmp_path / "t"), "brick", "apo", demo_split, bb, {"train_steps": 0},
                     progress=lambda *a: None)
    assert json.loads(df.iloc[0].config_json)["preset"] == "demo"

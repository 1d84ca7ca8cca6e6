"""Config loading and validation: each class of mistake gets its own, specific message."""

from __future__ import annotations

import pytest

from pha_lab.config import ConfigError, load_config


def error_for(overrides, experiment="pha_125m") -> str:
    with pytest.raises(ConfigError) as info:
        load_config(experiment, overrides)
    return str(info.value)


def test_overrides_apply_last():
    cfg = load_config("pha_125m", ["model.n_layers=4", "optim.lr=1e-3"])
    assert cfg.model.n_layers == 4 and cfg.optim.lr == 1e-3 and cfg.model.d_model == 768


def test_extends_chain_merges_in_order():
    cfg = load_config("gss_hybrid_125m")
    assert cfg.name == "gss_hybrid_125m"
    assert cfg.model.layout == "serial" and list(cfg.model.branches) == ["gss", "ffn"]  # from gss_125m
    assert cfg.model.d_model == 768  # from pha_125m
    assert list(cfg.model.overrides[0].layers) == [1, 6]


def test_misspelt_key_names_nearest_keys():
    msg = error_for(["model.d_modle=512"])
    assert "unknown config key 'model.d_modle'" in msg and "model.d_model" in msg
    msg = error_for(["model.attn.n_head=4"])
    assert "'model.attn.n_head'" in msg and "model.attn.n_heads" in msg


def test_misspelt_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("extends: tiny_pha\noptim:\n  learning_rate: 0.1\n")
    msg = error_for([], experiment=str(path))
    assert "'optim.learning_rate'" in msg and str(path) in msg and "Valid keys under 'optim': lr," in msg


def test_misspelt_key_inside_layer_override():
    msg = error_for(["model.overrides=[{layers: [1], branhces: [attn]}]"])
    assert "'branhces'" in msg and "branches" in msg and "LayerOverride" in msg


@pytest.mark.parametrize(
    "override,valid",
    [
        ("model.mixer=gated", "static, scalar, channel, concat, gate, mean"),
        ("model.layout=paralel", "parallel, serial"),
        ("model.branches=[gss,atn]", "gss, attn, ffn"),
        ("model.ffn.kind=relu", "gelu, swiglu"),
        ("model.gss.kernel=dss-exp", "(did you mean 'dss_exp'?); choose one of: dss_exp, s4d_lin_noscale"),
    ],
)
def test_bad_enum_lists_valid_choices(override, valid):
    msg = error_for([override])
    assert "invalid value" in msg and valid in msg


def test_shape_errors():
    assert "not divisible by model.attn.n_heads=12" in error_for(["model.d_model=100"])
    assert "not a multiple of model.attn.n_kv_heads=5" in error_for(["model.attn.n_kv_heads=5"])
    msg = error_for(["model.overrides=[{layers: [12], branches: [attn]}]"])
    assert "model.overrides[0].layers contains 12, out of range for model.n_layers=12" in msg
    assert "must be even for RoPE" in error_for(["model.d_model=36", "model.attn.n_heads=12", "model.attn.n_kv_heads=4"])


def test_shape_checks_skip_absent_branches():
    """A GSS-only model need not satisfy attention shape constraints."""
    load_config("gss_125m", ["model.attn.n_kv_heads=5"])


def test_all_branches_off_and_duplicates():
    assert "model.branches is empty" in error_for(["model.branches=[]"])
    assert "repeats a branch" in error_for(["model.branches=[ffn,ffn]"])


def test_wrong_type_and_unparsable_override():
    assert "'model.n_layers'" in error_for(["model.n_layers=abc"])
    assert "must look like key=value" in error_for(["model.n_layers"])
    assert "cannot parse override" in error_for(["model.overrides=[{layers:[1]}]"])


def test_unknown_experiment_suggests_names():
    msg = error_for([], experiment="pha_12m")
    assert "not found" in msg and "pha_125m" in msg

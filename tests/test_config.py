"""Config loading and validation: each class of mistake gets its own, specific message."""

from __future__ import annotations

import pytest
from bodies import config_error

from pha_lab.config import ConfigError, load_config


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
    msg = config_error(["model.d_modle=512"])
    assert "unknown config key 'model.d_modle'" in msg and "model.d_model" in msg
    msg = config_error(["model.attn.n_head=4"])
    assert "'model.attn.n_head'" in msg and "model.attn.n_heads" in msg


def test_misspelt_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("extends: tiny_pha\noptim:\n  learning_rate: 0.1\n")
    msg = config_error([], experiment=str(path))
    assert "'optim.learning_rate'" in msg and str(path) in msg and "Valid keys under 'optim': lr," in msg


def test_misspelt_key_inside_layer_override():
    msg = config_error(["model.overrides=[{layers: [1], branhces: [attn]}]"])
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
    msg = config_error([override])
    assert "invalid value" in msg and valid in msg


def test_shape_errors():
    assert "not divisible by model.attn.n_heads=12" in config_error(["model.d_model=100"])
    assert "not a multiple of model.attn.n_kv_heads=5" in config_error(["model.attn.n_kv_heads=5"])
    msg = config_error(["model.overrides=[{layers: [12], branches: [attn]}]"])
    assert "model.overrides[0].layers contains 12, out of range for model.n_layers=12" in msg
    msg = config_error(["model.d_model=36", "model.attn.n_heads=12", "model.attn.n_kv_heads=4"])
    assert "must be even for RoPE" in msg


def test_shape_checks_skip_absent_branches():
    """A GSS-only model need not satisfy attention shape constraints."""
    load_config("gss_125m", ["model.attn.n_kv_heads=5"])


def test_all_branches_off_and_duplicates():
    assert "model.branches is empty" in config_error(["model.branches=[]"])
    assert "repeats a branch" in config_error(["model.branches=[ffn,ffn]"])


def test_wrong_type_and_unparsable_override():
    assert "'model.n_layers'" in config_error(["model.n_layers=abc"])
    assert "must look like key=value" in config_error(["model.n_layers"])
    assert "cannot parse override" in config_error(["model.overrides=[{layers:[1]}]"])


def test_unknown_experiment_suggests_names():
    msg = config_error([], experiment="pha_12m")
    assert "not found" in msg and "pha_125m" in msg


def bench_spec(path, tiny=False):
    from pha_lab.bench.efficiency import load_spec

    return load_spec(path, tiny=tiny)


# Experiments and bench specs load through the loader sweeps use (tests/test_sweeps.py has the sweep cases).
KINDS = {"experiment": (load_config, "tiny_pha"), "bench spec": (bench_spec, "efficiency")}


@pytest.mark.parametrize("kind", KINDS)
def test_extends_cycle_and_unknown_target_name_the_files(tmp_path, kind):
    load, _ = KINDS[kind]
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match=r"'extends' cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load(str(tmp_path / "a.yaml"))
    (tmp_path / "lost.yaml").write_text("extends: nowhere\nname: lost\n")
    with pytest.raises(ConfigError, match=rf"lost\.yaml: 'extends: nowhere': unknown {kind} 'nowhere': not found"):
        load(str(tmp_path / "lost.yaml"))


@pytest.mark.parametrize(
    "kind,misspelt,nearest,wrong_type,key",
    [
        (
            "experiment",
            "trainer: {max_step: 3}",
            "trainer.max_steps",
            "trainer: {max_steps: many}",
            "trainer.max_steps",
        ),
        ("bench spec", "seq_len: [64]", "seq_lens", "overhead: {steps: many}", "overhead.steps"),
    ],
)
def test_misspelt_key_and_wrong_type_in_an_extending_file(tmp_path, kind, misspelt, nearest, wrong_type, key):
    load, base = KINDS[kind]
    for text, expected in (
        (misspelt, f"Nearest valid keys: {nearest}"),
        (wrong_type, f"bad value for config key '{key}'"),
    ):
        path = tmp_path / "child.yaml"
        path.write_text(f"extends: {base}\nname: child\n{text}\n")
        with pytest.raises(ConfigError) as info:
            load(str(path))
        assert str(path) in str(info.value) and expected in str(info.value)


def test_bench_spec_extends_and_keeps_its_cpu_section(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text("extends: efficiency\nname: short\nsteps: 2\nparts: [models]\n")
    spec, base = bench_spec(str(path)), bench_spec("efficiency")
    assert (spec.name, spec.steps, list(spec.parts), spec.models) == ("short", 2, ["models"], base.models)
    assert spec.cpu is None and bench_spec(str(path), tiny=True).models == bench_spec("efficiency", tiny=True).models

"""Where attention goes (model.n_attn_layers) and per-layer branch settings (model.overrides[i].<branch>): placed as
documented, applied to the modules that are built, refused with a message naming the key when they cannot apply,
and parameter-matched for any k in the attention-sparse presets."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
from bodies import config_error, meta_model

from pha_lab.config import attention_layers, layer_specs, load_config


def test_placement_rule():
    """The middle layer of each of k equal groups; with 32 layers and k = 4, Jamba's 1-in-8 at offset 4."""
    assert [attention_layers(12, k) for k in (1, 2, 3, 4, 6)] == [
        [6],
        [3, 9],
        [2, 6, 10],
        [1, 4, 7, 10],
        [1, 3, 5, 7, 9, 11],
    ]
    assert attention_layers(12, 12) == list(range(12)) and attention_layers(12, 0) == []
    assert attention_layers(32, 4) == [4, 12, 20, 28] and attention_layers(8, 2) == [2, 6]
    for n in range(1, 25):
        for k in range(n + 1):
            placed = attention_layers(n, k)
            assert len(set(placed)) == k and all(0 <= i < n for i in placed)


def test_n_attn_layers_keeps_attention_in_k_layers_of_either_layout():
    model = meta_model("pha_125m", "model.n_attn_layers=3")
    assert [i for i, blk in enumerate(model.blocks) if "attn" in blk.names] == [2, 6, 10]
    assert all(
        blk.names == ["gss", "ffn"] and blk.mixer.k == 2 for i, blk in enumerate(model.blocks) if i not in (2, 6, 10)
    )
    serial = meta_model("sequential_125m", "model.n_attn_layers=1")
    assert [blk.names for blk in serial.blocks][5:8] == [["gss", "ffn"], ["gss", "attn", "ffn"], ["gss", "ffn"]]
    assert [blk.names for blk in meta_model("pha_125m", "model.n_attn_layers=0").blocks] == [["gss", "ffn"]] * 12


def test_override_sections_set_branch_widths_per_layer():
    """Only the keys an override names change, for its layers: the rest of the model's section stays."""
    model = meta_model(
        "pha_125m",
        "model.ffn.kind=swiglu",
        "model.ffn.hidden=2048",
        "model.overrides=[{layers: [0, -1], ffn: {hidden: 1024}, gss: {d_hidden: 128, n_modes: 16}}]",
    )
    ffn = [blk.branches["ffn"] for blk in model.blocks]
    assert [f.W_out.in_features for f in ffn] == [1024] + [2048] * 10 + [1024]
    assert all(f.kind == "swiglu" and f.W_in.out_features == 2 * f.W_out.in_features for f in ffn)
    gss = [blk.branches["gss"] for blk in model.blocks]
    assert [(g.W_v.out_features, g.dss.im.numel()) for g in gss] == [(128, 16)] + [(256, 64)] * 10 + [(128, 16)]
    assert all(g.W_u.out_features == 768 for g in gss)  # expansion not overridden


def test_without_selects_the_layers_lacking_a_branch_at_that_point():
    """Overrides apply in order after n_attn_layers: `without: attn` sees the layers as the earlier ones left them."""
    specs = layer_specs(
        load_config(
            "pha_125m",
            [
                "model.n_attn_layers=2",
                "model.overrides=[{layers: [0], branches: [gss, attn, ffn]}, {without: attn, ffn: {hidden: 3648}}]",
            ],
        ).model
    )
    assert [i for i, s in enumerate(specs) if "attn" in s["branches"]] == [0, 3, 9]
    assert [s["sections"]["ffn"].hidden for s in specs] == [2624, 3648, 3648, 2624] + [3648] * 5 + [2624, 3648, 3648]
    assert specs[1]["keys"] == {"gss": "model.gss", "ffn": "model.overrides[1].ffn"}
    # k = L: no layer lacks attention, the override selects none (a sweep over k includes the full PHA)
    full = meta_model("pha_sparse_125m", "model.n_attn_layers=12")
    assert all(
        blk.names == ["gss", "attn", "ffn"] and blk.branches["ffn"].W_out.in_features == 2624 for blk in full.blocks
    )


@pytest.mark.parametrize(
    "name, base", [("pha_sparse_125m", "pha_125m"), ("pha_sparse_180m", "pha_180m"), ("mini_pha_sparse", "mini_pha")]
)
def test_attention_sparse_presets_stay_matched_for_any_k(name, base):
    """A layer without attention gets attention's parameters as FFN width, so every k has the full PHA's size (up to
    the one mixer logit a 2-branch layer lacks)."""
    full = meta_model(base).n_params()
    n_layers = load_config(base).model.n_layers
    for k in (1, 2, 3, n_layers // 2, n_layers):
        model = meta_model(name, f"model.n_attn_layers={k}")
        assert 0 <= full - model.n_params() == n_layers - k, k


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.n_attn_layers=2", "model.branches=[gss,ffn]"],
            "model.n_attn_layers=2 keeps the attention branch in 2 "
            "layers, but model.branches=['gss', 'ffn'] has no attn",
        ),
        (["model.n_attn_layers=13"], "model.n_attn_layers=13 must be in 0..model.n_layers (12)"),
        (["model.n_attn_layers=-1"], "model.n_attn_layers=-1 must be in 0..model.n_layers (12)"),
        (
            ["model.overrides=[{layers: [1], without: attn}]"],
            "model.overrides[0] sets both layers=[1] and without=attn",
        ),
        (
            ["model.overrides=[{ffn: {hidden: 8}}]"],
            "model.overrides[0].layers is empty: list the 0-based layer indices it "
            "applies to (or pick the layers lacking a branch with model.overrides[0].without)",
        ),
        (
            ["model.overrides=[{without: atn, ffn: {hidden: 8}}]"],
            "invalid value 'atn' for model.overrides[0].without (did you mean 'attn'?)",
        ),
        (
            ["model.overrides=[{layers: [2], branches: [gss, ffn], attn: {n_kv_heads: 2}}]"],
            "model.overrides[0].attn sets n_kv_heads for layer 2, which has no 'attn' branch "
            "(its branches: ['gss', 'ffn'])",
        ),
        (
            ["model.overrides=[{layers: [1], ffn: {kind: relu}}]"],
            "invalid value 'relu' for model.overrides[0].ffn.kind",
        ),
        (
            ["model.overrides=[{layers: [4], attn: {n_kv_heads: 5}}]"],
            "model.overrides[0].attn.n_heads=12 is not a multiple of model.overrides[0].attn.n_kv_heads=5",
        ),
        (["model.overrides=[{layers: [4], ffn: {hidden: wide}}]"], "bad value for config key 'ffn.hidden'"),
    ],
)
def test_bad_placements_and_per_layer_sections_are_refused_naming_the_key(overrides, message):
    assert message in config_error(overrides)


def test_misspelt_key_in_an_override_section_lists_the_section_keys():
    msg = config_error(["model.overrides=[{layers: [4], ffn: {hiden: 8}}]"])
    assert "unknown config key 'ffn.hiden'" in msg and "Nearest valid keys: ffn.hidden" in msg
    assert "Valid keys under a model.overrides[i].ffn section: kind, expansion, hidden" in msg
    msg = config_error(["model.overrides=[{layers: [4], fnn: {hidden: 8}}]"])
    assert "a model.overrides entry (LayerOverride)" in msg and "ffn" in msg


def test_a_config_with_override_sections_pickles_also_in_a_fresh_process(tmp_path):
    """The schema's classes are built from the branch registry; a fresh process finds them by name."""
    cfg = load_config("pha_sparse_125m")
    assert pickle.loads(pickle.dumps(cfg)).model.overrides[0].ffn.hidden == 3648
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    code = f"import pickle; print(pickle.load(open({str(tmp_path / 'cfg.pkl')!r}, 'rb')).model.overrides[0].ffn.hidden)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "3648"


def test_a_config_saved_before_these_keys_builds_as_before():
    """A checkpoint's or run's config from before model.n_attn_layers and the override sections existed."""
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(load_config("gss_hybrid_125m"))
    del saved["model"]["n_attn_layers"]
    for override in saved["model"]["overrides"]:
        for key in ("without", "gss", "attn", "ffn"):
            del override[key]
    specs = layer_specs(OmegaConf.create(saved).model)
    assert [i for i, s in enumerate(specs) if s["branches"] == ["attn", "ffn"]] == [1, 6]

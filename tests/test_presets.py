"""Every experiment preset loads, builds at its real size on the meta device, and is the size its name says; presets
and sweep cells record the model family they build."""

from __future__ import annotations

import re

import pytest
import torch

from pha_lab.analysis.runs import FAMILY_LABELS, guessed_family
from pha_lab.config import experiment_names, flatten, load_config
from pha_lab.models import build_model
from pha_lab.sweep.spec import load_sweep, sweep_names

PRESETS = experiment_names()
SCALED = [n for n in PRESETS if re.search(r"_(\d+)m$", n)]
TINY = [n for n in PRESETS if n.startswith("tiny_")]


def test_expected_presets_exist():
    for name in ["pha_90m", "pha_125m", "pha_180m", "transformer_125m", "transformer_180m", "gss_125m",
                 "gss_hybrid_125m", "sequential_125m", "tiny_pha", "tiny_transformer", "tiny_gss",
                 "tiny_gss_hybrid", "tiny_sequential", "pha_sparse_125m", "pha_sparse_180m", "transformer_deep_180m",
                 "transformer_mha_125m", "transformer_mha_180m", "mini_pha_sparse", "tiny_pha_sparse", "tiny_pha_swa",
                 "pha_swa_125m", "pha_swa_180m"]:
        assert name in PRESETS


@pytest.mark.parametrize("name", SCALED)
def test_preset_size_matches_name(name):
    cfg = load_config(name)
    with torch.device("meta"):
        model = build_model(cfg.model)
    target = int(re.search(r"_(\d+)m$", name).group(1)) * 1e6
    assert abs(model.n_params() / target - 1) <= 0.03, f"{name}: {model.n_params():,} params"
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_on_meta(name):
    cfg = load_config(name)
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert model(torch.zeros(1, 8, dtype=torch.long, device="meta")).shape == (1, 8, cfg.model.vocab_size)


def test_mini_presets_are_parameter_matched():
    counts = {}
    for name in ["mini_pha", "mini_transformer", "mini_gss", "mini_gss_hybrid", "mini_sequential", "mini_pha_sparse"]:
        with torch.device("meta"):
            counts[name] = build_model(load_config(name).model).n_params()
    assert all(abs(c / counts["mini_pha"] - 1) <= 0.03 for c in counts.values()), counts
    assert abs(counts["mini_pha"] / 30e6 - 1) < 0.1


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_trains_a_step_on_cpu(name):
    cfg = load_config(name)
    model = build_model(cfg.model)
    assert 1e5 < model.n_params() < 1e6
    idx = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1))
    logits = model(idx[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["pha_125m", "transformer_125m", "gss_125m", "gss_hybrid_125m", "sequential_125m",
                                  "pha_sparse_125m"])
def test_flops_estimate_matches_lightning_measure_flops(name):
    """The analytic FLOPs/token (used for MFU) agrees with torch's FLOP counter on the meta device;
    the counter does not count FFTs, so compare without them."""
    from lightning.fabric.utilities.throughput import measure_flops

    cfg = load_config(name)
    seq_len = cfg.data.seq_len
    with torch.device("meta"):
        model = build_model(cfg.model)
        idx = torch.randint(0, 100, (1, seq_len))
    measured = measure_flops(model, lambda: model(idx), lambda y: y.sum()) / seq_len
    est = model.flops_per_token(seq_len, training=True)
    assert abs((est["total"] - est["fft"]) / measured - 1) < 0.10
    assert est["fft"] < 0.01 * est["total"]


# Families first shipped after training recorded model.family: no run without the tag can have them, so there is no
# guess to agree with (the layout and branches cannot tell a deeper or a multi-head Transformer apart anyway).
RECORDED_ONLY = {"pha_sparse", "transformer_deep", "transformer_mha", "pha_swa"}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_records_its_model_family(name):
    """Each preset sets model.family, and for the shapes shipped before it was recorded it is what the tables
    guessed from the layout and branches (so old and new runs of one model carry one family); a newer family
    has a table label of its own."""
    cfg = load_config(name)
    family = cfg.model.family
    assert family
    if family in RECORDED_ONLY:
        assert family in FAMILY_LABELS
    else:
        assert family == guessed_family(flatten(cfg))


ARCHITECTURE = ("model.family", "model.layout", "model.branches", "model.overrides")


@pytest.mark.slow  # ~15 s: load_sweep validates every cell (tests/test_sweeps.py::test_shipped_sweeps_validate too)
@pytest.mark.parametrize("sweep", sweep_names())
def test_every_sweep_cell_records_its_model_family(sweep):
    """A cell that changes the architecture (a branch removed, a preset's layout changed by overrides) records the
    family it builds; one cell per distinct architecture is loaded."""
    spec = load_sweep(sweep)
    shapes = {(c["experiment"], str({k: v for k, v in c["overrides"].items() if k in ARCHITECTURE})): c
              for c in spec.cells().values()}
    for cell in shapes.values():
        cfg = spec.cell_config(cell)
        assert cfg.model.family == guessed_family(flatten(cfg)), (sweep, cell)

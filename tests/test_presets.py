"""Every experiment preset loads, builds at its real size on the meta device, is the size its name says, and trains
one optimizer step through the real `train()` (slow); presets and sweep cells record the model family they build."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from bodies import EXPERIMENTS, TINY, assert_trains_one_step, meta_model, run_config

from pha_lab.analysis.runs import FAMILY_LABELS, guessed_family
from pha_lab.config import flatten, load_config
from pha_lab.models import build_model
from pha_lab.sweep.spec import load_sweep, sweep_names

PRESETS = EXPERIMENTS
SCALED = [n for n in PRESETS if re.search(r"_(\d+)m$", n)]
MINI = [n for n in PRESETS if n.startswith("mini_")]


def test_expected_presets_exist():
    for name in [
        "pha_90m",
        "pha_125m",
        "pha_180m",
        "transformer_125m",
        "transformer_180m",
        "gss_125m",
        "gss_hybrid_125m",
        "sequential_125m",
        "tiny_pha",
        "tiny_transformer",
        "tiny_gss",
        "tiny_gss_hybrid",
        "tiny_sequential",
        "pha_sparse_125m",
        "pha_sparse_180m",
        "transformer_deep_180m",
        "transformer_mha_125m",
        "transformer_mha_180m",
        "mini_pha_sparse",
        "tiny_pha_sparse",
        "tiny_pha_swa",
        "pha_swa_125m",
        "pha_swa_180m",
    ]:
        assert name in PRESETS


@pytest.mark.parametrize("name", SCALED)
def test_preset_size_matches_name(name):
    model = meta_model(name)
    target = int(re.search(r"_(\d+)m$", name).group(1)) * 1e6
    assert abs(model.n_params() / target - 1) <= 0.03, f"{name}: {model.n_params():,} params"
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_on_meta(name):
    model = meta_model(name)
    assert model(torch.zeros(1, 8, dtype=torch.long, device="meta")).shape == (1, 8, load_config(name).model.vocab_size)


def test_mini_presets_are_parameter_matched():
    counts = {name: meta_model(name).n_params() for name in MINI}
    assert len(counts) >= 6, counts  # PHA, Transformer, GSS, GSS-Hybrid, sequential, attention-sparse
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


def one_step_overrides(name: str) -> list[str]:
    """One optimizer step of the preset's own model (its widths, depths, branches and vocabulary) on the CPU: one
    device, batch 1, a context of at most 128 tokens (MQAR keeps its own: its key-value pairs need it), logged,
    validated (the best checkpoint written) and tested on one window (MQAR: one example). The preset's checkpoint
    interval stays (every preset's is longer than one step: only the final checkpoint is written)."""
    data = load_config(name).data
    seq_len = data.seq_len if data.source == "mqar" else min(data.seq_len, 128)
    return [
        "trainer.max_steps=1",
        "trainer.val_every_n_steps=1",
        "trainer.log_every_n_steps=1",
        "trainer.devices=1",
        "trainer.num_nodes=1",
        f"data.seq_len={seq_len}",
        "data.batch_size=1",
        "data.eval_batch_size=1",
        f"data.max_eval_tokens={seq_len}",
        "data.mqar.num_test_examples=1",
    ]


@pytest.mark.slow  # minutes: the 125M-180M presets build, step and checkpoint at full size on the CPU
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_trains_one_step(name, tmp_path, shared_data, empty_mlflow_store):
    """lightning-hydra-template's test_experiments for this suite: each experiments/*.yaml (discovered, so a new
    preset is included) through `train()`, validated and tested, with the parameter count of the full preset."""
    cfg = run_config(tmp_path, name, *one_step_overrides(name), store=empty_mlflow_store)
    try:
        result, _ = assert_trains_one_step(cfg)
        assert result.n_params == meta_model(name).n_params()  # the preset's own model, not a shrunk one
    finally:  # a 180M checkpoint with its AdamW state is ~2 GB, and there are two (best and last)
        shutil.rmtree(tmp_path / "runs" / "checkpoints", ignore_errors=True)


@pytest.mark.parametrize("name", [n for n in PRESETS if n.endswith("_125m")])
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
    shapes = {
        (c["experiment"], str({k: v for k, v in c["overrides"].items() if k in ARCHITECTURE})): c
        for c in spec.cells().values()
    }
    for cell in shapes.values():
        cfg = spec.cell_config(cell)
        assert cfg.model.family == guessed_family(flatten(cfg)), (sweep, cell)

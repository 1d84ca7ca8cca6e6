"""A branch added from this file alone (its module, its config dataclass, one registration call) is configured,
validated, built in both layouts, trained through the real `train()`, counted in FLOPs, weight-decayed as its
parameters ask, and knocked out; and the built-in branches' parameters keep the optimizer groups they had."""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import pytest
import torch
from bodies import assert_causal, assert_knockout_zeroes, assert_trains_one_step
from lightning.fabric.utilities.throughput import measure_flops
from torch import nn

from pha_lab.branches import BranchConfig, register_branch
from pha_lab.cli import build_parser
from pha_lab.config import MIXERS, ConfigError, load_config, round_to
from pha_lab.models import BRANCH_REGISTRY, build_model
from pha_lab.training.module import LMModule
from pha_lab.training.optim import param_groups


# --------------------------------------------------------------------------- the toy branch (pha_lab.branches' example)
class RunningMean(nn.Module):
    """y = W_out(gate * causal running mean of W_in h): a causal sequence mixer whose mean is a T x T matmul."""

    flops_part = "running_mean"

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.W_in = nn.Linear(d_model, width, bias=False)
        self.W_out = nn.Linear(width, d_model, bias=False)
        self.W_out.is_residual_out = True
        self.gate = nn.Parameter(torch.ones(1, width))
        self.gate.no_weight_decay = True

    @classmethod
    def from_config(cls, cfg, d_model: int) -> RunningMean:
        return cls(d_model, round_to(cfg.expansion * d_model))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t = h.shape[1]
        avg = torch.ones(t, t, device=h.device, dtype=h.dtype).tril()
        return self.W_out(self.gate * ((avg / avg.sum(-1, keepdim=True)) @ self.W_in(h)))

    def flops_per_token(self, seq_len: int) -> float:
        return 2.0 * seq_len * self.W_in.out_features


@dataclass
class RunningMeanConfig(BranchConfig):
    expansion: float = 1.0

    def validate(self, model, key: str) -> None:
        if self.expansion <= 0:
            raise ConfigError(f"{key}.expansion={self.expansion} must be positive")


@pytest.fixture
def running_mean():
    """The registration, undone afterwards so the other test files see only the built-in branches."""
    register_branch("running_mean", RunningMeanConfig, RunningMean)
    yield
    del BRANCH_REGISTRY["running_mean"]


LAYOUTS = {"parallel": "[gss,running_mean,ffn]", "serial": "[running_mean,attn,ffn]"}


def toy_overrides(layout: str) -> list[str]:
    """tiny_pha with the toy branch in every layer of the given layout."""
    return [
        f"model.layout={layout}",
        f"model.branches={LAYOUTS[layout]}",
        f"model.family=toy_{layout}",
        "model.running_mean.expansion=2.0",
    ]


def toy_config(layout: str, *overrides: str):
    return load_config("tiny_pha", [*toy_overrides(layout), *overrides])


# --------------------------------------------------------------------------- configuration
def test_the_branch_is_a_typed_validated_config_section(running_mean):
    cfg = toy_config("parallel")
    assert cfg.model.running_mean.expansion == 2.0 and load_config("tiny_pha").model.running_mean.expansion == 1.0
    with pytest.raises(ConfigError, match="'model.running_mean.expansoin'.*model.running_mean.expansion"):
        toy_config("parallel", "model.running_mean.expansoin=2")
    with pytest.raises(ConfigError, match="bad value for config key 'model.running_mean.expansion'"):
        toy_config("parallel", "model.running_mean.expansion=wide")
    with pytest.raises(ConfigError, match=r"model.running_mean.expansion=0.0 must be positive"):
        toy_config("serial", "model.running_mean.expansion=0")
    load_config("tiny_pha", ["model.running_mean.expansion=0"])  # no layer uses it: its section is not checked
    with pytest.raises(ConfigError, match="choose one of: gss, attn, ffn, swa, running_mean"):
        load_config("tiny_pha", ["model.branches=[gss,running_men]"])
    knockout = build_parser().parse_args(["eval", "RUN_ID", "--knockout", "running_mean", "gss"]).knockout
    assert knockout == ["running_mean", "gss"]


def test_the_branch_has_per_layer_sections_and_its_missing_cache_count_is_named(running_mean):
    """An override can set the new branch's keys for some layers (the schema adds model.overrides[i].running_mean);
    without cache_bytes on its module, the model's inference cache cannot be counted, and says which branch lacks it."""
    cfg = toy_config("parallel", "model.overrides=[{layers: [0], running_mean: {expansion: 4.0}}]")
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert [blk.branches["running_mean"].W_in.out_features for blk in model.blocks] == [256, 128]
    with pytest.raises(ConfigError, match=r"model.overrides\[0\].running_mean.expansion=-1.0 must be positive"):
        toy_config("parallel", "model.overrides=[{layers: [1], running_mean: {expansion: -1.0}}]")
    with pytest.raises(TypeError, match=r"layer 0: branch 'running_mean' \(RunningMean\) has no cache_bytes"):
        model.cache_bytes(1, 128, 2)


def test_the_registration_is_undone_and_refuses_bad_entries(running_mean):
    with pytest.raises(ValueError, match="'gss' is already registered"):
        register_branch("gss", RunningMeanConfig, RunningMean)
    with pytest.raises(ValueError, match="must be a Python identifier"):
        register_branch("running-mean", RunningMeanConfig, RunningMean)
    with pytest.raises(TypeError, match="subclassing BranchConfig"):
        register_branch("plain", dict, RunningMean)
    with pytest.raises(ValueError, match="'package.module:Class'"):
        register_branch("lazy", RunningMeanConfig, "pha_lab.models.running_mean")
    register_branch("mixer", RunningMeanConfig, RunningMean)  # its section would be model.mixer
    try:
        with pytest.raises(ConfigError, match="branch 'mixer' .* clashes with the key model.mixer"):
            load_config("tiny_pha")
    finally:
        del BRANCH_REGISTRY["mixer"]
    register_branch("without", RunningMeanConfig, RunningMean)  # its per-layer section would be an override's key
    try:
        with pytest.raises(ConfigError, match=r"branch 'without' .* clashes with .*model.overrides\[i\].without"):
            load_config("tiny_pha")
    finally:
        del BRANCH_REGISTRY["without"]


def test_outside_the_fixture_the_branch_does_not_exist():
    assert "running_mean" not in BRANCH_REGISTRY
    with pytest.raises(ConfigError, match="unknown config key 'model.running_mean'"):
        load_config("tiny_pha", ["model.running_mean.expansion=2"])


# --------------------------------------------------------------------------- model, FLOPs, knockout, weight decay
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_branch_is_built_causal_and_knocked_out(running_mean, layout):
    cfg = toy_config(layout)
    torch.manual_seed(0)
    model = build_model(cfg.model).double().eval()
    assert all(isinstance(blk.branches["running_mean"], RunningMean) for blk in model.blocks)
    assert_causal(model, length=24, t=9)  # within 1e-10 (FFT round-off in the GSS branch: not bit-equal)
    idx = torch.randint(0, cfg.model.vocab_size, (2, 24))
    knocked = assert_knockout_zeroes(model, "running_mean", idx)
    with torch.no_grad():
        for blk in model.blocks:  # the same model with the branch's output projection zeroed
            blk.branches["running_mean"].W_out.weight.zero_()
        assert (knocked - model(idx)).abs().max().item() < 1e-12


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_branch_is_counted_in_flops_as_torch_counts_them(running_mean, layout):
    """Forward FLOPs on the meta device: the general rule (2 x Linear weights + what each module reports) equals
    torch's FLOP counter exactly (without GSS: the counter sees neither its FFTs nor, rightly, is its kernel build,
    amortised over the batch, part of the per-token rule)."""
    cfg = toy_config(layout, "model.branches=[running_mean,attn,ffn]")
    seq_len, batch = cfg.data.seq_len, 2
    with torch.device("meta"):
        model = build_model(cfg.model)
        idx = torch.randint(0, 100, (batch, seq_len))
    measured = measure_flops(model, lambda: model(idx)) / (batch * seq_len)
    est = model.flops_per_token(seq_len, training=False)
    assert est["total"] == measured and est["attention"] > 0 and est["fft"] == 0
    width = round_to(2.0 * cfg.model.d_model)
    assert est["running_mean"] == cfg.model.n_layers * 2.0 * seq_len * width
    assert model.flops_per_token(seq_len)["running_mean"] == 3 * est["running_mean"]
    assert est["total"] == sum(v for k, v in est.items() if k != "total")


def name_rule(name: str, p: torch.Tensor) -> bool:
    """The optimizer's grouping before parameters carried markers (training/module.py, parameter names)."""
    return p.ndim == 2 and not name.startswith("wte.") and ".mixer." not in name and ".dss." not in name


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("tied,norm", [(True, "rmsnorm"), (False, "layernorm")])
def test_weight_decay_groups_are_those_the_parameter_names_gave(family_preset, mixer, tied, norm):
    cfg = load_config(family_preset, [f"model.mixer={mixer}", f"model.tie_embeddings={tied}", f"model.norm={norm}"])
    model = build_model(cfg.model)
    decay, no_decay = param_groups(model, 0.1)
    named = dict(model.named_parameters())
    assert {id(p) for p in decay["params"]} == {id(p) for n, p in named.items() if name_rule(n, p)}
    assert {id(p) for p in no_decay["params"]} == {id(p) for n, p in named.items() if not name_rule(n, p)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_the_branch_parameters_carry_their_decay(running_mean):
    model = build_model(toy_config("parallel").model)
    decayed = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
    toy = model.blocks[0].branches["running_mean"]
    assert id(toy.W_in.weight) in decayed and id(toy.W_out.weight) in decayed
    assert id(toy.gate) not in decayed  # 2-D, but marked no_weight_decay


# --------------------------------------------------------------------------- trained through train(), evaluated
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_branch_trains_one_step_through_train_and_is_knocked_out_at_eval(
    running_mean, layout, tmp_path, tiny_config
):
    from pha_lab.training.evaluate import evaluate

    runs_dir = tmp_path / "runs"
    cfg = tiny_config(
        "tiny_pha",
        *toy_overrides(layout),
        "trainer.max_steps=1",
        "trainer.val_every_n_steps=1",
        "trainer.log_every_n_steps=1",
        "data.max_eval_tokens=1024",
    )
    result, step = assert_trains_one_step(cfg)  # one AdamW step moved every parameter, the toy branch's too
    assert len({n for n in step.moved if ".branches.running_mean." in n}) == 3 * cfg.model.n_layers
    run = mlflow.MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["family"] == f"toy_{layout}"
    assert run.data.params["model.running_mean.expansion"] == "2.0"
    assert float(run.data.tags["flops_per_token"]) == pytest.approx(LMModule(cfg).flops_per_token, rel=1e-5)
    if layout == "parallel":
        assert {"mixer/L0/running_mean", "rms/L1/running_mean"} <= run.data.metrics.keys()
    table = evaluate(result.run_id, [f"tracking.runs_dir={runs_dir}"], knockout=["running_mean"])
    assert list(table["condition"]) == ["intact", "-running_mean"] and table["delta_ppl"].iloc[1] != 0
    logged = mlflow.MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics
    assert logged["knockout/running_mean/all/delta_ppl"] == pytest.approx(table["delta_ppl"].iloc[1])

"""What many tests check, written once, so that a test file states its cases as one-line parametrised calls (the
shape of flash-linear-attention's tests/models: one shared body, thin per-model cases).

- The presets the tests run over, discovered from experiments/ (never listed: a new preset is picked up):
  EXPERIMENTS, TINY, and FAMILIES (model.family -> the tiny preset that builds it; conftest.py's `family_preset`
  fixture parametrises a test over it, with the family as the test id).
- Builders: `model64` (a preset's model in float64, for exact comparisons), `meta_model` (full size, on the meta
  device), `config_error` (the message a bad config gets), `run_config` (a CPU run tracked under a folder).
- Assertion bodies: `assert_causal` (a model) and `assert_causal_sequence_map` (a layer), `assert_knockout_zeroes`,
  `assert_trains_one_step` (one optimizer step through the real `train()`).

Imported by the test files as `bodies` (pytest puts tests/ on sys.path: the test files are not a package).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import DictConfig

from pha_lab.config import EXPERIMENTS_DIR, ConfigError, experiment_names, layer_specs, load_config
from pha_lab.models import build_model

# --------------------------------------------------------------------------- the presets
EXPERIMENTS = experiment_names()  # every experiments/*.yaml
TINY = [name for name in EXPERIMENTS if name.startswith("tiny_")]  # the CPU-sized presets


def _family_presets() -> dict[str, str]:
    """model.family -> its tiny preset. A tiny preset that extends one of the same family changes the task or the
    recipe, not the model (tiny_mqar: tiny_pha on MQAR), so it does not stand for the family."""
    family = {name: load_config(name).model.family for name in TINY}
    chosen: dict[str, str] = {}
    for name in TINY:
        parent = (yaml.safe_load((EXPERIMENTS_DIR / f"{name}.yaml").read_text()) or {}).get("extends")
        if parent in family and family[parent] == family[name]:
            continue
        if family[name] in chosen:
            raise ConfigError(
                f"two tiny presets build model.family={family[name]}: {chosen[family[name]]} and {name}; "
                f"let one extend the other, or give one its own family"
            )
        chosen[family[name]] = name
    return chosen


FAMILIES = _family_presets()  # {"gss": "tiny_gss", ..., "pha": "tiny_pha", ..., "transformer": "tiny_transformer"}


def branches_of(name: str) -> list[str]:
    """The branches some layer of the preset has, in their order of first appearance."""
    names: list[str] = []
    for spec in layer_specs(load_config(name).model):
        names += [b for b in spec["branches"] if b not in names]
    return names


# --------------------------------------------------------------------------- builders
def model64(name: str = "tiny_pha", *overrides: str):
    """The preset's model in float64 and eval mode, the precision the exactness tests compare in (its model config
    is `model.cfg`)."""
    return build_model(load_config(name, list(overrides)).model).double().eval()


def meta_model(name: str, *overrides: str):
    """The preset's model at its real size on the meta device: shapes and counts without memory or time."""
    cfg = load_config(name, list(overrides))
    with torch.device("meta"):
        return build_model(cfg.model)


def config_error(overrides: list[str], experiment: str = "pha_125m") -> str:
    """The message of the ConfigError that loading `experiment` with `overrides` raises."""
    with pytest.raises(ConfigError) as info:
        load_config(experiment, overrides)
    return str(info.value)


def run_config(root: Path, experiment: str = "tiny_pha", *overrides: str, store: Path | None = None) -> DictConfig:
    """A preset as a CPU run tracked under root/runs (MLflow experiment 'test'), `overrides` last; `store`: an empty
    MLflow database to start from (conftest's `empty_mlflow_store`), copied there unless one exists. conftest's
    `tiny_config` fixture is this with root = the test's tmp_path; module-scoped fixtures call it directly."""
    if store is not None and not (root / "runs" / "mlflow.db").exists():
        (root / "runs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store, root / "runs" / "mlflow.db")
    return load_config(
        experiment,
        [f"tracking.runs_dir={root / 'runs'}", "tracking.experiment=test", "trainer.accelerator=cpu", *overrides],
    )


# --------------------------------------------------------------------------- causality
def assert_outputs_agree_up_to(a: torch.Tensor, b: torch.Tensor, t: int, tol: float, visible: float) -> None:
    """Two outputs of inputs that differ only after position t: equal up to t (within tol), apart after."""
    assert (a[:, : t + 1] - b[:, : t + 1]).abs().max().item() < tol
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max().item() > visible  # the change is visible later


def assert_no_gradient_from_later(fn, x: torch.Tensor, t: int, tol: float, visible: float) -> None:
    """The output at position t of fn(x) [B, T, ...] has no gradient w.r.t. any later input, some w.r.t. earlier."""
    x = x.detach().clone().requires_grad_(True)
    fn(x)[:, t].sum().backward()
    assert x.grad[:, t + 1 :].abs().max().item() < tol
    assert x.grad[:, : t + 1].abs().max().item() > visible


def assert_causal(model, length: int = 24, t: int = 9) -> None:
    """A float64 language model: tokens after t change no logit up to t (and do change later ones), and no logit
    at t has a gradient from a later token embedding."""
    vocab = model.wte.num_embeddings
    idx = torch.randint(0, vocab, (2, length))
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, vocab, (2, length - t - 1))
    with torch.no_grad():
        assert_outputs_agree_up_to(model(idx), model(changed), t, tol=1e-10, visible=1e-6)
    assert_no_gradient_from_later(model.forward_embeddings, model.wte(idx), t, tol=1e-10, visible=0)


def assert_causal_sequence_map(fn, x: torch.Tensor, t: int, tol: float, visible: float) -> None:
    """A layer [B, T, ...] -> [B, T, ...]: changing x after t changes nothing up to t, and no output's gradient
    reaches a later input."""
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
    with torch.no_grad():
        assert_outputs_agree_up_to(fn(x), fn(changed), t, tol, visible)
    assert_no_gradient_from_later(fn, x, t, tol, visible)


# --------------------------------------------------------------------------- knockout
def assert_knockout_zeroes(model, branch: str, idx: torch.Tensor | None = None) -> torch.Tensor:
    """`model.knockout(branch)` is the model with that branch's output replaced by zeros in every layer that has it
    (a forward hook here), it changes the output, and it is undone on exit. Returns the knocked-out logits."""
    if idx is None:
        idx = torch.randint(0, model.wte.num_embeddings, (2, 12))
    with torch.no_grad():
        full = model(idx)
        with model.knockout(branch):
            knocked = model(idx)
        hooks = [
            blk.branches[branch].register_forward_hook(lambda module, args, out: torch.zeros_like(out))
            for blk in model.blocks
            if branch in blk.branches
        ]
        zeroed = model(idx)
        for hook in hooks:
            hook.remove()
        after = model(idx)
    assert (knocked - zeroed).abs().max().item() < 1e-12
    assert (knocked - full).abs().max().item() > 1e-6
    assert (after - full).abs().max().item() == 0  # knockout is undone on exit
    return knocked


# --------------------------------------------------------------------------- one training step
def assert_trains_one_step(cfg: DictConfig, callbacks: list | None = None):
    """`train(cfg)` (cfg asks for trainer.max_steps=1) takes exactly one optimizer step that moves every parameter,
    with a finite loss; the run ends FINISHED in MLflow with finite test metrics and its model family tagged.
    Returns (TrainResult, StepRecord) for the caller's own checks."""
    import lightning as L  # here, not at the top: importing Lightning takes seconds that most test files do not need
    import mlflow

    from pha_lab.training.run import train

    class StepRecord(L.Callback):
        """What one run did: its training losses, the optimizer steps taken, and the parameters that moved."""

        def __init__(self):
            self.losses: list[float] = []
            self.steps = -1
            self.moved: set[str] = set()
            self.unmoved: set[str] = set()

        def on_train_start(self, trainer, pl_module):
            self._before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad}

        def on_before_backward(self, trainer, pl_module, loss):
            self.losses.append(loss.item())

        def on_train_end(self, trainer, pl_module):
            self.steps = trainer.global_step
            for name, p in pl_module.model.named_parameters():
                if name in self._before:
                    (self.unmoved if torch.equal(self._before[name], p.detach()) else self.moved).add(name)
            del self._before

    record = StepRecord()
    result = train(cfg, [record, *(callbacks or [])])
    assert record.steps == 1, record.steps
    assert len(record.losses) == cfg.trainer.accumulate_grad_batches, record.losses
    assert all(torch.isfinite(torch.tensor(record.losses))), record.losses
    assert not record.unmoved, f"parameters that one optimizer step left unchanged: {sorted(record.unmoved)}"
    run = mlflow.MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert result.status == run.info.status == "FINISHED"
    assert run.data.tags.get("family") == cfg.model.family
    assert "test/loss" in result.metrics and all(torch.isfinite(torch.tensor(list(result.metrics.values())))), (
        result.metrics
    )
    return result, record


def sweep_yaml(tmp_path: Path, name: str, default_overrides: dict, default_grace_period: int, /, **spec) -> str:
    """A sweep YAML of tiny_pha trials with the default overrides and grace period and a 1 s heartbeat (keys of
    `spec`, such as overrides= or grace_period=, replace any of these), written to tmp_path/<name>.yaml; its path."""
    spec = {
        "name": name,
        "experiment": "tiny_pha",
        "overrides": dict(default_overrides),
        "heartbeat_interval": 1,
        "grace_period": default_grace_period,
        **spec,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)

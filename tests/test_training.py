"""Training: loss falls, MLflow holds the run, resume is exact, Lightning == plain PyTorch, NaN guard."""

from __future__ import annotations

import os
import signal

import lightning as L
import mlflow
import pandas as pd
import pytest
import torch

from pha_lab.config import load_config
from pha_lab.training.callbacks import RunInterrupted
from pha_lab.training.module import LMModule, lr_lambda, param_groups
from pha_lab.training.run import train


class LossRecorder(L.Callback):
    """Per-step training losses; optionally sends this process a signal after a given step."""

    def __init__(self, signal_at: int | None = None, nan_at: int | None = None):
        self.losses: dict[int, float] = {}
        self.signal_at, self.nan_at = signal_at, nan_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()
        if self.signal_at and trainer.global_step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.nan_at is not None and trainer.global_step == self.nan_at:
            with torch.no_grad():
                pl_module.model.wte.weight[0, 0] = float("nan")
                batch["input_ids"][0, 0] = 0


def tiny(tmp_path, experiment="tiny_pha", *overrides):
    return load_config(experiment, [f"tracking.runs_dir={tmp_path / 'runs'}", "tracking.experiment=test",
                                    "trainer.log_every_n_steps=5", *overrides])


def runs(result):
    mlflow.set_tracking_uri(result.tracking_uri)
    return mlflow.search_runs(experiment_names=["test"])


@pytest.mark.parametrize("experiment", ["tiny_pha", "tiny_mqar"])
def test_tiny_model_learns_and_everything_is_tracked(tmp_path, experiment):
    cfg = tiny(tmp_path, experiment, "trainer.max_steps=50", "trainer.val_every_n_steps=25", "optim.warmup_steps=5")
    rec = LossRecorder()
    result = train(cfg, [rec])
    first, last = sum(rec.losses[s] for s in range(1, 6)) / 5, sum(rec.losses[s] for s in range(46, 51)) / 5
    assert last < first - 0.3, (first, last)
    row = runs(result).set_index("run_id").loc[result.run_id]
    assert row["status"] == "FINISHED"
    # params: the flattened resolved config
    assert row["params.model.d_model"] == "64" and row["params.optim.lr"] == str(cfg.optim.lr)
    # tags: code, host, versions, sizes, protocol
    for tag in ("git_sha", "git_dirty", "host", "gpu", "torch", "lightning", "n_params", "n_params_non_embedding",
                "flops_per_token", "protocol.dataset", "protocol.split", "protocol.context", "protocol.stride",
                "protocol.tokenizer"):
        assert isinstance(row[f"tags.{tag}"], str) and row[f"tags.{tag}"], tag
    # metrics per step and per validation, final test metrics
    for metric in ("train/loss", "train/grad_norm", "lr-AdamW/pg1", "train/device/items_per_sec", "val/loss", "test/loss"):
        assert pd.notna(row[f"metrics.{metric}"]), metric
    if experiment == "tiny_mqar":
        assert 0.0 <= row["metrics.test/accuracy"] <= 1.0
        assert pd.isna(row.get("metrics.test/ppl"))
    else:
        assert row["metrics.test/ppl"] == pytest.approx(torch.tensor(row["metrics.test/loss"]).exp().item(), rel=1e-5)
        assert 0 < row["metrics.test/bpb"] < 10
    client = mlflow.tracking.MlflowClient(result.tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "mixer_weights.csv", "mixer_weights.png"} <= artifacts
    assert len(client.get_metric_history(result.run_id, "train/loss")) == 10  # every 5 steps


def test_introspection_table_has_one_row_per_layer_and_branch(tmp_path):
    result = train(tiny(tmp_path, "tiny_pha", "trainer.max_steps=10", "trainer.val_every_n_steps=5"))
    table = pd.read_csv(result.ckpt_dir / "introspection" / "mixer_weights.csv")
    assert len(table) == 2 * 3 and sorted(table.layer.unique()) == [0, 1]
    assert table.groupby("layer").weight.sum().round(5).tolist() == [1.0, 1.0]  # static: softmax
    assert (table.rms > 0).all()
    png = (result.ckpt_dir / "introspection" / "mixer_weights.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000


def test_resume_after_interrupt_is_exact_and_one_run(tmp_path):
    overrides = ["trainer.max_steps=20", "trainer.val_every_n_steps=10", "trainer.ckpt_every_n_steps=7"]
    straight = LossRecorder()
    ref = train(tiny(tmp_path / "a", "tiny_pha", *overrides), [straight])

    first = LossRecorder(signal_at=10)
    with pytest.raises(RunInterrupted) as info:
        train(tiny(tmp_path / "b", "tiny_pha", *overrides), [first])
    run_id = str(info.value).split()[1]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'b' / 'runs' / 'mlflow.db'}")
    assert mlflow.get_run(run_id).info.status == "KILLED"
    assert sorted(first.losses) == list(range(1, 11))

    second = LossRecorder()
    resumed = train(tiny(tmp_path / "b", "tiny_pha", *overrides, f"resume={run_id}"), [second])
    assert resumed.run_id == run_id and sorted(second.losses) == list(range(11, 21))
    merged = {**first.losses, **second.losses}
    assert max(abs(straight.losses[s] - merged[s]) for s in straight.losses) < 1e-6
    a = torch.load(ref.ckpt_dir / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(resumed.ckpt_dir / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    store = mlflow.search_runs(experiment_names=["test"])
    assert len(store) == 1 and store.status[0] == "FINISHED"
    assert resumed.metrics["test/loss"] == pytest.approx(ref.metrics["test/loss"], abs=1e-5)


def test_resume_refuses_shape_change(tmp_path):
    from pha_lab.config import ConfigError

    first = LossRecorder(signal_at=3)
    with pytest.raises(RunInterrupted) as info:
        train(tiny(tmp_path, "tiny_pha", "trainer.max_steps=10"), [first])
    run_id = str(info.value).split()[1]
    with pytest.raises(ConfigError, match=r"model\.d_model: 64 -> 128"):
        train(tiny(tmp_path, "tiny_pha", "trainer.max_steps=10", "model.d_model=128", f"resume={run_id}"))


def test_same_seed_gives_identical_losses(tmp_path):
    a, b = LossRecorder(), LossRecorder()
    train(tiny(tmp_path / "a", "tiny_pha", "trainer.max_steps=8"), [a])
    train(tiny(tmp_path / "b", "tiny_pha", "trainer.max_steps=8"), [b])
    assert a.losses == b.losses


def test_lightning_matches_plain_pytorch_loop(tmp_path):
    """Lightning's parity-test idea: same model, data, seed and optimiser in a hand-written loop."""
    from pha_lab.data import build_datamodule

    steps = 12
    cfg = tiny(tmp_path, "tiny_pha", f"trainer.max_steps={steps}", "trainer.val_every_n_steps=1000")
    rec = LossRecorder()
    train(cfg, [rec])

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = LMModule(cfg)
    model = module.model
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, o.warmup_steps, steps, o.min_lr_ratio))
    plain = []
    for step, batch in zip(range(steps), dm.train_dataloader()):
        logits = model(batch["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        plain.append(loss.item())
    assert [round(rec.losses[s + 1], 5) for s in range(steps)] == [round(v, 5) for v in plain]


def test_nan_loss_fails_the_run_with_its_step(tmp_path):
    cfg = tiny(tmp_path, "tiny_pha", "trainer.max_steps=20")
    with pytest.raises(Exception, match="non-finite training loss"):
        train(cfg, [LossRecorder(nan_at=4)])
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["test"]).iloc[0]
    assert run["status"] == "FAILED"
    assert "at step 5" in run["tags.failure_reason"]  # NaN injected before the 5th step (global_step 4 -> 5)


def test_lr_schedule_warmup_then_cosine_to_floor():
    values = [lr_lambda(s, 10, 110, 0.1) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.55) and values[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))


def test_no_weight_decay_on_norms_embeddings_mixers_and_ssm():
    cfg = load_config("tiny_pha", ["model.mixer=concat"])
    module = LMModule(cfg)
    decay, no_decay = param_groups(module.model, 0.1)
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "wte.weight" not in decayed
    assert not any(".mixer." in n or ".dss." in n or "norm" in n for n in decayed)
    assert "blocks.0.branches.attn.W_q.weight" in decayed and "blocks.0.branches.gss.W_u.weight" in decayed


def test_eval_knocks_out_branches_and_logs_to_the_run(tmp_path):
    from pha_lab.training.evaluate import evaluate

    result = train(tiny(tmp_path, "tiny_pha", "trainer.max_steps=10", "trainer.val_every_n_steps=5"))
    table = evaluate(result.run_id, [f"tracking.runs_dir={tmp_path / 'runs'}"], knockout=["gss", "ffn"], per_layer=True)
    assert list(table.condition) == ["intact", "-gss", "-gss", "-ffn", "-ffn"]
    assert table.loc[0, "ppl"] == pytest.approx(result.metrics["test/ppl"], rel=1e-5)
    assert (table.delta_ppl.iloc[1:] != 0).all()
    client = mlflow.tracking.MlflowClient(result.tracking_uri)
    logged = client.get_run(result.run_id).data.metrics
    assert logged["knockout/gss/L0/delta_ppl"] == pytest.approx(table.delta_ppl.iloc[1])
    assert "knockout.csv" in {a.path for a in client.list_artifacts(result.run_id)}

"""Training: loss falls, MLflow holds the run, resume is exact, Lightning == plain PyTorch, NaN guard."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback

import lightning as L
import mlflow
import pandas as pd
import pytest
import torch
from bodies import run_config

from pha_lab import tracking
from pha_lab.config import load_config
from pha_lab.training.callbacks import RunInterrupted, request_stop
from pha_lab.training.module import LMModule
from pha_lab.training.optim import build_optimizer, build_schedule, lr_lambda, param_groups
from pha_lab.training.run import train


class LossRecorder(L.Callback):
    """Training losses per optimizer step and of every micro-batch in order (recorded before backward, so a
    step that ends in an interruption is recorded too); optionally sends this process SIGTERM at the end of
    optimizer step `signal_at` or of micro-batch number `signal_after_micro`."""

    def __init__(self, signal_at: int | None = None, signal_after_micro: int | None = None):
        self.losses: dict[int, float] = {}
        self.micro: list[float] = []
        self.signal_at, self.signal_after_micro = signal_at, signal_after_micro

    def on_before_backward(self, trainer, pl_module, loss):
        self.losses[trainer.global_step + 1] = loss.item()
        self.micro.append(loss.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (
            self.signal_at
            and trainer.global_step == self.signal_at
            or self.signal_after_micro
            and len(self.micro) == self.signal_after_micro
        ):
            os.kill(os.getpid(), signal.SIGTERM)


def runs(result):
    mlflow.set_tracking_uri(result.tracking_uri)
    return mlflow.search_runs(experiment_names=["test"])


@pytest.mark.parametrize("experiment", ["tiny_pha", "tiny_mqar"])
def test_tiny_model_learns_and_everything_is_tracked(experiment, tiny_config):
    cfg = tiny_config(
        experiment,
        "trainer.max_steps=50",
        "trainer.val_every_n_steps=25",
        "optim.warmup_steps=5",
        "trainer.log_every_n_steps=5",
    )
    rec = LossRecorder()
    result = train(cfg, [rec])
    first, last = sum(rec.losses[s] for s in range(1, 6)) / 5, sum(rec.losses[s] for s in range(46, 51)) / 5
    assert last < first - 0.3, (first, last)
    row = runs(result).set_index("run_id").loc[result.run_id]
    assert row["status"] == "FINISHED"
    # params: the flattened resolved config
    assert row["params.model.d_model"] == "64" and row["params.optim.lr"] == str(cfg.optim.lr)
    # tags: code, host, versions, sizes, protocol
    for tag in (
        "git_sha",
        "git_dirty",
        "host",
        "gpu",
        "torch",
        "lightning",
        "n_params",
        "n_params_non_embedding",
        "flops_per_token",
        "protocol.dataset",
        "protocol.split",
        "protocol.context",
        "protocol.stride",
        "protocol.tokenizer",
    ):
        assert isinstance(row[f"tags.{tag}"], str) and row[f"tags.{tag}"], tag
    assert (
        row["tags.git_sha"] == tracking.git_info()["git_sha"] != "HEAD"
        and row["tags.command"] == tracking.command_line()
    )
    # metrics per step and per validation, final test metrics
    for metric in (
        "train/loss",
        "train/grad_norm",
        "lr-AdamW/pg1",
        "train/device/items_per_sec",
        "val/loss",
        "test/loss",
    ):
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


def test_introspection_table_has_one_row_per_layer_and_branch(tiny_config):
    result = train(tiny_config("tiny_pha", "trainer.max_steps=10", "trainer.val_every_n_steps=5"))
    table = pd.read_csv(result.ckpt_dir / "introspection" / "mixer_weights.csv")
    assert len(table) == 2 * 3 and sorted(table.layer.unique()) == [0, 1]
    assert table.groupby("layer").weight.sum().round(5).tolist() == [1.0, 1.0]  # static: softmax
    assert (table.rms > 0).all()
    png = (result.ckpt_dir / "introspection" / "mixer_weights.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000


def test_resume_after_interrupt_is_exact_and_one_run(tmp_path, tiny_config):
    overrides = ["trainer.max_steps=20", "trainer.val_every_n_steps=10", "trainer.ckpt_every_n_steps=7"]
    straight = LossRecorder()
    ref = train(tiny_config("tiny_pha", *overrides, root=tmp_path / "a"), [straight])

    first = LossRecorder(signal_at=10)
    with pytest.raises(RunInterrupted) as info:
        train(tiny_config("tiny_pha", *overrides, root=tmp_path / "b"), [first])
    run_id = info.value.run_id
    assert info.value.ckpt_path == tmp_path / "b" / "runs" / "checkpoints" / run_id / "last.ckpt"
    assert info.value.ckpt_path.is_file()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'b' / 'runs' / 'mlflow.db'}")
    assert mlflow.get_run(run_id).info.status == "KILLED"
    assert mlflow.get_run(run_id).data.tags["killed_reason"] == "SIGTERM received; stopped after step 11"
    assert sorted(first.losses) == list(range(1, 12))  # the signal came after step 10's hooks: stops after step 11

    second = LossRecorder()
    resumed = train(tiny_config("tiny_pha", *overrides, f"resume={run_id}", root=tmp_path / "b"), [second])
    assert resumed.run_id == run_id and sorted(second.losses) == list(range(12, 21))
    merged = {**first.losses, **second.losses}
    assert max(abs(straight.losses[s] - merged[s]) for s in straight.losses) < 1e-6
    a = torch.load(ref.ckpt_dir / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(resumed.ckpt_dir / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    store = mlflow.search_runs(experiment_names=["test"])
    assert len(store) == 1 and store.status[0] == "FINISHED"
    assert resumed.metrics["test/loss"] == pytest.approx(ref.metrics["test/loss"], abs=1e-5)


class RequestStopAt(L.Callback):
    """`callbacks.request_stop` (a launcher's own warning signal, e.g. submitit's USR2) at the end of step `at`."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            request_stop("SIGUSR2")


def test_a_launchers_stop_request_stops_the_run_like_a_signal(tmp_path, tiny_config):
    """request_stop (no signal to the process) checkpoints and stops after the next optimizer step, KILLED with
    the reason once; withdrawn (None), the next run trains to its end."""
    cfg = tiny_config("tiny_pha", "trainer.max_steps=6", "trainer.val_every_n_steps=100", "data.max_eval_tokens=2048")
    try:
        with pytest.raises(RunInterrupted) as info:
            train(cfg, [RequestStopAt(3)])
    finally:
        request_stop(None)
    assert torch.load(info.value.ckpt_path, weights_only=False)["global_step"] == 4
    run = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_run(info.value.run_id)
    assert run.info.status == "KILLED" and run.data.tags["killed_reason"] == "SIGUSR2 received; stopped after step 4"
    assert train(cfg).status == "FINISHED"


def test_interrupt_mid_accumulation_resumes_exactly(tmp_path, tiny_config):
    """SIGTERM arrives after the first micro-batch of an accumulated step: the run stops only once that
    step's optimizer update is done, and the resumed run's micro-batch losses are the uninterrupted run's."""
    overrides = [
        "trainer.max_steps=8",
        "trainer.val_every_n_steps=4",
        "trainer.accumulate_grad_batches=2",
        "trainer.ckpt_every_n_steps=100",
    ]
    straight = LossRecorder()
    train(tiny_config("tiny_pha", *overrides, root=tmp_path / "a"), [straight])
    assert len(straight.micro) == 16

    first = LossRecorder(signal_after_micro=7)  # after the first micro-batch of step 4
    with pytest.raises(RunInterrupted) as info:
        train(tiny_config("tiny_pha", *overrides, root=tmp_path / "b"), [first])
    run_id = info.value.run_id
    assert len(first.micro) == 8 and max(first.losses) == 4  # stopped once step 4's second micro-batch was done

    second = LossRecorder()
    train(tiny_config("tiny_pha", *overrides, f"resume={run_id}", root=tmp_path / "b"), [second])
    assert len(second.micro) == 8
    assert first.micro + second.micro == pytest.approx(straight.micro, abs=1e-6)


def test_resume_refuses_shape_change(tiny_config):
    from pha_lab.config import ConfigError

    first = LossRecorder(signal_at=3)
    with pytest.raises(RunInterrupted) as info:
        train(tiny_config("tiny_pha", "trainer.max_steps=10"), [first])
    run_id = info.value.run_id
    with pytest.raises(ConfigError, match=r"model\.d_model: 64 -> 128"):
        train(tiny_config("tiny_pha", "trainer.max_steps=10", "model.d_model=128", f"resume={run_id}"))


class DeterminismProbe(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.enabled = torch.are_deterministic_algorithms_enabled()


def test_deterministic_mode_gives_identical_runs(tmp_path, monkeypatch, tiny_config):
    """trainer.deterministic: cuBLAS workspace set before anything in train() touches CUDA (the run's tags query
    the GPU), deterministic algorithms while training and restored after; two runs give identical losses."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen_at_start = []
    a, b, probe = LossRecorder(), LossRecorder(), DeterminismProbe()

    def on_start(run_id, ckpt_dir):
        seen_at_start.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))

    overrides = ["trainer.max_steps=8", "trainer.deterministic=true"]
    train(tiny_config("tiny_pha", *overrides, root=tmp_path / "a"), [a, probe], on_start)
    assert seen_at_start == [":4096:8"] and probe.enabled
    assert not torch.are_deterministic_algorithms_enabled()
    train(tiny_config("tiny_pha", *overrides, root=tmp_path / "b"), [b])
    assert len(a.losses) == 8 and a.losses == b.losses


def test_lightning_matches_plain_pytorch_loop(tmp_path, tiny_config):
    """Lightning's parity-test idea: same model, data, seed and optimiser in a hand-written loop."""
    from pha_lab.data import build_datamodule

    steps = 12
    cfg = tiny_config("tiny_pha", f"trainer.max_steps={steps}", "trainer.val_every_n_steps=1000")
    rec = LossRecorder()
    train(cfg, [rec])

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = LMModule(cfg)
    model = module.model
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    o = cfg.optim
    opt = build_optimizer(model, o, torch.device("cpu"), "32-true")
    sched = build_schedule(opt, o, steps)
    plain = []
    for _, batch in zip(range(steps), dm.train_dataloader()):
        logits = model(batch["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        plain.append(loss.item())
    assert [round(rec.losses[s + 1], 5) for s in range(steps)] == [round(v, 5) for v in plain]


class NaNOutputs(L.Callback):
    """Makes the model's logits NaN for one batch (training at `train_step`, or validation batch `val_batch`);
    the weights stay finite unless an optimizer step uses the NaN gradients."""

    def __init__(self, train_step: int | None = None, val_batch: int | None = None):
        self.train_step, self.val_batch, self.handle = train_step, val_batch, None

    def _poison(self, pl_module):
        self.handle = pl_module.model.register_forward_hook(lambda module, args, out: out * float("nan"))

    def _heal(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.train_step:
            self._poison(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._heal()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.val_batch:
            self._poison(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._heal()

    def on_exception(self, trainer, pl_module, exception):
        self._heal()


def failed_run(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["test"]).iloc[0]


def test_nan_loss_fails_before_the_optimizer_step_and_checkpoints_stay_finite(tmp_path, tiny_config):
    cfg = tiny_config("tiny_pha", "trainer.max_steps=10", "trainer.ckpt_every_n_steps=2")
    with pytest.raises(Exception, match="non-finite training loss"):
        train(cfg, [NaNOutputs(train_step=3)])  # the 4th optimizer step (global_step 3 -> 4)
    run = failed_run(tmp_path)
    assert run["status"] == "FAILED" and "at step 4" in run["tags.failure_reason"]
    ckpt = torch.load(tmp_path / "runs" / "checkpoints" / run["run_id"] / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2  # the periodic checkpoint before the bad step; none was written at step 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    moments = [t for s in ckpt["optimizer_states"][0]["state"].values() for t in s.values() if torch.is_tensor(t)]
    assert moments and all(torch.isfinite(t).all() for t in moments)


class TrainingState(L.Callback):
    """The weights and AdamW state at the start of optimizer step `step + 1`, and when the run raised."""

    def __init__(self, step: int):
        self.step, self.before, self.at_failure = step, None, None

    @staticmethod
    def _state(trainer, pl_module):
        (opt,) = trainer.optimizers
        moments = [t.clone() for s in opt.state.values() for t in s.values()]
        return [v.clone() for v in pl_module.state_dict().values()], moments

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = self._state(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self.at_failure = self._state(trainer, pl_module)


def test_a_nan_step_is_skipped_on_the_device_and_the_run_stops_at_the_next_logging_step(tmp_path, tiny_config):
    """Step 6's loss is NaN; the flag is only read at logging steps (every 5): the fused AdamW skips steps 6 to 10
    on the device (weights, moments and step counts as after step 5), and the run fails at step 10 naming step 6."""
    cfg = tiny_config(
        "tiny_pha",
        "trainer.max_steps=12",
        "trainer.ckpt_every_n_steps=100",
        "trainer.val_every_n_steps=100",
        "trainer.log_every_n_steps=5",
    )
    state = TrainingState(step=5)
    with pytest.raises(Exception, match=r"non-finite training loss \(nan\) at step 6 .*skipped.*stopped at step 10"):
        train(cfg, [NaNOutputs(train_step=5), state])
    assert failed_run(tmp_path)["status"] == "FAILED"
    (weights, moments), (weights_after, moments_after) = state.before, state.at_failure
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_after))
    assert len(moments) == len(moments_after) and all(torch.equal(a, b) for a, b in zip(moments, moments_after))
    assert {float(m) for m in moments_after if m.ndim == 0} == {5.0}  # every parameter's AdamW step count


def test_nan_eval_loss_is_an_error_naming_the_stage_and_batch(tmp_path, tiny_config):
    cfg = tiny_config("tiny_pha", "trainer.max_steps=4", "trainer.val_every_n_steps=2")
    with pytest.raises(Exception, match=r"non-finite val loss \(nan\) in val batch 1 "):
        train(cfg, [NaNOutputs(val_batch=1)])
    assert failed_run(tmp_path)["status"] == "FAILED"


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


def test_eval_knocks_out_branches_and_logs_to_the_run(tmp_path, tiny_config):
    from pha_lab.training.evaluate import evaluate

    result = train(tiny_config("tiny_pha", "trainer.max_steps=10", "trainer.val_every_n_steps=5"))
    table = evaluate(result.run_id, [f"tracking.runs_dir={tmp_path / 'runs'}"], knockout=["gss", "ffn"], per_layer=True)
    assert list(table.condition) == ["intact", "-gss", "-gss", "-ffn", "-ffn"]
    assert table.loc[0, "ppl"] == pytest.approx(result.metrics["test/ppl"], rel=1e-5)
    assert (table.delta_ppl.iloc[1:] != 0).all()
    client = mlflow.tracking.MlflowClient(result.tracking_uri)
    logged = client.get_run(result.run_id).data.metrics
    assert logged["knockout/gss/L0/delta_ppl"] == pytest.approx(table.delta_ppl.iloc[1])
    assert "knockout.csv" in {a.path for a in client.list_artifacts(result.run_id)}


# ---------------------------------------------------------------------------- host syncs on the step path
class HostTransfers(L.Callback):
    """Every call made while training that copies device data to the host or waits for the device, with the
    optimizer step it happened in: Tensor.item / cpu / tolist / numpy / __bool__ / __float__ / __int__,
    torch.cuda.synchronize, and the throughput monitor's time points (where it calls torch.cuda.synchronize on a
    GPU: on this CPU machine they are counted instead). Calls before on_train_start and after on_train_end (setup,
    the final checkpoint, the test) are not counted."""

    def __init__(self, monkeypatch):
        from pha_lab.training.callbacks import ThroughputAtLogSteps

        self.step, self.calls = None, []
        for owner, name in [
            *((torch.Tensor, n) for n in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")),
            (torch.cuda, "synchronize"),
            (ThroughputAtLogSteps, "_time_point"),
        ]:
            monkeypatch.setattr(owner, name, self._counted(getattr(owner, name), name))

    def _counted(self, fn, name):
        def counted(*args, **kwargs):
            if self.step is not None:
                caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "test_training" not in f.filename)
                self.calls.append((self.step, name, f"{caller.filename}:{caller.lineno}"))
            return fn(*args, **kwargs)

        return counted

    def on_train_start(self, trainer, pl_module):
        self.step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step + 1  # the optimizer step this batch belongs to

    def on_train_end(self, trainer, pl_module):
        self.step = None


def test_the_training_step_path_reads_the_device_only_at_logging_steps(monkeypatch, tiny_config):
    """Over 20 optimizer steps with log_every_n_steps=5: no host transfer in any other step (the NaN check, the
    progress bar, the throughput monitor and the loggers all wait for logging steps), a few at each logging step,
    so about 20/5 x a constant in all (it was ~40 per step before: tests/test_training.py history)."""
    steps, k = 20, 5
    probe = HostTransfers(monkeypatch)
    train(
        tiny_config(
            "tiny_pha",
            f"trainer.max_steps={steps}",
            f"trainer.log_every_n_steps={k}",
            "trainer.val_every_n_steps=1000",
            "trainer.ckpt_every_n_steps=1000",
        ),
        [probe],
    )
    assert [c for c in probe.calls if c[0] % k] == []
    assert {c[0] for c in probe.calls} == set(range(k, steps + 1, k))  # the NaN flag is read at every logging step
    assert len(probe.calls) <= 6 * steps // k + 3, probe.calls


# ---------------------------------------------------------------------------- metrics: memory, FLOPs, tokens/s
class FakeDeviceMemory:
    """CUDA's peak-allocation counter for a CPU run: `allocate` raises the peak as an allocation would, and
    `reset` restarts it from what is allocated now, as torch.cuda.reset_peak_memory_stats does."""

    def __init__(self, left_over_gb: float):
        self.current, self.peak = 0.5, left_over_gb  # the peak an earlier trial in this process left behind

    def reset(self, device):
        self.peak = self.current

    def peak_gb(self, device):
        return self.peak

    def allocate(self, gb: float):
        self.peak = max(self.peak, gb)


class Workload(L.Callback):
    """Training batch k needs 1 + 0.1k GB, a validation batch 3 GB, a test batch 2 GB."""

    def __init__(self, memory):
        self.memory = memory

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.memory.allocate(1.0 + 0.1 * trainer.global_step)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.memory.allocate(3.0)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.memory.allocate(2.0)


def test_peak_memory_is_per_stage_and_nothing_carries_over(tmp_path, tiny_config):
    from lightning.pytorch.loggers import CSVLogger

    from pha_lab.data import build_datamodule
    from pha_lab.training.callbacks import PeakMemory

    cfg = tiny_config("tiny_pha", "trainer.max_steps=6")
    memory = FakeDeviceMemory(left_over_gb=25.86)
    logger = CSVLogger(tmp_path, name="peak")
    trainer = L.Trainer(
        max_steps=6,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[Workload(memory), PeakMemory(memory)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module, datamodule = LMModule(cfg), build_datamodule(cfg)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)
    logger.finalize("success")
    logged = pd.read_csv(tmp_path / "peak" / "version_0" / "metrics.csv")
    train_peaks = logged.dropna(subset=["train/peak_mem_gb"]).set_index("step")["train/peak_mem_gb"]
    # the running peak of the training batches so far: not the earlier trial's 25.86 GB, not validation's 3 GB
    assert sorted(train_peaks.tolist()) == pytest.approx([1.0 + 0.1 * k for k in range(6)])
    assert logged["val/peak_mem_gb"].dropna().tolist() == [3.0, 3.0]
    assert logged["test/peak_mem_gb"].dropna().tolist() == [2.0]


class BarReading(L.Callback):
    """What the progress bar shows as tok/s, with the bar's own state at that moment."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = trainer.progress_bar_callback
        self.state = dict(bar.train_progress_bar.format_dict)
        self.shown = bar.get_metrics(trainer, pl_module).get("tok/s")


@pytest.fixture(scope="module")
def accumulated_run(tmp_path_factory, shared_data, empty_mlflow_store):
    """One tiny run with 2 micro-batches per optimizer step, validated twice and tested."""
    cfg = run_config(
        tmp_path_factory.mktemp("accumulated"),
        "tiny_pha",
        "trainer.max_steps=8",
        "trainer.val_every_n_steps=4",
        "trainer.accumulate_grad_batches=2",
        "trainer.log_every_n_steps=5",
        store=empty_mlflow_store,
    )
    bar = BarReading()
    return cfg, train(cfg, [bar]), bar


def test_throughput_flops_per_token_are_the_work_of_each_stage(accumulated_run):
    """FLOP/s over tokens/s, as Lightning's ThroughputMonitor logs them, is the analytic FLOPs per token of what
    the stage computes: forward + backward when training, forward only in validation and test."""
    cfg, result, _ = accumulated_run
    client = mlflow.tracking.MlflowClient(result.tracking_uri)
    model = LMModule(cfg).model
    expected = {
        "train": model.flops_per_token(cfg.data.seq_len, training=True)["total"],
        "validate": model.flops_per_token(cfg.data.seq_len, training=False)["total"],
        "test": model.flops_per_token(cfg.data.seq_len, training=False)["total"],
    }
    for stage, per_token in expected.items():
        flops = {m.step: m.value for m in client.get_metric_history(result.run_id, f"{stage}/device/flops_per_sec")}
        tokens = {m.step: m.value for m in client.get_metric_history(result.run_id, f"{stage}/device/items_per_sec")}
        assert flops and flops.keys() == tokens.keys(), stage
        assert [flops[s] / tokens[s] for s in flops] == pytest.approx([per_token] * len(flops), rel=1e-6), stage


def test_progress_bar_tokens_per_s_do_not_divide_by_accumulation(accumulated_run):
    cfg, _, bar = accumulated_run
    # the bar counts micro-batches (2 per optimizer step) and refreshes every log_every_n_steps (5) optimizer steps:
    # its last refresh of the 16 micro-batches was at the 10th
    assert bar.state["n"] == 5 * 2
    rate = bar.state["rate"] or bar.state["n"] / bar.state["elapsed"]  # micro-batches per second
    assert float(bar.shown.replace(",", "")) == pytest.approx(rate * cfg.data.batch_size * cfg.data.seq_len, rel=1e-3)


def test_gate_mixer_logs_its_mean_over_the_scored_validation_tokens(tiny_config):
    """The logged gate weights are the token-weighted mean gate over the whole validation set, padding
    excluded, recomputed here from the final weights with hooks on the gate projections."""
    from pha_lab.data import build_datamodule

    cfg = tiny_config(
        "tiny_pha",
        "model.mixer=gate",
        "trainer.max_steps=10",
        "trainer.val_every_n_steps=10",
        "data.max_eval_tokens=1900",
        "data.eval_batch_size=4",
    )  # 15 windows, the last one padded
    result = train(cfg)
    module = LMModule(cfg)
    module.load_state_dict(torch.load(result.ckpt_dir / "last.ckpt", weights_only=False)["state_dict"])
    module.eval()
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("validate")
    gates = {}
    for i, blk in enumerate(module.model.blocks):
        blk.mixer.gate.register_forward_hook(
            lambda m, args, out, i=i: gates.__setitem__(i, torch.softmax(out.float(), -1))
        )
    total = {i: torch.zeros(len(blk.names), dtype=torch.float64) for i, blk in enumerate(module.model.blocks)}
    count, last_batch_means, padded = 0, {}, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            module.model(batch["input_ids"])
            scored = batch["labels"] != -100
            padded += int((~scored).sum())
            count += int(scored.sum())
            for i, g in gates.items():
                total[i] += g[scored].double().sum(0)
                last_batch_means[i] = g.mean((0, 1))  # what was logged before: the last batch, padding included
    assert padded > 0
    client = mlflow.tracking.MlflowClient(result.tracking_uri)
    for i, blk in enumerate(module.model.blocks):
        expected = (total[i] / count).tolist()
        logged = [client.get_metric_history(result.run_id, f"mixer/L{i}/{b}")[-1].value for b in blk.names]
        assert logged == pytest.approx(expected, abs=1e-6)
        assert max(abs(a - b) for a, b in zip(expected, last_batch_means[i].tolist())) > 1e-5  # the test can tell
    table = pd.read_csv(result.ckpt_dir / "introspection" / "mixer_weights.csv")
    assert table.query("layer == 0").weight.tolist() == pytest.approx((total[0] / count).tolist(), abs=1e-6)


def test_a_rank_above_zero_without_rank_zeros_run_is_refused(tmp_path, monkeypatch, tiny_config):
    """A rank > 0 that no rank 0 handed a run (torchrun, a node started by hand) fails naming the supported
    launchers, before it opens an MLflow run of its own."""
    from pha_lab.config import ConfigError

    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("PHA_RUN_ID", raising=False)
    with pytest.raises(ConfigError, match=r"DDP rank > 0 .* trainer.devices=N on one machine, or with srun"):
        train(tiny_config("tiny_pha", "trainer.max_steps=2", fresh_store=True))
    assert not (tmp_path / "runs" / "mlflow.db").exists()


# ---------------------------------------------------------------------------- DDP on the CPU (gloo): slow
# A 2-rank run from a script: Lightning's launcher starts rank 1 by re-running this very script.
DDP_SCRIPT = '''
import json, os, signal, sys
import lightning as L
from pha_lab.config import load_config
from pha_lab.training.callbacks import RunInterrupted
from pha_lab.training.run import train

class SignalRankOne(L.Callback):
    """SIGTERM to rank 1 alone, at the end of optimizer step 5."""
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

runs, out = sys.argv[1:3]
cfg = load_config("tiny_pha", [f"tracking.runs_dir={runs}", "tracking.experiment=test", "trainer.accelerator=cpu",
                               "trainer.devices=2", "trainer.max_steps=12", "trainer.log_every_n_steps=4",
                               "trainer.val_every_n_steps=100", "trainer.ckpt_every_n_steps=100"])
try:
    train(cfg, [SignalRankOne()])
    result = {"outcome": "finished"}
except RunInterrupted as exc:
    result = {"outcome": "interrupted", "message": str(exc), "run_id": exc.run_id}
with open(os.path.join(out, f"rank{os.environ.get('LOCAL_RANK', '0')}.json"), "w") as f:
    json.dump(result, f)
'''


def run_ranks(commands: list[list[str]], envs: list[dict], timeout: int = 400) -> list[subprocess.CompletedProcess]:
    """Run the processes of one DDP job to their end (killing them all after `timeout` s: a rank blocked in a
    collective never ends); their outputs."""
    procs = [
        subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for cmd, env in zip(commands, envs)
    ]
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    hung = any(p.poll() is None for p in procs)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    outs = [p.communicate()[0] for p in procs]
    if hung:
        pytest.fail(
            f"the DDP job did not end within {timeout} s (a rank blocked in a collective?); its output:\n"
            + "\n".join(f"--- rank {r}:\n{out[-3000:]}" for r, out in enumerate(outs))
        )
    return [subprocess.CompletedProcess(p.args, p.returncode, out) for p, out in zip(procs, outs)]


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_one_rank_gets_the_signal(tmp_path):
    """SIGTERM reaches rank 1 alone, after step 5: both ranks stop after the same step, the first multiple of
    log_every_n_steps (4) after the signal, 8, not after step 6 (the decision is not taken at every step), and
    the run is KILLED with the checkpoint of step 8."""
    script, out = tmp_path / "ddp_run.py", tmp_path / "out"
    script.write_text(DDP_SCRIPT)
    out.mkdir()
    (done,) = run_ranks([[sys.executable, str(script), str(tmp_path / "runs"), str(out)]], [{}])
    assert done.returncode == 0, done.stdout[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["outcome"] for r in ranks] == ["interrupted", "interrupted"], ranks
    assert ranks[0]["run_id"] == ranks[1]["run_id"]
    assert "(a signal to another rank received; stopped after step 8)" in ranks[0]["message"]
    assert "(SIGTERM received; stopped after step 8)" in ranks[1]["message"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(ranks[0]["run_id"])
    assert run.info.status == "KILLED" and "stopped after step 8" in run.data.tags["killed_reason"]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    ckpt = torch.load(tmp_path / "runs" / "checkpoints" / run.info.run_id / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 8


@pytest.mark.slow
def test_srun_ranks_train_one_run(tmp_path):
    """`pha-lab train` as srun starts it with 2 tasks (srun's environment, without slurmd: tests/cluster
    has the real one): Lightning's SLURMEnvironment joins them into one DDP job, rank 1 takes rank 0's run
    from its message (training/handoff.py) and opens none of its own."""
    runs = tmp_path / "runs"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "pha_lab.cli",
        "train",
        "tiny_pha",
        f"tracking.runs_dir={runs}",
        "tracking.experiment=test",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=2",
        "trainer.val_every_n_steps=3",
        "data.max_eval_tokens=2048",
    ]
    srun = {
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NAME": "pha-test",
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    ranks = run_ranks([cmd, cmd], [{**srun, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)} for r in (0, 1)])
    assert [r.returncode for r in ranks] == [0, 0], [r.stdout[-3000:] for r in ranks]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["trainer.devices"] == "2"
    assert not (runs / "ranks" / "4242.0.0").exists()  # rank 0 removed its message: both ranks formed the group
    assert f"run      {run.info.run_id}" in ranks[0].stdout and "run      " not in ranks[1].stdout  # rank 0's summary
    assert client.get_metric_history(run.info.run_id, "test/loss")


def test_the_final_weights_are_validated_at_the_last_step(tmp_path, tiny_config):
    # max_steps not a multiple of val_every_n_steps: without a last validation the run's val metrics would be those
    # of step 4, not of the weights it ends with (the H200 reference run of 2026-12-02 stopped at 2289, last val 2000)
    result = train(tiny_config("tiny_pha", "trainer.max_steps=6", "trainer.val_every_n_steps=4"))
    history = mlflow.tracking.MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "val/loss")
    assert len(history) == 2 and history[1].step == 6  # the periodic one (Lightning logs it at step 3), the last
    result = train(tiny_config("tiny_pha", "trainer.max_steps=8", "trainer.val_every_n_steps=4", root=tmp_path / "b"))
    history = mlflow.tracking.MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "val/loss")
    assert len(history) == 2  # already validated at the last step: not twice


def test_a_run_gives_back_the_processs_cpu_thread_count(tiny_config):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(tiny_config("tiny_pha", "trainer.max_steps=2", "trainer.cpu_threads=1"))
        assert torch.get_num_threads() == 2  # trainer.cpu_threads=1 held during the run only
    finally:
        torch.set_num_threads(before)

"""Sweeps: bookkeeping in Optuna and MLflow, resume after a killed worker, concurrent workers, failures, pruning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import mlflow
import optuna
import pytest
import yaml

from pha_lab.config import ConfigError
from pha_lab.sweep.runner import run_sweep
from pha_lab.sweep.spec import load_sweep, sweep_names

FAST = {"trainer.max_steps": 8, "trainer.val_every_n_steps": 4, "trainer.ckpt_every_n_steps": 4,
        "trainer.log_every_n_steps": 2, "data.max_eval_tokens": 2048, "optim.warmup_steps": 2}


def write_sweep(tmp_path, name, **spec):
    spec = {"name": name, "experiment": "tiny_pha", "overrides": dict(FAST), "heartbeat_interval": 1,
            "grace_period": 3, **spec}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def study_trials(runs, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{runs}/optuna.db").get_trials()


def mlflow_runs(runs, name):
    mlflow.set_tracking_uri(f"sqlite:///{runs}/mlflow.db")
    return mlflow.search_runs(experiment_names=[name])


def test_shipped_sweeps_validate():
    for name in ["smoke", "ablation", "baselines", "hpo", "mqar", "scale"]:
        assert name in sweep_names()
        assert load_sweep(name).cells()


def test_smoke_end_to_end(tmp_path):
    runs = tmp_path / "runs"
    table = run_sweep("smoke", ["trainer.max_steps=20", "trainer.val_every_n_steps=10"], runs_dir=str(runs))
    spec = load_sweep("smoke")
    assert len(spec.cells()) >= 6 and (table.state == "COMPLETE").all() and len(table) == len(spec.cells())
    df = mlflow_runs(runs, "smoke")
    parents = df[df["tags.sweep_parent"] == "true"]
    children = df[df["tags.sweep_parent"] != "true"]
    assert len(parents) == 1 and parents.status.iloc[0] == "FINISHED"
    assert len(children) == len(spec.cells()) and (children.status == "FINISHED").all()
    assert (children["tags.mlflow.parentRunId"] == parents.run_id.iloc[0]).all()
    assert sorted(children["tags.cell"]) == sorted(spec.cells())
    assert children["metrics.test/loss"].notna().all() and children["metrics.test/bpb"].notna().all()
    # Optuna agrees with MLflow: each trial's value is its run's objective
    by_run = children.set_index("run_id")["metrics.test/loss"]
    for t in study_trials(runs, "smoke"):
        assert t.value == pytest.approx(by_run[t.user_attrs["mlflow_run_id"]])
        assert t.user_attrs["ckpt_dir"].endswith(t.user_attrs["mlflow_run_id"])
    # covers PHA with two mixers, Transformer and GSS
    cells = " ".join(spec.cells())
    assert all(k in cells for k in ("pha_static", "pha_gate", "transformer", "gss"))
    # a second run finds nothing to do
    again = run_sweep("smoke", ["trainer.max_steps=20", "trainer.val_every_n_steps=10"], runs_dir=str(runs))
    assert len(again) == len(spec.cells())
    assert len(mlflow_runs(runs, "smoke")) == len(df)


def test_killed_worker_trial_resumes_in_its_run(tmp_path):
    runs = tmp_path / "runs"
    overrides = {**FAST, "trainer.max_steps": 40, "trainer.ckpt_every_n_steps": 5, "trainer.val_every_n_steps": 20}
    path = write_sweep(tmp_path, "killme", overrides=overrides,
                       grid={"model.mixer": ["static", "mean"]})
    proc = subprocess.Popen([sys.executable, "-m", "pha_lab.cli", "sweep", path, "--runs-dir", str(runs)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    victim = None
    deadline = time.time() + 240
    while time.time() < deadline and victim is None:
        time.sleep(0.5)
        try:
            for t in study_trials(runs, "killme"):
                ckpt = t.user_attrs.get("ckpt_dir")
                if t.state.name == "RUNNING" and ckpt and os.path.exists(os.path.join(ckpt, "last.ckpt")):
                    victim = t
        except Exception:
            continue  # the study does not exist yet
    assert victim is not None, "no trial reached a checkpoint in time"
    os.killpg(proc.pid, signal.SIGKILL)  # the worker dies without any cleanup
    proc.wait()
    time.sleep(4)  # > grace_period: the trial's heartbeat is stale

    table = run_sweep(path, runs_dir=str(runs))
    trials = study_trials(runs, "killme")
    complete = Counter(t.params["cell"] for t in trials if t.state.name == "COMPLETE")
    assert sorted(complete.values()) == [1, 1]  # every cell finished exactly once
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].user_attrs["mlflow_run_id"] == victim.user_attrs["mlflow_run_id"]
    df = mlflow_runs(runs, "killme")
    child = df[df.run_id == victim.user_attrs["mlflow_run_id"]].iloc[0]
    assert child.status == "FINISHED" and child["tags.resumed_from"].endswith("last.ckpt")
    assert len(df[df["tags.sweep_parent"] != "true"]) == 2  # no extra run for the resumed trial
    assert (table.state == "COMPLETE").sum() == 2


def test_two_workers_share_a_grid_without_duplicates(tmp_path):
    runs = tmp_path / "runs"
    path = write_sweep(tmp_path, "pair", grid={"model.mixer": ["static", "mean", "scalar", "gate"]})
    run_sweep(path, runs_dir=str(runs), workers=2)
    trials = study_trials(runs, "pair")
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.params["cell"] for t in trials}) == 4
    logs = list((runs / "sweeps" / "pair").glob("worker-cpu*.log"))
    assert len(logs) == 2
    workers_used = {t.user_attrs.get("worker") for t in trials}
    assert len(workers_used) == 2  # both workers took trials


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    runs = tmp_path / "runs"
    path = write_sweep(tmp_path, "oops", grid={"variant": {"ok": {}, "broken": {"data.train_files": ["no/such/books"]}}})
    table = run_sweep(path, runs_dir=str(runs))
    states = dict(zip(table.cell, table.state))
    assert states == {"variant=ok,seed=0": "COMPLETE", "variant=broken,seed=0": "FAIL"}
    failed = [t for t in study_trials(runs, "oops") if t.state.name == "FAIL"][0]
    assert "no/such/books" in failed.user_attrs["failure_reason"]
    df = mlflow_runs(runs, "oops")
    run = df[df.run_id == failed.user_attrs["mlflow_run_id"]].iloc[0]
    assert run.status == "FAILED" and "no/such/books" in run["tags.failure_reason"]
    # not retried unless asked
    assert len(run_sweep(path, runs_dir=str(runs))) == 2
    assert len(run_sweep(path, runs_dir=str(runs), retry_failed=True)) == 3


def test_hpo_with_pruning_prunes(tmp_path):
    runs = tmp_path / "runs"
    overrides = {**FAST, "trainer.max_steps": 12, "trainer.val_every_n_steps": 2}
    path = write_sweep(tmp_path, "tune", overrides=overrides, sampler="random", n_trials=6,
                       search={"optim.lr": {"type": "float", "low": 1e-6, "high": 3e-2, "log": True}},
                       objective={"metric": "val/loss", "direction": "minimize"},
                       pruning={"enabled": True, "n_startup_trials": 2, "n_warmup_steps": 0})
    table = run_sweep(path, runs_dir=str(runs))
    assert len(table) == 6 and (table.state == "PRUNED").sum() >= 1
    df = mlflow_runs(runs, "tune")
    pruned = df[df["tags.killed_reason"].fillna("").str.contains("pruned")]
    assert len(pruned) == (table.state == "PRUNED").sum()


def test_bad_sweeps_fail_before_any_trial(tmp_path):
    with pytest.raises(ConfigError, match="unknown sweep 'smok'.*smoke"):
        load_sweep("smok")
    bad_key = write_sweep(tmp_path, "badkey", grid={"model.mixr": ["static"]})
    with pytest.raises(ConfigError, match=r"model\.mixr.*model\.mixer"):
        load_sweep(bad_key)
    empty = write_sweep(tmp_path, "empty", grid={"branches": {"none": {"model.branches": []}, "all": {}}})
    with pytest.raises(ConfigError, match=r"(?s)1 of 2 cells.*branches=none.*model.branches is empty"):
        load_sweep(empty)


@pytest.mark.slow
def test_ddp_trials_run_in_sequence_as_one_run_each(tmp_path):
    """gpus_per_trial: 2 on CPU (gloo): each trial is a 2-process DDP run, one MLflow run per trial, and a
    worker can run several DDP trials one after another (Lightning's launcher leaves env vars behind)."""
    runs = tmp_path / "runs"
    path = write_sweep(tmp_path, "ddp", grid={"model.mixer": ["static", "mean"]}, gpus_per_trial=2,
                       overrides={**FAST, "trainer.accelerator": "cpu"})
    # from the command line: Lightning's DDP launcher starts rank 1 by re-running this very command
    subprocess.run([sys.executable, "-m", "pha_lab.cli", "sweep", path, "--runs-dir", str(runs)], check=True,
                   timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert sorted(t.state.name for t in study_trials(runs, "ddp")) == ["COMPLETE", "COMPLETE"]
    df = mlflow_runs(runs, "ddp")
    children = df[df["tags.sweep_parent"] != "true"]
    assert len(children) == 2 and (children.status == "FINISHED").all()
    assert (children["params.trainer.devices"] == "2").all()

"""Sweeps: bookkeeping in Optuna and MLflow, resume after a killed worker, concurrent workers, failures, pruning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime

import mlflow
import optuna
import pytest
import yaml
from bodies import sweep_yaml

from pha_lab.config import ConfigError, to_yaml
from pha_lab.sweep.runner import claim_waiting, enqueue_grid, open_study, run_sweep, tell, worker_seed
from pha_lab.sweep.spec import load_sweep, read_sweep, suggest, sweep_names

FAST = {
    "trainer.max_steps": 8,
    "trainer.val_every_n_steps": 4,
    "trainer.ckpt_every_n_steps": 4,
    "trainer.log_every_n_steps": 2,
    "data.max_eval_tokens": 2048,
    "optim.warmup_steps": 2,
}


def write_sweep(tmp_path, name, **spec):
    return sweep_yaml(tmp_path, name, FAST, 3, **spec)


def study_trials(runs, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{runs}/optuna.db").get_trials()


def mlflow_runs(runs, name):
    mlflow.set_tracking_uri(f"sqlite:///{runs}/mlflow.db")
    return mlflow.search_runs(experiment_names=[name])


def test_shipped_sweeps_validate():
    for name in ["smoke", "ablation", "baselines", "hpo", "mqar", "scale"]:
        assert name in sweep_names()
    for name in sweep_names():  # the repro_* sweeps too
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


def kill_sweep_when(path, runs, name, ready, timeout=240):
    """Start `pha-lab sweep PATH`, SIGKILL its process group once a RUNNING trial satisfies
    `ready(trial)` (the worker dies without any cleanup), wait past the grace period; the victim."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pha_lab.cli", "sweep", path, "--runs-dir", str(runs)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    victim = None
    deadline = time.time() + timeout
    while time.time() < deadline and victim is None and proc.poll() is None:
        time.sleep(0.2)
        try:
            victim = next((t for t in study_trials(runs, name) if t.state.name == "RUNNING" and ready(t)), None)
        except Exception:
            continue  # the study does not exist yet
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the sweep ended on its own before a trial was seen at the kill point
        pass
    proc.wait()
    assert victim is not None, "no trial reached the kill point in time (the sweep ended first, or the timeout)"
    time.sleep(4)  # > grace_period: the trial's heartbeat is stale
    return victim


def has_file(name):
    return lambda t: bool(t.user_attrs.get("ckpt_dir")) and os.path.exists(os.path.join(t.user_attrs["ckpt_dir"], name))


def test_killed_worker_trial_resumes_in_its_run(tmp_path):
    runs = tmp_path / "runs"
    overrides = {**FAST, "trainer.max_steps": 40, "trainer.ckpt_every_n_steps": 5, "trainer.val_every_n_steps": 20}
    path = write_sweep(tmp_path, "killme", overrides=overrides, grid={"model.mixer": ["static", "mean"]})
    victim = kill_sweep_when(path, runs, "killme", has_file("last.ckpt"))

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


def test_worker_killed_before_first_checkpoint_restarts_in_its_run(tmp_path):
    """The retry starts the cell over in the same MLflow run; it re-logs the run's params, which must
    not include the tags (trial_number changes on a retry, and MLflow refuses to change a param)."""
    runs = tmp_path / "runs"
    # 100 steps: a window of seconds between the params being logged and the trial's end, for the poll to see it
    overrides = {**FAST, "trainer.max_steps": 100, "trainer.ckpt_every_n_steps": 1000, "trainer.val_every_n_steps": 100}
    path = write_sweep(tmp_path, "early", overrides=overrides)
    client = mlflow.MlflowClient(f"sqlite:///{runs}/mlflow.db")
    victim = kill_sweep_when(
        path,
        runs,
        "early",
        lambda t: "mlflow_run_id" in t.user_attrs and client.get_run(t.user_attrs["mlflow_run_id"]).data.params,
    )  # params logged
    assert not has_file("last.ckpt")(victim), "the worker was killed after its first checkpoint"

    table = run_sweep(path, runs_dir=str(runs))
    assert list(table.state) == ["FAIL", "COMPLETE"]
    retry = study_trials(runs, "early")[1]
    assert retry.system_attrs["failed_trial"] == victim.number
    assert retry.user_attrs["mlflow_run_id"] == victim.user_attrs["mlflow_run_id"]
    df = mlflow_runs(runs, "early")
    children = df[df["tags.sweep_parent"] != "true"]
    assert list(children.run_id) == [victim.user_attrs["mlflow_run_id"]]  # the same run, finished
    child = children.iloc[0]
    assert child.status == "FINISHED" and child["tags.restarted_without_checkpoint"] == "true"
    assert child["metrics.test/loss"] > 0
    assert not [c for c in df.columns if c.startswith("params.tracking.tags")]


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
    assert len({t.user_attrs["sampler_seed"] for t in trials}) == 2  # each with its own sampler seed


# One worker ("machine") of the claim race: queue the grid as every `pha-lab sweep` does, then claim
# and finish trials through the worker's own next_trial/tell; the trial body itself is instant.
CLAIMER = """
import os, sys, time
from pha_lab.sweep.runner import enqueue_grid, next_trial, open_study, tell
from pha_lab.sweep.spec import read_sweep
path, url, gate = sys.argv[1:]
spec = read_sweep(path)  # (the test validated it: load_sweep)
study, storage = open_study(spec, url, sampler_seed=0)
open(os.path.join(gate, f"ready-{os.getpid()}"), "w").close()
while not os.path.exists(os.path.join(gate, "go")):
    time.sleep(0.005)
enqueue_grid(study, storage, spec)
while (trial := next_trial(study, storage, spec)) is not None:
    print(trial.suggest_categorical("cell", list(spec.cells())), flush=True)
    tell(study, trial, 0.0)
"""


def claim_race(tmp_path, storage_url, n_workers=4, n_dead=4):
    """`n_workers` processes released at one instant on one study of 16 cells, of which `n_dead`
    hold RUNNING trials of a worker that died long ago. Checks that every cell ran exactly once:
    each dead trial failed and re-queued once, no cell queued twice, no trial claimed twice.
    (Any RDB URL: tests/cluster runs it against PostgreSQL.)"""
    import sqlalchemy as sa
    from optuna.storages._rdb.models import TrialHeartbeatModel

    path = write_sweep(
        tmp_path,
        "race",
        grid={"model.mixer": ["static", "mean", "scalar", "gate"]},
        seeds=[0, 1, 2, 3],
        grace_period=60,
    )
    spec = load_sweep(path)
    cells = list(spec.cells())
    study, storage = open_study(spec, storage_url)
    dead = []
    for key in cells[:n_dead]:  # a dead worker's trials: RUNNING, last heartbeat long ago
        study.enqueue_trial({"cell": key})
        dead.append(claim_waiting(study, storage))
        dead[-1].suggest_categorical("cell", cells)
    heartbeats = TrialHeartbeatModel.__table__
    with storage.engine.begin() as conn:
        conn.execute(
            sa.update(heartbeats)
            .where(heartbeats.c.trial_id.in_([t._trial_id for t in dead]))
            .values(heartbeat=datetime(2000, 1, 1))
        )
    gate = tmp_path / "gate"
    gate.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, path, storage_url, str(gate)],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(n_workers)
    ]
    deadline = time.time() + 60
    while len(list(gate.glob("ready-*"))) < n_workers and time.time() < deadline:
        time.sleep(0.01)
    (gate / "go").touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    claimed = Counter(cell for out, _ in outputs for cell in out.split())
    assert claimed == Counter(cells), (
        f"cells not claimed exactly once: {claimed - Counter(cells)} too many, {Counter(cells) - claimed} missing"
    )
    trials = optuna.load_study(study_name="race", storage=storage_url).get_trials()
    assert len(trials) == len(cells) + n_dead  # no cell queued twice, one retry per dead trial
    assert Counter(t.params["cell"] for t in trials if t.state.name == "COMPLETE") == Counter(cells)
    assert (
        sorted(t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs)
        == sorted(t.number for t in trials if t.state.name == "FAIL")
        == list(range(n_dead))
    )


@pytest.mark.parametrize("repetition", range(3))
def test_four_workers_run_every_cell_once_on_sqlite(tmp_path, repetition):
    claim_race(tmp_path, f"sqlite:///{tmp_path}/optuna.db")


def test_tell_tolerates_a_trial_finished_elsewhere(tmp_path, capsys):
    """A worker whose trial another worker already failed as stale (its heartbeats were late)
    reports it and goes on instead of crashing on a second tell."""
    spec = load_sweep(write_sweep(tmp_path, "late", grid={"model.mixer": ["static"]}))
    study, storage = open_study(spec, f"sqlite:///{tmp_path}/optuna.db")
    enqueue_grid(study, storage, spec)
    trial = claim_waiting(study, storage)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # as the other worker's stale check did
    assert tell(study, trial, 1.0) is False
    assert study.trials[0].state.name == "FAIL" and "was already FAIL" in capsys.readouterr().err


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_workers_first_suggestions_differ(tmp_path, sampler):
    """Each worker's sampler is seeded by worker_seed (what the launcher passes to its workers):
    two workers of one launch draw different first suggestions, the same launch again draws the
    same ones, and a later launch (resuming the study) draws new ones."""
    spec = load_sweep(
        write_sweep(
            tmp_path,
            "draws",
            sampler=sampler,
            n_trials=4,
            search={
                "optim.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
                "optim.warmup_steps": {"type": "int", "low": 0, "high": 100},
            },
        )
    )
    url = f"sqlite:///{tmp_path}/optuna.db"

    def first_suggestion(worker_index, n_trials_at_launch):
        study, _ = open_study(spec, url, worker_seed(spec, worker_index, n_trials_at_launch))
        return suggest(study.ask(), spec)

    first = [first_suggestion(0, 0), first_suggestion(1, 0)]
    assert first[0] != first[1]
    assert first_suggestion(0, 0) == first[0] and first_suggestion(0, 3) != first[0]


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    runs = tmp_path / "runs"
    path = write_sweep(
        tmp_path, "oops", grid={"variant": {"ok": {}, "broken": {"data.train_files": ["no/such/books"]}}}
    )
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


def test_median_pruning_after_warmup_steps(tmp_path):
    """Reports are at optimizer steps, so a pruner with n_warmup_steps > 0 prunes: a learning-rate
    grid (run in order) whose third cell barely learns is pruned at its first report past the warm-up."""
    runs = tmp_path / "runs"
    path = write_sweep(
        tmp_path,
        "prune",
        grid={"optim.lr": [1.0e-2, 5.0e-3, 1.0e-7]},
        overrides={**FAST, "trainer.max_steps": 8, "trainer.val_every_n_steps": 2},
        pruning={"enabled": True, "n_startup_trials": 2, "n_warmup_steps": 3},
    )
    table = run_sweep(path, runs_dir=str(runs))
    assert list(table.state) == ["COMPLETE", "COMPLETE", "PRUNED"]
    trials = study_trials(runs, "prune")
    assert [sorted(t.intermediate_values) for t in trials] == [[2, 4, 6, 8], [2, 4, 6, 8], [2, 4]]
    assert trials[2].user_attrs["pruned_at_step"] == 4
    df = mlflow_runs(runs, "prune")
    run = df[df.run_id == trials[2].user_attrs["mlflow_run_id"]].iloc[0]
    assert run.status == "KILLED" and run["tags.pruned_at_step"] == "4"
    assert "pruned by Optuna: at step 4" in run["tags.killed_reason"]
    assert (df[df.run_id != run.run_id].status == "FINISHED").all()


def test_hpo_search_with_pruning(tmp_path):
    """A sampled search: distinct suggestions, reports at optimizer steps, pruned trials KILLED in
    MLflow with their step (which of the random trials get pruned depends on the draws)."""
    runs = tmp_path / "runs"
    overrides = {**FAST, "trainer.max_steps": 8, "trainer.val_every_n_steps": 2}
    path = write_sweep(
        tmp_path,
        "tune",
        overrides=overrides,
        sampler="random",
        n_trials=4,
        search={"optim.lr": {"type": "float", "low": 1e-6, "high": 3e-2, "log": True}},
        objective={"metric": "val/loss", "direction": "minimize"},
        pruning={"enabled": True, "n_startup_trials": 2, "n_warmup_steps": 3},
    )
    table = run_sweep(path, runs_dir=str(runs))
    assert len(table) == 4 and table.state.isin(["COMPLETE", "PRUNED"]).all()
    trials = study_trials(runs, "tune")
    assert len({t.params["optim.lr"] for t in trials}) == 4
    df = mlflow_runs(runs, "tune").set_index("run_id")
    for t in trials:
        run = df.loc[t.user_attrs["mlflow_run_id"]]
        if t.state.name == "PRUNED":
            step = t.user_attrs["pruned_at_step"]
            assert step >= 4 and sorted(t.intermediate_values) == list(range(2, step + 1, 2))
            assert run.status == "KILLED" and run["tags.pruned_at_step"] == str(step)
        else:
            assert sorted(t.intermediate_values) == [2, 4, 6, 8] and run.status == "FINISHED"


def test_bad_sweeps_fail_before_any_trial(tmp_path):
    with pytest.raises(ConfigError, match="unknown sweep 'smok'.*smoke"):
        load_sweep("smok")
    bad_key = write_sweep(tmp_path, "badkey", grid={"model.mixr": ["static"]})
    with pytest.raises(ConfigError, match=r"model\.mixr.*model\.mixer"):
        load_sweep(bad_key)
    empty = write_sweep(tmp_path, "empty", grid={"branches": {"none": {"model.branches": []}, "all": {}}})
    with pytest.raises(ConfigError, match=r"(?s)1 of 2 cells.*branches=none.*model.branches is empty"):
        load_sweep(empty)


def spec_error(path) -> str:
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    return str(info.value)


def test_bad_spec_keys_and_types_name_the_file_and_nearest_keys(tmp_path):
    """The sweep file goes through the typed schema: misspelt keys (top level, nested, in a search space) and
    wrong types fail naming the file, the key and the nearest valid keys, before any cell is built."""
    path = write_sweep(tmp_path, "typo", objetive={"metric": "val/loss"})
    msg = spec_error(path)
    assert path in msg and "unknown config key 'objetive'" in msg and "Nearest valid keys: objective" in msg
    msg = spec_error(write_sweep(tmp_path, "nested", pruning={"enabeld": True}))
    assert "'pruning.enabeld'" in msg and "pruning.enabled" in msg and "n_warmup_steps" in msg
    msg = spec_error(
        write_sweep(
            tmp_path,
            "space",
            n_trials=2,
            search={"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "lgo": True}},
        )
    )
    assert "'search.optim.lr.lgo'" in msg and "log" in msg and "SearchSpace" in msg
    msg = spec_error(write_sweep(tmp_path, "seeds", seeds=["zero"]))
    assert "tmp" in msg and "bad value for config key 'seeds[0]'" in msg and "'zero'" in msg
    msg = spec_error(write_sweep(tmp_path, "gpus", gpus_per_trial="two"))
    assert "'gpus_per_trial'" in msg and "gpus.yaml" in msg
    bare = tmp_path / "bare.yaml"
    bare.write_text("experiment: tiny_pha\n")
    assert "missing required key name" in spec_error(str(bare))


def test_spec_extends_replaces_axes_in_place_and_null_removes_them(tmp_path):
    base = write_sweep(
        tmp_path,
        "base",
        grid={"model.mixer": ["static", "gate"], "variant": {"x": {}, "y": {}}, "optim.warmup_steps": [1, 2]},
        n_trials=2,
        search={"optim.lr": {"type": "categorical", "choices": [0.01, 0.02]}},
    )
    child = tmp_path / "child.yaml"
    child.write_text(
        yaml.safe_dump(
            {
                "extends": "base.yaml",
                "name": "child",
                "seeds": [0, 1],
                "grid": {"model.mixer": ["mean"], "variant": {"z": {"optim.beta1": 0.8}}, "optim.warmup_steps": None},
                "search": {"optim.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2}},
            }
        )
    )
    spec = load_sweep(str(child))
    assert list(spec.cells()) == ["model.mixer=mean,variant=z,seed=0", "model.mixer=mean,variant=z,seed=1"]
    assert spec.cells()["model.mixer=mean,variant=z,seed=1"]["overrides"] == {
        **FAST,
        "model.mixer": "mean",
        "optim.beta1": 0.8,
        "seed": 1,
    }  # the base's overrides, inherited
    assert spec.search["optim.lr"].choices is None and spec.search["optim.lr"].type == "float"  # replaced whole
    assert (spec.n_trials, spec.heartbeat_interval, load_sweep(base).name) == (2, 1, "base")
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("extends: base.yaml\nseeds: [3]\n")
    assert "does not set its own name" in spec_error(str(nameless))


def test_bad_spec_extends_cycle_and_unknown_target(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    msg = spec_error(str(tmp_path / "a.yaml"))
    assert "'extends' cycle" in msg and msg.count("a.yaml") == 2 and "b.yaml" in msg
    (tmp_path / "self.yaml").write_text("extends: self.yaml\nname: self\n")
    assert "'extends' cycle" in spec_error(str(tmp_path / "self.yaml"))
    (tmp_path / "lost.yaml").write_text("extends: smok\nname: lost\n")
    msg = spec_error(str(tmp_path / "lost.yaml"))
    assert "lost.yaml" in msg and "unknown sweep 'smok'" in msg and "Did you mean: smoke" in msg


def test_shipped_spec_extends_resolve_like_their_bases():
    """repro_mqar = mqar without its task axis (the experiment's own task is (256, 16)); scale and ablation keep
    baselines' budget; repro_ablation keeps repro_baselines'. The same runs, not only the same cell names."""
    mqar, repro = read_sweep("mqar"), read_sweep("repro_mqar")
    same_task = {k.replace(",task=s256_kv16", ""): c for k, c in mqar.cells().items() if "task=s256_kv16" in k}
    assert list(repro.cells()) == list(same_task) and len(same_task) == 16
    for key, cell in repro.cells().items():
        assert to_yaml(repro.cell_config(cell)) == to_yaml(mqar.cell_config(same_task[key]))
    baselines = read_sweep("baselines")  # (test_shipped_sweeps_validate checks every cell of these)
    for name, extra in (("scale", {}), ("ablation", {"data.max_eval_tokens": 1048576})):
        spec = read_sweep(name)
        assert spec.overrides == {**baselines.overrides, **extra} and spec.objective == baselines.objective
    assert [lab for lab, _ in read_sweep("scale").axes()[0][1]] == [
        "pha_90m",
        "pha_125m",
        "pha_180m",
        "transformer_125m",
        "transformer_180m",
    ]  # replaced, not merged
    assert [axis for axis, _ in read_sweep("ablation").axes()] == ["branches", "model.mixer"]
    assert read_sweep("repro_ablation").overrides == read_sweep("repro_baselines").overrides
    assert list(read_sweep("repro_ablation").cells())[0] == "variant=full_static,seed=0"


@pytest.mark.slow
def test_ddp_trials_run_in_sequence_as_one_run_each(tmp_path):
    """gpus_per_trial: 2 on CPU (gloo): each trial is a 2-process DDP run, one MLflow run per trial, and a
    worker can run several DDP trials one after another (Lightning's launcher leaves env vars behind)."""
    runs = tmp_path / "runs"
    path = write_sweep(
        tmp_path,
        "ddp",
        grid={"model.mixer": ["static", "mean"]},
        gpus_per_trial=2,
        overrides={**FAST, "trainer.accelerator": "cpu"},
    )
    # from the command line: Lightning's DDP launcher starts rank 1 by re-running this very command
    subprocess.run(
        [sys.executable, "-m", "pha_lab.cli", "sweep", path, "--runs-dir", str(runs)],
        check=True,
        timeout=600,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert sorted(t.state.name for t in study_trials(runs, "ddp")) == ["COMPLETE", "COMPLETE"]
    df = mlflow_runs(runs, "ddp")
    children = df[df["tags.sweep_parent"] != "true"]
    assert len(children) == 2 and (children.status == "FINISHED").all()
    assert (children["params.trainer.devices"] == "2").all()

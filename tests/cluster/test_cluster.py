"""Scale-out against the real engines: PostgreSQL (Optuna), an MLflow tracking server on PostgreSQL with
proxied artifacts, and a one-node SLURM cluster running the sweep's workers as a submitit job array.

What is asserted about resuming: the three "machines" have separate runs folders but share this
machine's filesystem, as cluster nodes share a network filesystem; so a trial killed on machine A is
resumed from A's checkpoint (in its own MLflow run) by whichever machine claims it. Without a shared
filesystem, another machine would restart it from step 0 in the same MLflow run (README: scale-out).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from bodies import sweep_yaml
from conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

PHA = [sys.executable, "-m", "pha_lab.cli"]
# tiny trials, long enough (40 steps, a checkpoint every 5) to be interrupted in the middle
TRIAL = {
    "trainer.max_steps": 40,
    "trainer.val_every_n_steps": 20,
    "trainer.ckpt_every_n_steps": 5,
    "trainer.log_every_n_steps": 5,
    "data.max_eval_tokens": 2048,
    "optim.warmup_steps": 2,
    "trainer.cpu_threads": 1,
    "trainer.accelerator": "cpu",
}


def sweep_file(tmp_path: Path, name: str, **spec) -> str:
    return sweep_yaml(tmp_path, name, TRIAL, 5, **spec)


def study_trials(cluster, name: str):
    return optuna.load_study(study_name=name, storage=cluster.postgres.url("optuna")).get_trials(deepcopy=False)


def checkpointed_running_trials(cluster, name: str) -> list:
    """RUNNING trials whose worker has written a checkpoint (so an interruption now is 'in the middle')."""
    try:
        trials = study_trials(cluster, name)
    except KeyError:  # the study does not exist yet
        return []
    return [
        t
        for t in trials
        if t.state.name == "RUNNING"
        and t.user_attrs.get("ckpt_dir")
        and (Path(t.user_attrs["ckpt_dir"]) / "last.ckpt").is_file()
    ]


def search(cluster, name: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(cluster.mlflow.url)
    return mlflow.search_runs(experiment_names=[name])


def assert_every_cell_once_and_resumed(cluster, name: str, n_cells: int, victims: list) -> pd.DataFrame:
    """Optuna and MLflow agree: each cell COMPLETE exactly once, one FINISHED child run per cell, each victim's
    retry completed in the victim's MLflow run from its last checkpoint; the parent's summary is complete."""
    client = mlflow.MlflowClient(cluster.mlflow.url)
    trials = study_trials(cluster, name)
    states = Counter(t.state.name for t in trials)
    assert states["RUNNING"] == states["WAITING"] == 0, states
    complete = Counter(t.params["cell"] for t in trials if t.state.name == "COMPLETE")
    assert len(complete) == n_cells and set(complete.values()) == {1}, complete
    df = search(cluster, name)
    parents, children = df[df["tags.sweep_parent"] == "true"], df[df["tags.sweep_parent"] != "true"]
    assert len(parents) == 1 and parents.status.iloc[0] == "FINISHED"
    assert len(children) == n_cells and (children.status == "FINISHED").all(), children[["run_id", "status"]]
    assert sorted(children["tags.cell"]) == sorted(complete)
    for victim in victims:
        retries = [t for t in trials if victim.number in t.system_attrs.get("retry_history", [])]
        assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
        run_id = victim.user_attrs["mlflow_run_id"]
        assert retries[0].user_attrs["mlflow_run_id"] == run_id  # the same MLflow run, no new one
        run = children[children.run_id == run_id].iloc[0]
        assert run["tags.resumed_from"] == str(Path(victim.user_attrs["ckpt_dir"]) / "last.ckpt")
        assert run["metrics.train/tokens_seen"] == 40 * 8 * 128  # 40 steps of tiny_pha's 8 x 128 tokens
        # resumed, not retrained: the steps before the checkpoint were logged once (later ones may be twice)
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert steps.count(min(steps)) == 1 and max(steps) >= 35, steps
    # the parent's summary (downloaded through the server) is the study's final state
    summary = pd.read_csv(client.download_artifacts(parents.run_id.iloc[0], "summary.csv", tempfile.mkdtemp()))
    assert sorted(summary[summary.state == "COMPLETE"].cell) == sorted(complete)
    assert set(summary.state) <= {"COMPLETE", "FAIL"} and len(summary) == len(trials)
    return children


def assert_artifacts_went_through_the_server(cluster, children: pd.DataFrame, runs_dirs: list[Path]) -> None:
    for run_id, uri in zip(children.run_id, children.artifact_uri):
        assert uri.startswith("mlflow-artifacts:"), uri  # proxied: the client never writes the store itself
        exp_id = uri.split(":/", 1)[1].split("/")[0]
        assert (cluster.mlflow.artifacts / exp_id / run_id / "artifacts" / "config.yaml").is_file()
    for runs in runs_dirs:
        assert not (runs / "artifacts").exists() and not list(runs.glob("*.db"))  # nothing fell back to local stores


def slurm_task_of(pid: int) -> str:
    """`<array job>_<task>` of a worker process (its environment, read as root on this one node)."""
    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"


def job_field(cluster, job: str, key: str) -> str:
    out = cluster.slurm.command("scontrol", "show", "job", job)
    return next(w.split("=", 1)[1] for w in out.split() if w.startswith(key + "="))


def release_requeued(cluster, job: str) -> None:
    """SLURM holds a requeued batch job back for about 2 minutes (its BeginTime); start it now instead."""
    wait_for(f"{job} to be pending after the requeue", lambda: job_field(cluster, job, "JobState") == "PENDING", 120)
    cluster.slurm.command("scontrol", "update", f"JobId={job}", "StartTime=now")


# --------------------------------------------------------------------------- creation races
def test_workers_starting_together_create_one_study_and_one_experiment(cluster, tmp_path):
    """Four processes on a fresh PostgreSQL database: Optuna's schema creation races there (IntegrityError on
    pg_type) and MLflow's create_experiment races on the server; each process ends with the same study and
    experiment, and exactly one of them created the study."""
    url = cluster.postgres.url("optuna").rsplit("/", 1)[0] + "/race"
    cluster.postgres.sql("CREATE DATABASE race")
    script = tmp_path / "race.py"
    script.write_text(
        "import sys, time\n"
        "from pha_lab import tracking\nfrom pha_lab.config import load_config\n"
        "from pha_lab.sweep.runner import create_study_once\nfrom pha_lab.sweep.spec import SweepSpec\n"
        "start = float(sys.argv[3])\n"
        "while time.time() < start: time.sleep(0.001)\n"
        "created = create_study_once(SweepSpec(name='race', experiment='tiny_pha'), sys.argv[1])\n"
        "cfg = load_config(None, [f'tracking.runs_dir={sys.argv[4]}'])\n"
        "exp = tracking.ensure_experiment(tracking.client(sys.argv[2]), 'race', cfg.tracking)\n"
        "print(created, exp)\n"
    )
    start = time.time() + 8  # after every interpreter has imported optuna and mlflow
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), url, cluster.mlflow.url, str(start), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outs]
    results = [out.split()[-2:] for out, _ in outs]
    assert sorted(created for created, _ in results) == ["False", "False", "False", "True"]
    assert len({exp for _, exp in results}) == 1
    assert [s.study_name for s in optuna.get_all_study_summaries(storage=url)] == ["race"]
    assert [
        e.name for e in mlflow.MlflowClient(cluster.mlflow.url).search_experiments(filter_string="name = 'race'")
    ] == ["race"]


# --------------------------------------------------------------------------- three machines
@pytest.fixture(scope="module")
def three_machines(cluster, processes, tmp_path_factory):
    """A 6-cell sweep on three "machines" (process groups with their own runs folders) started together; one
    is killed (SIGKILL of its process group) in the middle of a checkpointed trial and started again."""
    root = tmp_path_factory.mktemp("machines")
    name = "machines"
    path = sweep_file(root, name, grid={"model.mixer": ["static", "mean", "scalar"]}, seeds=[0, 1])
    runs = [root / f"machine{i}" for i in range(3)]

    def machine(i: int):
        return processes.start(
            [
                *PHA,
                "sweep",
                path,
                "--storage",
                cluster.postgres.url("optuna"),
                "--tracking-uri",
                cluster.mlflow.url,
                "--runs-dir",
                str(runs[i]),
            ],
            runs[i] / "sweep.log",
        )

    procs = [machine(i) for i in range(3)]
    victim = wait_for("a trial with a checkpoint", lambda: checkpointed_running_trials(cluster, name), 300)[0]
    killed = next(i for i in range(3) if victim.user_attrs["ckpt_dir"].startswith(str(runs[i])))
    os.killpg(procs[killed].pid, signal.SIGKILL)  # no cleanup at all: the trial's heartbeat just stops
    procs[killed].wait()
    time.sleep(6)  # > grace_period: the dead trial is now stale, and the rerun (or another machine) re-queues it
    procs[killed] = machine(killed)
    for proc in procs:
        assert processes.wait(proc, 600) == 0
    return {"name": name, "victim": victim, "runs": runs, "killed": killed}


def test_three_machines_run_every_cell_once_and_the_killed_trial_resumes(cluster, three_machines):
    m = three_machines
    children = assert_every_cell_once_and_resumed(cluster, m["name"], 6, [m["victim"]])
    # the work was shared: trials completed in more than one machine's runs folder
    done_in = {
        Path(t.user_attrs["ckpt_dir"]).parents[1]
        for t in study_trials(cluster, m["name"])
        if t.state.name == "COMPLETE"
    }
    assert len(done_in) >= 2, done_in
    assert_artifacts_went_through_the_server(cluster, children, m["runs"])


def test_train_eval_and_tables_against_the_tracking_server(cluster, three_machines, tmp_path):
    """`pha-lab train`, `pha-lab eval` and `pha-lab tables` with --tracking-uri http://...: the run, its eval
    metrics and artifacts live on the server; the tables are built from the three machines' runs."""
    uri, runs = cluster.mlflow.url, tmp_path / "runs"
    short = [f"{k}={v}" for k, v in {**TRIAL, "trainer.max_steps": 6}.items()]
    out = subprocess.run(
        [
            *PHA,
            "train",
            "tiny_pha",
            *short,
            "tracking.experiment=single",
            "--tracking-uri",
            uri,
            "--runs-dir",
            str(runs),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_id = out.stdout.split("run      ")[1].split()[0]
    out = subprocess.run(
        [
            *PHA,
            "eval",
            run_id,
            "data.max_eval_tokens=2048",
            "--knockout",
            "ffn",
            "--tracking-uri",
            uri,
            "--runs-dir",
            str(runs),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert (
        run.info.status == "FINISHED"
        and "eval/test/loss" in run.data.metrics
        and "knockout/ffn/all/ppl" in run.data.metrics
    )
    exp_id = run.info.experiment_id
    for artifact in ("config.yaml", "knockout.csv", "mixer_weights.csv"):
        assert (cluster.mlflow.artifacts / exp_id / run_id / "artifacts" / artifact).is_file(), artifact

    tables = tmp_path / "tables"
    out = subprocess.run(
        [
            *PHA,
            "tables",
            "--tracking-uri",
            uri,
            "--out",
            str(tables),
            "--notebooks",
            "perplexity",
            "--sweeps",
            f"perplexity={three_machines['name']}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    table = pd.read_csv(tables / "perplexity-text.csv").set_index("config")  # tiny_pha's data.source is `text`
    df = search(cluster, three_machines["name"])
    children = df[df["tags.sweep_parent"] != "true"].assign(
        config=lambda d: d["tags.cell"].str.replace(r",seed=\d+", "", regex=True)
    )
    assert sorted(table.index) == sorted(children.config.unique()) and (table["n"] == 2).all()
    for config, runs_of in children.groupby("config"):
        assert set(table.loc[config, "runs"].split(",")) == set(runs_of.run_id)
        assert table.loc[config, "test/ppl"] == pytest.approx(runs_of["metrics.test/ppl"].mean())


def test_a_trial_whose_checkpoint_is_out_of_sight_restarts_in_its_own_run(cluster, processes, tmp_path):
    """Without a shared filesystem another machine cannot read the checkpoint of a trial that died on machine
    A (simulated: A's checkpoint folder is moved away): machine B trains it again from step 0, in the same
    MLflow run, which keeps the params it was created with, and the cell still completes once."""
    name, a, b = "unseen", tmp_path / "machineA", tmp_path / "machineB"
    path = sweep_file(tmp_path, name, grid={"model.mixer": ["static"]})

    def machine(runs: Path):
        return processes.start(
            [
                *PHA,
                "sweep",
                path,
                "--storage",
                cluster.postgres.url("optuna"),
                "--tracking-uri",
                cluster.mlflow.url,
                "--runs-dir",
                str(runs),
            ],
            runs / "sweep.log",
        )

    proc = machine(a)
    victim = wait_for("a trial with a checkpoint", lambda: checkpointed_running_trials(cluster, name), 300)[0]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = Path(victim.user_attrs["ckpt_dir"])
    ckpt.rename(ckpt.with_name(ckpt.name + ".out-of-sight"))
    time.sleep(6)  # > grace_period
    assert processes.wait(machine(b), 600) == 0

    retry = [t for t in study_trials(cluster, name) if victim.number in t.system_attrs.get("retry_history", [])]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].user_attrs["mlflow_run_id"] == victim.user_attrs["mlflow_run_id"]
    assert retry[0].user_attrs["ckpt_dir"].startswith(str(b))
    df = search(cluster, name)
    run = df[df.run_id == victim.user_attrs["mlflow_run_id"]].iloc[0]
    assert len(df) == 2 and run.status == "FINISHED" and run["tags.restarted_without_checkpoint"] == "true"
    assert pd.isna(run.get("tags.resumed_from")) and run["tags.checkpoint_dir"].startswith(str(b))
    assert run["params.tracking.runs_dir"] == str(a)  # MLflow keeps a run's first params
    assert run["metrics.train/tokens_seen"] == 40 * 8 * 128  # all 40 steps trained again


# --------------------------------------------------------------------------- SLURM job array
def test_slurm_array_tasks_requeued_mid_trial_resume(cluster, processes, tmp_path):
    """A 4-cell sweep as a 2-task job array. In the middle of a checkpointed trial, one task is requeued with
    `scontrol requeue` (SIGTERM, as a preemption), the other gets submitit's time-limit warning (USR2, which
    makes submitit requeue it). Both come back (Restarts=1), and the sweep completes with every cell once,
    each interrupted trial resumed from its checkpoint in its own MLflow run."""
    name, runs = "array", tmp_path / "runs"
    path = sweep_file(tmp_path, name, grid={"model.mixer": ["static", "mean", "scalar", "gate"]})
    out = subprocess.run(
        [
            *PHA,
            "sweep",
            path,
            "--launcher",
            "slurm",
            "--storage",
            cluster.postgres.url("optuna"),
            "--tracking-uri",
            cluster.mlflow.url,
            "--runs-dir",
            str(runs),
            "--partition",
            "cpu",
            "--gpus-per-node",
            "0",
            "--array-tasks",
            "2",
            "--time-limit",
            "30",
            "--cpus-per-task",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=cluster.slurm.env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    array = out.stdout.split("as SLURM job ")[1].split(";")[0]
    assert (runs / "slurm" / name / f"{array}_submission.sh").is_file()

    def one_per_task():
        by_task = {
            slurm_task_of(int(t.user_attrs["worker"].split(":")[1])): t
            for t in checkpointed_running_trials(cluster, name)
        }
        return by_task if len(by_task) == 2 else None

    victims = wait_for("both array tasks in the middle of a checkpointed trial", one_per_task, 400)
    (requeued, victim_a), (warned, victim_b) = sorted(victims.items())
    cluster.slurm.command("scontrol", "requeue", requeued)
    cluster.slurm.command("scancel", "--signal=USR2", warned)
    for task in (requeued, warned):
        release_requeued(cluster, task)
    wait_for("the job array to end", lambda: not cluster.slurm.command("squeue", "-h", "-j", array).strip(), 600, 2)

    for task in (requeued, warned):
        assert job_field(cluster, task, "Restarts") == "1" and job_field(cluster, task, "JobState") == "COMPLETED"
    log = (runs / "slurm" / name / f"{warned}_0_log.out").read_text()
    assert "this job is preempted" in log and f"Requeued job {warned}" in log  # submitit's checkpoint-and-requeue
    assert_every_cell_once_and_resumed(cluster, name, 4, [victim_a, victim_b])


def test_slurm_two_task_ddp_trials(cluster, tmp_path):
    """gpus_per_trial: 2 on the CPU partition: each trial is one DDP job over two srun tasks (gloo), rank 1
    trains the trials rank 0 claims; one MLflow run per trial, with both ranks' tokens counted."""
    name, runs = "ddp", tmp_path / "runs"
    path = sweep_file(
        tmp_path,
        name,
        grid={"model.mixer": ["static", "mean"]},
        gpus_per_trial=2,
        overrides={**TRIAL, "trainer.max_steps": 6, "trainer.val_every_n_steps": 3},
    )
    out = subprocess.run(
        [
            *PHA,
            "sweep",
            path,
            "--launcher",
            "slurm",
            "--storage",
            cluster.postgres.url("optuna"),
            "--tracking-uri",
            cluster.mlflow.url,
            "--runs-dir",
            str(runs),
            "--gpus-per-node",
            "0",
            "--array-tasks",
            "1",
            "--time-limit",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=cluster.slurm.env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    job = out.stdout.split("as SLURM job ")[1].split(";")[0]
    wait_for("the DDP job to end", lambda: not cluster.slurm.command("squeue", "-h", "-j", job).strip(), 600, 2)
    assert job_field(cluster, job, "JobState") == "COMPLETED" and job_field(cluster, job, "NumTasks") == "2"
    trials = study_trials(cluster, name)
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE"]
    df = search(cluster, name)
    children = df[df["tags.sweep_parent"] != "true"]
    assert len(children) == 2 and (children.status == "FINISHED").all()
    assert (children["params.trainer.devices"] == "2").all()
    tokens_one_rank = 6 * 8 * 128  # steps x batch x seq_len of tiny_pha
    assert (children["metrics.train/tokens_seen"] == 2 * tokens_one_rank).all(), children["metrics.train/tokens_seen"]
    # rank 0 sent its messages under ranks/ and they are gone: each trial's once both ranks formed its process
    # group, the mailbox once rank 1 read "done" (training/handoff.py)
    assert (runs / "ranks").is_dir() and not any((runs / "ranks").iterdir()), list((runs / "ranks").rglob("*"))

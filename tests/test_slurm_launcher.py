"""The SLURM launcher without a cluster: the sbatch script it would submit (--dry-run), how a trial's GPUs map
to nodes and tasks, and its errors. Submitting and requeueing for real: tests/cluster (make test-cluster)."""

from __future__ import annotations

import optuna
import pytest
import yaml

from pha_lab.cli import main
from pha_lab.config import ConfigError, load_config
from pha_lab.sweep.runner import trial_config
from pha_lab.sweep.slurm import SlurmOptions, task_layout, trial_overrides
from pha_lab.sweep.spec import load_sweep


def sweep(tmp_path, **spec) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({"name": "s", "experiment": "tiny_pha", "grid": {"model.mixer": ["static", "mean"]}, **spec})
    )
    return str(path)


def test_dry_run_prints_the_job_array_script_and_creates_nothing(tmp_path, capsys):
    rc = main(
        [
            "sweep",
            "smoke",
            "--launcher",
            "slurm",
            "--dry-run",
            "--time-limit",
            "240",
            "--partition",
            "gpu",
            "--account",
            "lab",
            "--gpus-per-node",
            "4",
            "--array-tasks",
            "3",
            "--max-parallel",
            "2",
            "--cpus-per-task",
            "8",
            "--sbatch",
            "qos=high",
            "--sbatch=--constraint=h100",
            "--sbatch",
            "exclusive",
            "--setup",
            "source /shared/venv/bin/activate",
            "--runs-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    lines = set(out.splitlines())
    for line in (
        "#SBATCH --array=0-2%2",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --time=240",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=1",  # one GPU per worker
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100",
        "#SBATCH --exclusive",
        "source /shared/venv/bin/activate",
    ):
        assert line in lines, line
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and srun.endswith(f"-m submitit.core._submit {tmp_path / 'slurm' / 'smoke'}")
    assert list(tmp_path.iterdir()) == []  # no study, no MLflow store, no submitit folder


def test_a_multi_gpu_trial_is_one_task_per_gpu_over_whole_nodes(tmp_path, capsys):
    path = sweep(tmp_path, gpus_per_trial=8)
    assert main(["sweep", path, "--launcher", "slurm", "--dry-run", "--time-limit", "60", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4"} <= set(out.splitlines())
    assert "trainer.num_nodes=2" in out.splitlines()[0]
    spec = load_sweep(path)
    assert task_layout(spec, SlurmOptions(gpus_per_node=8)) == (1, 8, 8)
    assert task_layout(spec, SlurmOptions(gpus_per_node=0)) == (1, 8, 0)  # CPU partition: 8 processes on one node
    # each rank's trial config: Lightning's SLURMEnvironment wants devices per node and num_nodes
    extra = trial_overrides(spec, SlurmOptions(gpus_per_node=4), [])
    spec = load_sweep(path, extra)
    _, cfg = trial_config(spec, optuna.create_study().ask(), extra, load_config(None).tracking, "parent")
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)


def test_launcher_errors_name_the_option_and_the_fix(tmp_path, capsys):
    path = sweep(tmp_path, gpus_per_trial=6)
    with pytest.raises(ConfigError, match="gpus_per_trial=6 is not a multiple of --gpus-per-node 4"):
        task_layout(load_sweep(path), SlurmOptions(gpus_per_node=4))
    assert main(["sweep", "smoke", "--launcher", "slurm", "--dry-run"]) == 2
    assert "needs --time-limit MINUTES" in capsys.readouterr().err
    # several nodes must share the study and the tracking store: SQLite would lose updates
    runs = tmp_path / "runs"
    assert main(["sweep", "smoke", "--launcher", "slurm", "--time-limit", "60", "--runs-dir", str(runs)]) == 2
    assert "needs --storage postgresql://" in capsys.readouterr().err
    assert (
        main(
            [
                "sweep",
                "smoke",
                "--launcher",
                "slurm",
                "--time-limit",
                "60",
                "--runs-dir",
                str(runs),
                "--storage",
                "postgresql://u@db/optuna",
            ]
        )
        == 2
    )
    assert "needs --tracking-uri http://" in capsys.readouterr().err
    assert not runs.exists()
    assert main(["sweep", "smoke", "--partition", "gpu", "--dry-run"]) == 2
    assert "--partition --dry-run: only with --launcher slurm" in capsys.readouterr().err


FOLLOWER = """
import json, os, sys
from pha_lab.config import load_config
from pha_lab.training import handoff

tracking_cfg = load_config(None, [f"tracking.runs_dir={sys.argv[1]}"]).tracking
seen = [(cfg.name, os.environ.get(handoff.RUN_ID)) for cfg in handoff.followed_runs(tracking_cfg)]
print(json.dumps({"seen": seen, "run_id_after": os.environ.get(handoff.RUN_ID)}))
"""


def test_sweep_ranks_follow_rank_zero_until_done_and_the_last_to_read_it_removes_the_mailbox(tmp_path):
    """A 3-task SLURM worker's ranks 1 and 2 (srun's environment, one process each) train rank 0's runs in order,
    each with PHA_RUN_ID set to its run, and stop at rank 0's done message; the mailbox under <runs_dir>/ranks/
    stays until the last of them has read "done" (removing it earlier would leave that rank waiting forever)."""
    import json
    import os
    import subprocess
    import sys

    from pha_lab.training import handoff

    runs = tmp_path / "runs"
    srun = {"SLURM_NTASKS": "3", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_JOB_NAME": "pha-s"}
    tracking_cfg = load_config(None, [f"tracking.runs_dir={runs}"]).tracking
    box = runs / "ranks" / "77.0.0"
    script = tmp_path / "follower.py"
    script.write_text(FOLLOWER)

    def follower(rank: int) -> dict:
        env = {**os.environ, **srun, "SLURM_PROCID": str(rank)}
        done = subprocess.run(
            [sys.executable, str(script), str(runs)], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[-1])

    with pytest.MonkeyPatch.context() as mp:  # this process plays rank 0 (its message counter starts at 0)
        for key, value in {**srun, "SLURM_PROCID": "0"}.items():
            mp.setenv(key, value)
        mp.setattr(handoff, "_sent", 0)
        mp.setattr(handoff, "_run_message", None)
        mp.delenv(handoff.RUN_ID, raising=False)  # (publish_run sets it; undone on leaving)
        for n, name in enumerate(["trial_a", "trial_b"]):
            handoff.publish_run(f"run{n}", load_config("tiny_pha", [f"name={name}", f"tracking.runs_dir={runs}"]))
        handoff.share_done(tracking_cfg)
    assert sorted(p.name for p in box.iterdir()) == ["0.json", "1.json", "2.json"]
    expected = {"seen": [["trial_a", "run0"], ["trial_b", "run1"]], "run_id_after": None}
    assert follower(1) == expected
    assert (box / "2.json").is_file()  # rank 2 has not read "done" yet
    assert follower(2) == expected
    assert not box.exists()

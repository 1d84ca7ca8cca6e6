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
    path.write_text(yaml.safe_dump({"name": "s", "experiment": "tiny_pha", "grid": {"model.mixer": ["static", "mean"]},
                                    **spec}))
    return str(path)


def test_dry_run_prints_the_job_array_script_and_creates_nothing(tmp_path, capsys):
    rc = main(["sweep", "smoke", "--launcher", "slurm", "--dry-run", "--time-limit", "240", "--partition", "gpu",
               "--account", "lab", "--gpus-per-node", "4", "--array-tasks", "3", "--max-parallel", "2",
               "--cpus-per-task", "8", "--sbatch", "qos=high", "--sbatch=--constraint=h100", "--sbatch", "exclusive",
               "--setup", "source /shared/venv/bin/activate", "--runs-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    lines = set(out.splitlines())
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=240",
                 "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=1",  # one GPU per worker
                 "#SBATCH --cpus-per-task=8", "#SBATCH --requeue", "#SBATCH --signal=USR2@120", "#SBATCH --qos=high",
                 "#SBATCH --constraint=h100", "#SBATCH --exclusive", "source /shared/venv/bin/activate"):
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
    assert main(["sweep", "smoke", "--launcher", "slurm", "--time-limit", "60", "--runs-dir", str(runs),
                 "--storage", "postgresql://u@db/optuna"]) == 2
    assert "needs --tracking-uri http://" in capsys.readouterr().err
    assert not runs.exists()
    assert main(["sweep", "smoke", "--partition", "gpu", "--dry-run"]) == 2
    assert "--partition --dry-run: only with --launcher slurm" in capsys.readouterr().err

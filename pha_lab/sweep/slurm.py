"""`pha-lab sweep NAME --launcher slurm`: the sweep's workers as one SLURM job array, through submitit.

The submitting process prepares the sweep as a local run does (validates it, creates the Optuna
study and the MLflow parent run once, queues the grid), then submits `array_tasks` workers with
submitit's SlurmExecutor in one `batch()`, which makes them one job array. Each array task is one
worker (runner.worker_loop: it claims cells from the shared study until none is left) on
`gpus_per_trial` GPUs, one SLURM task per GPU, on several nodes when gpus_per_trial > gpus_per_node.
With several tasks, rank 0 runs the worker loop and the other ranks train each trial it shares with
them (training/handoff.py): one Lightning DDP job (Lightning's SLURMEnvironment reads srun's ranks).

Interruptions end with the trial re-queued in the study and resumed from its checkpoint, in its own
MLflow run, by the next worker that claims it (usually the requeued task itself):
- SIGTERM (preemption, `scontrol requeue`, scancel): the running trial checkpoints at the next step
  (training.callbacks.Interruption) and is re-queued (runner.run_trial); SLURM requeues the task for
  a preemption or a requeue.
- The time limit: SLURM first sends submitit's warning signal (USR2, `signal_delay_s` ahead); the
  worker stops its trial the same way, then submitit requeues the task (its `Checkpointable`
  protocol: `checkpoint()` resubmits this worker as it is; the sweep's state is in the study).

Shared between machines: the Optuna database (PostgreSQL), the MLflow tracking server, and one
filesystem holding the project with its venv, the runs dir (checkpoints) and the submitit folder.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import submitit
from omegaconf import DictConfig

from pha_lab import tracking
from pha_lab.config import ConfigError, load_config
from pha_lab.sweep.spec import SweepSpec, load_sweep
from pha_lab.training import handoff

SERVER_SCHEMES = ("postgresql", "mysql", "oracle", "mssql")  # Optuna RDB storages shared over the network


@dataclass
class SlurmOptions:
    time_min: int | None = None  # walltime of each array task, minutes (required)
    partition: str | None = None
    gpus_per_node: int | None = None  # GPUs of one node a trial may use (default: gpus_per_trial); 0: CPU-only
    array_tasks: int | None = None  # workers (default: one per cell, or per search trial)
    max_parallel: int | None = None  # array tasks running at once (sbatch --array=...%N)
    account: str | None = None
    cpus_per_task: int | None = None
    sbatch: list[str] = field(default_factory=list)  # more `#SBATCH` options: KEY=VALUE, --KEY=VALUE or --FLAG
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load, activate a venv)
    folder: str | None = None  # submitit's job folder (default <runs_dir>/slurm/<sweep>); shared by the nodes
    signal_delay_s: int = 120  # submitit's warning signal (USR2) comes this long before the time limit


def task_layout(spec: SweepSpec, opts: SlurmOptions) -> tuple[int, int, int]:
    """(nodes, tasks per node, GPUs per node) of one array task: one task per GPU of a trial."""
    n = spec.gpus_per_trial
    per_node = n if opts.gpus_per_node is None else opts.gpus_per_node
    if per_node < 0:
        raise ConfigError(f"--gpus-per-node must be >= 0 (0: a CPU-only partition), got {per_node}")
    if per_node == 0:  # CPU-only: a trial's processes on one node
        return 1, n, 0
    if n <= per_node:
        return 1, n, n
    if n % per_node:
        raise ConfigError(
            f"gpus_per_trial={n} is not a multiple of --gpus-per-node {per_node}: "
            "a multi-node DDP trial takes whole nodes"
        )
    return n // per_node, per_node, per_node


def _sbatch_options(lines: list[str]) -> dict[str, object]:
    """`--qos=high`, `qos=high` or `--exclusive` -> submitit's additional_parameters."""
    out: dict[str, object] = {}
    for line in lines:
        key, sep, value = line.strip().lstrip("-").partition("=")
        if not key:
            raise ConfigError(f"--sbatch {line!r}: expected KEY=VALUE (e.g. qos=high) or a flag (e.g. exclusive)")
        out[key] = value if sep else True
    return out


def executor_parameters(spec: SweepSpec, opts: SlurmOptions) -> dict:
    """SlurmExecutor parameters of one array task (see submitit.slurm.slurm._make_sbatch_string)."""
    if not opts.time_min or opts.time_min < 1:
        raise ConfigError(
            "--launcher slurm needs --time-limit MINUTES (each array task's walltime; "
            "a task that reaches it checkpoints its trial and is requeued)"
        )
    nodes, tasks, gpus = task_layout(spec, opts)
    params: dict = {
        "job_name": f"pha-{spec.name}",
        "time": opts.time_min,
        "nodes": nodes,
        "ntasks_per_node": tasks,
        "signal_delay_s": opts.signal_delay_s,
        "srun_args": ["--kill-on-bad-exit=1"],  # a DDP rank that dies takes the others down (no hang)
        "additional_parameters": {"requeue": True, **_sbatch_options(opts.sbatch)},
    }
    for key, value in (
        ("gpus_per_node", gpus or None),
        ("partition", opts.partition),
        ("account", opts.account),
        ("cpus_per_task", opts.cpus_per_task),
        ("array_parallelism", opts.max_parallel),
    ):
        if value is not None:
            params[key] = value
    if opts.setup:
        params["setup"] = list(opts.setup)
    return params


def trial_overrides(spec: SweepSpec, opts: SlurmOptions, extra: list[str]) -> list[str]:
    nodes = task_layout(spec, opts)[0]
    return [*extra, f"trainer.num_nodes={nodes}"] if nodes > 1 else list(extra)


def sbatch_script(params: dict, folder: Path, n_tasks: int, python: str = sys.executable) -> str:
    """The batch script submitit writes for this array (its own generator, so --dry-run shows the real one)."""
    import shlex

    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{shlex.quote(python)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, map_count=n_tasks if n_tasks > 1 else None, **params)


def _check_shared_backends(storage: str | None, uri: str) -> None:
    if not storage or storage.split(":", 1)[0].split("+", 1)[0] not in SERVER_SCHEMES:
        raise ConfigError(
            "--launcher slurm needs --storage postgresql://USER:PW@HOST/DB "
            f"(got {storage or 'the SQLite default'}): SQLite on a network filesystem loses updates "
            "between nodes"
        )
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        raise ConfigError(
            "--launcher slurm needs --tracking-uri http://MLFLOW-HOST:PORT "
            f"(got {uri or 'the SQLite default'}): the array's tasks log through one MLflow tracking "
            "server"
        )


def submit(
    name: str,
    extra: list[str],
    opts: SlurmOptions,
    storage: str | None = None,
    tracking_uri: str | None = None,
    runs_dir: str | None = None,
    retry_failed: bool = False,
    dry_run: bool = False,
):
    """Prepare the sweep and submit its workers as a job array; return the submitit jobs (None for a dry run)."""
    from pha_lab.sweep.runner import prepare

    spec = load_sweep(name, list(extra))
    n_tasks = opts.array_tasks or (spec.n_trials if spec.is_search else len(spec.cells()))
    params = executor_parameters(spec, opts)
    base = load_config(None, [o for o in extra if o.startswith("tracking.")])
    if runs_dir:
        base.tracking.runs_dir = str(Path(runs_dir).resolve())
    root = tracking.runs_dir(base.tracking)
    folder = Path(opts.folder).resolve() if opts.folder else root / "slurm" / spec.name
    worker_extra = trial_overrides(spec, opts, list(extra))
    if dry_run:
        print(
            f"# pha-lab sweep {name} --launcher slurm: {n_tasks} array task(s), each one worker of "
            f"{spec.gpus_per_trial} GPU(s); trial overrides: {' '.join(worker_extra) or '(none)'}"
        )
        print(sbatch_script(params, folder, n_tasks))
        return None
    uri = tracking_uri or base.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    _check_shared_backends(storage, uri)
    spec, study, storage_url, tracking_cfg, parent_id = prepare(
        name, worker_extra, storage, uri, runs_dir, retry_failed
    )
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=30)
    executor.update_parameters(**params)
    sweep = str(Path(name).resolve()) if Path(name).is_file() else name
    worker = SweepWorker(
        sweep, worker_extra, storage_url, tracking_cfg.tracking_uri, str(tracking.runs_dir(tracking_cfg))
    )
    with executor.batch():
        jobs = [executor.submit(worker) for _ in range(n_tasks)]
    array_id = jobs[0].job_id.split("_")[0]
    print(
        f"[sweep {spec.name}] submitted {n_tasks} worker(s) as SLURM job {array_id}; scripts and logs in {folder}\n"
        f"  watch: squeue -j {array_id}; the last worker to end logs the summary on MLflow run {parent_id}",
        flush=True,
    )
    return jobs


class _StopOnSignals:
    """While a worker runs: SIGTERM, and submitit's warning signal before the time limit (USR2), stop the
    running fit at the next step (callbacks.request_stop; inside a fit, Interruption handles SIGTERM
    itself) and let the worker claim no further cell. `submitit_handler` is the handler submitit had set."""

    def __init__(self):
        from pha_lab.training.callbacks import request_stop

        self._request_stop = request_stop
        self.received: int | None = None
        self.warning = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, self.warning)}

    def _handler(self, signum, frame) -> None:
        self.received = signum
        self._request_stop(signal.Signals(signum).name)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self._request_stop(None)

    @property
    def submitit_handler(self):
        return self.previous[self.warning]


class SweepWorker(submitit.helpers.Checkpointable):
    """One array task: a sweep worker (rank 0) or, in a multi-GPU trial, one of its other DDP ranks.
    submitit pickles it; Checkpointable's checkpoint() resubmits it unchanged on requeue."""

    def __init__(self, sweep: str, extra: list[str], storage: str, tracking_uri: str, runs_dir: str):
        self.sweep, self.extra, self.storage = sweep, list(extra), storage
        self.tracking_uri, self.runs_dir = tracking_uri, runs_dir

    def __call__(self) -> str:
        env = submitit.JobEnvironment()
        tracking_cfg = load_config(
            None, [f"tracking.runs_dir={self.runs_dir}", f"tracking.tracking_uri={self.tracking_uri}"]
        ).tracking
        if env.global_rank > 0:
            return follow_rank_zero(tracking_cfg)
        return self._work(env, tracking_cfg)

    def _work(self, env, tracking_cfg: DictConfig) -> str:
        from pha_lab.sweep.report import finish, progress
        from pha_lab.sweep.runner import worker_loop
        from pha_lab.sweep.study import open_study, worker_seed
        from pha_lab.training.callbacks import RunInterrupted

        signals = _StopOnSignals()
        spec = load_sweep(self.sweep, self.extra)
        study, _ = open_study(spec, self.storage)
        print(
            f"[sweep {spec.name}] worker {env.job_id} (restart {os.environ.get('SLURM_RESTART_COUNT', 0)}) on "
            f"{env.hostname}: {env.num_tasks} task(s)",
            flush=True,
        )
        # distinct per array task; a requeued task sees a larger study, so it does not replay its first draws
        seed = worker_seed(spec, int(env.array_task_id or 0), len(study.get_trials(deepcopy=False)))
        status = "KILLED"
        try:
            worker_loop(
                spec, self.storage, self.extra, tracking_cfg, seed, should_stop=lambda: signals.received is not None
            )
            status = "FINISHED" if signals.received is None else "KILLED"
        except RunInterrupted as exc:  # the trial checkpointed and is queued again
            print(f"[sweep {spec.name}] worker {env.job_id}: {exc}", flush=True)
        finally:
            signals.restore()
            handoff.share_done(tracking_cfg)
            finish(spec, study, tracking_cfg, study.user_attrs["mlflow_parent_run_id"], status)
        if signals.received == signals.warning:  # the time limit is near: submitit requeues this task
            signals.submitit_handler(signals.warning, None)
        return progress(study, spec)


def follow_rank_zero(tracking_cfg: DictConfig) -> str:
    """DDP rank > 0 of a multi-GPU worker: train each trial rank 0 shares, in its MLflow run, until it is done."""
    from pha_lab.training.callbacks import RunInterrupted
    from pha_lab.training.run import train

    trained = 0
    for cfg in handoff.followed_runs(tracking_cfg):
        try:
            train(cfg)
        except RunInterrupted:
            pass  # rank 0 stopped at the same step and re-queues the trial
        except Exception as exc:  # rank 0 records the failure; follow it to its next trial
            print(
                f"rank {os.environ.get('SLURM_PROCID')}: run {os.environ.get(handoff.RUN_ID)} failed: "
                f"{type(exc).__name__}: {exc}",
                file=sys.stderr,
                flush=True,
            )
        trained += 1
    return f"rank {os.environ.get('SLURM_PROCID')}: {trained} trial(s)"

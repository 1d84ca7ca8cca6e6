"""`pha-lab sweep NAME`: run a sweep as an Optuna study whose trials are `train(config)` calls.

- The study (pha_lab.sweep.study): SQLite beside the MLflow database by default, or any RDB URL
  (PostgreSQL for several machines); grid cells queued once, each claimed by exactly one worker; search
  trials from the sampler (TPE / random), seeded per worker, with median pruning on the validation
  objective if enabled, reported at the optimizer step (`pruning.PruneAtStep`).
- Workers: one per group of `gpus_per_trial` GPUs (pinned with CUDA_VISIBLE_DEVICES), or one on CPU.
- Robustness: a trial that raises is FAILED (reason in its user attrs and its MLflow run) and the
  sweep goes on; a running trial sends heartbeats, so one whose worker died is found stale by the
  next worker and re-queued with its MLflow run id, and resumes from its last checkpoint in that
  run (or, if it died before its first one, starts over in that run); SIGINT/SIGTERM checkpoints the
  trial and re-queues it. Failed cells rerun only with `--retry-failed`.
- MLflow: one experiment per sweep, a parent run (sweep file and summary table as artifacts:
  pha_lab.sweep.report) and a nested child run per trial tagged with sweep, cell, seed and trial number.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pha_lab import tracking
from pha_lab.config import load_config, to_yaml
from pha_lab.sweep.report import finish, parent_run, progress
from pha_lab.sweep.spec import SweepSpec, load_sweep, suggest
from pha_lab.sweep.study import (  # (callers import the study's names from here too: `x as x` re-exports)
    Heartbeat,
    claim_waiting as claim_waiting,
    create_study_once,
    default_storage,
    enqueue_grid,
    next_trial,
    open_study,
    tell,
    wait_for_creator,
    worker_seed,
)
from pha_lab.training import handoff


# --------------------------------------------------------------------------- running trials
def objective_value(client, run_id: str, metric: str, direction: str) -> float:
    """A test metric's final value, or the best value of a validation metric over the run."""
    history = [m.value for m in client.get_metric_history(run_id, metric)]
    if not history:
        raise RuntimeError(f"run {run_id} logged no '{metric}' (the sweep's objective.metric)")
    if metric.startswith("test/"):
        return history[-1]
    return min(history) if direction == "minimize" else max(history)


def trial_config(spec: SweepSpec, trial, extra: list[str], tracking_cfg: DictConfig, parent_id: str):
    cells = spec.cells()
    cell_key = trial.suggest_categorical("cell", list(cells))
    params = suggest(trial, spec)
    cfg = spec.cell_config(cells[cell_key], params, extra)
    cfg.tracking.runs_dir = tracking_cfg.runs_dir
    cfg.tracking.tracking_uri = tracking_cfg.tracking_uri
    cfg.tracking.experiment = spec.name
    cfg.tracking.run_name = f"{spec.name}:{cell_key}"
    cfg.tracking.tags = {
        **cfg.tracking.tags,
        "mlflow.parentRunId": parent_id,
        "sweep": spec.name,
        "cell": cell_key,
        "seed": str(cfg.seed),
        "trial_number": str(trial.number),
        **{f"search.{k}": str(v) for k, v in params.items()},
    }
    if spec.gpus_per_trial > 1:
        cfg.trainer.devices = spec.gpus_per_trial // cfg.trainer.num_nodes  # per node (num_nodes: the SLURM launcher)
    previous = trial.user_attrs.get("mlflow_run_id")
    if previous:  # a re-queued trial continues its own MLflow run
        cfg.resume = previous
        recorded = Path(trial.user_attrs.get("ckpt_dir", ""))
        if (recorded / "config.yaml").is_file():  # from its checkpoint: this machine's, or on a shared filesystem
            cfg.tracking.checkpoints_dir = str(recorded.parent)
        else:  # another machine's checkpoint, not visible here: from step 0, with the trial's config as the run's
            from pha_lab.training.run import checkpoint_dir

            saved = checkpoint_dir(cfg, previous) / "config.yaml"
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(to_yaml(cfg))
    return cell_key, cfg


def run_trial(
    spec: SweepSpec, study, storage, trial, extra: list[str], tracking_cfg: DictConfig, parent_id: str
) -> str:
    """Run one claimed trial to COMPLETE / PRUNED / FAIL; re-raise an interruption after re-queueing."""
    import optuna
    from optuna.trial import TrialState

    from pha_lab.training.callbacks import RunInterrupted
    from pha_lab.training.post_eval import post_evaluate
    from pha_lab.training.run import train

    client = tracking.client(tracking.tracking_uri(tracking_cfg))
    with Heartbeat(storage, trial._trial_id, spec.heartbeat_interval):
        try:
            cell_key, cfg = trial_config(spec, trial, extra, tracking_cfg, parent_id)
        except Exception as exc:
            trial.set_user_attr("failure_reason", f"{type(exc).__name__}: {exc}"[:2000])
            tell(study, trial, state=TrialState.FAIL)
            return "FAIL"
        callbacks = []
        if spec.pruning.enabled:
            from pha_lab.sweep.pruning import PruneAtStep

            callbacks.append(PruneAtStep(trial, monitor=spec.metric))

        def on_start(run_id: str, ckpt_dir: Path) -> None:
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("ckpt_dir", str(ckpt_dir))

        try:
            with handoff.trial_for_spawned_ranks(cfg, tracking_cfg, spec.name, trial.number):
                result = train(cfg, callbacks, on_start=on_start)
            post_evaluate(spec.post_eval, result.run_id, tracking_cfg)  # the sweep's `post_eval:` on the trained run
        except optuna.TrialPruned:
            tell(study, trial, state=TrialState.PRUNED)
            return "PRUNED"
        except RunInterrupted:
            if tell(study, trial, state=TrialState.FAIL):  # else another worker already re-queued it
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)(study, study.trials[trial.number])
            raise
        except Exception as exc:
            trial.set_user_attr("failure_reason", f"{type(exc).__name__}: {exc}"[:2000])
            tell(study, trial, state=TrialState.FAIL)
            print(
                f"[sweep {spec.name}] trial {trial.number} ({cell_key}) FAILED: {type(exc).__name__}: {exc}",
                file=sys.stderr,
            )
            return "FAIL"
        value = objective_value(client, result.run_id, spec.metric, spec.direction)
        tell(study, trial, value)
        return "COMPLETE"


def worker_loop(
    spec: SweepSpec,
    storage_url: str,
    extra: list[str],
    tracking_cfg: DictConfig,
    sampler_seed: int,
    should_stop=lambda: False,
) -> None:
    """Claim and run trials until the grid (or the search budget) is exhausted, or `should_stop()` (a
    launcher's hook: the SLURM worker's stop signal)."""
    study, storage = open_study(spec, storage_url, sampler_seed)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    print(f"[sweep {spec.name}] worker {socket.gethostname()}:{os.getpid()}, sampler seed {sampler_seed}", flush=True)
    while not should_stop() and (trial := next_trial(study, storage, spec)) is not None:
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("sampler_seed", sampler_seed)
        run_trial(spec, study, storage, trial, extra, tracking_cfg, parent_id)
        print(progress(study, spec), flush=True)


# --------------------------------------------------------------------------- entry points
def worker_groups(gpus_per_trial: int, workers: int | None) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker: one group of `gpus_per_trial` GPUs per worker; on CPU,
    `workers` processes (default 1) with no GPU. A single worker runs in-process ([None])."""
    import torch

    n = torch.cuda.device_count()
    if n:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = (visible.split(",") if visible else [str(i) for i in range(n)])[:n]
        groups = [
            ",".join(ids[i : i + gpus_per_trial]) for i in range(0, len(ids) - gpus_per_trial + 1, gpus_per_trial)
        ]
        if not groups:
            raise RuntimeError(f"gpus_per_trial={gpus_per_trial} but only {n} GPU(s) are visible")
    else:
        groups = [""] * (workers or 1)
    groups = groups[: workers or len(groups)]
    return groups if len(groups) > 1 else [None]


def prepare(
    name: str,
    extra: list[str] = (),
    storage: str | None = None,
    tracking_uri: str | None = None,
    runs_dir: str | None = None,
    retry_failed: bool = False,
):
    """Validate the sweep, open (or create) its study and MLflow parent run, queue the grid."""
    base = load_config(None, [o for o in extra if o.startswith("tracking.")])
    tracking_cfg = base.tracking
    if runs_dir:
        tracking_cfg.runs_dir = str(Path(runs_dir).resolve())
    if tracking_uri:
        tracking_cfg.tracking_uri = tracking_uri
    tracking_cfg.tracking_uri = tracking.tracking_uri(tracking_cfg)
    spec = load_sweep(name, list(extra))
    storage_url = storage or default_storage(tracking_cfg)
    created = create_study_once(spec, storage_url)
    study, storage = open_study(spec, storage_url)
    if not created:
        wait_for_creator(study)
    added = enqueue_grid(study, storage, spec, retry_failed)
    sweep_path = Path(name) if Path(name).is_file() else Path(__file__).resolve().parents[2] / "sweeps" / f"{name}.yaml"
    parent_id = parent_run(spec, tracking_cfg, sweep_path, study)
    tracking.client(tracking_cfg.tracking_uri).update_run(parent_id, status="RUNNING")
    print(
        f"[sweep {spec.name}] {len(spec.cells())} cells ({added} newly queued); study '{spec.name}' in {storage_url}; "
        f"MLflow experiment '{spec.name}' at {tracking_cfg.tracking_uri} (parent run {parent_id})",
        flush=True,
    )
    return spec, study, storage_url, tracking_cfg, parent_id


def join_ddp_trial() -> bool:
    """In a DDP rank > 0 that Lightning started by re-running the sweep command: train rank 0's trial
    (pha_lab.training.handoff) instead of starting a sweep."""
    cfg = handoff.spawned_trial()
    if cfg is None:
        return False
    from pha_lab.training.run import train

    train(cfg)
    return True


def run_sweep(
    name: str,
    extra: list[str] = (),
    storage: str | None = None,
    tracking_uri: str | None = None,
    runs_dir: str | None = None,
    retry_failed: bool = False,
    workers: int | None = None,
) -> Any:
    """Set up, run the workers, log the summary table to the parent run. Returns the summary."""
    if join_ddp_trial():
        return None
    spec, study, storage_url, tracking_cfg, parent_id = prepare(
        name, extra, storage, tracking_uri, runs_dir, retry_failed
    )
    print(progress(study, spec), flush=True)
    status = "FINISHED"
    try:
        groups = worker_groups(spec.gpus_per_trial, workers)
        n_trials = len(study.get_trials(deepcopy=False))
        seeds = [worker_seed(spec, index, n_trials) for index in range(len(groups))]
        if groups == [None]:
            worker_loop(spec, storage_url, list(extra), tracking_cfg, seeds[0])
        else:
            _run_worker_processes(spec, name, groups, seeds, storage_url, list(extra), tracking_cfg, study)
    except BaseException:
        status = "KILLED"
        print(f"[sweep {spec.name}] interrupted; run the same command again to resume", file=sys.stderr)
        raise
    finally:
        table = finish(spec, study, tracking_cfg, parent_id, status)
    return table


def _run_worker_processes(spec, name, groups, seeds, storage_url, extra, tracking_cfg: DictConfig, study) -> None:
    """One worker process per GPU group, pinned with CUDA_VISIBLE_DEVICES, each with its own sampler
    seed; logs under runs/sweeps/NAME/."""
    log_dir = tracking.runs_dir(tracking_cfg) / "sweeps" / spec.name
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for group, seed in zip(groups, seeds):
        cmd = [
            sys.executable,
            "-m",
            "pha_lab.sweep.runner",
            name,
            *extra,
            "--storage",
            storage_url,
            "--tracking-uri",
            tracking_cfg.tracking_uri,
            "--runs-dir",
            str(tracking.runs_dir(tracking_cfg)),
            "--sampler-seed",
            str(seed),
        ]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": group}
        label = f"gpu{group.replace(',', '_')}" if group else f"cpu{len(procs)}"
        log = open(log_dir / f"worker-{label}.log", "a")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        print(f"[sweep {spec.name}] worker {label}: log {log.name}", flush=True)
    try:
        last = time.monotonic()
        while any(p.poll() is None for p, _ in procs):
            time.sleep(1)
            if time.monotonic() - last > 30:
                print(progress(study, spec), flush=True)
                last = time.monotonic()
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.terminate()
        for p, log in procs:
            p.wait()
            log.close()
    failed = [(log.name, p.returncode) for p, log in procs if p.returncode not in (0, -signal.SIGTERM)]
    if failed:
        raise RuntimeError(f"sweep worker(s) failed: {', '.join(f'{n} (exit {rc})' for n, rc in failed)}")


def worker_main(argv: list[str] | None = None) -> int:
    """`python -m pha_lab.sweep.runner NAME ...`: one worker (spawned per GPU group by run_sweep)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--sampler-seed", type=int, required=True, help="this worker's worker_seed()")
    parser.add_argument("extra", nargs="*")
    args = parser.parse_args(argv)
    if join_ddp_trial():
        return 0
    base = load_config(None, [f"tracking.runs_dir={args.runs_dir}", f"tracking.tracking_uri={args.tracking_uri}"])
    worker_loop(load_sweep(args.name, args.extra), args.storage, args.extra, base.tracking, args.sampler_seed)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())

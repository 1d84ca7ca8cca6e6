"""How the processes of one DDP run find each other's MLflow run and trial: the whole hand-off protocol.

Rank 0 (global rank 0) alone opens, tags and terminates the MLflow run, calls a sweep's `on_start`, and
claims sweep trials. Every other rank trains the same config in the same run and writes nothing to MLflow.
What a rank > 0 must learn from rank 0 depends on who started it.

1. Ranks that Lightning's launcher starts (one machine, `trainer.devices > 1`, no srun). Lightning re-executes
   the entry command (`pha-lab train ...`, `pha-lab sweep ...`, `python -m pha_lab.sweep.runner ...`) in child
   processes with LOCAL_RANK=1.., each with a copy of rank 0's environment at `trainer.fit`. So:
   - PHA_RUN_ID (the MLflow run id): set by rank 0's `train()` once the run is open (`publish_run`); read by
     the child's `train()` (`joined_run_id`) in place of opening a run; restored to its previous value (unset)
     when rank 0's `train()` returns (`ddp_session`).
   - PHA_TRIAL_CONFIG (path of `<runs_dir>/sweeps/<sweep>/trial-<n>.yaml`): written and set by the sweep
     runner around each trial's `train()` (`trial_for_spawned_ranks`), cleared when it returns. The child,
     which re-ran the sweep command, reads it at the entry point (`spawned_trial`, called by
     `sweep.runner.join_ddp_trial`) and trains that trial instead of starting a sweep of its own.
   - MASTER_ADDR, MASTER_PORT, NODE_RANK, LOCAL_RANK, WORLD_SIZE (`LIGHTNING_ENV`): Lightning sets them in rank
     0's own process when it launches the children; `ddp_session` puts back what was there before and
     destroys the process group, so the next `train()` of a sweep worker starts its own launcher instead of
     mistaking these for an external one.
2. Ranks that srun starts (SLURM, `--ntasks-per-node` = devices: the SLURM launcher's multi-GPU trials, or
   `srun pha-lab train ... trainer.devices=N`): every rank runs the entry point itself, and Lightning's
   SLURMEnvironment makes them one DDP job (SLURM_PROCID = global rank; SLURM_LOCALID, SLURM_NODEID,
   SLURM_NTASKS). No environment reaches them from rank 0, so rank 0's `train()` also writes one message
   {"run_id", "config"} per run (`publish_run` -> `share`) to
   `<runs_dir>/ranks/<SLURM_JOB_ID>.<SLURM_STEP_ID>.<SLURM_RESTART_COUNT>/<n>.json`, and rank r > 0 reads
   message n (`receive`, waiting for it). `pha-lab train` on rank r > 0 takes its run id from it
   (`joined_run_id`). A sweep worker's rank > 0 must not claim trials: it follows rank 0 instead
   (`followed_runs`, called by sweep/slurm.py): it reads each message and trains its config with PHA_RUN_ID
   set to its run id, until rank 0's {"done": true} (`share_done`, when rank 0's worker runs out of trials).
   The runs dir is shared by the job's nodes anyway (checkpoints), a file needs no port, and a requeued job
   (new SLURM_RESTART_COUNT) never reads its previous life's messages. Clean-up: a run's message is removed
   by rank 0 when the run ends, if its DDP process group was formed (`ddp_session`: the group's rendezvous
   waits for every rank, and each rank read the message before it joined); otherwise (rank 0 failed before
   the fit) it stays, since a rank may still be about to read it. The last rank > 0 to read "done" removes
   the mailbox (rank 0 writes nothing after it). A task killed outright (SIGKILL) leaves its few kB behind.
   Lightning's SLURMEnvironment also sets MASTER_ADDR/MASTER_PORT in each task; `ddp_session` restores them.
3. Other launchers (torchrun, a second node started by hand) are refused by `joined_run_id`: their ranks > 0
   would otherwise open runs of their own.

Not hand-off: PHA_GIT_SHA / PHA_GIT_DIRTY (provenance of a tree without .git, `tracking.git_info`),
PHA_DATA_DIR and PHA_TOKENIZER_DIR (data roots): set by the user, read alike by every rank;
CUBLAS_WORKSPACE_CONFIG: set by each rank's own `train()` (`prepare_determinism`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pha_lab import tracking
from pha_lab.config import ConfigError, load_config, to_yaml

RUN_ID = "PHA_RUN_ID"
TRIAL_CONFIG = "PHA_TRIAL_CONFIG"
LIGHTNING_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")

_sent = 0  # srun messages written by this process (rank 0) / read by it (rank > 0), in order
_received = 0
_run_message: Path | None = None  # rank 0: the srun message of the run being trained, removed when it ends


# --------------------------------------------------------------------------- who am I
def srun_world() -> tuple[int, int] | None:
    """(global rank, number of tasks) when srun started this process as one of several tasks, else None.
    The test of Lightning's SLURMEnvironment: SLURM_NTASKS set, job name not bash/interactive."""
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if ntasks < 2 or "SLURM_PROCID" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    return int(os.environ["SLURM_PROCID"]), ntasks


def is_rank_zero() -> bool:
    """Global rank 0, known before Lightning sets anything up: RANK (torchrun), else SLURM_PROCID (srun),
    else node 0's LOCAL_RANK 0 (Lightning's launcher gives its children LOCAL_RANK >= 1)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    world = srun_world()
    if world is not None:
        return world[0] == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


# --------------------------------------------------------------------------- the run id
def joined_run_id(tracking_cfg: DictConfig) -> str:
    """Rank > 0: the MLflow run rank 0 opened (PHA_RUN_ID, else rank 0's next srun message)."""
    if os.environ.get(RUN_ID):
        return os.environ[RUN_ID]
    if srun_world() is not None:
        return receive(tracking_cfg)["run_id"]
    raise ConfigError(
        "this process is a DDP rank > 0 (RANK, NODE_RANK or LOCAL_RANK > 0) but no rank 0 handed it its "
        f"MLflow run (${RUN_ID} unset, not started by srun): start multi-device runs with "
        "trainer.devices=N on one machine, or with srun under SLURM (see pha_lab/training/handoff.py)"
    )


def publish_run(run_id: str, cfg: DictConfig) -> None:
    """Rank 0, once its run is open: for the ranks Lightning will start, and for srun's other tasks."""
    global _run_message
    os.environ[RUN_ID] = run_id
    if srun_world() is not None:
        _run_message = share(cfg.tracking, {"run_id": run_id, "config": to_yaml(cfg)})


@contextmanager
def ddp_session() -> Iterator[None]:
    """One run's footprint on this process, undone on exit: the hand-off and Lightning's DDP variables, the
    process group (the next run of a sweep worker starts a new one), rank 0's srun message once it was read."""
    import torch

    global _run_message
    before = {key: os.environ.get(key) for key in (*LIGHTNING_ENV, RUN_ID)}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if _run_message is not None:  # every rank joined the group, so every rank has read the message
                _run_message.unlink(missing_ok=True)
                _remove_if_empty(_run_message.parent)
            torch.distributed.destroy_process_group()
        _run_message = None
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------- sweep trials (Lightning's launcher)
@contextmanager
def trial_for_spawned_ranks(cfg: DictConfig, tracking_cfg: DictConfig, sweep: str, number: int) -> Iterator[Path]:
    """The trial's config on disk and in PHA_TRIAL_CONFIG while its `train()` runs (Lightning starts the
    ranks > 0 of a DDP trial by re-running the worker's command: they find their trial there)."""
    path = tracking.runs_dir(tracking_cfg) / "sweeps" / sweep / f"trial-{number}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg))
    os.environ[TRIAL_CONFIG] = str(path)
    try:
        yield path
    finally:
        os.environ.pop(TRIAL_CONFIG, None)


def spawned_trial() -> DictConfig | None:
    """In a rank > 0 that Lightning started by re-running a sweep command: rank 0's trial config, else None."""
    if is_rank_zero() or not os.environ.get(TRIAL_CONFIG):
        return None
    return OmegaConf.merge(load_config(None), OmegaConf.load(os.environ[TRIAL_CONFIG]))


# --------------------------------------------------------------------------- srun's ranks: messages from rank 0
def _mailbox(tracking_cfg: DictConfig) -> Path:
    key = ".".join(os.environ.get(k, "0") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"))
    return tracking.runs_dir(tracking_cfg) / "ranks" / key


def share(tracking_cfg: DictConfig, message: dict) -> Path:
    """Rank 0: publish the next message to the other tasks (written atomically); its path."""
    global _sent
    box = _mailbox(tracking_cfg)
    box.mkdir(parents=True, exist_ok=True)
    tmp, path = box / f".{_sent}.json.tmp", box / f"{_sent}.json"
    tmp.write_text(json.dumps(message))
    os.replace(tmp, path)
    _sent += 1
    return path


def receive(tracking_cfg: DictConfig, timeout_s: float = 7 * 24 * 3600, poll_s: float = 0.5) -> dict:
    """Rank > 0: wait for rank 0's next message (between a sweep's trials rank 0 only claims the next cell)."""
    global _received
    path = _mailbox(tracking_cfg) / f"{_received}.json"
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            rank = os.environ.get("SLURM_PROCID")
            raise TimeoutError(f"rank {rank}: no message {path} from rank 0 in {timeout_s:.0f} s")
        time.sleep(poll_s)
    _received += 1
    return json.loads(path.read_text())


def _remove_if_empty(box: Path) -> None:
    try:
        box.rmdir()  # (rank 0's next message creates it again)
    except OSError:  # a message a rank may still read
        pass


# --------------------------------------------------------------------------- a SLURM sweep worker's ranks > 0
def share_done(tracking_cfg: DictConfig) -> None:
    """Rank 0 of a multi-task sweep worker, out of trials: its other ranks stop following it."""
    if srun_world() is not None:
        share(tracking_cfg, {"done": True})


def followed_runs(tracking_cfg: DictConfig) -> Iterator[DictConfig]:
    """Rank > 0 of a multi-task sweep worker: the config of each run rank 0 shares, with PHA_RUN_ID set to its run
    while the caller trains it (its `train()` joins that run rather than reading another message), until rank
    0's done message. The last rank to read that one removes the mailbox: rank 0 writes nothing after it."""
    while not (message := receive(tracking_cfg)).get("done"):
        os.environ[RUN_ID] = message["run_id"]
        try:
            yield OmegaConf.merge(load_config(None), OmegaConf.create(message["config"]))
        finally:
            os.environ.pop(RUN_ID, None)
    rank, ntasks = srun_world()
    box = _mailbox(tracking_cfg)
    (box / f"done.{rank}").touch()
    if len(list(box.glob("done.*"))) >= ntasks - 1:  # (two ranks may both see it complete: either removes it)
        shutil.rmtree(box, ignore_errors=True)

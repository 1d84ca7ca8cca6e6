"""Ranks that srun started: rank 0 opens each run and shares it with the other ranks.

Under SLURM every task of a multi-GPU job runs the same entry point (Lightning's SLURMEnvironment
then makes them one DDP job), so the other ranks must learn which MLflow run, and in a sweep which
trial config, rank 0 is training. Rank 0 writes one small JSON message per run into
`<runs_dir>/ranks/<job>.<step>.<restart>/<n>.json` (atomically); rank r > 0 waits for message n.
The runs dir is shared between the job's nodes anyway (checkpoints), and a file needs no port.
Ranks started by Lightning's own launcher (one machine, `trainer.devices > 1`) get the run id
through the environment instead (`PHA_RUN_ID`, training/run.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pha_lab import tracking

_sent = 0  # messages written by this process (rank 0) / read by it (rank > 0), in order
_received = 0


def srun_world() -> tuple[int, int] | None:
    """(global rank, number of tasks) when srun started this process as one of several tasks, else None.
    Same test as Lightning's SLURMEnvironment (SLURM_NTASKS set, job name not bash/interactive)."""
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if ntasks < 2 or "SLURM_PROCID" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    return int(os.environ["SLURM_PROCID"]), ntasks


def _mailbox(tracking_cfg) -> Path:
    key = ".".join(os.environ.get(k, "0") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"))
    return tracking.runs_dir(tracking_cfg) / "ranks" / key


def share(tracking_cfg, message: dict) -> None:
    """Rank 0: publish the next message to the other ranks."""
    global _sent
    box = _mailbox(tracking_cfg)
    box.mkdir(parents=True, exist_ok=True)
    tmp = box / f".{_sent}.json.tmp"
    tmp.write_text(json.dumps(message))
    os.replace(tmp, box / f"{_sent}.json")
    _sent += 1


def receive(tracking_cfg, timeout_s: float = 7 * 24 * 3600, poll_s: float = 0.5) -> dict:
    """Rank > 0: wait for rank 0's next message (between trials rank 0 only claims the next cell)."""
    global _received
    path = _mailbox(tracking_cfg) / f"{_received}.json"
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {os.environ.get('SLURM_PROCID')}: no message {path} from rank 0 in {timeout_s:.0f} s")
        time.sleep(poll_s)
    _received += 1
    return json.loads(path.read_text())

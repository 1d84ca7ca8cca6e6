"""MLflow plumbing shared by training, sweeps, benchmarks and analysis.

Default store: `sqlite:///<runs_dir>/mlflow.db` (MLflow 3 refuses the old ./mlruns file store), with
artifacts under `<runs_dir>/artifacts`. Any MLflow tracking URI works too: for several machines an
`http://` tracking server (on a PostgreSQL backend store), through which artifacts are uploaded.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pha_lab.config import PROJECT_ROOT

if TYPE_CHECKING:
    from omegaconf import DictConfig

# The user's MLFLOW_TRACKING_URI, read once: mlflow.set_tracking_uri() (called by Lightning's logger)
# rewrites the variable in-process, which must not redirect this process's later runs.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy store, no server


def runs_dir(tracking_cfg: DictConfig) -> Path:
    path = Path(tracking_cfg.runs_dir)
    return (path if path.is_absolute() else Path.cwd() / path).resolve()


def tracking_uri(tracking_cfg: DictConfig) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else the project's SQLite database."""
    uri = tracking_cfg.tracking_uri or _USER_TRACKING_URI
    if uri:
        return uri
    root = runs_dir(tracking_cfg)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def client(uri: str):
    from mlflow.tracking import MlflowClient  # start-up time: importing mlflow takes ~3 s; light commands need none

    return MlflowClient(tracking_uri=uri)


# MLflow 3 experiments have a kind; the suite's are model training ("custom_model_development"; the other values
# are in mlflow/server/js's ExperimentKind). MLflow 3.17's UI shows the GenAI view unless the browser's workflow
# switch says "Model training" (`?workflowType=machine_learning`, remembered in localStorage): see UI_QUERY.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_QUERY = "?workflowType=machine_learning"  # append to an MLflow 3 UI address to open on the runs table


def ensure_experiment(mlflow_client, name: str, tracking_cfg: DictConfig) -> str:
    """Experiment id for `name`, created on first use with the model-training kind: once, also when several
    workers start together (a loser of the creation race reads the winner's); an existing experiment without
    a kind gets it, one with a kind keeps its own. A database URI (MLflow without a server) keeps artifacts
    under runs_dir; a tracking server places them itself (`--artifacts-destination`, proxied)."""
    from mlflow.exceptions import MlflowException

    scheme = mlflow_client.tracking_uri.split(":", 1)[0].split("+", 1)[0]
    location = (runs_dir(tracking_cfg) / "artifacts" / name).as_uri() if scheme in DATABASE_SCHEMES else None
    attempt = 0
    while True:
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is not None:
            if EXPERIMENT_KIND[0] not in exp.tags:
                try:
                    mlflow_client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
                except Exception:  # another worker set it at the same moment
                    if EXPERIMENT_KIND[0] not in mlflow_client.get_experiment(exp.experiment_id).tags:
                        raise
            return exp.experiment_id
        try:
            return mlflow_client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
        except MlflowException:  # another worker created it (or holds the database): read theirs
            attempt += 1
            if attempt > 5:
                raise
            time.sleep(0.5 * attempt)


def git_info(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """The commit (40 hex digits) and dirty flag of the code that runs.

    $PHA_GIT_SHA / $PHA_GIT_DIRTY first, when set: whoever copies a tree to another machine states what it is. (The
    GPU machine's copy of a checkout carries a .git frozen at the commit the session started from, with the later
    commits as uncommitted changes: git there reads an old commit and "dirty", which is how three H200 calls of
    2026-12-02 were first recorded; docs/benchmarks.md says which commits they ran.) Else from git when `root` is
    the top of a git checkout; else "unknown". Never "HEAD": `git rev-parse HEAD` prints that word, and fails,
    outside a repository."""
    sha = os.environ.get("PHA_GIT_SHA", "").strip().lower()
    if sha:
        if not re.fullmatch(r"[0-9a-f]{40}", sha):
            raise ValueError(
                f"PHA_GIT_SHA={sha!r} is not a full commit id; set it to the output of `git rev-parse HEAD`"
            )
        dirty = os.environ.get("PHA_GIT_DIRTY", "unknown").strip().lower()
        if dirty not in ("true", "false", "unknown"):
            raise ValueError(f"PHA_GIT_DIRTY={dirty!r}: use true, false or unknown")
        return {"git_sha": sha, "git_dirty": dirty}
    top = _git(root, "rev-parse", "--show-toplevel")
    sha = (
        _git(root, "rev-parse", "--verify", "HEAD^{commit}")
        if top and Path(top).resolve() == Path(root).resolve()
        else None
    )
    if sha is not None:
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        return {"git_sha": sha, "git_dirty": "unknown" if status is None else str(bool(status)).lower()}
    return {"git_sha": "unknown", "git_dirty": "unknown"}


def _git(root: Path, *args: str) -> str | None:
    """git's output in `root`, or None when git is missing or fails (its exit code counts, not its stdout)."""
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def command_line() -> str:
    """The exact command this process was started with, shell-quoted."""
    return shlex.join(sys.argv)


def environment_tags() -> dict[str, str]:
    """Code, command, host, versions and device: what a reader needs to reproduce or compare a number."""
    import lightning  # start-up time: ~5 s with torch; only a run being logged needs them
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        **git_info(),
        "command": command_line(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "gpu": gpu,
        "gpu_count": str(torch.cuda.device_count()),
        "cuda_driver": _driver_version(),
    }


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "none"
    except (OSError, subprocess.SubprocessError):
        return "none"

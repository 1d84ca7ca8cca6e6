"""MLflow plumbing shared by training, sweeps, benchmarks and analysis.

Default store: `sqlite:///<runs_dir>/mlflow.db` (MLflow 3 refuses the old ./mlruns file store), with
artifacts under `<runs_dir>/artifacts`. Any MLflow tracking URI works too: for several machines an
`http://` tracking server (on a PostgreSQL backend store), through which artifacts are uploaded.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from pathlib import Path

from pha_lab.config import PROJECT_ROOT

# The user's MLFLOW_TRACKING_URI, read once: mlflow.set_tracking_uri() (called by Lightning's logger)
# rewrites the variable in-process, which must not redirect this process's later runs.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy store, no server


def runs_dir(tracking_cfg) -> Path:
    path = Path(tracking_cfg.runs_dir)
    return (path if path.is_absolute() else Path.cwd() / path).resolve()


def tracking_uri(tracking_cfg) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else the project's SQLite database."""
    uri = tracking_cfg.tracking_uri or _USER_TRACKING_URI
    if uri:
        return uri
    root = runs_dir(tracking_cfg)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(mlflow_client, name: str, tracking_cfg) -> str:
    """Experiment id for `name`, created on first use: once, also when several workers start together
    (a loser of the creation race reads the winner's). A database URI (MLflow without a server) keeps
    artifacts under runs_dir; a tracking server places them itself (`--artifacts-destination`, proxied)."""
    from mlflow.exceptions import MlflowException

    scheme = mlflow_client.tracking_uri.split(":", 1)[0].split("+", 1)[0]
    location = (runs_dir(tracking_cfg) / "artifacts" / name).as_uri() if scheme in DATABASE_SCHEMES else None
    attempt = 0
    while True:
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return mlflow_client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another worker created it (or holds the database): read theirs
            attempt += 1
            if attempt > 5:
                raise
            time.sleep(0.5 * attempt)


def git_info() -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    sha = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": str(bool(dirty)).lower()}


def environment_tags() -> dict[str, str]:
    """Host, versions and device: what a reader needs to reproduce or compare a number."""
    import lightning
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        **git_info(),
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
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "none"
    except (OSError, subprocess.SubprocessError):
        return "none"

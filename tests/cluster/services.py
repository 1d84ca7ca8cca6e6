"""Throw-away cluster services for `make test-cluster`: PostgreSQL, an MLflow server on it, a one-node SLURM.

Each service lives in its own temporary folder, listens on 127.0.0.1 on a free port, is started by
a process this module holds, and is stopped (by that process id) and removed by `stop()`. A service
that cannot start raises `ServiceError` naming the step, the command and the tail of its log: the
tests fail with that message; they never skip.

Also usable by hand (`python tests/cluster/services.py`): starts all three, prints how to reach them,
and stops them on Enter.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DEBIAN_PACKAGES = {"postgresql": "/usr/lib/postgresql", "slurm-wlm": "/usr/sbin/slurmctld", "munge": "/usr/sbin/munged"}


class ServiceError(RuntimeError):
    """A cluster component could not be installed or started (the message says which and why)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {path})"


def _run(step: str, cmd: list[str], timeout: float = 120, **kw) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceError(f"{step}: `{' '.join(cmd)}` could not run: {exc}") from None
    if out.returncode != 0:
        raise ServiceError(
            f"{step}: `{' '.join(cmd)}` exited {out.returncode}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
        )
    return out.stdout


def _wait(step: str, ready, proc: subprocess.Popen | None, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(
                f"{step}: the process exited with {proc.returncode} before it was ready; log {log}:\n{_tail(log)}"
            )
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise ServiceError(f"{step}: not ready after {timeout:.0f} s; log {log}:\n{_tail(log)}")


def _stop(proc: subprocess.Popen | None, group: bool = False, timeout: float = 20) -> None:
    """SIGTERM the process we started (or, with `group`, its whole session), SIGKILL it if it does not exit in
    time, then SIGKILL whatever of its session is left (each service is started in a session of its own)."""
    if proc is None:
        return
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM) if group else proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def install_debian_packages() -> list[str]:
    """apt-get install what is missing (as root, like CI); returns the packages installed."""
    missing = [pkg for pkg, probe in DEBIAN_PACKAGES.items() if not Path(probe).exists()]
    if not missing:
        return []
    if os.geteuid() != 0:
        raise ServiceError(
            f"install: {', '.join(missing)} missing and not root: run `apt-get install -y {' '.join(missing)}`"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run("install (apt-get update)", ["apt-get", "update", "-q"], timeout=600, env=env)
    _run(
        f"install ({' '.join(missing)})",
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        timeout=900,
        env=env,
    )
    return missing


# --------------------------------------------------------------------------- PostgreSQL
class Postgres:
    """A PostgreSQL cluster made by initdb in a temp folder, owned by the `postgres` user (initdb refuses root),
    listening on 127.0.0.1:<free port> with trust authentication (a throw-away test database)."""

    def __init__(self, root: Path, databases: tuple[str, ...] = ("optuna", "mlflow")):
        self.root, self.databases = root / "postgres", databases
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "postgres.log"

    def _bin(self, name: str) -> str:
        found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
        if not found:
            raise ServiceError(
                f"postgres: no {name} under /usr/lib/postgresql/*/bin (is Debian's postgresql installed?)"
            )
        return str(found[-1])

    @property
    def _as_postgres(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> Postgres:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise ServiceError("postgres: no `postgres` user (it comes with Debian's postgresql package)") from None
        data, sock = self.root / "data", self.root / "socket"
        for d in (self.root, sock):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, user.pw_uid, user.pw_gid)
        as_postgres = self._as_postgres
        _run(
            "postgres (initdb)",
            [
                *as_postgres,
                self._bin("initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        self.log.touch()
        os.chown(self.log, user.pw_uid, user.pw_gid)
        # max_connections: every worker holds Optuna and MLflow-server connection pools
        self.proc = subprocess.Popen(
            [
                *as_postgres,
                self._bin("postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-k",
                str(sock),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
                "-c",
                "fsync=off",
            ],
            stdout=open(self.log, "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait("postgres (server start)", self._accepts, self.proc, self.log, 60)
        for db in self.databases:
            self.sql(f"CREATE DATABASE {db}")
        return self

    def _accepts(self) -> bool:
        import psycopg

        psycopg.connect(self.url("postgres"), connect_timeout=2).close()
        return True

    def sql(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(statement)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:  # "fast" shutdown: ends open client sessions too
            subprocess.run(
                [
                    *self._as_postgres,
                    self._bin("pg_ctl"),
                    "-D",
                    str(self.root / "data"),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "30",
                    "stop",
                ],
                capture_output=True,
                timeout=60,
            )
        _stop(self.proc)


# --------------------------------------------------------------------------- MLflow tracking server
class MlflowServer:
    """`mlflow server` on a PostgreSQL backend store, proxying artifacts to a local folder."""

    def __init__(self, root: Path, backend_uri: str):
        self.root, self.backend_uri = root / "mlflow", backend_uri
        self.port = free_port()
        self.artifacts = self.root / "artifacts"
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(mlflow),
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "2",
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            cmd, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        _wait(f"mlflow server (`{' '.join(cmd)}`)", self._healthy, self.proc, self.log, 120)
        return self

    def _healthy(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
            return r.status == 200

    def stop(self) -> None:
        _stop(self.proc, group=True)  # the server and its uvicorn workers


# --------------------------------------------------------------------------- SLURM (+ munge)
class Slurm:
    """A one-node SLURM cluster on this machine: munged with a generated key, slurmctld and slurmd in the
    foreground (held by this object), a generated slurm.conf with one CPU-only partition `cpu`,
    linuxproc process tracking and no task plugin (no cgroups needed). Clients need `env` (SLURM_CONF)."""

    def __init__(self, root: Path):
        self.root = root / "slurm"
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> Slurm:
        if os.geteuid() != 0:
            raise ServiceError(
                "slurm: slurmd must run as root here (it starts jobs as their user); run the tests as root"
            )
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(munge_dir, 0o755)
        key = munge_dir / "munge.key"
        _run("munge (mungekey)", ["mungekey", "--create", "--keyfile", str(key)])
        os.chmod(key, 0o400)
        log = munge_dir / "munged.log"
        self.procs["munged"] = subprocess.Popen(
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={log}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
            stdout=open(munge_dir / "munged.out", "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait(
            "munge (munged)",
            lambda: (
                subprocess.run(["munge", "-n", f"--socket={self.munge_socket}"], capture_output=True).returncode == 0
            ),
            self.procs["munged"],
            log,
            30,
        )

        node = _run("slurm (slurmd -C)", ["slurmd", "-C"]).splitlines()[0]  # NodeName=... CPUs=... RealMemory=...
        host = socket.gethostname()
        node = " ".join(w for w in node.split() if not w.startswith(("NodeName=", "UpTime=")))
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=phatest",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SchedulerType=sched/backfill",
                    "MpiDefault=none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    "KillWait=30",
                    "MinJobAge=900",
                    "InactiveLimit=0",
                    f"NodeName={host} NodeAddr=127.0.0.1 {node} State=UNKNOWN",
                    "PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        for daemon in ("slurmctld", "slurmd"):
            log = self.root / "log" / f"{daemon}.log"
            extra = ["-c"] if daemon == "slurmctld" else []  # -c: a fresh state (no jobs from a previous test)
            self.procs[daemon] = subprocess.Popen(
                [daemon, "-D", "-f", str(self.conf), *extra],
                env=self.env,
                stdout=open(self.root / "log" / f"{daemon}.out", "a"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait(
            "slurm (node idle in `sinfo`)", self._node_idle, self.procs["slurmd"], self.root / "log" / "slurmd.log", 90
        )
        if self.procs["slurmctld"].poll() is not None:
            raise ServiceError(f"slurm (slurmctld) exited; log:\n{_tail(self.root / 'log' / 'slurmctld.log')}")
        return self

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env, timeout=10)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def command(self, *args: str) -> str:
        return _run(f"slurm ({args[0]})", list(args), env=self.env, timeout=60)

    def stop(self) -> None:
        """Cancel every job of this cluster and let slurmstepd end their processes, then stop the daemons."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(
                ["scancel", "--full", "--user", pwd.getpwuid(os.getuid()).pw_name],
                env=self.env,
                capture_output=True,
                timeout=30,
            )
            deadline = time.monotonic() + 60  # > KillWait
            while (
                time.monotonic() < deadline
                and subprocess.run(
                    ["squeue", "-h"], capture_output=True, text=True, env=self.env, timeout=10
                ).stdout.strip()
            ):
                time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            _stop(self.procs.get(name))


class Cluster:
    """All three services in one temp folder; `stop()` stops each and removes the folder."""

    def __init__(self, slurm: bool = True):
        self.root = Path(tempfile.mkdtemp(prefix="pha-cluster-"))
        os.chmod(self.root, 0o755)  # the postgres user reaches its folder below it
        self.postgres = self.mlflow = self.slurm = None
        self.with_slurm = slurm
        self.timings: dict[str, float] = {}

    def start(self) -> Cluster:
        try:
            t = time.monotonic()
            installed = install_debian_packages()
            self.timings["apt-get install " + (" ".join(installed) or "(nothing missing)")] = time.monotonic() - t
            t = time.monotonic()
            self.postgres = Postgres(self.root).start()
            self.timings["postgres"] = time.monotonic() - t
            t = time.monotonic()
            self.mlflow = MlflowServer(self.root, self.postgres.url("mlflow")).start()
            self.timings["mlflow server"] = time.monotonic() - t
            if self.with_slurm:
                t = time.monotonic()
                self.slurm = Slurm(self.root).start()
                self.timings["munge + slurmctld + slurmd"] = time.monotonic() - t
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for service in (self.slurm, self.mlflow, self.postgres):
            if service is not None:
                try:
                    service.stop()
                except Exception as exc:  # stop the others all the same
                    print(f"[cluster] stopping {type(service).__name__} failed: {exc}", file=sys.stderr)
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    cluster = Cluster().start()
    print(
        f"postgres  {cluster.postgres.url('optuna')}\nmlflow    {cluster.mlflow.url}\n"
        f"slurm     SLURM_CONF={cluster.slurm.conf}\ntimings   {cluster.timings}"
    )
    try:
        input("Enter stops everything\n")
    finally:
        cluster.stop()

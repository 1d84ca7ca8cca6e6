"""Fixtures of the cluster tests: the services (started once, stopped and removed at the end, also when a
test fails) and worker processes (each its own process group, killed at the end if still alive)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from services import Cluster, ServiceError  # noqa: E402


@pytest.fixture(scope="session")
def cluster(request):
    """PostgreSQL + an MLflow server on it + a one-node SLURM; a component that cannot start fails the test."""
    report = request.config.pluginmanager.get_plugin("terminalreporter")
    try:
        services = Cluster().start()
    except ServiceError as exc:
        pytest.fail(f"cluster component could not start: {exc}", pytrace=False)
    request.addfinalizer(services.stop)
    if report is not None:  # shown even under output capture: what each component took to start
        with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
            report.write_line(
                "\n[cluster] started: " + ", ".join(f"{k} {v:.1f} s" for k, v in services.timings.items())
            )
    return services


class Processes:
    """Worker commands started as their own process groups ("machines"), logged to files, all killed at the end."""

    def __init__(self):
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append((proc, log))
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float) -> int:
        log = next(lg for p, lg in self.procs if p is proc)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            pytest.fail(
                f"`{' '.join(proc.args)}` still running after {timeout:.0f} s; end of {log}:\n{tail}", pytrace=False
            )

    def kill_all(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def processes():
    procs = Processes()
    yield procs
    procs.kill_all()


def wait_for(what: str, condition, timeout: float, interval: float = 0.5):
    """Poll `condition()` until it returns something truthy (returned); fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)

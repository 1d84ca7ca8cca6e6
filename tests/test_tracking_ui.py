"""The suite's MLflow experiments open on the runs table: the experiment kind tag, and (slow) a real
`mlflow ui` loaded in headless Chromium at the address the README gives.

The slow test needs Debian's chromium (`apt-get install -y chromium chromium-driver`); without it it fails
saying so. Run it with `make test-slow ARGS="-k mlflow_ui"`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from pha_lab import tracking

KIND, MODEL_TRAINING = tracking.EXPERIMENT_KIND


def suite_experiment(tmp_path: Path, name: str = "ui_check") -> tuple[str, str]:
    """(tracking URI, experiment id) of an experiment made as the suite makes them, holding one finished run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = tracking.ensure_experiment(client, name, SimpleNamespace(runs_dir=str(tmp_path)))
    run = client.create_run(exp_id, run_name="ui-check-run")
    client.log_metric(run.info.run_id, "val/loss", 1.5)
    client.set_terminated(run.info.run_id)
    return uri, exp_id


def test_suite_experiments_are_model_training(tmp_path):
    uri, exp_id = suite_experiment(tmp_path)
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_experiment(exp_id).tags[KIND] == MODEL_TRAINING == "custom_model_development"
    old = client.create_experiment("made_before", artifact_location=(tmp_path / "a").as_uri())  # no kind yet
    mine = client.create_experiment(
        "genai", artifact_location=(tmp_path / "b").as_uri(), tags={KIND: "genai_development"}
    )
    cfg = SimpleNamespace(runs_dir=str(tmp_path))
    assert tracking.ensure_experiment(client, "made_before", cfg) == old
    assert tracking.ensure_experiment(client, "genai", cfg) == mine
    assert client.get_experiment(old).tags[KIND] == MODEL_TRAINING  # an existing experiment gets the kind
    assert client.get_experiment(mine).tags[KIND] == "genai_development"  # a kind someone chose is kept


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_text(chromium: str, url: str) -> str:
    """The rendered page's text: headless Chromium, DOM dumped after a virtual-time budget."""
    out = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--virtual-time-budget=20000",
            "--window-size=1400,900",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", out.stdout, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@pytest.mark.slow
def test_mlflow_ui_opens_a_suite_experiment_on_the_runs_table(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail(
            "this check needs a headless browser: install Debian's chromium and chromium-driver "
            "(apt-get update && apt-get install -y chromium chromium-driver), then rerun"
        )
    uri, exp_id = suite_experiment(tmp_path)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [mlflow_cli, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"mlflow ui did not answer {base}/health within 60 s")
        text = page_text(chromium, f"{base}/#/experiments/{exp_id}{tracking.UI_QUERY}")
        assert f"Runs - Experiment {exp_id}" in text, text[:500]  # the runs tab, not the GenAI overview
        assert "Run Name" in text and "ui-check-run" in text, text[:500]  # the table, with the run in it
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started (its own session)
        server.wait(timeout=30)

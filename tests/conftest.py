"""Shared fixtures. Tests that need ../shared/data fail (not skip) with a clear message if it is missing."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolate_mlflow_env(monkeypatch):
    """mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into os.environ; keep tests (and the
    subprocesses they start) from inheriting another test's database."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

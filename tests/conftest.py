"""Shared fixtures. Tests that need ../shared/data fail (not skip) with a clear message if it is missing."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

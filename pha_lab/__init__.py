"""pha_lab: experiment suite for the Parallel Hybrid Architecture (arXiv 2606.16093)."""

from pathlib import Path

__version__ = "0.1.0"

# The source checkout (editable install): experiments/, sweeps/, bench/ and the default data root's parent.
PROJECT_ROOT = Path(__file__).resolve().parents[1]

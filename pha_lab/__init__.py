"""pha_lab: experiment suite for the Parallel Hybrid Architecture (arXiv 2606.16093)."""

__version__ = "0.1.0"

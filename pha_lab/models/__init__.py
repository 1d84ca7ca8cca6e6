"""The PHA model family and its baselines, all built from configuration by `build_model`."""

from pha_lab.models.lm import LanguageModel, build_model

__all__ = ["LanguageModel", "build_model"]

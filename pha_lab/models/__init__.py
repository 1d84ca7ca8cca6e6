"""The PHA model family and its baselines, all built from configuration by `build_model`.

A layer's branches come from `BRANCH_REGISTRY` (pha_lab.branches: how to add one), its mixer from
`MIXER_REGISTRY`; FLOPs from the one rule in `flops.flops_per_token`.
"""

from pha_lab.branches import BRANCH_REGISTRY, register_branch
from pha_lab.models.flops import flops_per_token
from pha_lab.models.lm import LanguageModel, build_model
from pha_lab.models.mixers import MIXER_REGISTRY

__all__ = ["BRANCH_REGISTRY", "MIXER_REGISTRY", "LanguageModel", "build_model", "flops_per_token", "register_branch"]

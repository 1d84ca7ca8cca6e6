"""Blocks: a layer is a layout plus a list of branches.

parallel (PHA):  h = norm(x);  x = x + mixer([branch_b(h) for b], h)
serial:          for b in branches: x = x + branch_b(norm_b(x))   (Transformer = [attn, ffn])

Both support branch knockout (`block.knockout = {"gss"}`: that branch's output is replaced by zeros,
at eval or anywhere) and record each branch's output RMS when `block.record_stats` is on. `decode` runs the same
layout with each branch's `prefill` or `step` on its state (pha_lab.models.decoding), so decoding and the forward
share one description of the layer.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from pha_lab.branches import BRANCH_REGISTRY
from pha_lab.models.mixers import MIXER_REGISTRY


def make_norm(kind: str, d_model: int) -> nn.Module:
    norm = nn.RMSNorm(d_model) if kind == "rmsnorm" else nn.LayerNorm(d_model, bias=False)
    norm.weight.no_weight_decay = True
    return norm


def make_branch(name: str, cfg: DictConfig, section: DictConfig | None = None) -> nn.Module:
    """The registered branch `name` (pha_lab.branches), built from `section` (a layer's own, see
    pha_lab.config.layer_specs), by default its section `cfg.<name>` of the model config."""
    if name not in BRANCH_REGISTRY:
        raise ValueError(f"unknown branch '{name}'; registered: {', '.join(BRANCH_REGISTRY)}")
    return BRANCH_REGISTRY[name].build(cfg, section)


class Block(nn.Module):
    def __init__(self, branches: list[str], cfg, sections: dict | None = None):
        super().__init__()
        self.names = list(branches)
        sections = sections or {}
        self.branches = nn.ModuleDict({b: make_branch(b, cfg, sections.get(b)) for b in self.names})
        self.knockout: set[str] = set()
        self.record_stats = False
        self.branch_rms: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, self._run)

    def decode(self, x: torch.Tensor, states: dict, mode: str) -> torch.Tensor:
        """The layer over new tokens x [B, T, D] with each branch's `mode` ("prefill" | "step") on its entry of
        `states` (branch name -> state, updated)."""

        def run(name: str, h: torch.Tensor) -> torch.Tensor:
            y, states[name] = getattr(self.branches[name], mode)(h, states[name])
            return self._post(name, y)

        return self.layer(x, run)

    def layer(self, x: torch.Tensor, run) -> torch.Tensor:
        """The layout: x -> x + ..., with run(name, h) giving branch `name`'s output on its input h."""
        raise NotImplementedError

    def _run(self, name: str, h: torch.Tensor) -> torch.Tensor:
        return self._post(name, self.branches[name](h))

    def _post(self, name: str, y: torch.Tensor) -> torch.Tensor:
        if name in self.knockout:
            y = torch.zeros_like(y)
        if self.record_stats:
            self.branch_rms[name] = y.detach().float().pow(2).mean().sqrt().item()
        return y

    def mixer_weights(self) -> torch.Tensor | None:
        return None


class ParallelBlock(Block):
    layout = "parallel"

    def __init__(self, branches: list[str], mixer: str, cfg, sections: dict | None = None):
        super().__init__(branches, cfg, sections)
        self.norm = make_norm(cfg.norm, cfg.d_model)
        self.mixer = MIXER_REGISTRY[mixer](len(self.names), cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def layer(self, x: torch.Tensor, run) -> torch.Tensor:
        h = self.norm(x)
        return x + self.drop(self.mixer([run(b, h) for b in self.names], h))

    def mixer_weights(self) -> torch.Tensor:
        return self.mixer.weights().detach().float().cpu()


class SerialBlock(Block):
    layout = "serial"

    def __init__(self, branches: list[str], cfg, sections: dict | None = None):
        super().__init__(branches, cfg, sections)
        self.norms = nn.ModuleDict({b: make_norm(cfg.norm, cfg.d_model) for b in self.names})
        self.drop = nn.Dropout(cfg.dropout)

    def layer(self, x: torch.Tensor, run) -> torch.Tensor:
        for b in self.names:
            x = x + self.drop(run(b, self.norms[b](x)))
        return x

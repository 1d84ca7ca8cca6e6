"""Mixers fuse the parallel branch outputs of one layer: `mixer(ys, h) -> [B, T, D]`.

Each mixer exposes `weights()`, a [k] tensor of its current per-branch weights, for logging:
static   softmax over per-layer logits, initialised uniform (the paper's "learnable static mixing")
scalar   free per-branch scalars, initialised 1/k
channel  per-branch RMSNorm, then per-branch per-channel weights (Hymba style), initialised equal and small
         (residual_init: the normalisation hides the branches' scaled init from the residual stream)
concat   Linear(k*D -> D) over the concatenated outputs (Falcon-H1 style); weights() = each block's
         share of the weight matrix's squared norm
gate     input-dependent softmax gate Linear(D -> k) on h, zero-initialised (uniform at start);
         weights() = mean gate over the tokens of the last forward (the "dynamic" ablation); the logged
         weights are its mean over the validation set's scored tokens (training.callbacks.MixerIntrospection)
mean     fixed 1/k, no parameters (the control)

No mixer parameter is weight-decayed: each is marked `no_weight_decay` (read by training.optim.param_groups).
"""

from __future__ import annotations

import torch
from torch import nn


class Mixer(nn.Module):
    def __init__(self, n_branches: int, d_model: int):
        super().__init__()
        self.k = n_branches

    def weights(self) -> torch.Tensor:
        raise NotImplementedError

    def residual_init(self, out_std: float) -> None:
        """Called by LanguageModel._init_weights with the std given to the branches' output projections. Mixers
        whose output scales with the branch outputs need nothing."""

    def token_weights(self) -> torch.Tensor | None:
        """[B, T, k] per-token weights of the last forward for an input-dependent mixer, else None."""
        return None


class StaticMixer(Mixer):
    def __init__(self, n_branches: int, d_model: int):
        super().__init__(n_branches, d_model)
        self.logits = nn.Parameter(torch.zeros(n_branches))
        self.logits.no_weight_decay = True

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)

    def forward(self, ys: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        w = self.weights().to(ys[0].dtype)
        return sum(w[i] * y for i, y in enumerate(ys))


class ScalarMixer(Mixer):
    def __init__(self, n_branches: int, d_model: int):
        super().__init__(n_branches, d_model)
        self.scales = nn.Parameter(torch.full((n_branches,), 1.0 / n_branches))
        self.scales.no_weight_decay = True

    def weights(self) -> torch.Tensor:
        return self.scales

    def forward(self, ys: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        w = self.scales.to(ys[0].dtype)
        return sum(w[i] * y for i, y in enumerate(ys))


class ChannelMixer(Mixer):
    def __init__(self, n_branches: int, d_model: int):
        super().__init__(n_branches, d_model)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, elementwise_affine=False) for _ in range(n_branches))
        self.scales = nn.Parameter(torch.full((n_branches, d_model), 1.0 / n_branches))
        self.scales.no_weight_decay = True

    def weights(self) -> torch.Tensor:
        return self.scales.mean(dim=1)

    def residual_init(self, out_std: float) -> None:
        """Each normalised branch output has RMS 1 whatever its projection's init, so at 1/k this mixer would add
        RMS ~1/sqrt(k) per layer (~50x the embedding's 0.02 after a few layers). Start its weights where a
        projection with the branches' scaled init, fan-in D, would put a unit-RMS input, averaged over the k
        branches like the other mixers: out_std * sqrt(D) / k."""
        with torch.no_grad():
            self.scales.fill_(out_std * self.scales.shape[1] ** 0.5 / self.k)

    def forward(self, ys: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        w = self.scales.to(ys[0].dtype)
        return sum(w[i] * norm(y) for i, (norm, y) in enumerate(zip(self.norms, ys)))


class ConcatMixer(Mixer):
    def __init__(self, n_branches: int, d_model: int):
        super().__init__(n_branches, d_model)
        self.proj = nn.Linear(n_branches * d_model, d_model, bias=False)
        with torch.no_grad():  # start as the mean of the branches plus a small perturbation
            eye = torch.eye(d_model) / n_branches
            self.proj.weight.copy_(
                torch.cat([eye] * n_branches, dim=1) + 0.02 / n_branches * torch.randn_like(self.proj.weight)
            )
        self.proj.weight.no_init = True  # keep this init when the model initialises its Linears
        self.proj.weight.no_weight_decay = True

    def weights(self) -> torch.Tensor:
        blocks = self.proj.weight.detach().float().chunk(self.k, dim=1)
        sq = torch.stack([b.pow(2).sum() for b in blocks])
        return sq / sq.sum()

    def forward(self, ys: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat(ys, dim=-1))


class GateMixer(Mixer):
    def __init__(self, n_branches: int, d_model: int):
        super().__init__(n_branches, d_model)
        self.gate = nn.Linear(d_model, n_branches, bias=False)
        nn.init.zeros_(self.gate.weight)
        self.gate.weight.no_init = True
        self.gate.weight.no_weight_decay = True
        self.last_gate: torch.Tensor | None = None  # [B, T, k] fp32 gates of the last forward (detached)

    def weights(self) -> torch.Tensor:
        if self.last_gate is None:
            return torch.full((self.k,), 1.0 / self.k)
        return self.last_gate.mean(dim=(0, 1))

    def token_weights(self) -> torch.Tensor | None:
        return self.last_gate

    def forward(self, ys: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        g = torch.softmax(self.gate(h).float(), dim=-1)  # [B, T, k]
        self.last_gate = g.detach()
        g = g.to(ys[0].dtype)
        return sum(g[..., i : i + 1] * y for i, y in enumerate(ys))


class MeanMixer(Mixer):
    def weights(self) -> torch.Tensor:
        return torch.full((self.k,), 1.0 / self.k)

    def forward(self, ys: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        return sum(ys) / self.k


MIXER_REGISTRY: dict[str, type[Mixer]] = {
    "static": StaticMixer,
    "scalar": ScalarMixer,
    "channel": ChannelMixer,
    "concat": ConcatMixer,
    "gate": GateMixer,
    "mean": MeanMixer,
}

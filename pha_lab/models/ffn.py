"""Position-wise feed-forward branch: GELU MLP or SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pha_lab.branches import FFNConfig
from pha_lab.config import round_to
from pha_lab.models.decoding import PositionState


class FFN(nn.Module):
    def __init__(self, d_model: int, kind: str = "gelu", expansion: float = 4.0, hidden: int | None = None):
        super().__init__()
        self.kind = kind
        if hidden is None:  # SwiGLU keeps the parameter count of a GELU MLP of the same expansion
            hidden = round_to(expansion * d_model * (2 / 3 if kind == "swiglu" else 1))
        self.W_in = nn.Linear(d_model, hidden * (2 if kind == "swiglu" else 1), bias=False)
        self.W_out = nn.Linear(hidden, d_model, bias=False)
        self.W_out.is_residual_out = True

    @classmethod
    def from_config(cls, cfg: FFNConfig, d_model: int) -> FFN:
        """cfg: a model.ffn section (pha_lab.branches.FFNConfig)."""
        return cls(d_model, cfg.kind, cfg.expansion, cfg.hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            gate, up = self.W_in(h).chunk(2, dim=-1)
            return self.W_out(F.silu(gate) * up)
        return self.W_out(F.gelu(self.W_in(h)))

    def init_state(self, batch: int, max_len: int, *, device=None, dtype=None) -> PositionState:
        """Decoding (pha_lab.models.decoding): position-wise, so only a position counter."""
        return PositionState()

    def prefill(self, h: torch.Tensor, state: PositionState) -> tuple[torch.Tensor, PositionState]:
        state.pos += h.shape[1]
        return self(h), state

    step = prefill

    def cache_bytes(self, batch: int, seq_len: int, dtype_bytes: int) -> int:
        """Position-wise: decoding keeps nothing between tokens."""
        return 0

"""Grouped-query causal self-attention with rotary position embeddings.

n_heads query heads share n_kv_heads key/value heads; the causal softmax attention is
`F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU) with `enable_gqa`,
so k/v are never materialised at n_heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_cos_sin(seq_len: int, head_dim: int, base: float, device, dtype,
                 offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim/2] of positions offset..offset+T-1 (decoding starts past 0), computed in fp32
    (fp64 for float64 reference checks); the same numbers for a position whatever the offset."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=work) / head_dim))
    angles = torch.outer(torch.arange(offset, offset + seq_len, device=device, dtype=work), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x_i, x_{i+hd/2}) by position-dependent angles.  x: [B, heads, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class GroupedQueryAttention(nn.Module):
    flops_part = "attention"  # its part of pha_lab.models.flops.flops_per_token

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, rope_base: float = 10000.0, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.rope_base = rope_base
        self.dropout = dropout
        self.W_q = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.W_kv = nn.Linear(d_model, 2 * n_kv_heads * self.head_dim, bias=False)
        self.W_o = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.W_o.is_residual_out = True

    @classmethod
    def from_config(cls, cfg, d_model: int) -> "GroupedQueryAttention":
        """cfg: a model.attn section (pha_lab.branches.AttnConfig)."""
        return cls(d_model, cfg.n_heads, cfg.n_kv_heads, cfg.rope_base, cfg.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q = self.W_q(h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.W_kv(h).view(b, t, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rope_cos_sin(t, self.head_dim, self.rope_base, h.device, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.W_o(y.transpose(1, 2).reshape(b, t, -1))

    def cache_bytes(self, batch: int, seq_len: int, dtype_bytes: int) -> int:
        """Bytes of the KV cache that decoding `batch` sequences at context `seq_len` holds: keys and values,
        n_kv_heads x head_dim each, for every position kept: all of them, or at most `window` where the module
        has a (not None) `window` attribute (sliding-window attention keeps a ring buffer)."""
        window = getattr(self, "window", None)
        kept = seq_len if window is None else min(seq_len, window)
        return 2 * batch * kept * self.n_kv_heads * self.head_dim * dtype_bytes

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs of QK^T and AV per token, counted over the full (unmasked) T x T square, as
        torch's FLOP counter does for SDPA; the projections are counted by parameters."""
        return 4.0 * seq_len * self.n_heads * self.head_dim

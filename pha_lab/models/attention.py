"""Grouped-query causal self-attention with rotary position embeddings.

n_heads query heads share n_kv_heads key/value heads; the causal softmax attention is
`F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU) with `enable_gqa`,
so k/v are never materialised at n_heads. Decoding (pha_lab.models.decoding) keeps a KV cache of n_kv_heads
(`KVCache`), rotates the new tokens' q and k at their absolute positions and attends over the cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pha_lab.branches import AttnConfig


def rope_cos_sin(
    seq_len: int, head_dim: int, base: float, device, dtype, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim/2] for positions offset..offset+T-1, computed in fp32 (fp64 for float64 reference
    checks); a position's row is the same whatever the offset (decoding rotates one token at its position)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=work) / head_dim))
    angles = torch.outer(torch.arange(offset, offset + seq_len, device=device, dtype=work), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x_i, x_{i+hd/2}) by position-dependent angles.  x: [B, heads, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# Positions whose RoPE tables every attention module keeps as fp32 buffers (2 x 4 x head_dim/2 bytes each: 1 MB per
# layer at head_dim 64). Why tables rather than computing them per forward: under torch.compile Inductor inlines a
# computed [T, hd/2] table into the kernels that rotate q and k, recomputing pow, sin and cos for every element of
# [B, heads, T, hd], forward and backward (measured on an H200: ~2.5 of a 15.2 ms mini_transformer step;
# docs/perf-notes.md, RoPE tables). Longer sequences, and float64 reference runs, compute the tables in the forward.
ROPE_TABLE_POSITIONS = 8192


@dataclass
class KVCache:
    """Decoding state of one attention layer: keys and values [B, n_kv_heads, max_len, head_dim] (rotated keys),
    filled up to `pos`."""

    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


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
        cos, sin = rope_cos_sin(ROPE_TABLE_POSITIONS, self.head_dim, rope_base, None, torch.float32)
        self.register_buffer("rope_cos", cos, persistent=False)  # not in checkpoints: a function of the config
        self.register_buffer("rope_sin", sin, persistent=False)

    def rope_tables(self, t: int, dtype: torch.dtype, device, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [t, hd/2] of positions offset..offset+t-1 in `dtype`: slices of the fp32 buffers, or computed where
        they fall short (beyond ROPE_TABLE_POSITIONS, or float64, whose reference checks need float64 angles)."""
        if offset + t <= self.rope_cos.shape[0] and dtype != torch.float64:
            return self.rope_cos[offset : offset + t].to(dtype), self.rope_sin[offset : offset + t].to(dtype)
        return rope_cos_sin(t, self.head_dim, self.rope_base, device, dtype, offset=offset)

    @classmethod
    def from_config(cls, cfg: AttnConfig, d_model: int) -> GroupedQueryAttention:
        """cfg: a model.attn section (pha_lab.branches.AttnConfig)."""
        return cls(d_model, cfg.n_heads, cfg.n_kv_heads, cfg.rope_base, cfg.dropout)

    def _qkv(self, h: torch.Tensor, pos: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, n_heads, T, hd], k and v [B, n_kv_heads, T, hd] of tokens at positions pos..pos+T-1 (q, k rotated)."""
        b, t, _ = h.shape
        q = self.W_q(h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.W_kv(h).view(b, t, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = self.rope_tables(t, q.dtype, h.device, offset=pos)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attend(self, q, k, v, causal: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, _, t, _ = q.shape
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.W_o(y.transpose(1, 2).reshape(b, t, -1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._attend(*self._qkv(h))

    # ---------------------------------------------------------------- decoding (pha_lab.models.decoding)
    def init_state(self, batch: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` tokens, in `dtype` (the activations')."""
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def prefill(self, h: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """T new tokens after the cache's `pos`: their keys and values go into the cache, each query attends to
        the cached prefix and the new tokens up to itself. From an empty cache this is the forward's computation."""
        p, t = state.pos, h.shape[1]
        if p + t > state.max_len:
            raise ValueError(
                f"attention KV cache full: {p} cached + {t} new tokens > max_len={state.max_len}; "
                f"pass a larger max_len to init_state"
            )
        q, k, v = self._qkv(h, p)
        state.k[:, :, p : p + t] = k
        state.v[:, :, p : p + t] = v
        state.pos = p + t
        if p == 0:  # nothing cached before: the forward's own causal attention on the fresh k, v
            return self._attend(q, k, v), state
        keys, values = state.k[:, :, : p + t].to(q.dtype), state.v[:, :, : p + t].to(q.dtype)
        if t == 1:  # one query sees the whole prefix
            return self._attend(q, keys, values, causal=False), state
        # query i (position p + i) sees keys 0..p+i; is_causal would align the mask top-left instead
        mask = torch.arange(p + t, device=h.device)[None, :] <= p + torch.arange(t, device=h.device)[:, None]
        return self._attend(q, keys, values, causal=False, mask=mask), state

    def step(self, h: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One token: its key and value appended at `pos`, its query over the cache."""
        return self.prefill(h, state)

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

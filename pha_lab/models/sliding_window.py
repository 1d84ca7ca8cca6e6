"""Sliding-window causal attention (the `swa` branch): grouped-query attention with RoPE in which the query at
position i sees keys j with i - window < j <= i, itself and the window - 1 positions before it.

Why a branch of its own: its KV cache is bounded by the window (a ring buffer of `window` slots), so a model with
it in most layers decodes at any context with a constant cache, as Mistral, Gemma 2, Samba and Hymba do.

Forward paths (the same function; tests/test_sliding_window.py checks each against a float64 loop):
- window >= T: the band is the causal triangle, so plain causal SDPA (flash on GPU);
- CUDA: torch.nn.attention.flex_attention with a sliding-window block mask (built once per (window, T, device) and
  cached), compiled as the flex docs ask (inside an already compiled model the plain function is traced instead);
  only the blocks that touch the band are computed, so the work is ~T x window, not T x T;
- CPU, or with attention dropout: SDPA with an explicit banded causal mask [T, T] (flex has no dropout).
`impl` ("auto", "flex", "sdpa") forces a path (the tests run each).

Decoding (the per-branch contract of pha_lab.models.decoding): `init_state(batch, max_len, device=, dtype=)` makes a
ring of min(window, max_len) slots of keys and values (RoPE already applied), position p kept in slot p % slots;
`prefill(h, state)` runs the parallel forward over h (from the state's position) and leaves its last keys in the
ring; `step(h, state)` writes one position's key and value, then attends over the ring. `cache_bytes` (inherited)
counts min(window, T) positions.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pha_lab.branches import SlidingWindowConfig
from pha_lab.models.attention import GroupedQueryAttention

IMPLS = ("auto", "flex", "sdpa")


def band_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Boolean [Tq, Tk], True where the query at position q_pos[i] may see the key at k_pos[j]: k <= q < k + window.
    A negative key position marks an empty ring slot (never seen)."""
    diff = q_pos[:, None] - k_pos[None, :]
    return (diff >= 0) & (diff < window) & (k_pos[None, :] >= 0)


_BLOCK_MASKS: dict[tuple[int, int, torch.device], object] = {}


def sliding_block_mask(window: int, seq_len: int, device: torch.device):
    """flex_attention's BlockMask of the sliding-window causal band, cached per (window, T, device). Inside
    torch.compile a cached mask is read as a graph input; a missing one is built outside the graph (one graph break,
    then dynamo recompiles with the mask cached)."""
    mask = _BLOCK_MASKS.get((window, seq_len, device))
    return mask if mask is not None else _build_block_mask(window, seq_len, device)


@functools.cache
def band_mod(window: int):
    """The band as a flex mask_mod, one function object per window: the compiled flex_attention guards on it, so a
    new length with the same window needs no new one."""

    def in_band(b, h, q, kv):
        return (q >= kv) & (q - kv < window)

    return in_band


@torch.compiler.disable
def _build_block_mask(window: int, seq_len: int, device: torch.device):
    """Built eagerly on the CPU; on a GPU by the compiled create_block_mask (as torch recommends: eager, it evaluates
    the band over the whole T x T grid with int64 differences, ~9 GB at 32k), eagerly if that compile fails."""
    from torch.nn.attention.flex_attention import create_block_mask

    build = create_block_mask
    if device.type == "cuda":
        build = _compiled_create_block_mask()
    args = (band_mod(window), None, None, seq_len, seq_len)
    try:
        mask = build(*args, device=device)
    except Exception as exc:  # a correct mask either way; the eager one costs memory once per length
        if build is create_block_mask:
            raise
        warnings.warn(
            f"compiled create_block_mask failed ({type(exc).__name__}: {str(exc)[:200]}); building the "
            f"sliding-window mask eagerly (T x T int64 temporaries)",
            stacklevel=2,
        )
        mask = create_block_mask(*args, device=device)
    if len(_BLOCK_MASKS) >= 64:  # lengths seen by a bench or an evaluation sweep; a few MB each at most
        _BLOCK_MASKS.clear()
    _BLOCK_MASKS[window, seq_len, device] = mask
    return mask


@functools.cache
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


@functools.cache
def _compiled_flex():
    """flex_attention compiled (its fused kernel; eager it materialises the scores), shapes dynamic after the second
    length seen (torch.compile's default), so a sweep of lengths does not run into the recompile limit."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex(q, k, v, block_mask, enable_gqa: bool):
    """flex_attention, compiled on a GPU unless already inside a compiled graph (which traces it itself); eager on
    the CPU (the tests: unfused, forward only)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention if torch.compiler.is_compiling() or q.device.type != "cuda" else _compiled_flex()
    return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


@dataclass
class RingKV:
    """Decoding state of one sliding-window layer: keys and values [B, n_kv_heads, slots, head_dim] (RoPE applied),
    position p in slot p % slots, and `pos`, the number of positions seen (the next token's absolute position)."""

    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def slot_positions(self) -> torch.Tensor:
        """The absolute position each slot holds (negative: not written yet)."""
        s = torch.arange(self.slots, device=self.k.device)
        return self.pos - 1 - torch.remainder(self.pos - 1 - s, self.slots)


class SlidingWindowAttention(GroupedQueryAttention):
    flops_part = "attention"

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int, window: int, rope_base: float = 10000.0, dropout: float = 0.0
    ):
        super().__init__(d_model, n_heads, n_kv_heads, rope_base, dropout)
        if window < 1:
            raise ValueError(f"window={window} must be >= 1")
        self.window = window  # also what GroupedQueryAttention.cache_bytes bounds the cache by
        self.impl = "auto"

    @classmethod
    def from_config(cls, cfg: SlidingWindowConfig, d_model: int) -> SlidingWindowAttention:
        """cfg: a model.swa section (pha_lab.branches.SlidingWindowConfig)."""
        return cls(d_model, cfg.n_heads, cfg.n_kv_heads, cfg.window, cfg.rope_base, cfg.dropout)

    def extra_repr(self) -> str:
        return f"window={self.window}"

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        return self.W_o(y.transpose(1, 2).reshape(b, t, -1))

    def _window_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Sliding-window causal attention [B, H, T, hd] of a whole sequence from position 0 (paths: module
        docstring); q and k rotated by `_qkv` (GroupedQueryAttention's)."""
        if self.impl not in IMPLS:
            raise ValueError(f"impl={self.impl!r}: choose one of {', '.join(IMPLS)}")
        t, gqa = q.shape[2], self.n_kv_heads != self.n_heads
        dropout = self.dropout if self.training else 0.0
        if self.impl == "auto" and self.window >= t:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=gqa)
        if self.impl == "flex" or (self.impl == "auto" and q.device.type == "cuda" and dropout == 0.0):
            if dropout:
                raise ValueError("impl='flex' has no attention dropout: use impl='sdpa' or dropout=0")
            return flex(q, k, v, sliding_block_mask(self.window, t, q.device), gqa)
        pos = torch.arange(t, device=q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=band_mask(pos, pos, self.window), dropout_p=dropout, enable_gqa=gqa
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._out(self._window_attend(*self._qkv(h)))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs of QK^T and AV per token over the window only: every query against min(window, T) keys (the
        attention branch's T x T square convention, cut to the band's width)."""
        return 4.0 * min(self.window, seq_len) * self.n_heads * self.head_dim

    # ---------------------------------------------------------------- decoding
    def init_state(self, batch: int, max_len: int, *, device=None, dtype=None) -> RingKV:
        """An empty ring of min(window, max_len) slots (a shorter decode never needs the whole window)."""
        device = device if device is not None else self.W_q.weight.device
        dtype = dtype if dtype is not None else self.W_q.weight.dtype
        shape = (batch, self.n_kv_heads, min(self.window, max_len), self.head_dim)
        return RingKV(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def _check_room(self, state: RingKV, t: int) -> None:
        if state.slots < self.window and state.pos + t > state.slots:
            raise ValueError(
                f"this sliding-window state has {state.slots} slots (init_state's max_len) and the window "
                f"is {self.window}: positions {state.pos}..{state.pos + t - 1} do not fit; make the "
                f"state with max_len >= {state.pos + t}"
            )

    def _write(self, state: RingKV, k: torch.Tensor, v: torch.Tensor) -> RingKV:
        """Keep the last min(T, slots) of the new keys/values in their slots; the state moves on by T positions (in
        place, as the decoding contract has it)."""
        t = k.shape[2]
        n = min(t, state.slots)
        slots = torch.remainder(torch.arange(state.pos + t - n, state.pos + t, device=k.device), state.slots)
        state.k.index_copy_(2, slots, k[:, :, t - n :].to(state.k.dtype))
        state.v.index_copy_(2, slots, v[:, :, t - n :].to(state.v.dtype))
        state.pos += t
        return state

    def prefill(self, h: torch.Tensor, state: RingKV) -> tuple[torch.Tensor, RingKV]:
        """The parallel forward over h [B, T, D] from the state's position, and the state after it. From position 0
        it is `forward`'s computation; later, the queries see the ring's keys and the new ones through one mask."""
        t = h.shape[1]
        self._check_room(state, t)
        q, k, v = self._qkv(h, state.pos)
        if state.pos == 0:
            y = self._window_attend(q, k, v)
        else:
            k_all = torch.cat([state.k.to(k.dtype), k], dim=2)
            v_all = torch.cat([state.v.to(v.dtype), v], dim=2)
            q_pos = torch.arange(state.pos, state.pos + t, device=h.device)
            mask = band_mask(q_pos, torch.cat([state.slot_positions(), q_pos]), self.window)
            y = F.scaled_dot_product_attention(
                q, k_all, v_all, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads
            )
        return self._out(y), self._write(state, k, v)

    def step(self, h: torch.Tensor, state: RingKV) -> tuple[torch.Tensor, RingKV]:
        """One position h [B, 1, D]: its key and value go into the ring first (overwriting the one that left the
        window), then the query attends over the ring (a mask only while the ring is not yet full)."""
        self._check_room(state, 1)
        q, k, v = self._qkv(h, state.pos)
        state = self._write(state, k, v)
        filled = state.pos >= state.slots
        mask = None if filled else (torch.arange(state.slots, device=h.device) < state.pos)[None]
        y = F.scaled_dot_product_attention(
            q, state.k.to(q.dtype), state.v.to(q.dtype), attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self._out(y), state

"""Gated State Space branch (Mehta et al. 2022, arXiv 2206.13947) with a DSS long convolution.

    u = GELU(W_u h)            width F = expansion * D   (the gate)
    v = GELU(W_v h)            width H = d_hidden        (reduced width, the DSS input)
    y = DSS(v)                 causal long convolution with K[l] = Re sum_n C~_n exp(lambda_n l), plus D * v
    out = W_o((W_g y) * u)

(Mehta et al.'s pseudo-code swaps the letters u and v; we follow the project's design notes.)

The kernel K is built once per forward, from modes lambda_n shared by the H channels and per-channel
coefficients C~_{h,n}, so it costs O(N * L) to build and O(H * L log L) to apply via an FFT
zero-padded to 2L (fp32 always: bf16 FFTs lose the long tail). Without the 2L padding the
convolution would be circular and leak the future.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from pha_lab.config import round_to


def fp32_region(device: torch.device):
    """Switch autocast off (FFTs and the kernel stay fp32) where it is on; a no-op elsewhere (e.g. meta)."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def dss_kernel(log_neg_re: torch.Tensor, im: torch.Tensor, c_re: torch.Tensor, c_im: torch.Tensor, length: int) -> torch.Tensor:
    """K[h, l] = Re sum_n C~[h, n] exp(lambda_n * l), lambda_n = -exp(log_neg_re_n) + i im_n.  -> [H, L]"""
    pos = torch.arange(length, device=im.device, dtype=im.dtype)
    decay = torch.exp(-torch.exp(log_neg_re)[:, None] * pos)  # [N, L]
    phase = im[:, None] * pos
    # Re(C (cos + i sin) decay) = (C_re cos - C_im sin) decay: two real [H,N]@[N,L] matmuls, no complex copies.
    return c_re @ (decay * torch.cos(phase)) - c_im @ (decay * torch.sin(phase))


def causal_fft_conv(v: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """y[b, t, h] = sum_{s<=t} K[h, t-s] v[b, s, h], computed in fp32 by FFT of size 2L.  v: [B, L, H]."""
    length = v.shape[1]
    n = 2 * length
    work = torch.promote_types(v.dtype, torch.float32)
    v_f = torch.fft.rfft(v.to(work).transpose(1, 2), n=n)  # [B, H, L+1]
    k_f = torch.fft.rfft(kernel.to(work), n=n)  # [H, L+1], once per forward
    y = torch.fft.irfft(v_f * k_f, n=n)[..., :length]
    return y.transpose(1, 2)


class DSS(nn.Module):
    """Diagonal state space layer (DSS-exp), H channels sharing N complex modes."""

    def __init__(self, d_hidden: int, n_modes: int, dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        # S4D-Lin style init: lambda_n = dt_n * (-1/2 + i pi n), dt_n log-uniform in [dt_min, dt_max].
        dt = torch.exp(torch.linspace(math.log(dt_min), math.log(dt_max), n_modes))
        self.log_neg_re = nn.Parameter(torch.log(0.5 * dt))  # Lambda (real part, kept negative)
        self.im = nn.Parameter(math.pi * torch.arange(n_modes) * dt)  # Lambda (imaginary part)
        scale = 1.0 / math.sqrt(2 * n_modes)
        self.c_re = nn.Parameter(torch.randn(d_hidden, n_modes) * scale)  # C~ (real)
        self.c_im = nn.Parameter(torch.randn(d_hidden, n_modes) * scale)  # C~ (imag)
        self.skip = nn.Parameter(torch.ones(d_hidden))  # D

    def kernel(self, length: int) -> torch.Tensor:
        work = torch.promote_types(self.im.dtype, torch.float32)
        params = (self.log_neg_re, self.im, self.c_re, self.c_im)
        with fp32_region(self.im.device):
            return dss_kernel(*(p.to(work) for p in params), length)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        with fp32_region(v.device):
            y = causal_fft_conv(v, self.kernel(v.shape[1])) + self.skip.to(torch.promote_types(v.dtype, torch.float32)) * v
        return y.to(v.dtype)


class GSS(nn.Module):
    def __init__(self, d_model: int, expansion: float, d_hidden: int, n_modes: int, dt_min: float, dt_max: float):
        super().__init__()
        d_gate = round_to(expansion * d_model)  # F
        self.W_u = nn.Linear(d_model, d_gate, bias=False)
        self.W_v = nn.Linear(d_model, d_hidden, bias=False)
        self.dss = DSS(d_hidden, n_modes, dt_min, dt_max)
        self.W_g = nn.Linear(d_hidden, d_gate, bias=False)
        self.W_o = nn.Linear(d_gate, d_model, bias=False)
        self.W_o.is_residual_out = True  # scaled init, see LanguageModel._init_weights

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = F.gelu(self.W_u(h))
        v = F.gelu(self.W_v(h))
        y = self.dss(v)
        return self.W_o(self.W_g(y) * u)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs of the long convolution per token (the matmuls are counted by parameters).

        Three real FFTs of size 2L (~2.5 * 2L log2(2L) flops each, amortised over L tokens) per channel,
        one complex product, and the kernel build (2 [H,N]@[N,L] matmuls, amortised over the batch's
        tokens, so left out here)."""
        h = self.dss.skip.numel()
        n = 2 * seq_len
        return h * (3 * 2.5 * n * math.log2(n) + 6 * n) / seq_len

"""The DSS long convolution (the GSS branch's y = K * v + D v) in each implementation the bench times side by
side. All compute the same function; tests check them against a float64 O(L^2) reference.

  fft_autograd  the model's path before the GSS rewrite (kept as the baseline to measure against): fp32 rfft/irfft of
                exactly 2L through autograd's own FFT backward, v cast and transposed, the skip D * v as three
                separate elementwise passes
  fft           the model's `conv_impl: fft` (pha_lab.models.gss.causal_fft_conv): D folded into K[:, 0], one
                cast+transpose+pad copy, FFT length fft_size(L), 1/n folded into the kernel's spectrum, a
                hand-written backward (one rfft, one product, one irfft per gradient)
  chunked       the model's `conv_impl: chunked` (pha_lab.models.gss.chunked_conv): the diagonal scan in chunks
                of Q positions, matmuls only
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pha_lab.models.gss import DSS, fft_size, fp32_region

VARIANTS = ("fft_autograd", "fft", "chunked")


def fft_autograd(v: torch.Tensor, dss: DSS) -> torch.Tensor:
    """The model path before the GSS rewrite, verbatim in effect: y = irfft(rfft(v, 2L) rfft(K, 2L))[:L] + D v."""
    length = v.shape[1]
    n = 2 * length
    work = torch.promote_types(v.dtype, torch.float32)
    v_f = torch.fft.rfft(v.to(work).transpose(1, 2), n=n)  # [B, H, L+1]
    k_f = torch.fft.rfft(dss.kernel(length).to(work), n=n)  # [H, L+1]
    y = torch.fft.irfft(v_f * k_f, n=n)[..., :length].transpose(1, 2)
    return (y + dss.skip.to(work) * v).to(v.dtype)


class DSSBench(nn.Module):
    """One DSS layer (a preset's H and N) running one variant; input v [B, L, H]."""

    def __init__(self, d_hidden: int, n_modes: int, variant: str, chunk: int = 128):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown DSS variant '{variant}'; choose from {', '.join(VARIANTS)}")
        impl = "chunked" if variant == "chunked" else "fft"
        self.dss, self.variant, self.chunk = DSS(d_hidden, n_modes, conv_impl=impl, chunk=chunk), variant, chunk

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.variant == "fft_autograd":
            with fp32_region(v.device):
                return fft_autograd(v, self.dss)
        return self.dss(v)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, as GSS.flops_per_token counts them for the same conv_impl (fft_autograd: n = 2L)."""
        h, n_modes = self.dss.skip.numel(), self.dss.im.numel()
        if self.variant == "chunked":
            q = min(self.chunk, seq_len)
            return h * (2 * q + 8 * n_modes + 8 * n_modes * math.ceil(seq_len / q) / q)
        m = 2 * seq_len if self.variant == "fft_autograd" else fft_size(seq_len)
        return h * (3 * 2.5 * m * math.log2(m) + 6 * m) / seq_len


def reference(v: torch.Tensor, dss: DSS) -> torch.Tensor:
    """O(L^2) float64 definition: y[t] = sum_{s<=t} K[t-s] v[s] + D v[t]."""
    length = v.shape[1]
    k = dss.kernel(length).double()  # [H, L]
    idx = torch.arange(length)
    diff = idx[:, None] - idx[None, :]
    toeplitz = torch.where(diff >= 0, k[:, diff.clamp(min=0)], torch.zeros((), dtype=torch.float64))  # [H, T, S]
    return torch.einsum("hts,bsh->bth", toeplitz, v.double()) + dss.skip.double() * v.double()

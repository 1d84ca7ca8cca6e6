"""Candidate implementations of the DSS long convolution (the GSS branch's y = K * v + D v), to time against
the model's own (pha_lab.models.gss) before changing it. All compute the same function; tests check them
against a float64 O(L^2) reference.

  fft           the model's path: causal_fft_conv (fp32 rfft/irfft over 2L) plus the skip D * v
  fft_skipfold  D folded into K[:, 0] (K * v + D v = (K + D delta) * v), so the skip's three elementwise
                passes (promote, multiply, add) disappear; v is cast, transposed and zero-padded in one copy
  chunked       no FFT: the diagonal SSM in chunks of Q tokens (the SSD / chunked-linear-attention form).
                Within a chunk y = T_h v with T_h the [Q, Q] lower-triangular Toeplitz matrix of K[h, :Q]
                (plus D on the diagonal); across chunks each channel carries N complex states
                S_c = sum_{s < cQ} exp(lambda (cQ - 1 - s)) v_s, which contribute Re sum_n C_n exp(lambda_n (i+1)) S_{c,n}
                to position i of chunk c. Everything is a matmul; the chunk-to-chunk recurrence is one
                lower-triangular [n_chunks, n_chunks] matmul per mode. Reads v and writes y once per pass
                instead of ~10 fp32 passes over [H, 2L].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pha_lab.models.gss import DSS, fp32_region

VARIANTS = ("fft", "fft_skipfold", "chunked")


def _modes(dss: DSS, work: torch.dtype):
    """(lambda [N], C~ [H, N], D [H]) of the layer's discretisation (any `model.gss.kernel`), in `work` precision."""
    m = dss.discretised()
    cdt = torch.complex128 if work == torch.float64 else torch.complex64
    return torch.complex(m.lam_re, m.lam_im).to(cdt), m.coef().to(cdt), dss.skip.to(work)


def fft_skipfold(v: torch.Tensor, dss: DSS) -> torch.Tensor:
    """The model's FFT path with D folded into the kernel's first tap and one copy into the padded buffer."""
    b, length, h = v.shape
    work = torch.promote_types(v.dtype, torch.float32)
    k = dss.kernel(length).to(work)
    k = torch.cat([k[:, :1] + dss.skip.to(work)[:, None], k[:, 1:]], dim=1)
    buf = v.new_zeros((b, h, 2 * length), dtype=work)
    buf[..., :length] = v.transpose(1, 2)  # cast + transpose + pad: one pass
    y = torch.fft.irfft(torch.fft.rfft(buf) * torch.fft.rfft(k, n=2 * length), n=2 * length)[..., :length]
    return y.transpose(1, 2).to(v.dtype)


def chunked(v: torch.Tensor, dss: DSS, chunk: int = 128) -> torch.Tensor:
    """The same convolution as a chunked diagonal SSM (see the module docstring). L must be a multiple of
    `chunk` (or shorter than it)."""
    b, length, h = v.shape
    q = min(chunk, length)
    if length % q:
        raise ValueError(f"chunked DSS needs the length ({length}) to be a multiple of the chunk ({q})")
    nc = length // q
    work = torch.promote_types(v.dtype, torch.float32)
    cdt = torch.complex128 if work == torch.float64 else torch.complex64
    lam, c, skip = _modes(dss, work)  # [N], [H, N], [H]
    pos = torch.arange(q, device=v.device, dtype=work)
    # intra-chunk: Toeplitz T[h, i, j] = K[h, i - j] (i >= j) + D_h [i == j]
    k = (c.unsqueeze(-1) * torch.exp(lam[:, None] * pos)).sum(1).real  # [H, Q] = K[:, :Q]
    diff = pos[:, None] - pos[None, :]
    toeplitz = torch.where(diff >= 0, k[:, diff.clamp(min=0).long()], torch.zeros((), dtype=work, device=v.device))
    toeplitz = toeplitz + torch.diag_embed(skip[:, None].expand(h, q))
    vc = v.to(work).view(b, nc, q, h)
    y = torch.einsum("hij,bcjh->bcih", toeplitz, vc)
    if nc > 1:
        # chunk-end states x_c[n] = sum_j exp(lambda_n (Q-1-j)) v[cQ + j]  (real and imaginary parts)
        w = torch.exp(lam[:, None] * (q - 1 - pos))  # [N, Q]
        x = torch.complex(torch.einsum("nj,bcjh->bchn", w.real, vc), torch.einsum("nj,bcjh->bchn", w.imag, vc))
        # states entering chunk c: S_c = sum_{c' < c} exp(lambda Q (c - 1 - c')) x_{c'}
        cpos = torch.arange(nc, device=v.device, dtype=work)
        gap = cpos[:, None] - 1 - cpos[None, :]  # [c, c']
        decay = torch.where(gap >= 0, torch.exp(lam[:, None, None] * q * gap.clamp(min=0)), torch.zeros((), dtype=cdt, device=v.device))
        s = torch.einsum("nce,behn->bchn", decay, x)  # [B, nc, H, N]
        g = c * s  # C_n S_n
        e = torch.exp(lam[None, :] * (pos[:, None] + 1))  # [Q, N]
        y = y + torch.einsum("in,bchn->bcih", e.real, g.real) - torch.einsum("in,bchn->bcih", e.imag, g.imag)
    return y.reshape(b, length, h).to(v.dtype)


class DSSBench(nn.Module):
    """One DSS layer (a preset's H and N) running one variant; input v [B, L, H]."""

    def __init__(self, d_hidden: int, n_modes: int, variant: str, chunk: int = 128):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown DSS variant '{variant}'; choose from {', '.join(VARIANTS)}")
        self.dss, self.variant, self.chunk = DSS(d_hidden, n_modes), variant, chunk

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        with fp32_region(v.device):
            if self.variant == "fft":
                return self.dss(v)
            if self.variant == "fft_skipfold":
                return fft_skipfold(v, self.dss)
            return chunked(v, self.dss, self.chunk)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: FFT variants as GSS.flops_per_token counts them; chunked: the Toeplitz
        matmul (2Q), chunk states (4N), state carry (8N nc / Q) and read-out (4N, after 6N for C S)."""
        h, n = self.dss.skip.numel(), self.dss.im.numel()
        if self.variant != "chunked":
            m = 2 * seq_len
            return h * (3 * 2.5 * m * math.log2(m) + 6 * m) / seq_len
        q = min(self.chunk, seq_len)
        nc = seq_len // q
        return h * (2 * q + 4 * n + 8 * n * nc / q + 10 * n)


def reference(v: torch.Tensor, dss: DSS) -> torch.Tensor:
    """O(L^2) float64 definition: y[t] = sum_{s<=t} K[t-s] v[s] + D v[t]."""
    length = v.shape[1]
    k = dss.kernel(length).double()  # [H, L]
    idx = torch.arange(length)
    diff = idx[:, None] - idx[None, :]
    toeplitz = torch.where(diff >= 0, k[:, diff.clamp(min=0)], torch.zeros((), dtype=torch.float64))  # [H, T, S]
    return torch.einsum("hts,bsh->bth", toeplitz, v.double()) + dss.skip.double() * v.double()

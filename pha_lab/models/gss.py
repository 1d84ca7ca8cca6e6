"""Gated State Space branch (Mehta et al. 2022, arXiv 2206.13947) with a DSS long convolution.

    u = GELU(W_u h)            width F = expansion * D   (the gate)
    v = GELU(W_v h)            width H = d_hidden        (reduced width, the DSS input)
    y = DSS(v)                 causal long convolution y = K * v with K[h, l] = Re sum_n C~[h, n] exp(lambda_n l), plus D * v
    out = W_o((W_g y) * u)

(Mehta et al.'s pseudo-code swaps the letters u and v; we follow the project's design notes.)

The kernel K (`model.gss.kernel`) is built once per forward from N modes lambda_n shared by the H channels and
per-channel coefficients C~[h, n], so it costs O(N * L) memory plus an [H, N] @ [N, L] product, and O(H * L log L)
to apply via an FFT zero-padded to 2L (fp32 always: bf16 FFTs lose the long tail). Without the 2L padding the
convolution would be circular and leak the future.

dss_exp (default): DSS-EXP (Gupta, Gu & Berant 2022, "Diagonal State Spaces are as Effective as Structured State
    Spaces", arXiv 2203.14343), the DSS variant GSS builds on:
        K[h, l] = Re sum_n W[h, n] * (exp(dt_n Lambda_n) - 1) / Lambda_n * exp(dt_n Lambda_n l),
    i.e. lambda_n = dt_n Lambda_n and C~ = W (exp(dt Lambda) - 1) / Lambda (zero-order hold: each mode's kernel
    sums over l to -W / Lambda, whatever its dt). Lambda_n = -exp(a_n) + i b_n, dt_n = exp(log_dt_n).
    Init as in the DSS reference implementation (github.com/ag1988/dss, src/models/sequence/ss/standalone/dss.py,
    DSSKernel with version="exp"; defaults in configs/model/layer/dss.yaml): Lambda = the N eigenvalues with
    positive imaginary part of the skew-symmetric part of the 2N x 2N HiPPO-LegS matrix, minus 1/2
    (Lambda_init="hippo_skew_pos_imag"); log dt uniform on [log dt_min, log dt_max], dt_min = 1e-3, dt_max = 1e-1;
    Re W, Im W ~ N(0, 1). Two deliberate differences: (1) dt is one per mode, shared by the H channels (the
    reference has one dt per channel, separate ones for the real and imaginary part, equal at init, which needs an [H, N, L]
    Vandermonde tensor: 4 GB per layer at H=256, N=64, L=32k); sharing the modes across channels is what GSS does
    (its pseudo-code builds one [N, L] Vandermonde matrix for all H channels and is the dt = 1 case of this
    formula, with Im Lambda = exp(.) and N = 512, H = 256, as reproduced in lucidrains/gated-state-spaces-pytorch,
    gss.py; the GSS authors' slides say a random init works well for language modelling); (2) the
    skip D starts at 1 (reference: N(0, 1)). The reference trains these parameters without weight decay, as does
    our optimiser (each DSS parameter is marked `no_weight_decay`), and with its own lr of 1e-3 (we use the model's lr).
s4d_lin_noscale: the kernel this project used first: K[h, l] = Re sum_n C[h, n] exp(lambda_n l) with the S4D-Lin
    init lambda_n = dt_n (-1/2 + i pi n) (Gu et al. 2022, arXiv 2206.11893), dt_n geometric over the modes on
    [dt_min, dt_max], C ~ N(0, 1/(2N)), and no discretisation factor (the DSS reference's "exp-no-scale").

Numerics: the angle Im(lambda_n) * l reaches ~4e6 rad at l = 65536 for the dss_exp init; formed in fp32 it is
off by up to half an ulp of that (at 32k: 0.1 rad for dss_exp, 0.03 rad for s4d_lin_noscale). So the modes are
discretised and the angle reduced mod 2 pi in float64 (O(N L) elementwise, cheap): the fp32 angle is within
3e-7 rad of float64 at any length (tests/test_models.py::test_mode_powers_phase_accuracy, 2.8e-7 at 65536);
the rest of the kernel and the FFTs run in fp32.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pha_lab.branches import DSS_KERNELS
from pha_lab.config import round_to


def fp32_region(device: torch.device):
    """Switch autocast off (FFTs and the kernel stay fp32) where it is on; a no-op elsewhere (e.g. meta)."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


@functools.lru_cache(maxsize=8)
def skew_hippo_eigenvalues(n_modes: int) -> torch.Tensor:
    """DSS's Lambda init [N] (complex128, CPU): the N eigenvalues with the largest imaginary part of the
    skew-symmetric part of the 2N x 2N HiPPO-LegS matrix (purely imaginary, in conjugate pairs), minus 1/2."""
    q = torch.sqrt(2 * torch.arange(2 * n_modes, dtype=torch.float64, device="cpu") + 1)
    legs = torch.tril(q[:, None] * q[None, :], diagonal=-1)  # HiPPO-LegS below the diagonal (sign irrelevant here)
    eig = torch.linalg.eigvals((legs - legs.T) / 2)
    top = eig[torch.argsort(eig.imag, descending=True)[:n_modes]]
    return torch.complex(torch.full_like(top.real, -0.5), top.imag)


class DiscreteDSS(NamedTuple):
    """A DSS layer in discrete time, per channel h and mode n (float64, see the module docstring):

        x_t[h, n] = exp(lambda_n) x_{t-1}[h, n] + v_t[h],    y_t[h] = Re sum_n coef[h, n] x_t[h, n]  (+ D v_t[h])

    whose impulse response is the kernel K[h, l] = Re sum_n coef[h, n] exp(lambda_n l)."""

    lam_re: torch.Tensor  # [N] log |per-step decay| (< 0)
    lam_im: torch.Tensor  # [N] per-step rotation (rad)
    coef_re: torch.Tensor  # [H, N]
    coef_im: torch.Tensor  # [H, N]

    def decay(self) -> torch.Tensor:
        """exp(lambda): each mode's complex per-step decay, [N]."""
        return torch.exp(torch.complex(self.lam_re, self.lam_im))

    def coef(self) -> torch.Tensor:
        return torch.complex(self.coef_re, self.coef_im)


def mode_powers(lam_re: torch.Tensor, lam_im: torch.Tensor, length: int, dtype: torch.dtype = torch.float32):
    """exp(lambda_n l) for l < length as (real, imag), each [N, L] in `dtype`. The exponent is formed in float64
    and the angle reduced mod 2 pi there, so only a value in [0, 2 pi) is rounded to fp32."""
    pos = torch.arange(length, device=lam_im.device, dtype=torch.float64)
    angle = torch.remainder(lam_im.double()[:, None] * pos, 2 * math.pi).to(dtype)
    magnitude = torch.exp((lam_re.double()[:, None] * pos).to(dtype))
    return magnitude * torch.cos(angle), magnitude * torch.sin(angle)


def dss_kernel(modes: DiscreteDSS, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """K[h, l] = Re sum_n coef[h, n] exp(lambda_n l)  -> [H, L] in `dtype`."""
    re, im = mode_powers(modes.lam_re, modes.lam_im, length, dtype)
    # Re(C (re + i im)) = C_re re - C_im im: two real [H,N]@[N,L] matmuls, no complex copies.
    return modes.coef_re.to(dtype) @ re - modes.coef_im.to(dtype) @ im


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
    """Diagonal state space layer: H channels sharing N complex modes, kernel `dss_exp` or `s4d_lin_noscale`."""

    def __init__(self, d_hidden: int, n_modes: int, dt_min: float = 1e-3, dt_max: float = 1e-1, kernel: str = "dss_exp"):
        super().__init__()
        if kernel not in DSS_KERNELS:
            raise ValueError(f"unknown DSS kernel '{kernel}'; choose one of: {', '.join(DSS_KERNELS)}")
        self.kind = kernel
        device = torch.get_default_device()  # the eigenvalues are computed on the CPU (also under a meta device)
        if kernel == "dss_exp":
            lam = skew_hippo_eigenvalues(n_modes).to(device)
            log_dt = math.log(dt_min) + torch.rand(n_modes) * (math.log(dt_max) - math.log(dt_min))
            self.log_dt = nn.Parameter(log_dt)  # dt (per mode)
            self.log_neg_re = nn.Parameter(torch.log(-lam.real).float())  # Lambda = -exp(log_neg_re) + i im
            self.im = nn.Parameter(lam.imag.float())
            self.w_re = nn.Parameter(torch.randn(d_hidden, n_modes))  # W (real)
            self.w_im = nn.Parameter(torch.randn(d_hidden, n_modes))  # W (imag)
        else:  # lambda_n = dt_n * (-1/2 + i pi n), dt_n geometric in [dt_min, dt_max]; no discretisation factor
            dt = torch.exp(torch.linspace(math.log(dt_min), math.log(dt_max), n_modes))
            self.log_neg_re = nn.Parameter(torch.log(0.5 * dt))  # lambda = -exp(log_neg_re) + i im
            self.im = nn.Parameter(math.pi * torch.arange(n_modes) * dt)
            scale = 1.0 / math.sqrt(2 * n_modes)
            self.c_re = nn.Parameter(torch.randn(d_hidden, n_modes) * scale)  # C~ (real)
            self.c_im = nn.Parameter(torch.randn(d_hidden, n_modes) * scale)  # C~ (imag)
        self.skip = nn.Parameter(torch.ones(d_hidden))  # D
        for p in self.parameters():  # as the DSS reference: the SSM's Lambda, dt, C~ and D are never decayed
            p.no_weight_decay = True

    def discretised(self) -> DiscreteDSS:
        """The per-mode discrete exponents lambda and per-channel coefficients, in float64 (shared by the
        convolution kernel and a step-by-step recurrence)."""
        if self.kind == "s4d_lin_noscale":
            return DiscreteDSS(-torch.exp(self.log_neg_re.double()), self.im.double(), self.c_re.double(), self.c_im.double())
        dt = torch.exp(self.log_dt.double())
        lam_re, lam_im = -torch.exp(self.log_neg_re.double()), self.im.double()  # continuous-time Lambda
        z_re, z_im = dt * lam_re, dt * lam_im  # dt Lambda
        # exp(z) - 1 without cancellation for small |z|: expm1(Re z) cos(Im z) - 2 sin^2(Im z / 2) + i exp(Re z) sin(Im z)
        e_re = torch.expm1(z_re) * torch.cos(z_im) - 2 * torch.sin(z_im / 2) ** 2
        e_im = torch.exp(z_re) * torch.sin(z_im)
        norm = lam_re**2 + lam_im**2  # > 0: Re Lambda < 0
        b_re, b_im = (e_re * lam_re + e_im * lam_im) / norm, (e_im * lam_re - e_re * lam_im) / norm  # (exp(z) - 1) / Lambda
        w_re, w_im = self.w_re.double(), self.w_im.double()
        return DiscreteDSS(z_re, z_im, w_re * b_re - w_im * b_im, w_re * b_im + w_im * b_re)

    def kernel(self, length: int) -> torch.Tensor:
        work = torch.promote_types(self.skip.dtype, torch.float32)
        with fp32_region(self.skip.device):
            return dss_kernel(self.discretised(), length, work)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        with fp32_region(v.device):
            y = causal_fft_conv(v, self.kernel(v.shape[1])) + self.skip.to(torch.promote_types(v.dtype, torch.float32)) * v
        return y.to(v.dtype)


class GSS(nn.Module):
    flops_part = "fft"  # its part of pha_lab.models.flops.flops_per_token: the long convolution

    def __init__(self, d_model: int, expansion: float, d_hidden: int, n_modes: int, dt_min: float, dt_max: float,
                 kernel: str = "dss_exp"):
        super().__init__()
        d_gate = round_to(expansion * d_model)  # F
        self.W_u = nn.Linear(d_model, d_gate, bias=False)
        self.W_v = nn.Linear(d_model, d_hidden, bias=False)
        self.dss = DSS(d_hidden, n_modes, dt_min, dt_max, kernel)
        self.W_g = nn.Linear(d_hidden, d_gate, bias=False)
        self.W_o = nn.Linear(d_gate, d_model, bias=False)
        self.W_o.is_residual_out = True  # scaled init, see LanguageModel._init_weights

    @classmethod
    def from_config(cls, cfg, d_model: int) -> "GSS":
        """cfg: a model.gss section (pha_lab.branches.GSSConfig)."""
        return cls(d_model, cfg.expansion, cfg.d_hidden, cfg.n_modes, cfg.dt_min, cfg.dt_max, cfg.kernel)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = F.gelu(self.W_u(h))
        v = F.gelu(self.W_v(h))
        y = self.dss(v)
        return self.W_o(self.W_g(y) * u)

    def cache_bytes(self, batch: int, seq_len: int, dtype_bytes: int) -> int:
        """Bytes of the recurrent state that decoding `batch` sequences holds, whatever the context `seq_len`: the
        DSS state x[h, n] (DiscreteDSS), H x N complex numbers, real and imaginary part each in fp32 at least (as
        the FFTs: `dtype_bytes` = 8, a float64 model, keeps float64). u, v and the skip need no history."""
        h, n = self.dss.skip.numel(), self.dss.im.numel()  # H channels, N modes
        return 2 * batch * h * n * max(4, dtype_bytes)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs of the long convolution per token (the matmuls are counted by parameters).

        Three real FFTs of size 2L (~2.5 * 2L log2(2L) flops each, amortised over L tokens) per channel,
        one complex product, and the kernel build (2 [H,N]@[N,L] matmuls, amortised over the batch's
        tokens, so left out here)."""
        h = self.dss.skip.numel()
        n = 2 * seq_len
        return h * (3 * 2.5 * n * math.log2(n) + 6 * n) / seq_len

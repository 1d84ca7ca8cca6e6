"""Gated State Space branch (Mehta et al. 2022, arXiv 2206.13947) with a DSS long convolution.

    u = GELU(W_u h)            width F = expansion * D   (the gate)
    v = GELU(W_v h)            width H = d_hidden        (reduced width, the DSS input)
    y = DSS(v)                 causal long convolution y = K * v with K[h, l] = Re sum_n C~[h, n] exp(lambda_n l),
                               plus D * v
    out = W_o((W_g y) * u)

(Mehta et al.'s pseudo-code swaps the letters u and v; we follow the project's design notes.)

The kernel K (`model.gss.kernel`) is built once per forward from N modes lambda_n shared by the H channels and
per-channel coefficients C~[h, n], so it costs O(N * L) memory plus an [H, N] @ [N, L] product; the skip D is
folded into its first tap. `model.gss.conv_impl` says how y = K * v is computed (the same function; tests check
both against a float64 O(L^2) convolution, gradients included):
    fft      (default) real FFTs zero-padded to fft_size(L) >= 2L (the smallest fast even length; without the
             padding the convolution would be circular and leak the future), with a hand-written backward
             (`_CausalFFTConv`, O(H * L log L), see docs/perf-notes.md for the passes it saves);
    chunked  the diagonal recurrence in chunks of `model.gss.chunk` positions, as matmuls (`chunked_conv`).
Both run in fp32 (bf16 FFTs lose the long tail) and only inside the convolution: v comes in and y goes out in
the activations' dtype (bf16 under autocast); the projections stay bf16.

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
    reference has one dt per channel, separate ones for the real and imaginary part, equal at init, which needs an
    [H, N, L] Vandermonde tensor: 4 GB per layer at H=256, N=64, L=32k); sharing the modes across channels is what
    GSS does (its pseudo-code builds one [N, L] Vandermonde matrix for all H channels and is the dt = 1 case of this
    formula, with Im Lambda = exp(.) and N = 512, H = 256, as reproduced in lucidrains/gated-state-spaces-pytorch,
    gss.py; the GSS authors' slides say a random init works well for language modelling); (2) the
    skip D starts at 1 (reference: N(0, 1)). The reference trains these parameters without weight decay, as does
    our optimiser (each DSS parameter is marked `no_weight_decay`), and with its own lr of 1e-3 (we use the model's lr).
s4d_lin_noscale: the kernel this project used first: K[h, l] = Re sum_n C[h, n] exp(lambda_n l) with the S4D-Lin
    init lambda_n = dt_n (-1/2 + i pi n) (Gu et al. 2022, arXiv 2206.11893), dt_n geometric over the modes on
    [dt_min, dt_max], C ~ N(0, 1/(2N)), and no discretisation factor (the DSS reference's "exp-no-scale").

Decoding (pha_lab.models.decoding) runs the same layer as the recurrence of DiscreteDSS on a complex state x[B, H, N]
(`DSSState`; complex64, complex128 for float64): a step is x = exp(lambda) x + v_t, y_t = Re sum_n coef x + D v_t;
a prefill of T tokens runs the forward's convolution (either conv_impl) and computes the state after them in
closed form, x_T = exp(lambda T) x_0 + sum_l exp(lambda (T - 1 - l)) v_l (two [N, T] @ [B, T, H] products of
mode_powers), adding the earlier state's readout Re sum_n coef exp(lambda (t + 1)) x_0 to its outputs.

(This file is over ~400 lines on purpose: the kernel, both convolutions and the recurrence are one layer's math.)

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
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pha_lab.branches import DSS_CONV_IMPLS, DSS_KERNELS, GSSConfig
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


def dss_kernel(
    modes: DiscreteDSS, length: int, dtype: torch.dtype = torch.float32, skip: torch.Tensor | None = None
) -> torch.Tensor:
    """K[h, l] = Re sum_n coef[h, n] exp(lambda_n l)  -> [H, L] in `dtype`; with `skip` [H], D is added to K[:, 0]
    (K * v + D v = (K + D delta) * v: the skip becomes part of the convolution instead of three passes over v)."""
    re, im = mode_powers(modes.lam_re, modes.lam_im, length, dtype)
    # Re(C (re + i im)) = C_re re - C_im im: two real [H,N]@[N,L] matmuls (the second accumulating), no complex copies.
    k = torch.addmm(modes.coef_re.to(dtype) @ re, modes.coef_im.to(dtype), im, alpha=-1)
    if skip is not None:
        k[:, 0] += skip.to(dtype)
    return k


def fft_size(length: int) -> int:
    """FFT length for a causal convolution over `length` positions: the smallest even n >= 2L whose prime factors
    are 2, 3, 5 and 7 (the radices cuFFT and pocketfft are fast at; even, so the real FFT runs as a half-length
    complex one). Any n >= 2L - 1 is causal: the linear convolution has 2L - 1 terms, none wraps into the first L."""
    n = 2 * max(length, 1)
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 2


def _padded(x: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, L, H] -> [B, H, n] in `dtype`, zero past L: cast, transpose and pad in one copy, so the FFT runs along a
    contiguous last dimension (an FFT along dim 1 of [B, L, H] makes cuFFT's batch non-collapsible: torch copies it)."""
    b, length, h = x.shape
    buf = x.new_empty((b, h, n), dtype=dtype)
    buf[..., :length].copy_(x.transpose(1, 2))
    buf[..., length:].zero_()
    return buf


def _unpadded(y: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, n] -> its first `length` positions as a contiguous [B, L, H] in `dtype` (one strided copy)."""
    return y[..., :length].transpose(1, 2).to(dtype, memory_format=torch.contiguous_format)


class _CausalFFTConv(torch.autograd.Function):
    """y = K * v by real FFTs of length n with a hand-written backward, which autograd's own FFT backward is not:
    it runs rfft's backward as a complex FFT of length n over a zero-filled copy and adds a doubling pass and two
    normalisation passes (torch scales cuFFT's output in a separate multiply). Here both directions are one
    rfft, one complex product and one irfft, the 1/n is folded into the kernel's spectrum (norm="forward"), and
    grad_K = the batch-summed correlation of v and grad_y (one [H, n] irfft). v: [B, L, H], any float dtype
    (cast inside); kernel: [H, L], fp32 or fp64 (the working precision); y in v's dtype."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, kernel: torch.Tensor, n: int) -> torch.Tensor:
        length = v.shape[1]
        k_f = torch.fft.rfft(kernel, n=n, norm="forward")  # [H, F] = FFT(K) / n, once per forward, shared by the batch
        v_f = torch.fft.rfft(_padded(v, n, kernel.dtype))  # [B, H, F]
        ctx.save_for_backward(v_f, k_f)
        ctx.shape = (length, n, v.dtype)
        return _unpadded(torch.fft.irfft(v_f * k_f, n=n, norm="forward"), length, v.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        v_f, k_f = ctx.saved_tensors
        length, n, dtype = ctx.shape
        g_f = torch.fft.rfft(_padded(grad_y, n, k_f.real.dtype))
        grad_v = grad_k = None
        if ctx.needs_input_grad[0]:  # correlation with K: grad_v[s] = sum_t grad_y[t] K[t - s]
            grad_v = _unpadded(torch.fft.irfft(g_f * k_f.conj(), n=n, norm="forward"), length, dtype)
        if ctx.needs_input_grad[1]:  # grad_K[l] = sum_b sum_t grad_y[b, t] v[b, t - l]
            grad_k = torch.fft.irfft((g_f * v_f.conj()).sum(0), n=n)[:, :length]
        return grad_v, grad_k, None


def causal_fft_conv(v: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """y[b, t, h] = sum_{s<=t} K[h, t-s] v[b, s, h], by FFTs of length fft_size(L) in fp32 (fp64 for fp64 inputs).
    v: [B, L, H]; kernel: [H, L]; y: [B, L, H] in v's dtype."""
    work = torch.promote_types(torch.promote_types(v.dtype, kernel.dtype), torch.float32)
    return _CausalFFTConv.apply(v, kernel.to(work), fft_size(v.shape[1]))


def chunked_conv(v: torch.Tensor, modes: DiscreteDSS, skip: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """The same y = K * v + D v as the diagonal SSM run in chunks of Q positions (the SSD / chunked linear
    attention form), matmuls only, no FFT. Within a chunk y = T_h v, T_h the [Q, Q] lower-triangular Toeplitz
    matrix of K[h, :Q] (D on its diagonal); across chunks each channel carries N complex states
    S_c = sum_{s < cQ} exp(lambda (cQ - 1 - s)) v_s, read out at position i of chunk c as
    Re sum_n coef_n exp(lambda_n (i + 1)) S_{c, n}; the carry is one lower-triangular [nc, nc] matmul per mode.
    The powers of exp(lambda) come from mode_powers (angles reduced in float64). Any L (zero-padded at the end to
    a multiple of Q, which no earlier position sees). v: [B, L, H]; y in v's dtype; working precision fp32
    (fp64 for fp64 inputs)."""
    b, length, h = v.shape
    q = min(chunk, length)
    work = torch.promote_types(v.dtype, torch.float32)
    x = v.to(work)
    if length % q:
        x = F.pad(x, (0, 0, 0, q - length % q))
    nc = x.shape[1] // q
    xc = x.view(b, nc, q, h)
    p_re, p_im = mode_powers(modes.lam_re, modes.lam_im, q + 1, work)  # exp(lambda l), l = 0..Q: [N, Q + 1]
    c_re, c_im = modes.coef_re.to(work), modes.coef_im.to(work)
    k = torch.addmm(c_re @ p_re[:, :q], c_im, p_im[:, :q], alpha=-1)  # K[:, :Q]
    k[:, 0] += skip.to(work)
    lag = torch.arange(q, device=v.device)
    lag = lag[:, None] - lag[None, :]
    toeplitz = torch.where(lag >= 0, k[:, lag.clamp(min=0)], torch.zeros((), dtype=work, device=v.device))
    y = torch.einsum("hij,bcjh->bcih", toeplitz, xc)
    if nc > 1:
        w_re, w_im = p_re[:, :q].flip(-1), p_im[:, :q].flip(-1)  # exp(lambda (Q - 1 - j))
        s_re = torch.einsum("nj,bcjh->bhnc", w_re, xc)  # chunk-end states
        s_im = torch.einsum("nj,bcjh->bhnc", w_im, xc)
        g_re, g_im = mode_powers(modes.lam_re * q, modes.lam_im * q, nc - 1, work)  # exp(lambda Q g), g < nc - 1
        gap = torch.arange(nc, device=v.device)
        gap = gap[:, None] - 1 - gap[None, :]  # c - 1 - c'
        zero = torch.zeros((), dtype=work, device=v.device)
        d_re = torch.where(gap >= 0, g_re[:, gap.clamp(min=0)], zero)  # [N, nc, nc], lower-triangular
        d_im = torch.where(gap >= 0, g_im[:, gap.clamp(min=0)], zero)
        # states entering chunk c: S_c = sum_{c' < c} exp(lambda Q (c - 1 - c')) s_c'  (complex, as real matmuls)
        big_re = torch.einsum("nce,bhne->bchn", d_re, s_re) - torch.einsum("nce,bhne->bchn", d_im, s_im)
        big_im = torch.einsum("nce,bhne->bchn", d_re, s_im) + torch.einsum("nce,bhne->bchn", d_im, s_re)
        r_re, r_im = c_re * big_re - c_im * big_im, c_re * big_im + c_im * big_re  # coef * S
        y = y + torch.einsum("ni,bchn->bcih", p_re[:, 1:], r_re) - torch.einsum("ni,bchn->bcih", p_im[:, 1:], r_im)
    return y.reshape(b, nc * q, h)[:, :length].to(v.dtype)


@dataclass
class DSSState:
    """Decoding state of one DSS layer: x [B, H, N] complex after `pos` tokens, and the per-step decay exp(lambda) [N]
    and coefficients coef [H, N] (complex, from DiscreteDSS: constants of the weights, computed once per state and
    not part of the cache)."""

    x: torch.Tensor
    decay: torch.Tensor
    coef: torch.Tensor
    pos: int = 0

    def cache_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.x,)


def state_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The complex dtype of a DSS state for activations of `dtype`: complex64 at least, as the FFTs are fp32."""
    return torch.complex128 if dtype == torch.float64 else torch.complex64


class DSS(nn.Module):
    """Diagonal state space layer: H channels sharing N complex modes, kernel `dss_exp` or `s4d_lin_noscale`."""

    def __init__(
        self,
        d_hidden: int,
        n_modes: int,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        kernel: str = "dss_exp",
        conv_impl: str = "fft",
        chunk: int = 128,
    ):
        super().__init__()
        if kernel not in DSS_KERNELS:
            raise ValueError(f"unknown DSS kernel '{kernel}'; choose one of: {', '.join(DSS_KERNELS)}")
        if conv_impl not in DSS_CONV_IMPLS:
            raise ValueError(f"unknown DSS conv_impl '{conv_impl}'; choose one of: {', '.join(DSS_CONV_IMPLS)}")
        self.kind, self.conv_impl, self.chunk = kernel, conv_impl, chunk
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
            return DiscreteDSS(
                -torch.exp(self.log_neg_re.double()), self.im.double(), self.c_re.double(), self.c_im.double()
            )
        dt = torch.exp(self.log_dt.double())
        lam_re, lam_im = -torch.exp(self.log_neg_re.double()), self.im.double()  # continuous-time Lambda
        z_re, z_im = dt * lam_re, dt * lam_im  # dt Lambda
        # exp(z) - 1 without cancellation for small |z|:
        # expm1(Re z) cos(Im z) - 2 sin^2(Im z / 2) + i exp(Re z) sin(Im z)
        e_re = torch.expm1(z_re) * torch.cos(z_im) - 2 * torch.sin(z_im / 2) ** 2
        e_im = torch.exp(z_re) * torch.sin(z_im)
        norm = lam_re**2 + lam_im**2  # > 0: Re Lambda < 0
        b_re, b_im = (
            (e_re * lam_re + e_im * lam_im) / norm,
            (e_im * lam_re - e_re * lam_im) / norm,
        )  # (exp(z) - 1) / Lambda
        w_re, w_im = self.w_re.double(), self.w_im.double()
        return DiscreteDSS(z_re, z_im, w_re * b_re - w_im * b_im, w_re * b_im + w_im * b_re)

    def kernel(self, length: int) -> torch.Tensor:
        work = torch.promote_types(self.skip.dtype, torch.float32)
        with fp32_region(self.skip.device):
            return dss_kernel(self.discretised(), length, work)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """y = K * v + D v in v's dtype (bf16 under autocast): fp32 only inside the convolution (`conv_impl`)."""
        with fp32_region(v.device):
            modes = self.discretised()
            if self.conv_impl == "chunked":
                return chunked_conv(v, modes, self.skip, self.chunk)
            work = torch.promote_types(self.skip.dtype, torch.float32)
            return causal_fft_conv(v, dss_kernel(modes, v.shape[1], work, skip=self.skip))

    # ---------------------------------------------------------------- decoding (see the module docstring)
    def init_state(self, batch: int, device=None, dtype=None) -> DSSState:
        cdtype = state_dtype(dtype)
        with torch.no_grad():
            modes = self.discretised()
            decay, coef = modes.decay().to(device, cdtype), modes.coef().to(device, cdtype)
        return DSSState(torch.zeros(batch, *coef.shape, device=device, dtype=cdtype), decay, coef)

    def prefill(self, v: torch.Tensor, state: DSSState) -> torch.Tensor:
        """y of T new tokens v [B, T, H] after the state's tokens; the state advanced to the last of them."""
        t = v.shape[1]
        y = self.forward(v)
        with fp32_region(v.device):
            work = state.x.real.dtype
            modes = self.discretised()
            p_re, p_im = mode_powers(modes.lam_re, modes.lam_im, t + 1, work)  # exp(lambda l), l = 0..T: [N, T + 1]
            x = v.to(work)
            w_re, w_im = p_re[:, :t].flip(-1), p_im[:, :t].flip(-1)  # exp(lambda (T - 1 - l))
            fresh = torch.complex(torch.einsum("nl,blh->bhn", w_re, x), torch.einsum("nl,blh->bhn", w_im, x))
            if state.pos:  # what the earlier tokens' state adds: to the outputs, and decayed T steps to the new state
                r = state.coef * state.x
                y = (
                    y.to(work)
                    + torch.einsum("bhn,nt->bth", r.real, p_re[:, 1:])
                    - torch.einsum("bhn,nt->bth", r.imag, p_im[:, 1:])
                ).to(v.dtype)
                fresh = fresh + torch.complex(p_re[:, t], p_im[:, t]) * state.x
        state.x, state.pos = fresh.to(state.x.dtype), state.pos + t
        return y

    def step(self, v: torch.Tensor, state: DSSState) -> torch.Tensor:
        """y of one token v [B, 1, H]: x = exp(lambda) x + v, y = Re sum_n coef x + D v."""
        with fp32_region(v.device):
            x = v[:, 0].to(state.x.real.dtype)
            state.x = state.decay * state.x + x[..., None]
            y = (state.coef * state.x).real.sum(-1) + self.skip.to(x.dtype) * x
        state.pos += 1
        return y[:, None].to(v.dtype)


class GSS(nn.Module):
    flops_part = "fft"  # its part of pha_lab.models.flops.flops_per_token: the long convolution

    def __init__(
        self,
        d_model: int,
        expansion: float,
        d_hidden: int,
        n_modes: int,
        dt_min: float,
        dt_max: float,
        kernel: str = "dss_exp",
        conv_impl: str = "fft",
        chunk: int = 128,
    ):
        super().__init__()
        d_gate = round_to(expansion * d_model)  # F
        self.W_u = nn.Linear(d_model, d_gate, bias=False)
        self.W_v = nn.Linear(d_model, d_hidden, bias=False)
        self.dss = DSS(d_hidden, n_modes, dt_min, dt_max, kernel, conv_impl, chunk)
        self.W_g = nn.Linear(d_hidden, d_gate, bias=False)
        self.W_o = nn.Linear(d_gate, d_model, bias=False)
        self.W_o.is_residual_out = True  # scaled init, see LanguageModel._init_weights

    @classmethod
    def from_config(cls, cfg: GSSConfig, d_model: int) -> GSS:
        """cfg: a model.gss section (pha_lab.branches.GSSConfig)."""
        return cls(
            d_model,
            cfg.expansion,
            cfg.d_hidden,
            cfg.n_modes,
            cfg.dt_min,
            cfg.dt_max,
            cfg.kernel,
            cfg.conv_impl,
            cfg.chunk,
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._gated(h, self.dss)

    def _gated(self, h: torch.Tensor, dss) -> torch.Tensor:
        u = F.gelu(self.W_u(h))
        v = F.gelu(self.W_v(h))
        y = dss(v)
        return self.W_o(self.W_g(y) * u)

    # ---------------------------------------------------------------- decoding (pha_lab.models.decoding)
    def init_state(self, batch: int, max_len: int, *, device=None, dtype=None) -> DSSState:
        """The DSS state of `batch` sequences (any length: it does not grow; `max_len` is not needed)."""
        return self.dss.init_state(batch, device, dtype)

    def prefill(self, h: torch.Tensor, state: DSSState) -> tuple[torch.Tensor, DSSState]:
        return self._gated(h, lambda v: self.dss.prefill(v, state)), state

    def step(self, h: torch.Tensor, state: DSSState) -> tuple[torch.Tensor, DSSState]:
        return self._gated(h, lambda v: self.dss.step(v, state)), state

    def cache_bytes(self, batch: int, seq_len: int, dtype_bytes: int) -> int:
        """Bytes of the recurrent state that decoding `batch` sequences holds, whatever the context `seq_len`: the
        DSS state x[h, n] (DiscreteDSS), H x N complex numbers, real and imaginary part each in fp32 at least (as
        the FFTs: `dtype_bytes` = 8, a float64 model, keeps float64). u, v and the skip need no history."""
        h, n = self.dss.skip.numel(), self.dss.im.numel()  # H channels, N modes
        return 2 * batch * h * n * max(4, dtype_bytes)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs of the long convolution per token (the matmuls are counted by parameters).

        fft: three real FFTs of length n = fft_size(L) (~2.5 n log2 n flops each, amortised over L tokens) per
        channel and one complex product; the kernel build (2 [H,N]@[N,L] matmuls, amortised over the batch's
        tokens) is left out. chunked: per channel, the Toeplitz matmul (2Q), chunk states (4N), the carry across
        chunks (8N nc / Q, nc = L / Q chunks) and the read-out (4N)."""
        h, n_modes = self.dss.skip.numel(), self.dss.im.numel()
        if self.dss.conv_impl == "chunked":
            q = min(self.dss.chunk, seq_len)
            nc = math.ceil(seq_len / q)
            return h * (2 * q + 8 * n_modes + 8 * n_modes * nc / q)
        n = fft_size(seq_len)
        return h * (3 * 2.5 * n * math.log2(n) + 6 * n) / seq_len

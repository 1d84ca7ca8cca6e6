"""Model family: causality, DSS and GQA against float64 references, mixers, knockout."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from bodies import FAMILIES, assert_causal, assert_causal_sequence_map, assert_knockout_zeroes, branches_of, model64

from pha_lab.branches import DSS_KERNELS
from pha_lab.config import MIXERS, ConfigError, load_config
from pha_lab.models import BRANCH_REGISTRY, build_model
from pha_lab.models.attention import GroupedQueryAttention, apply_rope, rope_cos_sin
from pha_lab.models.gss import DSS, GSS, causal_fft_conv, fft_size, mode_powers
from pha_lab.models.mixers import MIXER_REGISTRY

BRANCHES = ("gss", "attn", "ffn")  # tiny_pha's, every layer (the registry has more: swa, tests/test_sliding_window.py)


def test_registries_match_config_names():
    assert tuple(MIXER_REGISTRY) == MIXERS
    model = model64()
    assert set(model.blocks[0].branches) == set(BRANCHES) and set(BRANCHES) < set(BRANCH_REGISTRY)
    assert model.blocks[0].branches["gss"].dss.kind == "dss_exp"  # the default model.gss.kernel
    with pytest.raises(ValueError, match="choose one of: dss_exp, s4d_lin_noscale"):
        DSS(4, 4, kernel="dss")


def test_causal_every_family(family_preset):
    assert_causal(model64(family_preset))


@pytest.mark.parametrize("mixer", MIXERS)
def test_causal_every_mixer(mixer):
    assert_causal(model64("tiny_pha", f"model.mixer={mixer}"))


# ----------------------------------------------------------------------------- DSS / GSS
def reference_modes(dss: DSS):
    """(lambda [N], coef [H, N]) in complex128 straight from the papers' formulas, not through dss.discretised()."""
    p = {name: t.detach().double() for name, t in dss.named_parameters()}
    if dss.kind == "s4d_lin_noscale":  # K = Re sum C exp(lambda l)
        return torch.complex(-p["log_neg_re"].exp(), p["im"]), torch.complex(p["c_re"], p["c_im"])
    # DSS-EXP (Gupta et al. 2022): zero-order hold of x' = Lambda x + v with step dt, output Re(W x)
    lam = torch.complex(-p["log_neg_re"].exp(), p["im"])
    dt = p["log_dt"].exp()
    b_bar = (torch.exp(dt * lam) - 1) / lam
    return dt * lam, torch.complex(p["w_re"], p["w_im"]) * b_bar


def reference_kernel(dss: DSS, length: int) -> torch.Tensor:
    lam, coef = reference_modes(dss)
    powers = torch.exp(lam[:, None] * torch.arange(length, dtype=torch.float64))  # complex128, angle exact to ~1e-9
    return (coef @ powers).real


def naive_dss(dss: DSS, v: torch.Tensor) -> torch.Tensor:
    """Float64 recurrence x_t = exp(lambda) x_{t-1} + v_t, y_t = Re(coef x_t) + D v_t, per channel."""
    lam, coef = reference_modes(dss)
    b, length, h = v.shape
    state = torch.zeros(b, h, lam.numel(), dtype=torch.complex128)
    out = []
    for t in range(length):
        state = state * torch.exp(lam) + v[:, t, :, None].double()
        out.append((state * coef).sum(-1).real + dss.skip.detach().double() * v[:, t].double())
    return torch.stack(out, dim=1)


def naive_causal_conv(v: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """O(L^2) float64 causal convolution y[b, t, h] = sum_{s<=t} K[h, t-s] v[b, s, h], as a Toeplitz product."""
    length = v.shape[1]
    lag = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # t - s
    toeplitz = torch.where(lag >= 0, kernel[:, lag.clamp(min=0)], 0.0)  # [H, L(t), L(s)]
    return torch.einsum("hts,bsh->bth", toeplitz, v.double())


@pytest.mark.parametrize("kernel", DSS_KERNELS)
@pytest.mark.parametrize("length", [16, 37, 64, 100])
def test_fft_dss_matches_naive_recurrence(kernel, length):
    dss = DSS(d_hidden=5, n_modes=7, dt_min=1e-2, dt_max=0.5, kernel=kernel).double()
    with torch.no_grad():
        dss.skip.normal_()
    v = torch.randn(2, length, 5, dtype=torch.float64)
    assert (dss(v) - naive_dss(dss, v)).abs().max().item() < 1e-10


def fp32_error_against_float64(dss: DSS, length: int = 2048) -> float:
    """The fp32 layer's output (checked to be fp32) on GELU inputs, as a relative max error against the O(L^2)
    float64 convolution with the papers' kernel."""
    v = F.gelu(torch.randn(2, length, dss.skip.numel()) * 0.5)
    ref = naive_causal_conv(v, reference_kernel(dss, length)) + dss.skip.detach().double() * v.double()
    with torch.no_grad():
        y = dss(v)
    assert y.dtype == torch.float32
    return (y.double() - ref).abs().max().item() / ref.abs().max().item()


@pytest.mark.parametrize("kernel", DSS_KERNELS)
def test_fp32_dss_matches_float64_naive_convolution(kernel):
    """The model's fp32 path (kernel build + FFT of size 2L) against an O(L^2) float64 convolution, at the presets'
    N = 64 and with one slow mode (|exp(lambda)| ~ 1 - 1e-4, as training can make it) that the kernel keeps to the
    end."""
    torch.manual_seed(0)
    dss = DSS(d_hidden=4, n_modes=64, kernel=kernel)
    with torch.no_grad():
        dss.log_neg_re[0] = math.log(1e-4 / (dss.log_dt[0].exp().item() if kernel == "dss_exp" else 1.0))
    err = fp32_error_against_float64(dss)
    assert err < 2e-6, err  # measured 1e-7 - 3e-7 (fp32 rounding of the FFT and kernel)


@pytest.mark.parametrize("kernel", DSS_KERNELS)
def test_discretised_recurrence_matches_convolution(kernel):
    """dss.discretised() is enough to run the layer step by step (what recurrent decoding needs)."""
    dss = DSS(d_hidden=3, n_modes=6, kernel=kernel).double()
    v = torch.randn(1, 50, 3, dtype=torch.float64)
    modes = dss.discretised()
    state, out = torch.zeros(1, 3, 6, dtype=torch.complex128), []
    for t in range(v.shape[1]):
        state = modes.decay() * state + v[:, t, :, None]
        out.append((modes.coef() * state).sum(-1).real + dss.skip * v[:, t])
    with torch.no_grad():
        assert (torch.stack(out, dim=1) - dss(v)).abs().max().item() < 1e-10


@pytest.mark.parametrize("kernel", DSS_KERNELS)
def test_mode_powers_phase_accuracy(kernel):
    """At L = 65536 the fp32 angle of exp(lambda l) is within 1e-6 rad of float64 (measured: 2.8e-7 rad for both
    inits, about an fp32 ulp of 2 pi); forming Im(lambda) * l in fp32 instead is off by 0.03 rad (s4d_lin_noscale)
    and 0.10 rad (dss_exp) at 32k."""
    torch.manual_seed(0)
    lam_im = DSS(d_hidden=2, n_modes=64, kernel=kernel).discretised().lam_im.detach()
    length = 65536
    re, im = mode_powers(torch.zeros_like(lam_im), lam_im, length, torch.float32)  # unit magnitude: the angle only
    exact = torch.exp(1j * lam_im[:, None] * torch.arange(length, dtype=torch.float64))

    def angle_error(z):
        return torch.angle(z * exact[:, : z.shape[1]].conj()).abs().max().item()

    assert angle_error(torch.complex(re.double(), im.double())) < 1e-6
    fp32_angle = lam_im.float()[:, None] * torch.arange(length, dtype=torch.float32)  # the naive fp32 phase
    naive = torch.complex(torch.cos(fp32_angle).double(), torch.sin(fp32_angle).double())
    assert angle_error(naive[:, :32768]) > 1e-2


@pytest.mark.parametrize("kernel", DSS_KERNELS)
def test_fp32_kernel_at_32k_matches_float64(kernel):
    """The whole fp32 kernel at L = 32768, with slow modes (|exp(lambda)| = 1 - 1e-5, alive at the end)."""
    torch.manual_seed(0)
    dss = DSS(d_hidden=4, n_modes=64, kernel=kernel)
    with torch.no_grad():
        dt = dss.log_dt.exp() if kernel == "dss_exp" else torch.ones(64)
        dss.log_neg_re.copy_(torch.log(1e-5 / dt))
        ref = reference_kernel(dss, 32768)
        err = (dss.kernel(32768).double() - ref).abs().max().item() / ref.abs().max().item()
    assert err < 1e-5, err  # measured 2.4e-7 - 2.8e-7; the angle formed in fp32 would give 2e-3 - 4e-3


def test_dss_exp_init_follows_the_reference():
    """Lambda = skew-HiPPO eigenvalues - 1/2 (positive imaginary parts), dt in [dt_min, dt_max], W ~ CN(0, 2)."""
    torch.manual_seed(0)
    dss = DSS(d_hidden=256, n_modes=64, dt_min=1e-3, dt_max=1e-1)
    lam = torch.complex(-dss.log_neg_re.exp().double(), dss.im.double()).detach()
    assert torch.allclose(lam.real, torch.full_like(lam.real, -0.5))
    assert (lam.imag > 0).all() and (lam.imag.diff() < 0).all()  # distinct, largest first
    q = torch.sqrt(2 * torch.arange(128, dtype=torch.float64) + 1)
    legs = torch.tril(q[:, None] * q[None, :], -1)
    skew = (legs - legs.T) / 2  # i b is an eigenvalue: skew - i b is singular (up to the fp32 rounding of b)
    for b in lam.imag[[0, 10, 63]]:
        sv = torch.linalg.svdvals(skew - 1j * b * torch.eye(128))
        assert sv.min() / sv.max() < 1e-7
    dt = dss.log_dt.exp()
    assert dt.min() >= 1e-3 and dt.max() <= 1e-1 and dt.max() / dt.min() > 20
    assert abs(dss.w_re.std().item() - 1) < 0.05 and abs(dss.w_im.std().item() - 1) < 0.05


def test_dss_exp_coefficients_are_the_zero_order_hold():
    """The (exp(dt Lambda) - 1) / Lambda factor: a constant input's steady-state output is Re sum_n -W_n / Lambda_n,
    whatever dt, so slow and fast modes start with comparable gains (the kernel without it does not)."""
    torch.manual_seed(0)
    dss = DSS(d_hidden=3, n_modes=8, kernel="dss_exp").double()
    with torch.no_grad():
        dss.log_neg_re.fill_(math.log(0.5 / dss.log_dt.exp().min().item() * 1e-2))  # every mode ~settled by L = 4096
    gain = dss.kernel(4096).sum(-1)
    lam = torch.complex(-dss.log_neg_re.exp(), dss.im)
    expected = (-torch.complex(dss.w_re, dss.w_im) / lam).sum(-1).real
    assert torch.allclose(gain, expected, rtol=1e-6)


@pytest.mark.parametrize("length", [8, 33])
def test_fft_conv_matches_direct_convolution(length):
    kernel = torch.randn(3, length, dtype=torch.float64)
    v = torch.randn(2, length, 3, dtype=torch.float64)
    ref = torch.zeros_like(v)
    for t in range(length):
        for s in range(t + 1):
            ref[:, t] += kernel[:, t - s] * v[:, s]
    assert (causal_fft_conv(v, kernel) - ref).abs().max().item() < 1e-10


def test_circular_convolution_would_leak():
    """Sanity for the padding: an FFT of size L (no zero padding) is not causal."""
    length = 16
    kernel, v = torch.randn(1, length, dtype=torch.float64), torch.zeros(1, length, 1, dtype=torch.float64)
    v[0, -1, 0] = 1.0  # an impulse at the last position
    circular = torch.fft.irfft(torch.fft.rfft(v[..., 0], n=length) * torch.fft.rfft(kernel, n=length), n=length)
    assert circular[0, 0].abs() > 0  # the future reached position 0
    assert causal_fft_conv(v, kernel)[0, :-1].abs().max() < 1e-12


CONV_IMPLS = ("fft", "chunked")


def test_fft_size_is_the_smallest_fast_even_length_of_at_least_2L():
    def smooth(n):
        for p in (2, 3, 5, 7):
            while n % p == 0:
                n //= p
        return n == 1

    for length in range(1, 3000):
        n = fft_size(length)
        assert n >= 2 * length and n % 2 == 0 and smooth(n), (length, n)
        assert not any(smooth(m) for m in range(2 * length, n, 2)), (length, n)
    assert [fft_size(L) for L in (1000, 1024, 1500, 4097)] == [2000, 2048, 3000, 8232]


def dss_for_impl(impl: str, kernel: str = "dss_exp", h: int = 5, n: int = 7, chunk: int = 16) -> DSS:
    """A float64 DSS layer moved off its init (skip too), so every parameter shapes the output."""
    torch.manual_seed(3)
    dss = DSS(d_hidden=h, n_modes=n, dt_min=1e-2, dt_max=0.5, kernel=kernel, conv_impl=impl, chunk=chunk).double()
    with torch.no_grad():
        for p in dss.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return dss


def naive_layer(dss: DSS, v: torch.Tensor) -> torch.Tensor:
    """The O(L^2) float64 definition y = K * v + D v through autograd (kernel from the papers' formulas is checked
    separately; here dss.kernel, so gradients reach every parameter the same way)."""
    return naive_causal_conv(v, dss.kernel(v.shape[1]).double()) + dss.skip.double() * v


@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("kernel", DSS_KERNELS)
@pytest.mark.parametrize("length", [1, 13, 16, 50, 100])
def test_every_conv_impl_matches_the_float64_naive_convolution(impl, kernel, length):
    """Output against the papers' kernel and an O(L^2) convolution; gradients of the input and of every parameter
    against autograd through that convolution. Lengths: one position, non-multiples of the chunk (16) and of any
    power of two (fft_size(13) = 28 > 2L), exact multiples."""
    dss = dss_for_impl(impl, kernel)
    v = torch.randn(3, length, 5, dtype=torch.float64, requires_grad=True)
    y = dss(v)
    exact = naive_causal_conv(v.detach(), reference_kernel(dss, length)) + dss.skip.detach() * v.detach()
    assert y.dtype == torch.float64 and (y - exact).abs().max().item() < 1e-10
    g = torch.randn_like(y)
    params = [v, *dss.parameters()]
    got = torch.autograd.grad((y * g).sum(), params)
    want = torch.autograd.grad((naive_layer(dss, v) * g).sum(), params)
    for (name, _), a, b in zip([("v", v), *dss.named_parameters()], got, want):
        assert (a - b).norm().item() <= 1e-10 * b.norm().item() + 1e-13, name  # (at L = 1 some gradients are 0)


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_every_conv_impl_is_causal(impl):
    """Changing v after position t changes nothing up to t, and no output's gradient reaches a later input."""
    assert_causal_sequence_map(
        dss_for_impl(impl, chunk=8), torch.randn(2, 41, 5, dtype=torch.float64), t=20, tol=1e-13, visible=1e-3
    )


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_fp32_conv_impls_match_float64_with_a_slow_mode(impl):
    """Each fp32 path (the model's working precision) at L = 2048, N = 64, one mode with |exp(lambda)| = 1 - 1e-4
    that is still alive at the end, against the float64 definition."""
    torch.manual_seed(0)
    dss = DSS(d_hidden=4, n_modes=64, conv_impl=impl)
    with torch.no_grad():
        dss.log_neg_re[0] = math.log(1e-4 / dss.log_dt[0].exp().item())
        dss.skip.normal_()
    err = fp32_error_against_float64(dss)
    assert err < 2e-6, err  # measured: fft 1.5e-7, chunked 1.2e-7


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_bf16_autocast_keeps_the_convolution_in_fp32(impl):
    """Under bf16 autocast (CPU) the GSS projections run in bf16 and DSS takes and returns bf16, but the convolution
    itself is fp32: DSS(v_bf16) is the fp32 result of the same bf16 values, rounded once to bf16 (a bf16 FFT or
    kernel would be off by ~1e-2 over 1024 positions). The whole GSS layer stays within bf16's tolerance of fp32,
    and gradients reach the input and every parameter."""
    torch.manual_seed(0)
    gss = GSS(d_model=64, expansion=1.0, d_hidden=32, n_modes=16, dt_min=1e-3, dt_max=1e-1, conv_impl=impl)
    v = F.gelu(torch.randn(2, 1024, 32)).to(torch.bfloat16)
    with torch.no_grad():
        y_fp32 = gss.dss(v.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_bf16 = gss.dss(v)
    assert y_bf16.dtype == torch.bfloat16
    assert (y_bf16.float() - y_fp32).abs().max().item() <= 2.0**-8 * y_fp32.abs().max().item()

    h = torch.randn(2, 256, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gss(h)
    ref = gss(h)
    assert out.dtype == torch.bfloat16 and ref.dtype == torch.float32
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2
    out.float().square().mean().backward()
    assert h.grad.dtype == torch.float32 and h.grad.abs().max() > 0
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().max() > 0 for p in gss.parameters()
    )


def test_chunked_model_equals_the_fft_model():
    """`model.gss.conv_impl=chunked` is the same model function as the default (float64 logits), and a bad value is
    refused naming the key."""
    fft = model64("tiny_pha")
    chunked = model64("tiny_pha", "model.gss.conv_impl=chunked", "model.gss.chunk=16")
    chunked.load_state_dict(fft.state_dict())
    assert chunked.blocks[0].branches["gss"].dss.conv_impl == "chunked"
    idx = torch.randint(0, 2048, (2, 50))
    with torch.no_grad():
        assert (fft(idx) - chunked(idx)).abs().max().item() < 1e-10
    with pytest.raises(ConfigError, match="model.gss.conv_impl"):
        load_config("tiny_pha", ["model.gss.conv_impl=triton"])


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_gss_layer_traces_into_one_graph(impl):
    """torch.compile sees the whole GSS layer, convolution included (the FFT path is an autograd.Function that
    dynamo traces), with no graph break under bf16 autocast: whole-model compilation is not cut at each GSS."""
    gss = GSS(d_model=64, expansion=1.0, d_hidden=32, n_modes=8, dt_min=1e-3, dt_max=1e-1, conv_impl=impl, chunk=16)

    def loss(h):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return gss(h).float().square().mean()

    try:
        explained = torch._dynamo.explain(loss)(torch.randn(2, 64, 64, requires_grad=True))
    finally:
        torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


# ----------------------------------------------------------------------------- attention
def reference_gqa(attn: GroupedQueryAttention, h: torch.Tensor) -> torch.Tensor:
    b, t, _ = h.shape
    hd, nh, nkv = attn.head_dim, attn.n_heads, attn.n_kv_heads
    q = attn.W_q(h).view(b, t, nh, hd).transpose(1, 2)
    kv = attn.W_kv(h).view(b, t, 2, nkv, hd)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    cos, sin = rope_cos_sin(t, hd, attn.rope_base, h.device, h.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return attn.W_o(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 1), (4, 2), (4, 4), (6, 3)])
def test_gqa_matches_reference(n_heads, n_kv_heads):
    attn = GroupedQueryAttention(48, n_heads, n_kv_heads)
    h = torch.randn(2, 19, 48)
    assert (attn(h) - reference_gqa(attn, h)).abs().max().item() < 1e-6


def test_gqa_with_all_kv_heads_is_multi_head_attention(monkeypatch):
    import pha_lab.models.attention as attention

    attn = GroupedQueryAttention(32, 4, 4)
    mha = torch.nn.MultiheadAttention(32, 4, bias=False, batch_first=True)
    h = torch.randn(1, 11, 32)
    # Same projections; RoPE switched off (torch's MHA has no position encoding).
    monkeypatch.setattr(attention, "apply_rope", lambda x, cos, sin: x)
    with torch.no_grad():
        wk, wv = attn.W_kv.weight.chunk(2, dim=0)
        mha.in_proj_weight.copy_(torch.cat([attn.W_q.weight, wk, wv]))
        mha.out_proj.weight.copy_(attn.W_o.weight)
    mask = torch.triu(torch.ones(11, 11, dtype=torch.bool), 1)
    ref, _ = mha(h, h, h, attn_mask=mask, need_weights=False)
    assert (attn(h) - ref).abs().max().item() < 1e-6


def test_rope_is_relative():
    """RoPE: <q_m, k_n> depends only on m - n."""
    hd = 8
    cos, sin = rope_cos_sin(20, hd, 10000.0, "cpu", torch.float64)
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)

    def rot(x, p):
        return apply_rope(x.view(1, 1, 1, hd), cos[p : p + 1], sin[p : p + 1]).view(hd)

    assert torch.allclose(rot(q, 5) @ rot(k, 2), rot(q, 15) @ rot(k, 12))


# ----------------------------------------------------------------------------- mixers
def test_static_mixer_is_softmax_starting_uniform():
    model = model64("tiny_pha", "model.mixer=static")
    mixer = model.blocks[0].mixer
    assert torch.allclose(mixer.weights(), torch.full((3,), 1 / 3, dtype=torch.float64))
    with torch.no_grad():
        mixer.logits.copy_(torch.tensor([2.0, -1.0, 0.5]))
    w = mixer.weights()
    assert torch.allclose(w.sum(), torch.tensor(1.0, dtype=torch.float64)) and (w > 0).all()
    assert torch.allclose(w, torch.softmax(mixer.logits, 0))


def test_mean_mixer_has_no_parameters():
    model = model64("tiny_pha", "model.mixer=mean")
    assert sum(p.numel() for p in model.blocks[0].mixer.parameters()) == 0
    ys = [torch.randn(1, 3, 64) for _ in range(3)]
    assert torch.allclose(model.blocks[0].mixer.float()(ys, ys[0]), sum(ys) / 3)


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("branch", BRANCHES)
def test_knockout_equals_zeroed_branch(mixer, branch):
    assert_knockout_zeroes(model64("tiny_pha", f"model.mixer={mixer}"), branch)


@pytest.mark.parametrize(
    "preset, branch",
    [(p, b) for p in FAMILIES.values() for b in branches_of(p)],
    ids=[f"{f}-{b}" for f, p in FAMILIES.items() for b in branches_of(p)],
)
def test_knockout_equals_zeroed_branch_every_family(preset, branch):
    """Both layouts, and branches that only some layers have (gss_hybrid's attn, pha_sparse's attn)."""
    assert_knockout_zeroes(model64(preset), branch)


def test_knockout_of_missing_branch_fails():
    model = model64("tiny_transformer")
    with pytest.raises(ValueError, match="no layer has a 'gss' branch"):
        with model.knockout("gss"):
            pass


def test_serial_layout_is_a_different_function():
    torch.manual_seed(1)
    parallel = model64("tiny_pha")
    torch.manual_seed(1)
    serial = model64("tiny_sequential")
    # same branch modules (copy the weights), different composition
    serial.load_state_dict(parallel.state_dict(), strict=False)
    for p_blk, s_blk in zip(parallel.blocks, serial.blocks):
        for name in p_blk.names:
            s_blk.branches[name].load_state_dict(p_blk.branches[name].state_dict())
    idx = torch.randint(0, parallel.cfg.vocab_size, (1, 10))
    with torch.no_grad():
        assert (parallel(idx) - serial(idx)).abs().max().item() > 1e-4


@pytest.mark.parametrize("mixer", MIXERS)
def test_attention_sparse_pha_mixes_the_branches_each_layer_has(mixer):
    """tiny_pha_sparse: attention in layer 1 only; layers 0 and 2 mix GSS and FFN with a 2-branch mixer whose two
    weights start equal (the weighted-sum mixers: as their average), the model stays causal, and knocking attention
    out touches layer 1 only."""
    model = model64("tiny_pha_sparse", f"model.mixer={mixer}")
    assert [blk.names for blk in model.blocks] == [["gss", "ffn"], ["gss", "attn", "ffn"], ["gss", "ffn"]]
    assert [blk.mixer.k for blk in model.blocks] == [2, 3, 2]
    w = model.blocks[0].mixer.weights().detach()
    assert w.shape == (2,) and w[0] == pytest.approx(w[1].item(), rel=0.05)
    if mixer in ("static", "scalar", "gate", "mean"):
        ys = [torch.randn(1, 3, 64, dtype=torch.float64) for _ in range(2)]
        assert torch.allclose(model.blocks[0].mixer(ys, ys[0]), (ys[0] + ys[1]) / 2)
    weights = model.mixer_weights()
    assert [sorted(w) for w in weights] == [["ffn", "gss"], ["attn", "ffn", "gss"], ["ffn", "gss"]]
    if mixer != "channel":  # its weights are per-channel scales, not shares
        assert all(math.isclose(sum(w.values()), 1.0, rel_tol=1e-6) for w in weights)
    assert_causal(model)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(idx)
        with model.knockout("attn"):
            assert model.blocks[1].knockout == {"attn"} and not model.blocks[0].knockout | model.blocks[2].knockout
            assert (model(idx) - full).abs().max() > 1e-6


def test_layer_overrides_place_attention():
    model = model64("tiny_gss_hybrid")
    layouts = [(blk.layout, tuple(blk.names)) for blk in model.blocks]
    assert layouts == [("serial", ("gss", "ffn")), ("serial", ("attn", "ffn")), ("serial", ("gss", "ffn"))]


def test_mixer_weights_and_branch_stats_are_reported():
    model = model64("tiny_pha", "model.mixer=gate")
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with torch.no_grad(), model.recording_stats() as stats:
        model(idx)
    assert len(stats) == model.cfg.n_layers and set(stats[0]) == set(BRANCHES)
    assert all(v > 0 for layer in stats for v in layer.values())
    weights = model.mixer_weights()
    assert len(weights) == model.cfg.n_layers
    assert math.isclose(sum(weights[0].values()), 1.0, rel_tol=1e-6)


# ----------------------------------------------------------------------------- residual init
RESIDUAL_FAMILIES = {
    "parallel PHA": ("tiny_pha", ()),
    "parallel PHA, channel mixer": ("tiny_pha", ("model.mixer=channel",)),
    "serial transformer": ("tiny_transformer", ()),
    "serial sequential, 3 branches": ("tiny_sequential", ()),
    "GSS hybrid": ("tiny_gss_hybrid", ("model.overrides=[{layers: [1, -2], branches: [attn, ffn]}]",)),
    "attention-sparse PHA, 2-branch layers": ("tiny_pha_sparse", ()),
}


@functools.cache
def residual_growth(name: str, overrides: tuple[str, ...], n_layers: int) -> float:
    """RMS of the residual stream entering the final norm over the RMS of the token embeddings, at init, on
    random tokens (forward hooks)."""
    torch.manual_seed(0)
    cfg = load_config(name, [f"model.n_layers={n_layers}", *overrides])
    model = build_model(cfg.model).eval()
    rms = {}
    model.wte.register_forward_hook(lambda m, args, out: rms.__setitem__("embedding", out.pow(2).mean().sqrt()))
    model.norm_f.register_forward_hook(lambda m, args, out: rms.__setitem__("last", args[0].pow(2).mean().sqrt()))
    with torch.no_grad():
        model(torch.randint(0, model.cfg.vocab_size, (2, 64)))
    return (rms["last"] / rms["embedding"]).item()


@pytest.mark.parametrize("family", RESIDUAL_FAMILIES)
def test_initial_residual_growth(family):
    """With the output projections scaled by the real number of residual additions, every family's stream at
    the last of 12 layers (width 64) is 1.1-8x its embedding, and the same at 4 and 24 layers (within 15%).
    Measured: parallel PHA 1.27, channel mixer 6.8, transformer 1.57, sequential 1.27, GSS hybrid 1.37; with
    the former 1/sqrt(2 n_layers) they were 1.04, 83 (107 at 24 layers), 1.55, 1.36 and 1.36."""
    name, overrides = RESIDUAL_FAMILIES[family]
    growth = {n: residual_growth(name, overrides, n) for n in (4, 12, 24)}
    assert 1.1 < growth[12] < 8.0, growth
    assert 0.85 < growth[24] / growth[4] < 1.15, growth


def test_parallel_and_serial_stacks_start_with_the_same_growth():
    """The same three branches, mixed in parallel (one addition per layer, a uniform mixer) or stacked serially
    (three additions): the residual stream grows alike (formerly 1.04 vs 1.36: the serial stack grew more)."""
    parallel = residual_growth("tiny_pha", (), 12)
    serial = residual_growth("tiny_sequential", (), 12)
    assert abs(parallel / serial - 1) < 0.1, (parallel, serial)


def test_residual_additions_are_counted_per_layout():
    model = model64("tiny_gss_hybrid", "model.overrides=[{layers: [1], layout: parallel, branches: [attn, ffn]}]")
    assert model.n_residual_additions() == 2 + 1 + 2  # serial [gss, ffn], parallel [attn, ffn], serial [gss, ffn]
    out_std = [blk.branches["ffn"].W_out.weight.std().item() for blk in model.blocks]
    assert out_std[1] / out_std[0] == pytest.approx(math.sqrt(2), rel=0.15)  # the parallel block's sqrt(k)


def test_tied_embeddings_counted_once():
    model = model64("tiny_pha")
    assert model.lm_head.weight is model.wte.weight
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.n_params() == unique
    assert model.n_params() - model.n_params(non_embedding=True) == model.wte.weight.numel()
    untied = model64("tiny_pha", "model.tie_embeddings=false")
    assert untied.n_params() == model.n_params() + model.wte.weight.numel()

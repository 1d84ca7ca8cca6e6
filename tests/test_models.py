"""Model family: causality, DSS and GQA against float64 references, mixers, knockout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pha_lab.config import BRANCHES, MIXERS, load_config
from pha_lab.models import build_model
from pha_lab.models.attention import GroupedQueryAttention, apply_rope, rope_cos_sin
from pha_lab.models.gss import DSS, causal_fft_conv, dss_kernel
from pha_lab.models.mixers import MIXER_REGISTRY

TINY_FAMILIES = ["tiny_pha", "tiny_transformer", "tiny_gss", "tiny_gss_hybrid", "tiny_sequential"]


def tiny_model(name="tiny_pha", *overrides):
    cfg = load_config(name, list(overrides))
    return build_model(cfg.model).double().eval(), cfg


def test_registries_match_config_names():
    assert tuple(MIXER_REGISTRY) == MIXERS
    model, _ = tiny_model()
    assert set(model.blocks[0].branches) == set(BRANCHES)


def _assert_causal(model, vocab, T=24, t=9):
    idx = torch.randint(0, vocab, (2, T))
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, vocab, (2, T - t - 1))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert (a[:, : t + 1] - b[:, : t + 1]).abs().max().item() < 1e-10
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max().item() > 1e-6  # the change is visible later

    x = model.wte(idx).detach().requires_grad_(True)
    model.forward_embeddings(x)[:, t].sum().backward()
    assert x.grad[:, t + 1 :].abs().max().item() < 1e-10
    assert x.grad[:, : t + 1].abs().max().item() > 0


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_causal_every_family(family):
    model, cfg = tiny_model(family)
    _assert_causal(model, cfg.model.vocab_size)


@pytest.mark.parametrize("mixer", MIXERS)
def test_causal_every_mixer(mixer):
    model, cfg = tiny_model("tiny_pha", f"model.mixer={mixer}")
    _assert_causal(model, cfg.model.vocab_size)


# ----------------------------------------------------------------------------- DSS / GSS
def naive_dss(v, log_neg_re, im, c_re, c_im, skip):
    """Float64 recurrence x_t = exp(lambda) x_{t-1} + v_t, y_t = Re(C x_t) + D v_t, per channel."""
    lam = torch.complex(-torch.exp(log_neg_re), im)  # [N]
    c = torch.complex(c_re, c_im)  # [H, N]
    b, length, h = v.shape
    state = torch.zeros(b, h, lam.numel(), dtype=torch.complex128)
    out = []
    for t in range(length):
        state = state * torch.exp(lam) + v[:, t, :, None]
        out.append((state * c).sum(-1).real + skip * v[:, t])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("length", [16, 37, 64, 100])
def test_fft_dss_matches_naive_recurrence(length):
    dss = DSS(d_hidden=5, n_modes=7, dt_min=1e-2, dt_max=0.5).double()
    with torch.no_grad():
        dss.skip.normal_()
    v = torch.randn(2, length, 5, dtype=torch.float64)
    ref = naive_dss(v, dss.log_neg_re, dss.im, dss.c_re, dss.c_im, dss.skip)
    assert (dss(v) - ref).abs().max().item() < 1e-10


@pytest.mark.parametrize("length", [8, 33])
def test_fft_conv_matches_direct_convolution(length):
    kernel = torch.randn(3, length, dtype=torch.float64)
    v = torch.randn(2, length, 3, dtype=torch.float64)
    ref = torch.zeros_like(v)
    for t in range(length):
        for s in range(t + 1):
            ref[:, t] += kernel[:, t - s] * v[:, s]
    assert (causal_fft_conv(v, kernel) - ref).abs().max().item() < 1e-10


def test_dss_kernel_is_real_part_of_modes():
    n, h, length = 4, 3, 10
    log_neg_re, im = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    c_re, c_im = torch.randn(h, n, dtype=torch.float64), torch.randn(h, n, dtype=torch.float64)
    lam = torch.complex(-torch.exp(log_neg_re), im)
    ref = (torch.complex(c_re, c_im)[:, :, None] * torch.exp(lam[:, None] * torch.arange(length))).sum(1).real
    assert (dss_kernel(log_neg_re, im, c_re, c_im, length) - ref).abs().max().item() < 1e-12


def test_circular_convolution_would_leak():
    """Sanity for the padding: an FFT of size L (no zero padding) is not causal."""
    length = 16
    kernel, v = torch.randn(1, length, dtype=torch.float64), torch.zeros(1, length, 1, dtype=torch.float64)
    v[0, -1, 0] = 1.0  # an impulse at the last position
    circular = torch.fft.irfft(torch.fft.rfft(v[..., 0], n=length) * torch.fft.rfft(kernel, n=length), n=length)
    assert circular[0, 0].abs() > 0  # the future reached position 0
    assert causal_fft_conv(v, kernel)[0, :-1].abs().max() < 1e-12


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
    rot = lambda x, p: apply_rope(x.view(1, 1, 1, hd), cos[p : p + 1], sin[p : p + 1]).view(hd)
    assert torch.allclose(rot(q, 5) @ rot(k, 2), rot(q, 15) @ rot(k, 12))


# ----------------------------------------------------------------------------- mixers
def test_static_mixer_is_softmax_starting_uniform():
    model, _ = tiny_model("tiny_pha", "model.mixer=static")
    mixer = model.blocks[0].mixer
    assert torch.allclose(mixer.weights(), torch.full((3,), 1 / 3, dtype=torch.float64))
    with torch.no_grad():
        mixer.logits.copy_(torch.tensor([2.0, -1.0, 0.5]))
    w = mixer.weights()
    assert torch.allclose(w.sum(), torch.tensor(1.0, dtype=torch.float64)) and (w > 0).all()
    assert torch.allclose(w, torch.softmax(mixer.logits, 0))


def test_mean_mixer_has_no_parameters():
    model, _ = tiny_model("tiny_pha", "model.mixer=mean")
    assert sum(p.numel() for p in model.blocks[0].mixer.parameters()) == 0
    ys = [torch.randn(1, 3, 64) for _ in range(3)]
    assert torch.allclose(model.blocks[0].mixer.float()(ys, ys[0]), sum(ys) / 3)


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("branch", BRANCHES)
def test_knockout_equals_zeroed_branch(mixer, branch):
    model, cfg = tiny_model("tiny_pha", f"model.mixer={mixer}")
    idx = torch.randint(0, cfg.model.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(idx)
        with model.knockout(branch):
            knocked = model(idx)
        # reference: replace the branch's forward by zeros
        originals = {}
        for i, blk in enumerate(model.blocks):
            mod = blk.branches[branch]
            originals[i] = mod.forward
            mod.forward = lambda h, _m=mod: torch.zeros_like(h)
        zeroed = model(idx)
        for i, blk in enumerate(model.blocks):
            blk.branches[branch].forward = originals[i]
        after = model(idx)
    assert (knocked - zeroed).abs().max().item() < 1e-12
    assert (knocked - full).abs().max().item() > 1e-6
    assert (after - full).abs().max().item() == 0  # knockout is undone on exit


def test_knockout_of_missing_branch_fails():
    model, _ = tiny_model("tiny_transformer")
    with pytest.raises(ValueError, match="no layer has a 'gss' branch"):
        with model.knockout("gss"):
            pass


def test_serial_layout_is_a_different_function():
    torch.manual_seed(1)
    parallel, cfg = tiny_model("tiny_pha")
    torch.manual_seed(1)
    serial, _ = tiny_model("tiny_sequential")
    # same branch modules (copy the weights), different composition
    serial.load_state_dict(parallel.state_dict(), strict=False)
    for p_blk, s_blk in zip(parallel.blocks, serial.blocks):
        for name in p_blk.names:
            s_blk.branches[name].load_state_dict(p_blk.branches[name].state_dict())
    idx = torch.randint(0, cfg.model.vocab_size, (1, 10))
    with torch.no_grad():
        assert (parallel(idx) - serial(idx)).abs().max().item() > 1e-4


def test_layer_overrides_place_attention():
    model, _ = tiny_model("tiny_gss_hybrid")
    layouts = [(blk.layout, tuple(blk.names)) for blk in model.blocks]
    assert layouts == [("serial", ("gss", "ffn")), ("serial", ("attn", "ffn")), ("serial", ("gss", "ffn"))]


def test_mixer_weights_and_branch_stats_are_reported():
    model, cfg = tiny_model("tiny_pha", "model.mixer=gate")
    idx = torch.randint(0, cfg.model.vocab_size, (2, 12))
    with torch.no_grad(), model.recording_stats() as stats:
        model(idx)
    assert len(stats) == cfg.model.n_layers and set(stats[0]) == set(BRANCHES)
    assert all(v > 0 for layer in stats for v in layer.values())
    weights = model.mixer_weights()
    assert len(weights) == cfg.model.n_layers
    assert math.isclose(sum(weights[0].values()), 1.0, rel_tol=1e-6)


def test_tied_embeddings_counted_once():
    model, _ = tiny_model("tiny_pha")
    assert model.lm_head.weight is model.wte.weight
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.n_params() == unique
    assert model.n_params() - model.n_params(non_embedding=True) == model.wte.weight.numel()
    untied, _ = tiny_model("tiny_pha", "model.tie_embeddings=false")
    assert untied.n_params() == model.n_params() + model.wte.weight.numel()

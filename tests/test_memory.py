"""Memory accounting: the inference cache (KV cache + recurrent state) of every family against a hand computation
and against the tensors the modules make, the training state per parameter, and what `pha-lab params` prints."""

from __future__ import annotations

import pytest
import torch
from bodies import meta_model

from pha_lab.cli import main
from pha_lab.config import load_config
from pha_lab.models import build_model
from pha_lab.models.memory import training_bytes, weight_bytes


# Hand computation, per sequence: attention 2 (K and V) x n_kv_heads x head_dim x T x bytes per layer that has it;
# GSS 2 (real, imag) x H x N x 4 (fp32) per layer, whatever T; FFN nothing.
def kv(layers: int, kv_heads: int, head_dim: int, t: int, b: int, nbytes: int) -> int:
    return layers * 2 * kv_heads * head_dim * t * b * nbytes


def state(layers: int, h: int, n: int, b: int, nbytes: int = 4) -> int:
    return layers * 2 * h * n * b * nbytes


FAMILIES = {  # preset -> (attention part, GSS part) for batch b, context t, 2-byte (bf16) cache
    "pha_180m": lambda t, b: (kv(12, 4, 64, t, b, 2), state(12, 256, 64, b)),
    "pha_sparse_180m": lambda t, b: (kv(2, 4, 64, t, b, 2), state(12, 256, 64, b)),
    "transformer_180m": lambda t, b: (kv(12, 4, 64, t, b, 2), 0),
    "transformer_deep_180m": lambda t, b: (kv(20, 4, 64, t, b, 2), 0),
    "transformer_mha_180m": lambda t, b: (kv(12, 16, 64, t, b, 2), 0),
    "transformer_mha_125m": lambda t, b: (kv(12, 12, 64, t, b, 2), 0),
    "gss_125m": lambda t, b: (0, state(12, 256, 64, b)),
    "gss_hybrid_125m": lambda t, b: (kv(2, 4, 64, t, b, 2), state(10, 256, 64, b)),
    "sequential_125m": lambda t, b: (kv(12, 4, 64, t, b, 2), state(12, 256, 64, b)),
    "mini_pha_sparse": lambda t, b: (kv(2, 2, 64, t, b, 2), state(8, 128, 64, b)),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_cache_bytes_of_every_family_match_the_hand_count(name):
    model = meta_model(name)
    for t, b in ((1024, 1), (32768, 1), (4096, 16)):
        attn, gss = FAMILIES[name](t, b)
        assert model.cache_bytes(b, t, 2) == attn + gss, (t, b)
        parts = model.cache_bytes_by_branch(b, t, 2)
        assert (parts["attn"], parts["gss"], parts["ffn"]) == (attn, gss, 0)


def test_tiny_cache_counts_the_tensors_the_modules_make():
    """K and V as the attention projects them (n_kv_heads wide) and a complex fp32 state of the DSS's shape."""
    model = build_model(load_config("tiny_pha").model)
    b, t = 3, 40
    h = torch.randn(b, t, 64)
    expected = 0
    for blk in model.blocks:
        attn, gss = blk.branches["attn"], blk.branches["gss"]
        k, v = attn.W_kv(h).to(torch.bfloat16).chunk(2, dim=-1)  # [B, T, n_kv_heads * head_dim] each
        expected += k.nbytes + v.nbytes
        coef = gss.dss.discretised().coef()
        expected += torch.zeros(b, *coef.shape, dtype=torch.complex64).nbytes
    assert model.cache_bytes(b, t, 2) == expected
    # float64 (the decoding tests' precision): K, V and the state all in float64
    assert model.cache_bytes(b, t, 8) == sum(
        2 * b * t * blk.branches["attn"].n_kv_heads * blk.branches["attn"].head_dim * 8
        + torch.zeros(b, *blk.branches["gss"].dss.discretised().coef().shape, dtype=torch.complex128).nbytes
        for blk in model.blocks
    )


def test_a_window_bounds_the_kv_cache():
    """The sliding-window convention: an attention module with a `window` keeps at most that many positions."""
    model = meta_model("tiny_transformer")
    full = model.cache_bytes(2, 100, 2)
    for blk in model.blocks:
        blk.branches["attn"].window = 16
    assert model.cache_bytes(2, 100, 2) == full * 16 // 100 and model.cache_bytes(2, 10, 2) == full * 10 // 100


def test_sliding_window_layers_keep_at_most_the_window():
    """pha_swa_180m: full KV caches in layers 3 and 9, 512 positions in the 10 swa layers, the GSS states."""
    model = meta_model("pha_swa_180m")
    for t, b in ((256, 1), (512, 2), (32768, 1), (4096, 16)):
        parts = model.cache_bytes_by_branch(b, t, 2)
        assert parts["attn"] == kv(2, 4, 64, t, b, 2) and parts["swa"] == kv(10, 4, 64, min(512, t), b, 2), t
        assert parts["gss"] == state(12, 256, 64, b) and model.cache_bytes(b, t, 2) == sum(parts.values())


def test_attention_sparse_pha_cache_against_the_transformer_baselines_at_32k():
    """What the long-context cache target (<= 0.25x transformer_180m's at 32k) asks, analytically: 2 of 12 attention
    layers plus the GSS state."""
    sparse = meta_model("pha_sparse_180m").cache_bytes(1, 32768, 2)
    ratios = {
        base: sparse / meta_model(base).cache_bytes(1, 32768, 2)
        for base in ("transformer_180m", "transformer_deep_180m", "transformer_mha_180m")
    }
    assert ratios == pytest.approx(
        {"transformer_180m": 0.1706, "transformer_deep_180m": 0.1023, "transformer_mha_180m": 0.0426}, abs=1e-4
    )


def test_training_state_and_weight_bytes():
    model = meta_model("pha_125m")
    n = model.n_params()
    assert training_bytes(n) == {"weights": 4 * n, "grads": 4 * n, "adamw": 8 * n, "total": 16 * n}
    assert model.training_bytes()["total"] == 16 * n
    assert weight_bytes(model) == 4 * n and weight_bytes(model, 2) == 2 * n  # the tied head counted once


def test_params_command_prints_cache_bytes_per_token(capsys):
    assert (
        main(
            ["params", "pha_sparse_180m", "transformer_180m", "gss_125m", "pha_swa_180m", "--contexts", "1024", "32768"]
        )
        == 0
    )
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["preset"][-6:] == ["cache", "B/tok", "@1k", "cache", "B/tok", "@32k"]
    # bytes per token: KV of the attention layers + the GSS state spread over the context
    assert lines["pha_sparse_180m"][-2:] == [f"{2048 + 1572864 // 1024:,}", f"{2048 + 1572864 // 32768:,}"]
    assert lines["transformer_180m"][-2:] == ["12,288", "12,288"] and lines["gss_125m"][-2:] == ["1,536", "48"]
    assert [lines[name][3] for name in ("pha_sparse_180m", "transformer_180m", "gss_125m")] == ["3,9", "all", "-"]
    # full attention in 2 layers, a 512-position window in the other 10 (1,024 bytes per position and layer)
    assert lines["pha_swa_180m"][3:5] == ["3,9", "+10swa"]
    assert lines["pha_swa_180m"][-2:] == [f"{2048 + 10 * 512 + 1536:,}", f"{2048 + 10 * 1024 * 512 // 32768 + 48:,}"]

"""The sliding-window attention branch (`swa`): every forward path against a float64 loop with the band mask,
causality and the window's reach, window >= T = full causal attention, its config errors, FLOPs and cache counted
over the window only, and decoding (prefill, steps, the ring buffer) against the parallel forward."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from pha_lab.config import ConfigError, load_config
from pha_lab.models import build_model, sliding_window as sw
from pha_lab.models.attention import GroupedQueryAttention, apply_rope, rope_cos_sin
from pha_lab.models.sliding_window import SlidingWindowAttention

# CPU flex_attention runs unfused (and warns so); forward only
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def module(window: int, d_model: int = 32, n_heads: int = 4, n_kv_heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return SlidingWindowAttention(d_model, n_heads, n_kv_heads, window).double().eval()


def naive(m: SlidingWindowAttention, h: torch.Tensor) -> torch.Tensor:
    """Attention written out per query in float64: RoPE'd q and k, each query against keys i - window < j <= i."""
    b, t, _ = h.shape
    hd, group = m.head_dim, m.n_heads // m.n_kv_heads
    q = m.W_q(h).view(b, t, m.n_heads, hd).transpose(1, 2)
    k, v = m.W_kv(h).view(b, t, 2, m.n_kv_heads, hd).permute(2, 0, 3, 1, 4)
    cos, sin = rope_cos_sin(t, hd, m.rope_base, h.device, h.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = torch.zeros_like(q)
    for head in range(m.n_heads):
        kv = head // group  # query heads share key/value heads in consecutive groups
        for i in range(t):
            lo = max(0, i - m.window + 1)
            scores = torch.einsum("bd,bnd->bn", q[:, head, i], k[:, kv, lo : i + 1]) / math.sqrt(hd)
            y[:, head, i] = torch.einsum("bn,bnd->bd", torch.softmax(scores, -1), v[:, kv, lo : i + 1])
    return m.W_o(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("impl", sw.IMPLS)
@pytest.mark.parametrize("window", [1, 4, 13, 40])
def test_every_path_matches_a_float64_loop(impl, window):
    m = module(window)
    m.impl = impl
    h = torch.randn(2, 13, 32, dtype=torch.float64)
    with torch.no_grad():  # flex on the CPU has no backward
        assert (m(h) - naive(m, h)).abs().max().item() < 1e-12


@pytest.mark.parametrize("impl", ["auto", "sdpa"])
def test_each_position_sees_exactly_its_window(impl):
    """A change at position j moves the outputs j..j+window-1 and nothing else (causal, and blind beyond the window);
    the gradient of output i reaches exactly the inputs i-window+1..i."""
    window, t = 4, 14
    m = module(window)
    m.impl = impl
    h = torch.randn(2, t, 32, dtype=torch.float64)
    with torch.no_grad():
        base = m(h)
        for j in (0, 5, t - 1):
            moved = h.clone()
            moved[:, j] += 1.0
            diff = (m(moved) - base).abs().amax(dim=(0, 2))
            reach = (torch.arange(t) >= j) & (torch.arange(t) < j + window)
            assert diff[~reach].max().item() < 1e-13, j
            assert diff[reach].min().item() > 1e-6, j
    x = h.clone().requires_grad_(True)
    i = 9
    m(x)[:, i].sum().backward()
    seen = x.grad.abs().amax(dim=(0, 2))
    assert seen[i - window + 1 : i + 1].min().item() > 0
    assert seen[: i - window + 1].max().item() == 0 and seen[i + 1 :].max().item() == 0


def test_flex_path_sees_exactly_its_window():
    """The CUDA path (flex_attention and the cached block mask; unfused on the CPU, forward only)."""
    window, t = 3, 150  # more than one 128-position block: the block mask's partial and empty blocks are used
    m = module(window)
    m.impl = "flex"
    h = torch.randn(1, t, 32, dtype=torch.float64)
    with torch.no_grad():
        base = m(h)
        moved = h.clone()
        moved[:, 130] += 1.0
        diff = (m(moved) - base).abs().amax(dim=(0, 2))
    assert diff[130:133].min().item() > 1e-6
    assert diff[:130].max().item() == 0 and diff[133:].max().item() < 1e-13
    m.impl = "sdpa"
    with torch.no_grad():
        assert (m(h) - base).abs().max().item() < 1e-12


@pytest.mark.parametrize("impl", sw.IMPLS)
def test_a_window_of_at_least_T_is_full_causal_attention(impl):
    """The same weights in GroupedQueryAttention (causal SDPA) give the same outputs when the window covers T."""
    t = 12
    full = GroupedQueryAttention(32, 4, 2).double().eval()
    h = torch.randn(2, t, 32, dtype=torch.float64)
    for window in (t, t + 7):
        m = module(window)
        m.load_state_dict(full.state_dict())
        m.impl = impl
        with torch.no_grad():
            assert (m(h) - full(h)).abs().max().item() < 1e-12, window
    with torch.no_grad():  # and a shorter window is not
        short = module(t - 1)
        short.load_state_dict(full.state_dict())
        assert (short(h) - full(h)).abs().max().item() > 1e-6


def test_bad_window_and_impl_fail_naming_the_key():
    with pytest.raises(ConfigError, match=r"model.swa.window=0 must be >= 1"):
        load_config("tiny_pha_swa", ["model.swa.window=0"])
    with pytest.raises(ConfigError, match=r"model.overrides\[1\].swa.window=-3 must be >= 1"):
        load_config(
            "tiny_pha_swa",
            ["model.overrides=[{without: attn, branches: [gss, swa, ffn]}, {layers: [0], swa: {window: -3}}]"],
        )
    with pytest.raises(ConfigError, match=r"model.swa.n_heads=3"):  # the attention keys are checked too
        load_config("tiny_pha_swa", ["model.swa.n_heads=3"])
    with pytest.raises(ConfigError, match="model.swa.windw"):
        load_config("tiny_pha_swa", ["model.swa.windw=8"])
    m = module(4)
    m.impl = "fast"
    with pytest.raises(ValueError, match="impl='fast': choose one of auto, flex, sdpa"):
        m(torch.randn(1, 8, 32, dtype=torch.float64))


def test_flops_count_the_window_only():
    m = module(16)
    per_key = 4.0 * m.n_heads * m.head_dim  # QK^T and AV, 2 FLOPs per multiply-add each
    assert m.flops_per_token(8) == 8 * per_key and m.flops_per_token(1024) == 16 * per_key
    cfg = load_config("tiny_pha_swa").model
    with torch.device("meta"):
        model = build_model(cfg)
        full = build_model(load_config("tiny_pha_swa", ["model.swa.window=100000"]).model)
    t, w = 1024, cfg.swa.window
    attn = model.blocks[1].branches["attn"]
    expected = 4.0 * attn.n_heads * attn.head_dim * (t + 2 * w)  # layer 1 full attention, layers 0 and 2 the window
    assert model.flops_per_token(t, training=False)["attention"] == expected
    assert full.flops_per_token(t, training=False)["attention"] == 4.0 * attn.n_heads * attn.head_dim * 3 * t
    assert model.flops_per_token(t)["attention"] == 3 * expected  # training: x3, as every part


def test_cache_is_bounded_by_the_window():
    """The analytic count (min(window, T) positions of K and V per swa layer) is what init_state allocates."""
    cfg = load_config("tiny_pha_swa").model
    model = build_model(cfg)
    w, kv_bytes = cfg.swa.window, 2 * cfg.swa.n_kv_heads * (cfg.d_model // cfg.swa.n_heads)  # K+V per position
    for t, b in ((10, 3), (w, 1), (1000, 2)):
        parts = model.cache_bytes_by_branch(b, t, 2)
        assert parts["swa"] == 2 * b * min(w, t) * kv_bytes * 2  # two swa layers, 2 bytes per number
        assert parts["attn"] == b * t * kv_bytes * 2
        for dtype in (torch.bfloat16, torch.float64):
            for blk in (model.blocks[0], model.blocks[2]):
                swa = blk.branches["swa"]
                state = swa.init_state(b, t, device="cpu", dtype=dtype)
                assert state.k.nbytes + state.v.nbytes == swa.cache_bytes(b, t, dtype.itemsize)


# --------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("window, t, prompt", [(5, 23, 9), (5, 23, 2), (8, 20, 20), (30, 20, 7), (1, 9, 4)])
def test_prefill_then_steps_equal_the_forward(window, t, prompt):
    """float64: a prompt longer than the window (the ring wraps while prefilling and again while stepping), shorter
    (it fills while stepping), and a window longer than everything (a ring of max_len slots)."""
    m = module(window)
    h = torch.randn(2, t, 32, dtype=torch.float64)
    with torch.no_grad():
        full = m(h)
        state = m.init_state(2, t)
        y, state = m.prefill(h[:, :prompt], state)
        outs = [y]
        for i in range(prompt, t):
            y, state = m.step(h[:, i : i + 1], state)
            outs.append(y)
    assert state.pos == t and state.slots == min(window, t)
    assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-9


def test_prefill_leaves_the_last_window_in_the_ring():
    window, t = 4, 11
    m = module(window)
    h = torch.randn(2, t, 32, dtype=torch.float64)
    with torch.no_grad():
        _, k, v = m._qkv(h, 0)
        _, state = m.prefill(h, m.init_state(2, 64))
    assert state.pos == t and state.slots == window
    for p in range(t - window, t):  # position p in slot p % window, RoPE'd at its absolute position
        assert torch.equal(state.k[:, :, p % window], k[:, :, p]) and torch.equal(state.v[:, :, p % window], v[:, :, p])
    assert state.slot_positions().tolist() == [8, 9, 10, 7]


def test_chunked_prefill_equals_the_forward():
    """Prefill from a state that already holds positions (the queries see the ring and the new keys)."""
    m = module(5)
    h = torch.randn(2, 21, 32, dtype=torch.float64)
    with torch.no_grad():
        state, outs = m.init_state(2, 21), []
        for lo, hi in ((0, 3), (3, 4), (4, 13), (13, 21)):
            y, state = m.prefill(h[:, lo:hi], state)
            outs.append(y)
        assert (torch.cat(outs, 1) - m(h)).abs().max().item() < 1e-9


def test_a_ring_shorter_than_the_window_refuses_more_positions():
    m = module(8)
    state = m.init_state(1, 4)
    with torch.no_grad():
        _, state = m.prefill(torch.randn(1, 4, 32, dtype=torch.float64), state)
        with pytest.raises(
            ValueError, match="4 slots .* window is 8: positions 4..4 do not fit; make the state with max_len >= 5"
        ):
            m.step(torch.randn(1, 1, 32, dtype=torch.float64), state)
    full_ring = m.init_state(1, 100)  # a ring of the whole window goes on past max_len: keys leave the window
    with torch.no_grad():
        for _ in range(12):
            _, full_ring = m.step(torch.randn(1, 1, 32, dtype=torch.float64), full_ring)
    assert full_ring.pos == 12


# --------------------------------------------------------------------------- in the model
def test_the_preset_places_full_and_windowed_attention():
    cfg = load_config("tiny_pha_swa")
    model = build_model(cfg.model)
    assert [blk.names for blk in model.blocks] == [["gss", "swa", "ffn"], ["gss", "attn", "ffn"], ["gss", "swa", "ffn"]]
    assert model.blocks[0].branches["swa"].window == cfg.model.swa.window < cfg.data.seq_len
    plain = build_model(load_config("tiny_pha_swa", ["model.overrides=[]", "model.n_attn_layers=null"]).model)
    assert model.n_params() == plain.n_params()  # swa has attention's weights: tiny_pha at 3 layers


def test_the_model_is_causal_and_windowed():
    """tiny_pha_swa with a 4-token window in layers 0 and 2: the logits before a changed token do not move."""
    torch.manual_seed(0)
    cfg = load_config("tiny_pha_swa", ["model.swa.window=4"])
    model = build_model(cfg.model).double().eval()
    idx = torch.randint(0, cfg.model.vocab_size, (2, 24))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, cfg.model.vocab_size, (2, 14))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert (a[:, :10] - b[:, :10]).abs().max().item() < 1e-10
    assert (a[:, 10:] - b[:, 10:]).abs().max().item() > 1e-6


def test_the_cuda_path_is_one_graph_once_its_mask_is_cached():
    """Under torch.compile (dynamo's explain on the CPU, the flex path forced): the first trace builds the block mask
    outside the graph (one break), after which the cached mask is a graph input: one graph, the mask not rebuilt."""
    m = module(5).float()
    m.impl = "flex"
    h = torch.randn(2, 19, 32)
    sw._BLOCK_MASKS.clear()
    counts = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            torch._dynamo.reset()
            explained = torch._dynamo.explain(m)(h)
            counts.append((explained.graph_count, len(explained.break_reasons)))
    torch._dynamo.reset()
    assert counts == [(3, 1), (1, 0)]
    assert list(sw._BLOCK_MASKS) == [(5, 19, torch.device("cpu"))]
    # one mask_mod per window, whatever the length: what the compiled flex_attention guards on
    assert (
        sw.sliding_block_mask(5, 40, torch.device("cpu")).mask_mod
        is sw._BLOCK_MASKS[5, 19, torch.device("cpu")].mask_mod
    )
    assert sw.band_mod(5) is sw.band_mod(5) is not sw.band_mod(6)


@pytest.mark.parametrize("layout", ["parallel", "serial"])
def test_the_model_decodes_step_by_step_as_its_forward(layout):
    """LanguageModel.prefill + step (pha_lab.models.decoding) with swa layers whose ring wraps in the prompt and
    again while stepping, float64: the logits equal the forward's, and the state's tensors are the counted cache."""
    torch.manual_seed(0)
    cfg = load_config("tiny_pha_swa", ["model.swa.window=4", f"model.layout={layout}"])
    model = build_model(cfg.model).double().eval()
    idx = torch.randint(0, cfg.model.vocab_size, (2, 17))
    with torch.no_grad():
        full = model(idx)
    state = model.init_state(2, 17)
    logits, state = model.prefill(idx[:, :7], state)
    steps = [model.step(idx[:, i], state)[0] for i in range(7, 17)]
    assert (logits - full[:, :7]).abs().max().item() < 1e-9
    assert (torch.stack(steps, 1) - full[:, 7:]).abs().max().item() < 1e-9
    assert state.nbytes_by_branch() == model.cache_bytes_by_branch(2, 17, 8)
    assert state.nbytes_by_branch()["swa"] == 2 * 2 * 2 * 4 * 2 * 16 * 8  # 2 layers, K+V, B=2, 4 slots, 2 x 16 wide


@pytest.mark.slow  # ~70 s: inductor compiles create_block_mask and flex_attention for the CPU
def test_the_compiled_mask_and_flex_kernel_equal_the_eager_ones():
    """What the CUDA path compiles (create_block_mask, flex_attention), compiled here for the CPU: the same blocks and
    outputs as eager, and a third length runs on the dynamic graph made at the second (no recompile per length)."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()
    counters.clear()
    build, attend = torch.compile(create_block_mask), torch.compile(flex_attention)
    for t in (200, 300, 450):
        mask = build(sw.band_mod(16), None, None, t, t, device="cpu")
        assert torch.equal(
            mask.to_dense(), create_block_mask(sw.band_mod(16), None, None, t, t, device="cpu").to_dense()
        )
        q, k, v = torch.randn(1, 4, t, 16), torch.randn(1, 2, t, 16), torch.randn(1, 2, t, 16)
        with torch.no_grad():
            fast, eager = (
                attend(q, k, v, block_mask=mask, enable_gqa=True),
                flex_attention(q, k, v, block_mask=mask, enable_gqa=True),
            )
        assert (fast - eager).abs().max().item() < 1e-5, t
        if t == 300:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()

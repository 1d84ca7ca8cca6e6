"""Decoding (pha_lab.models.decoding): in float64, step-by-step logits and prefill + steps equal the parallel forward
for every tiny family (both layouts, layer overrides, attention in k layers), every mixer and every DSS kernel and
convolution; the decode state's tensors are the bytes `cache_bytes` counts; sampling (greedy, seeds, top-k, top-p,
temperature); the errors (a full state, a branch without the hooks); `pha-lab generate` on a run trained on the CPU.

The assertion bodies are shared; the cases are thin parametrisations over them."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pha_lab.branches import DSS_CONV_IMPLS, DSS_KERNELS
from pha_lab.cli import main
from pha_lab.config import MIXERS, experiment_names, load_config
from pha_lab.models import build_model
from pha_lab.models.decoding import filter_logits, sample

TINY = [name for name in experiment_names() if name.startswith("tiny_")]  # every family, as the presets define them
LAYOUTS = {  # tiny_pha's layer in other layouts: all serial, and one serial layer among parallel ones
    "serial": ["model.layout=serial"],
    "mixed": ["model.overrides=[{layers: [1], layout: serial}]"],
}
ATOL = 1e-9


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny64(name: str, *overrides: str):
    cfg = load_config(name, list(overrides))
    return build_model(cfg.model).double().eval(), cfg.model.vocab_size


def ids_for(vocab: int, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length))


# --------------------------------------------------------------------------- shared bodies
def assert_steps_equal_forward(model, vocab: int, length: int = 12) -> None:
    """Logits of one token at a time from an empty state == the parallel forward's, at every position."""
    ids = ids_for(vocab, length=length)
    with torch.no_grad():
        full = model(ids)
    state = model.init_state(ids.shape[0], length)
    steps = []
    for t in range(length):
        logits, state = model.step(ids[:, t], state)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=ATOL, rtol=0)
    assert state.pos == length and all(st.pos == length for layer in state.layers for st in layer.values())


def assert_prefill_then_steps_equal_forward(model, vocab: int, length: int = 12, cuts=(5, 9)) -> None:
    """prefill(prompt) + steps == forward; and a prompt prefilled in two pieces (the second after a non-empty state:
    the KV cache's offset mask, the GSS state's readout and decay) + steps; last_only gives the last row."""
    ids = ids_for(vocab, length=length)
    with torch.no_grad():
        full = model(ids)
    a, b = cuts
    state = model.init_state(ids.shape[0], length)
    first, state = model.prefill(ids[:, :a], state)
    rows = [first]
    for t in range(a, length):
        logits, state = model.step(ids[:, t : t + 1], state)  # [B, 1] ids, as well as [B]
        rows.append(logits[:, None])
    torch.testing.assert_close(torch.cat(rows, 1), full, atol=ATOL, rtol=0)

    state = model.init_state(ids.shape[0], length)
    p1, state = model.prefill(ids[:, :a], state)
    p2, state = model.prefill(ids[:, a:b], state, last_only=True)
    torch.testing.assert_close(p1, full[:, :a], atol=ATOL, rtol=0)
    torch.testing.assert_close(p2, full[:, b - 1], atol=ATOL, rtol=0)
    rows = []
    for t in range(b, length):
        logits, state = model.step(ids[:, t], state)
        rows.append(logits)
    torch.testing.assert_close(torch.stack(rows, 1), full[:, b:], atol=ATOL, rtol=0)


def assert_decodes(model, vocab: int) -> None:
    assert_steps_equal_forward(model, vocab)
    assert_prefill_then_steps_equal_forward(model, vocab)


# --------------------------------------------------------------------------- step == parallel forward
@pytest.mark.parametrize("family", TINY)
def test_every_family_decodes_as_its_forward(family):
    assert_decodes(*tiny64(family))


@pytest.mark.parametrize("window", [1, 4])
def test_a_sliding_window_decodes_as_its_forward_when_its_ring_wraps(window):
    """tiny_pha_swa's window (32) covers these 12 tokens; a shorter one wraps its ring in the prompt and while stepping
    (the branch's own cases: tests/test_sliding_window.py)."""
    assert_decodes(*tiny64("tiny_pha_swa", f"model.swa.window={window}"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_decodes_as_its_forward(layout):
    assert_decodes(*tiny64("tiny_pha", *LAYOUTS[layout]))


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_mixer_decodes_as_its_forward(mixer):
    """The mixers are position-wise, the gate mixer's input-dependent gate included; tiny_pha_sparse's 2-branch
    mixers beside the 3-branch one."""
    assert_decodes(*tiny64("tiny_pha", f"model.mixer={mixer}"))
    assert_steps_equal_forward(*tiny64("tiny_pha_sparse", f"model.mixer={mixer}"))


@pytest.mark.parametrize("impl", DSS_CONV_IMPLS)
@pytest.mark.parametrize("kernel", DSS_KERNELS)
def test_every_dss_kernel_and_convolution_decodes(kernel, impl):
    """The recurrence follows each kernel's discretisation (dss_exp's zero-order hold, s4d_lin_noscale's none) and
    the learned skip; the prefill runs the configured convolution (chunks of 4: several chunks and a ragged one)."""
    model, vocab = tiny64("tiny_gss", f"model.gss.kernel={kernel}", f"model.gss.conv_impl={impl}", "model.gss.chunk=4")
    with torch.no_grad():
        for blk in model.blocks:  # a skip far from its init of 1, so a lost or doubled skip shows
            blk.branches["gss"].dss.skip.normal_()
    assert_decodes(model, vocab)


def test_a_longer_context_than_training_decodes():
    """Nothing ties decoding to data.seq_len: 150 tokens (tiny: 128), prefill of 140 then steps, in fp64."""
    model, vocab = tiny64("tiny_pha")
    assert_prefill_then_steps_equal_forward(model, vocab, length=150, cuts=(100, 140))


def test_knockout_decodes_as_the_knocked_out_forward():
    model, vocab = tiny64("tiny_pha")
    with model.knockout("gss"):
        assert_decodes(model, vocab)


def test_fp32_decoding_is_close_to_the_forward():
    """fp32 (complex64 GSS state): within fp32 rounding of the forward over 64 steps."""
    model = build_model(load_config("tiny_pha").model).eval()
    ids = ids_for(2048, length=64)
    with torch.no_grad():
        full = model(ids)
    state = model.init_state(2, 64)
    logits, state = model.prefill(ids[:, :32], state)
    rows = [logits] + [model.step(ids[:, t], state)[0][:, None] for t in range(32, 64)]
    torch.testing.assert_close(torch.cat(rows, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["tiny_pha", "tiny_gss_hybrid", "tiny_pha_swa"])
def test_bf16_autocast_decodes_with_a_bf16_kv_cache(family):
    """As on a GPU run (bf16-mixed): a state made inside autocast keeps bf16 keys and values and a complex64 GSS
    state (cache_bytes at 2 bytes), and decoding is within bf16 rounding of the autocast forward."""
    cfg = load_config(family)
    model = build_model(cfg.model).eval()
    ids = ids_for(cfg.model.vocab_size, length=40)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        full = model(ids)
        state = model.init_state(2, 40)
        logits, state = model.prefill(ids[:, :20], state)
        rows = [logits] + [model.step(ids[:, t], state)[0][:, None] for t in range(20, 40)]
    kinds = {type(st).__name__: st for layer in state.layers for st in layer.values()}
    assert kinds["KVCache"].k.dtype == torch.bfloat16 and kinds["DSSState"].x.dtype == torch.complex64
    assert state.nbytes() == model.cache_bytes(2, 40, 2)
    torch.testing.assert_close(torch.cat(rows, 1).float(), full.float(), atol=3e-2, rtol=3e-2)


# --------------------------------------------------------------------------- the state's bytes
@pytest.mark.parametrize("family", TINY)
def test_decode_state_bytes_equal_cache_bytes(family):
    """The tensors a decode state keeps (KV cache at max_len, GSS's complex state, nothing for the FFN) are exactly
    `cache_bytes` by branch, for bf16 / fp32 / fp64 caches, before and after a prefill (nothing grows)."""
    cfg = load_config(family)
    model = build_model(cfg.model).eval()
    batch, max_len = 3, 17
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        state = model.to(dtype).init_state(batch, max_len)
        expected = model.cache_bytes_by_branch(batch, max_len, torch.finfo(dtype).bits // 8)
        assert state.nbytes_by_branch() == expected, dtype
        assert state.nbytes() == model.cache_bytes(batch, max_len, torch.finfo(dtype).bits // 8)
        model.prefill(ids_for(cfg.model.vocab_size, batch, 10), state)
        assert state.nbytes_by_branch() == expected, dtype
    assert state.nbytes() > 0


# --------------------------------------------------------------------------- a branch of one's own
class RunningSum(nn.Module):
    """A toy causal branch with the decoding hooks: y_t = W_out(sum_{s<=t} W_in h_s); its state a plain attribute."""

    def __init__(self, d_model: int, width: int = 8):
        super().__init__()
        self.W_in, self.W_out = nn.Linear(d_model, width, bias=False), nn.Linear(width, d_model, bias=False)

    def forward(self, h):
        return self.W_out(self.W_in(h).cumsum(1))

    def init_state(self, batch, max_len, *, device=None, dtype=None):
        return SimpleNamespace(pos=0, total=torch.zeros(batch, 1, self.W_in.out_features, device=device, dtype=dtype))

    def prefill(self, h, state):
        sums = state.total + self.W_in(h).cumsum(1)
        state.total, state.pos = sums[:, -1:], state.pos + h.shape[1]
        return self.W_out(sums), state

    step = prefill


class NoHooks(nn.Module):
    def forward(self, h):
        return h


def test_a_new_branch_with_the_hooks_decodes():
    model, vocab = tiny64("tiny_pha")
    model.blocks[1].branches["ffn"] = RunningSum(64).double()
    assert_decodes(model, vocab)
    state = model.init_state(2, 10)
    assert state.nbytes_by_branch()["ffn"] == 2 * 8 * 8  # its tensor attribute: [2, 1, 8] float64


def test_a_branch_without_the_hooks_is_named():
    model, _ = tiny64("tiny_transformer")
    model.blocks[1].branches["ffn"] = NoHooks()
    for call in (lambda: model.init_state(1, 8), lambda: model.generate(torch.zeros(1, 3, dtype=torch.long), 2)):
        with pytest.raises(
            TypeError,
            match=re.escape(
                "layer 1: branch 'ffn' (NoHooks) has no init_state, prefill, step, so this model cannot decode"
            ),
        ):
            call()


# --------------------------------------------------------------------------- limits
def test_a_full_state_is_refused_and_left_as_it_was():
    model, vocab = tiny64("tiny_pha")
    ids = ids_for(vocab, length=6)
    state = model.init_state(2, 5)
    model.prefill(ids[:, :4], state)
    model.step(ids[:, 4], state)
    with pytest.raises(ValueError, match=r"5 tokens seen \+ 1 new > max_len=5; start from init_state"):
        model.step(ids[:, 5], state)
    assert state.pos == 5 and all(st.pos == 5 for layer in state.layers for st in layer.values())
    with pytest.raises(ValueError, match=r"max_len=3"):
        model.prefill(ids[:, :4], model.init_state(2, 3))
    attn = model.blocks[0].branches["attn"]  # the branch on its own refuses too
    cache = attn.init_state(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"attention KV cache full: 0 cached \+ 4 new tokens > max_len=3"):
        attn.prefill(torch.zeros(2, 4, 64, dtype=torch.float64), cache)
    with pytest.raises(ValueError, match=r"ids of shape \(2, 2\), expected \[batch\] or \[batch, 1\]"):
        model.step(ids[:, :2], model.init_state(2, 5))
    with pytest.raises(ValueError, match=r"expected \[batch=3, tokens\]"):
        model.prefill(ids, model.init_state(3, 8))


# --------------------------------------------------------------------------- sampling
def greedy_by_forward(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The reference: the argmax of a full forward of everything so far, n times."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("family", ["tiny_pha", "tiny_gss_hybrid", "tiny_pha_sparse"])
def test_greedy_generation_is_the_argmax_of_the_forward(family):
    model, vocab = tiny64(family)
    ids = ids_for(vocab, length=5)
    expected = greedy_by_forward(model, ids, 8)
    assert torch.equal(model.generate(ids, 8, temperature=0), expected)
    assert torch.equal(model.generate(ids, 8, top_k=1, seed=3), expected)  # top-k of 1 is greedy at any temperature
    assert torch.equal(model.generate(ids, 8, top_p=1e-9, seed=3), expected)  # so is a tiny nucleus
    assert torch.equal(model.generate(ids, 0), ids)


def test_a_seed_gives_the_same_tokens_and_other_seeds_others():
    model, vocab = tiny64("tiny_pha")
    ids = ids_for(vocab, length=4)
    a, b = (model.generate(ids, 12, temperature=1.5, seed=7) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (2, 16) and torch.equal(a[:, :4], ids)
    assert not torch.equal(a, model.generate(ids, 12, temperature=1.5, seed=8))


def test_sampled_tokens_stay_in_the_top_k_and_top_p_sets():
    """Every sampled token is among the k most likely (and in the nucleus) of the forward at its position, where
    unfiltered sampling from the same model often leaves those sets."""
    model, vocab = tiny64("tiny_pha")
    with torch.no_grad():  # a more peaked model (tied head: the embedding too): a nucleus of ~100 tokens at p = 0.5
        model.lm_head.weight.mul_(6)
    ids = ids_for(vocab, length=3)

    def inside(out, top_k, top_p):  # per new token: in the set filter_logits keeps for its position?
        with torch.no_grad():
            logits = model(out[:, :-1])[:, 2:].reshape(-1, vocab)  # the distribution each new token came from
        allowed = torch.isfinite(filter_logits(logits / 0.8, top_k, top_p))
        return allowed.gather(1, out[:, 3:].reshape(-1, 1)), allowed.sum(1)

    for top_k, top_p in ((5, None), (None, 0.5), (3, 0.9)):
        kept, size = inside(model.generate(ids, 16, temperature=0.8, seed=1, top_k=top_k, top_p=top_p), top_k, top_p)
        assert kept.all() and size.float().mean() < vocab / 8, (top_k, top_p, size.float().mean())
        assert not inside(model.generate(ids, 16, temperature=0.8, seed=1), top_k, top_p)[0].all()  # the control
    with pytest.raises(ValueError, match=r"top_p=1.5 must be in \(0, 1\]"):
        model.generate(ids, 2, top_p=1.5)
    with pytest.raises(ValueError, match=r"top_k=0 must be a positive integer"):
        model.generate(ids, 2, top_k=0)
    with pytest.raises(ValueError, match=r"temperature=-1 must be >= 0"):
        model.generate(ids, 2, temperature=-1)


def test_filter_logits_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = probs.log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw)).int().tolist()  # noqa: E731
    assert kept(top_k=2) == [[1, 1, 0, 0], [0, 0, 1, 1]]
    assert kept(top_p=0.75) == [[1, 1, 0, 0], [0, 0, 1, 1]]  # 0.5 < 0.75 <= 0.5 + 0.3
    assert kept(top_p=0.85) == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert kept(top_p=0.4) == [[1, 0, 0, 0], [0, 0, 0, 1]]  # the most likely token always stays
    assert kept(top_k=3, top_p=0.75) == kept(top_p=0.75) and kept(top_k=4, top_p=1.0) == [[1] * 4] * 2


def test_temperature_scales_the_sampled_distribution():
    """20,000 draws from fixed logits at temperature 2 follow softmax(logits / 2) (4 sigma)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(logits, 2.0, generator=gen), minlength=4).double()
    p = torch.softmax(logits[0].double() / 2.0, 0)
    assert ((counts / 20000 - p).abs() < 4 * (p * (1 - p) / 20000).sqrt()).all()
    assert torch.equal(sample(logits[:3], 0.0), torch.zeros(3, dtype=torch.long))


def test_generation_stops_at_eos_and_pads_finished_sequences():
    model, vocab = tiny64("tiny_pha")
    ids = ids_for(vocab, length=4)
    free = model.generate(ids, 6, temperature=0)
    eos = int(free[0, 5])  # sequence 0's second new token
    expected = free.clone()
    for row in expected:  # after a sequence's first eos: eos only
        hits = (row[4:] == eos).nonzero()
        if len(hits):
            row[4 + int(hits[0]) + 1 :] = eos
    assert torch.equal(model.generate(ids, 6, temperature=0, eos_id=eos), expected)
    first = 4 + int((free[0, 4:] == eos).nonzero()[0])  # where sequence 0 emits eos
    same = ids[:1].repeat(2, 1)  # both sequences end there: generation stops
    assert torch.equal(model.generate(same, 6, temperature=0, eos_id=eos), free[:1, : first + 1].repeat(2, 1))


# --------------------------------------------------------------------------- pha-lab generate
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny_pha trained 4 steps on the CPU through `pha-lab train`: (runs dir, run id, checkpoint)."""
    runs = tmp_path_factory.mktemp("gen") / "runs"
    assert (
        main(
            [
                "train",
                "tiny_pha",
                "trainer.max_steps=4",
                "trainer.val_every_n_steps=4",
                "trainer.log_every_n_steps=2",
                "data.max_eval_tokens=1024",
                "tracking.experiment=gen",
                "--runs-dir",
                str(runs),
            ]
        )
        == 0
    )
    (ckpt,) = (runs / "checkpoints").glob("*/last.ckpt")
    return runs, ckpt.parent.name, ckpt


def generate_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_prints_stable_greedy_text(trained, capsys):
    runs, run_id, ckpt = trained
    args = ["--prompt", "It was a dark night", "--max-new-tokens", "12", "--temperature", "0", "--runs-dir", str(runs)]
    code, first, _ = generate_cli(capsys, run_id, *args)
    assert code == 0 and first.startswith("It was a dark night") and len(first.strip()) > len("It was a dark night")
    assert generate_cli(capsys, run_id, *args)[:2] == (0, first)  # the same text again
    assert generate_cli(capsys, str(ckpt), *args)[1] == first  # a checkpoint path loads the same model
    sampled = ["--prompt", "", "--max-new-tokens", "8", "--top-k", "20", "--top-p", "0.95", "--runs-dir", str(runs)]
    a, b = generate_cli(capsys, run_id, *sampled, "--seed", "1"), generate_cli(capsys, run_id, *sampled, "--seed", "1")
    assert a[:2] == b[:2] and a[0] == 0 and a[1].strip()


def test_cli_generate_errors_name_the_problem(trained, capsys):
    runs, _, ckpt = trained
    code, _, err = generate_cli(capsys, "0123abcd", "--prompt", "x", "--runs-dir", str(runs))
    assert code == 2 and "0123abcd is neither a checkpoint file nor a run id" in err and "--runs-dir" in err
    code, _, err = generate_cli(capsys, str(Path(ckpt).parent / "missing.ckpt"), "--prompt", "x")
    assert code == 2 and "missing.ckpt does not exist" in err
    code, _, err = generate_cli(capsys, str(ckpt), "--prompt", "x", "--top-p", "2")
    assert code == 2 and "top_p=2.0 must be in (0, 1]" in err

"""The chunked LM head + cross-entropy (pha_lab.training.loss) against the plain `F.cross_entropy(logits.float())`
path and a float64 reference: loss and gradients (hidden states, head weight, model parameters), the LM and MQAR's
masked loss, chunk sizes that do and do not divide the tokens; per-position NLL, argmax, memory."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pha_lab.bench.loss import LiveTensorBytes, inputs, saved_bytes
from pha_lab.config import load_config
from pha_lab.data.batch import IGNORE_INDEX
from pha_lab.data.mqar import MQARDataset
from pha_lab.models import build_model
from pha_lab.training import loss
from pha_lab.training.loss import argmax_tokens, token_nll

PARAMS = [
    "wte.weight",
    "norm_f.weight",
    "blocks.0.branches.attn.W_q.weight",
    "blocks.1.branches.gss.dss.w_re",
    "blocks.1.branches.ffn.W_in.weight",
]  # wte.weight is also the tied LM head


def case(experiment: str, batch: int = 2):
    """(fp32 model, token ids, labels): tiny_pha with every position scored, tiny_mqar with the answers only."""
    cfg = load_config(experiment)
    model = build_model(cfg.model)
    if cfg.data.source == "mqar":
        ds = MQARDataset(cfg.data, "train", 0, 64)
        rows = [ds[i] for i in range(batch)]
        idx, labels = (torch.from_numpy(np.stack([r[k] for r in rows])) for k in ("input_ids", "labels"))
        assert 0 < (labels != IGNORE_INDEX).float().mean() < 0.2  # mostly ignored
    else:
        ids = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len + 1))
        idx, labels = ids[:, :-1], ids[:, 1:]
    return model, idx, labels


def run(model, idx, labels, path: str, amp: bool = False) -> dict[str, torch.Tensor]:
    """Loss and gradients (hidden states and PARAMS) by one of the paths: plain (the [N, V] logits, upcast to the
    compute dtype's fp32 as LMModule did before) or chunked:<chunk_tokens>."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        hidden = model(idx, return_hidden=True)
        hidden.retain_grad()
        if path == "plain":
            logits = model.lm_head(hidden)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            value = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        else:
            value = token_nll(hidden, model.lm_head.weight, labels, "sum", int(path.split(":")[1]))
    value.backward()
    params = dict(model.named_parameters())
    return {"loss": value.detach(), "hidden": hidden.grad, **{p: params[p].grad for p in PARAMS}}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("experiment", ["tiny_pha", "tiny_mqar"])
@pytest.mark.parametrize("chunk", [64, 100, 4096])  # N = 256 tokens: divides, does not, one chunk
def test_chunked_loss_and_gradients_match_the_plain_path(experiment, chunk):
    model, idx, labels = case(experiment, batch=2 if experiment == "tiny_pha" else 4)
    assert idx.numel() == 256
    model64 = copy.deepcopy(model).double()
    ref = run(model64, idx, labels, "plain")
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in ref.values())
    # the algorithm is exact: float64 chunked == float64 plain to rounding
    exact = run(model64, idx, labels, f"chunked:{chunk}")
    assert max(rel_err(exact[k], ref[k]) for k in ref) < 1e-12
    # fp32 and bf16 autocast: no further from the float64 reference than the plain path in the same precision
    for amp, floor in ((False, 1e-6), (True, 2e-3)):
        plain, chunked = run(model, idx, labels, "plain", amp), run(model, idx, labels, f"chunked:{chunk}", amp)
        for key in ref:
            e_plain, e_chunked = rel_err(plain[key], ref[key]), rel_err(chunked[key], ref[key])
            assert e_chunked <= 2 * e_plain + floor, (amp, key, e_chunked, e_plain)
            assert e_chunked < (1e-3 if not amp else 2e-2), (amp, key, e_chunked)  # (the model's rounding dominates)


@pytest.mark.parametrize("chunk", [96, 1000])
def test_the_loss_alone_rounds_no_worse_than_the_plain_path(chunk):
    """The loss's own rounding, isolated from the model's: the same fp32 inputs, the float64 reference computed
    from them; fp32 and bf16 autocast."""
    h, w, y = inputs(1000, 32, 512, torch.device("cpu"))
    y[::3] = IGNORE_INDEX

    def grads(fn, h, w, amp=False):
        h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = fn(h, w)
        return [loss.detach(), *torch.autograd.grad(loss, (h, w))]

    def plain(h, w):
        logits = F.linear(h, w)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y, reduction="sum")

    def chunked(h, w):
        return token_nll(h, w, y, "sum", chunk)

    ref = grads(plain, h.double(), w.double())
    for amp, floor in ((False, 1e-7), (True, 5e-4)):
        for r, a, b in zip(ref, grads(plain, h, w, amp), grads(chunked, h, w, amp)):
            assert rel_err(b, r) <= 2 * rel_err(a, r) + floor, (amp, rel_err(b, r), rel_err(a, r))


def test_the_compiled_kernel_is_the_eager_one_written_pointwise():
    """What `compiled=True` hands to torch.compile (tests/test_compile.py compiles it) computes what the eager
    in-place kernel does, ignored rows included."""
    logits, labels = torch.randn(50, 300, dtype=torch.float64), torch.randint(0, 300, (50,))
    labels[::4] = IGNORE_INDEX
    nll_a, grad_a = loss._nll_and_grad(logits.clone(), labels)
    nll_b, grad_b = loss._nll_and_grad_pointwise(logits, labels)
    assert torch.allclose(nll_a, nll_b, rtol=0, atol=1e-12) and torch.allclose(grad_a, grad_b, rtol=0, atol=1e-12)
    assert (grad_a[::4] == 0).all() and (nll_a[::4] == 0).all()


def test_per_position_nll_and_argmax_without_logits():
    model, idx, labels = case("tiny_mqar", batch=4)
    model = model.double()
    with torch.no_grad():
        hidden = model(idx, return_hidden=True)
        logits = model.lm_head(hidden)
        assert torch.equal(logits, model(idx))  # return_hidden is the head's input
        nll = token_nll(hidden, model.lm_head.weight, labels, "none", chunk_tokens=37)
        expected = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        assert nll.shape == labels.shape and torch.allclose(nll, expected, rtol=0, atol=1e-12)
        assert (nll[labels == IGNORE_INDEX] == 0).all() and (nll[labels != IGNORE_INDEX] > 0).all()
        assert token_nll(hidden, model.lm_head.weight, labels, "sum", 37) == pytest.approx(expected.sum().item())
        assert torch.equal(argmax_tokens(hidden, model.lm_head.weight, chunk_tokens=37), logits.argmax(-1))


def test_bad_calls_are_refused():
    h, w, y = inputs(8, 4, 16, torch.device("cpu"))
    with pytest.raises(ValueError, match="for evaluation, without gradients"):
        token_nll(h, w, y, "none")
    with pytest.raises(ValueError, match="reduction must be"):
        token_nll(h, w, y, "mean")
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        token_nll(h, w, y, "sum", chunk_tokens=0)
    with pytest.raises(ValueError, match="must agree"):
        token_nll(h, w, y[:-1], "sum")


def test_the_loss_peak_memory_drops_from_the_logits_to_one_chunk():
    """CPU, bf16 autocast as on the GPU: the bytes of every tensor the loss allocates and still holds, at their
    peak over forward + backward. The plain path holds >= 10 bytes per logit at once (the fp32 copy, its saved
    log-softmax, its fp32 gradients); the chunked one one chunk's worth (bf16 logits, their fp32 log-softmax,
    the bf16 gradient) plus the head weight's gradient (fp32 + a bf16 partial) and the hidden states' gradient."""
    n, d, v, chunk = 2048, 64, 8192, 256
    h, w, y = inputs(n, d, v, torch.device("cpu"))

    def plain():
        return F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")

    def chunked():
        return token_nll(h, w, y, "sum", chunk)

    peaks, saved = {}, {}
    for name, fn in (("plain", plain), ("chunked", chunked)):

        def step(fn=fn):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = fn()
            loss.backward()

        with LiveTensorBytes() as live:
            step()
        peaks[name] = live.peak
        with torch.autocast("cpu", dtype=torch.bfloat16):
            saved[name] = saved_bytes(fn)
    assert peaks["plain"] >= 10 * n * v
    assert peaks["chunked"] <= 16 * chunk * v + 16 * v * d + 8 * n * d < peaks["plain"] / 4
    assert saved["plain"] >= 4 * n * v and saved["chunked"] <= 2 * n * d + 4 * v * d


def test_module_loss_and_mqar_accuracy_go_through_the_chunked_path():
    """LMModule's summed NLL and its MQAR accuracy (argmax on the answer positions only) equal what the full
    logits give."""
    from pha_lab.training.module import LMModule

    cfg = load_config("tiny_mqar", ["trainer.loss_chunk_tokens=50"])
    module = LMModule(cfg).eval()
    _, idx, labels = case("tiny_mqar", batch=8)
    batch = {"input_ids": idx, "labels": labels}
    with torch.no_grad():
        logits = module(idx)
        _, nll, count = module._losses(batch)
        module._eval_step(batch, 0, "val")
    mask = labels != IGNORE_INDEX
    assert nll.item() == pytest.approx(F.cross_entropy(logits[mask], labels[mask], reduction="sum").item(), rel=1e-6)
    assert count == mask.sum()
    assert module.eval_acc.compute().item() == (logits.argmax(-1)[mask] == labels[mask]).float().mean().item()
    assert torch.allclose(
        module.nll_per_position(batch),
        F.cross_entropy(logits.transpose(1, 2), labels, reduction="none"),
        rtol=1e-6,
        atol=1e-6,
    )

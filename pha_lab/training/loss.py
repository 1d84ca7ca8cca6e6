"""The LM head and its cross-entropy in one chunked pass: no [tokens, vocab] logits tensor is ever made.

At V = 50,304 the logits of a training step are the largest tensors of the step (12,288 tokens: 1.2 GB in bf16,
2.5 GB per fp32 copy, and the plain `F.cross_entropy(logits.float())` keeps several fp32 copies alive through
backward). Here the head matmul belongs to the loss: `hidden` [N, D] (the final norm's output) and the head
weight [V, D] go in, and the tokens are processed `chunk_tokens` at a time, so only one chunk's logits exist:

- forward with gradients (`reduction="sum"`, training): each chunk's logits are made (in the autocast dtype,
  bf16 on the GPU), upcast to fp32 chunk-wise, their log-sum-exp and NLL taken and, in the same pass, the
  gradient of the summed NLL w.r.t. them (softmax - one-hot, zero at IGNORE_INDEX), which is turned at once into
  that chunk's gradient w.r.t. `hidden` and its share of the weight's gradient (accumulated in fp32). Backward
  only scales the two by the incoming gradient. This is Liger-Kernel's fused linear cross-entropy idea (without
  Triton): since a training forward is always followed by its backward, computing the gradient early costs no
  recomputed matmul, unlike a checkpointed chunk loop (which redoes the [N, D] x [D, V] product: ~9 % more FLOPs
  for a 125M model).
- without gradients (evaluation, `reduction="none"` or "sum"): the same chunks, NLL only.
- `argmax_tokens`: the predicted token per row, chunk-wise (MQAR's accuracy).

The per-chunk elementwise work is plain tensor code: eager (`_nll_and_grad`, in place: one fp32 chunk at a time) or,
with `compiled=True`, handed to torch.compile in a form it fuses (`_nll_and_grad_pointwise`: one reduction and
one pointwise kernel per chunk instead of ~8 eager passes over fp32); the chunk loop and the matmuls stay eager,
a clean boundary outside the model's compiled graph.
`token_nll` is the one loss path: training, validation/test and any evaluation by position call it.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch

from pha_lab.data.batch import IGNORE_INDEX

CHUNK_TOKENS = 4096  # default tokens per chunk: 4,096 x 50,304 bf16 logits = 0.4 GB alive at a time


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(NLL [c] in fp32 or wider, log-softmax [c, V] in that dtype, the scored rows, the targets with ignored rows
    set to 0). One fused log_softmax kernel: no log-sum-exp temporaries."""
    log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels, 0)
    nll = torch.where(valid, -log_p.gather(-1, target[:, None]).squeeze(-1), 0.0)
    return nll, log_p, valid, target


def _nll_only(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _nll(logits, labels)[0]


def _nll_and_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL [c] and d(sum NLL)/d(logits) [c, V] in the logits' dtype: softmax - one-hot on scored rows, 0 elsewhere.
    In place on the log-softmax (eager: one fp32 chunk alive besides the upcast logits)."""
    nll, log_p, valid, target = _nll(logits, labels)
    grad = log_p.exp_().mul_(valid[:, None])
    grad.scatter_add_(-1, target[:, None], -valid[:, None].to(grad.dtype))
    return nll, grad.to(logits.dtype)


def _nll_and_grad_pointwise(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_nll_and_grad` without in-place ops or a scatter (the one-hot is a comparison), for torch.compile: a
    reduction (log-sum-exp) and one pointwise kernel that reads the logits and writes their gradient in their
    dtype, with no fp32 [c, V] buffer. Eager, it would hold several fp32 chunks at once."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels, 0)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    nll = torch.where(valid, (lse - x.gather(-1, target[:, None])).squeeze(-1), 0.0)
    one_hot = torch.arange(x.shape[-1], device=x.device) == target[:, None]
    grad = (torch.exp(x - lse) - one_hot.to(x.dtype)) * valid[:, None]
    return nll, grad.to(logits.dtype)


@functools.cache
def _kernels(compiled: bool):
    """(nll, nll_and_grad) per chunk: eager, or torch.compile'd (once per process; a chunk of another size, the
    last one or an evaluation batch's, compiles once more, shape-generic)."""
    if not compiled:
        return _nll_only, _nll_and_grad
    return torch.compile(_nll_only), torch.compile(_nll_and_grad_pointwise)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head matmul runs in: autocast's where it is on (as `lm_head(hidden)` would), else the inputs'."""
    device = hidden.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _no_autocast(device: torch.device):
    """Autocast off inside (every dtype here is explicit; autocast does not take `out=` matmuls)."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum over scored rows of -log softmax(hidden @ weight.T)[label]; gradients made during the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, dtype: torch.dtype, compiled: bool):
        kernel = _kernels(compiled)[1]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h, w = hidden.to(dtype), weight.to(dtype)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.promote_types(dtype, torch.float32), device=weight.device)
            if want_w
            else None
        )
        partial = torch.empty_like(w) if want_w and grad_w.dtype != dtype else None  # one chunk's share, then added
        total = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=hidden.device)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            nll, g = kernel(h[rows] @ w.T, labels[rows])
            total += nll.sum()
            if want_h:
                torch.mm(g, w, out=grad_h[rows])
            if want_w and partial is None:
                torch.addmm(grad_w, g.T, h[rows], out=grad_w)  # (= addmm_, which torch's FLOP counter skips)
            elif want_w:
                grad_w += torch.mm(g.T, h[rows], out=partial)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (
            None if grad_h is None else (grad_h * grad_total).to(h_dtype),
            None if grad_w is None else (grad_w * grad_total).to(w_dtype),
            None,
            None,
            None,
            None,
        )


def token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "none",
    chunk_tokens: int = CHUNK_TOKENS,
    compiled: bool = False,
) -> torch.Tensor:
    """Negative log-likelihood of `labels` under logits = hidden @ weight.T, in fp32 (float64 for float64 inputs),
    chunk by chunk (see the module docstring).

    hidden [..., D], weight [V, D], labels [...] (IGNORE_INDEX: not scored, NLL 0). reduction "none": NLL per
    position, shaped like `labels` (no gradients: evaluation); "sum": the sum over scored positions (training:
    differentiable w.r.t. hidden and weight). compiled: torch.compile the per-chunk elementwise kernels."""
    if reduction not in ("none", "sum"):
        raise ValueError(f"reduction must be 'none' or 'sum', got {reduction!r}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must agree but for hidden's last dimension"
        )
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if needs_grad and reduction == "none":
        raise ValueError(
            "per-position NLL (reduction='none') is for evaluation, without gradients; train on reduction='sum'"
        )
    dtype = _compute_dtype(hidden, weight)
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    with _no_autocast(hidden.device):
        if needs_grad:
            return _LinearCrossEntropySum.apply(flat_h, weight, flat_y, chunk_tokens, dtype, compiled)
        kernel = _kernels(compiled)[0]
        h, w = flat_h.to(dtype), weight.to(dtype)
        nll = torch.cat(
            [
                kernel(h[s : s + chunk_tokens] @ w.T, flat_y[s : s + chunk_tokens])
                for s in range(0, h.shape[0], chunk_tokens)
            ]
            or [flat_h.new_zeros(0, dtype=torch.float32)]
        )
    return nll.sum() if reduction == "sum" else nll.view(labels.shape)


@torch.no_grad()
def argmax_tokens(hidden: torch.Tensor, weight: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """The most likely token under logits = hidden @ weight.T for each row of hidden [..., D] -> [...], chunk-wise."""
    dtype = _compute_dtype(hidden, weight)
    flat = hidden.reshape(-1, hidden.shape[-1])
    with _no_autocast(hidden.device):
        h, w = flat.to(dtype), weight.to(dtype)
        best = [(h[s : s + chunk_tokens] @ w.T).argmax(-1) for s in range(0, h.shape[0], chunk_tokens)]
    return (torch.cat(best) if best else flat.new_zeros(0, dtype=torch.long)).view(hidden.shape[:-1])

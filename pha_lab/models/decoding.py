"""Decoding: a prompt's parallel prefill, then one token at a time from a per-layer state; sampling.

The contract, stated once (pha_lab.branches points here). A branch module decodes when it has the three methods

    init_state(batch, max_len, *, device, dtype) -> state      an empty state for `batch` sequences of up to
                                                                `max_len` tokens; `dtype`: the activations' dtype
                                                                (what a KV cache stores; a recurrent state may keep
                                                                more: GSS keeps complex64, complex128 for float64)
    prefill(h [B, T, D], state) -> (out [B, T, D], state)       the forward's math over T new tokens at once, after
                                                                the state's `pos` tokens (0 for a fresh state)
    step(h [B, 1, D], state) -> (out [B, 1, D], state)          one token

The state is the branch's own object: it carries its position counter `pos` (tokens seen; RoPE needs the absolute
position), is advanced in place and returned (the same object, so `out, state = branch.step(h, state)` and ignoring
the returned one are equivalent). The bytes it keeps between tokens are its tensor attributes, or, where it has a
`cache_tensors()` method, the tensors that method returns (GSS keeps its discretised modes beside the state: weights,
not cache); tests/test_decoding.py checks they equal the module's `cache_bytes(batch, max_len, dtype_bytes)`.
Position-wise branches (FFN) have trivial ones (`PositionState`). The mixers are position-wise (the gate mixer's
gate is a function of the token's own h), so every mixer decodes.

A model decodes when every branch of every layer has the three methods, in both layouts and with any per-layer
overrides; `check_decodable` names the first layer and branch that lacks them. On LanguageModel (thin wrappers of
the functions here):

    init_state(batch, max_len, device=None, dtype=None) -> DecodeState   defaults: the embedding's device, and its
                                                                         dtype (the autocast dtype inside autocast)
    prefill(ids [B, T], state, last_only=False) -> (logits [B, T, V], state)   ([B, V] of the last token with
                                                                               last_only: no [B, T, V] at long T)
    step(ids [B] or [B, 1], state) -> (logits [B, V], state)
    generate(ids [B, T], max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, eos_id=None)
        -> ids [B, T + n], n <= max_new_tokens

DecodeState is advanced in place and returned, like the branches' states; prefill and step run under no_grad and
refuse to go past `max_len` (before touching any layer, so a refused call leaves the state as it was). Knockout
(`with model.knockout("gss")`) works as in the forward: the branch still advances its state, its output is zeroed.
Decoding is inference: call `model.eval()` first (generate does, and restores the mode) or dropout differs.

Numerics: step-by-step logits equal the parallel forward's to ~1e-15 in float64 (tests/test_decoding.py: 1e-9 for
every family, layout and mixer). In fp32 a GSS step accumulates its complex64 state over the tokens, where the
forward's FFT convolution sees the kernel afresh at every length: the two agree to fp32 rounding times the number
of steps a mode remembers.

Sampling (generate): temperature 0 is greedy (argmax); otherwise the logits are divided by the temperature, then
top_k keeps the k largest (and any tied with the k-th), top_p the smallest set of most likely tokens whose
probability reaches top_p (the most likely token always stays), and a token is drawn from the rest by
torch.multinomial with a torch.Generator seeded with `seed` on the model's device: the same seed gives the same
tokens on one device (seed None: torch's global generator). A sequence that emits `eos_id` is padded with it;
generation stops when all have.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

DECODE_METHODS = ("init_state", "prefill", "step")


@dataclass
class PositionState:
    """The state of a position-wise branch: only the position counter (it keeps nothing between tokens)."""

    pos: int = 0


def state_tensors(state: Any) -> list[torch.Tensor]:
    """The tensors a branch state keeps between tokens: its `cache_tensors()`, else its tensor attributes."""
    if callable(getattr(state, "cache_tensors", None)):
        return list(state.cache_tensors())
    return [v for v in vars(state).values() if isinstance(v, torch.Tensor)]


@dataclass
class DecodeState:
    """The whole model's decoding state: per layer, branch name -> that branch's state, and the model's position."""

    layers: list[dict[str, Any]]
    batch: int
    max_len: int
    pos: int = 0  # tokens seen
    device: torch.device | None = field(default=None, repr=False)

    def nbytes_by_branch(self) -> Counter[str]:
        """Bytes kept between tokens, by branch name, summed over the layers (compare LanguageModel.cache_bytes)."""
        parts: Counter[str] = Counter()
        for layer in self.layers:
            for name, st in layer.items():
                parts[name] += sum(t.nbytes for t in state_tensors(st))
        return parts

    def nbytes(self) -> int:
        return sum(self.nbytes_by_branch().values())

    def reserve(self, n: int) -> None:
        """Refuse `n` more tokens beyond max_len, before any layer runs."""
        if self.pos + n > self.max_len:
            raise ValueError(
                f"decoding state full: {self.pos} tokens seen + {n} new > max_len={self.max_len}; "
                f"start from init_state(batch, max_len) with max_len >= prompt + new tokens"
            )


def check_decodable(model) -> None:
    """Raise a TypeError naming the first layer and branch whose module lacks init_state / prefill / step."""
    for i, block in enumerate(model.blocks):
        for name, branch in block.branches.items():
            missing = [m for m in DECODE_METHODS if not callable(getattr(branch, m, None))]
            if missing:
                raise TypeError(
                    f"layer {i}: branch '{name}' ({type(branch).__name__}) has no {', '.join(missing)}, "
                    f"so this model cannot decode; add init_state/prefill/step to the module "
                    f"(the contract: pha_lab.models.decoding)"
                )


def init_state(model, batch: int, max_len: int, device=None, dtype=None) -> DecodeState:
    check_decodable(model)
    if batch < 1 or max_len < 1:
        raise ValueError(f"init_state(batch={batch}, max_len={max_len}): both must be >= 1")
    device = torch.device(device) if device is not None else model.wte.weight.device
    if dtype is None:  # inside autocast, the dtype the activations (so the keys and values) will have
        autocast = device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else model.wte.weight.dtype
    layers = [
        {name: branch.init_state(batch, max_len, device=device, dtype=dtype) for name, branch in block.branches.items()}
        for block in model.blocks
    ]
    return DecodeState(layers, batch, max_len, device=device)


def _run(model, ids: torch.Tensor, state: DecodeState, mode: str) -> torch.Tensor:
    """ids [B, T] through the blocks' `mode` (prefill | step) -> the final norm's output [B, T, D]."""
    if ids.dim() != 2 or ids.shape[0] != state.batch:
        raise ValueError(f"{mode}: ids of shape {tuple(ids.shape)}, expected [batch={state.batch}, tokens]")
    state.reserve(ids.shape[1])
    x = model.drop(model.wte(ids))
    for block, layer in zip(model.blocks, state.layers):
        x = block.decode(x, layer, mode)
    state.pos += ids.shape[1]
    return model.norm_f(x)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, state: DecodeState, last_only: bool = False):
    h = _run(model, ids, state, "prefill")
    return model.lm_head(h[:, -1] if last_only else h), state


@torch.no_grad()
def step(model, ids: torch.Tensor, state: DecodeState):
    ids = ids[:, None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[1] != 1:
        raise ValueError(f"step: ids of shape {tuple(ids.shape)}, expected [batch] or [batch, 1]; use prefill for more")
    return model.lm_head(_run(model, ids, state, "step")[:, 0]), state


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits [B, V] with every token outside the top-k set and outside the top-p nucleus set to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def check_sampling(max_new_tokens: int, temperature: float, top_k, top_p) -> None:
    """ValueError naming the bad setting of generate."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k={top_k} must be a positive integer (or None: no top-k filter)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None: no nucleus filter)")


def sample(logits: torch.Tensor, temperature: float, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """One token id per row of logits [B, V] -> [B] (see the module docstring)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model,
    ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if ids.dim() != 2 or ids.shape[1] < 1:
        raise ValueError(f"generate: ids of shape {tuple(ids.shape)}, expected [batch, prompt tokens >= 1]")
    if max_new_tokens == 0:
        return ids
    was_training = model.training
    model.eval()
    try:
        gen = None
        if seed is not None:
            gen = torch.Generator(device=ids.device)
            gen.manual_seed(seed)
        state = init_state(model, ids.shape[0], ids.shape[1] + max_new_tokens - 1, device=ids.device)
        logits, state = prefill(model, ids, state, last_only=True)
        out, done = [ids], torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, gen)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done |= token == eos_id
            out.append(token[:, None])
            if i + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
                break
            logits, state = step(model, token, state)
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)

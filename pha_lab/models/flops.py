"""FLOPs per token, one rule for every module (the models, their branches alone, the bench's reference GPT-2).

    forward = 2 x (weights of every nn.Linear)  +  sum over submodules of their own `flops_per_token(seq_len)`
    training = 3 x forward (the backward does twice the forward's matmuls)

Each Linear counts once per token, whatever shares its weight (a tied LM head is a matmul, counted once). A
module reports through `flops_per_token(seq_len)` only its own work that no Linear does (attention's QK^T and AV
over the full T x T square, as torch's FLOP counter counts SDPA; GSS's FFTs), never its children's, and names
that part with `flops_part` (default: its class name). The root module's own method is not called: it is the one
asking (LanguageModel.flops_per_token calls this).
"""

from __future__ import annotations

from collections import Counter

from torch import nn


def flops_per_token(module: nn.Module, seq_len: int, training: bool = True) -> Counter[str]:
    """FLOPs per token by part: "matmul" (the Linears), each reporting module's `flops_part` (e.g. "attention",
    "fft") and "total". A part no module has reads 0."""
    mult = 3.0 if training else 1.0
    parts: Counter[str] = Counter()
    parts["matmul"] = mult * 2.0 * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
    for m in module.modules():
        if m is not module and callable(getattr(m, "flops_per_token", None)):
            parts[getattr(m, "flops_part", type(m).__name__)] += mult * m.flops_per_token(seq_len)
    parts["total"] = sum(parts.values())
    return parts

"""Memory accounting, one rule per part, for every model (pha_lab.models.lm exposes them as methods):

    weights      n_params x bytes per weight (GPT-2 counting: a tied embedding once)
    training     + fp32 gradients + AdamW's two fp32 moments, beside fp32 weights (the master copy that bf16-mixed
                 autocast reads): 16 bytes per parameter; activations are what a measured peak holds beyond
                 these (the bench's activations_gb column)
    decoding     the inference cache per sequence: each branch module's `cache_bytes(batch, seq_len, dtype_bytes)`
                 (attention: the KV cache, growing with the context; GSS: its recurrent state, not growing; FFN: 0)

A branch without `cache_bytes` cannot be counted: asking for the cache of a model that has one is an error naming
it (pha_lab.branches states the contract). Analytic: the decoding code's cache objects are checked against it.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

FP32 = 4
TRAINING_BYTES_PER_PARAM = {"weights": FP32, "grads": FP32, "adamw": 2 * FP32}


def weight_bytes(module: nn.Module, dtype_bytes: int | None = None) -> int:
    """Bytes of the parameters as stored (each in its own dtype), or at `dtype_bytes` per weight; a shared
    parameter (the tied LM head) counts once, as nn.Module.parameters() yields it once."""
    return sum(p.numel() * (p.element_size() if dtype_bytes is None else dtype_bytes) for p in module.parameters())


def training_bytes(n_params: int) -> dict[str, int]:
    """Bytes of the training state besides activations (fp32 weights, fp32 gradients, AdamW moments) and "total"."""
    parts = {part: n_params * size for part, size in TRAINING_BYTES_PER_PARAM.items()}
    return {**parts, "total": sum(parts.values())}


def cache_bytes_by_branch(blocks: nn.ModuleList, batch: int, seq_len: int, dtype_bytes: int) -> Counter[str]:
    """Inference cache bytes by branch name over the layers (`blocks`: the model's, each with `.branches`)."""
    parts: Counter[str] = Counter()
    for i, block in enumerate(blocks):
        for name, branch in block.branches.items():
            count = getattr(branch, "cache_bytes", None)
            if not callable(count):
                raise TypeError(
                    f"layer {i}: branch '{name}' ({type(branch).__name__}) has no cache_bytes(batch, "
                    f"seq_len, dtype_bytes), so the model's cache cannot be counted: add it to the module "
                    f"(pha_lab.branches, the contract)"
                )
            parts[name] += count(batch, seq_len, dtype_bytes)
    return parts

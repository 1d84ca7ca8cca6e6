"""The optimizer and learning-rate schedule, built here for every loop that trains a model: LMModule's
`configure_optimizers` (Lightning), the plain PyTorch loops of the bench and of the parity test. One place,
so the loops that are compared with each other cannot drift apart."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig


def lr_lambda(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup from 1/warmup to 1, then cosine decay to `min_ratio` at `max_steps` (a multiplier of lr)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as each parameter asks: the module that owns a parameter marks it `no_weight_decay = True`
    where it must not be decayed (the embedding, norms, mixer parameters, the SSM's Lambda / dt / C~ / D);
    unmarked matrices (the branch and LM-head projections) are decayed, unmarked vectors (biases) are not."""
    decay, no_decay = [], []
    for p in model.parameters():  # a tied LM head appears once, as the embedding
        if p.requires_grad:
            (no_decay if getattr(p, "no_weight_decay", p.ndim < 2) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: torch.nn.Module, optim_cfg: DictConfig, device: torch.device, precision: str
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`, fused when `optim.fused` (on CUDA and the CPU: the model's parameters on
    `device`). The fused kernel is what lets LMModule skip a non-finite step on the device, without a host sync
    (its `found_inf` input). Not fused under "16-mixed": the fused kernel unscales fp16 gradients itself, after
    LMModule's clipping, so it is used only where no gradient scaler is involved."""
    o = optim_cfg
    fused = o.fused and torch.device(device).type in ("cuda", "cpu") and precision != "16-mixed"
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None
    )


def build_schedule(
    optimizer: torch.optim.Optimizer, optim_cfg: DictConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then cosine (`lr_lambda`), stepped once per optimizer step."""
    o = optim_cfg
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, o.warmup_steps, max_steps, o.min_lr_ratio)
    )

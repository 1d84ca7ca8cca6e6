"""What the `auto` settings of `trainer` mean for a run: the GPU or the CPU, its precision, whether to compile.

A leaf module (no Lightning, torch imported where asked) so that run.py and the LightningModule share one rule.
"""

from __future__ import annotations

from omegaconf import DictConfig


def on_gpu(cfg: DictConfig) -> bool:
    import torch

    accelerator = cfg.trainer.accelerator
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def precision(cfg: DictConfig) -> str:
    """`trainer.precision`; "auto": bf16-mixed on a GPU, 32-true on the CPU."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16-mixed" if on_gpu(cfg) else "32-true"


def compile_enabled(cfg: DictConfig) -> bool:
    """`trainer.compile`; auto: on when training on a GPU, off on the CPU (compiling costs more than it gains
    there), and off under trainer.deterministic (Inductor's generated kernels are outside torch's
    deterministic-algorithms flag)."""
    if cfg.trainer.compile == "auto":
        return on_gpu(cfg) and not cfg.trainer.deterministic
    return bool(cfg.trainer.compile)

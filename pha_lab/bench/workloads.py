"""What the bench runs: a module, the batches that feed it, its loss, its optimizer and its size.

Workload names (the `model` column): a preset (`pha_125m`: token ids -> logits, the loss as LMModule
computes it), `gpt2_*` (pha_lab.bench.gpt2_reference: the loss inside its forward, nanoGPT style),
`PRESET:BRANCH` (a BranchStack: one branch's share of the model, on random activations; `PRESET:gss-IMPL` with
`model.gss.conv_impl=IMPL`) and
`PRESET:dss-VARIANT[-CHUNK]` (one DSS long convolution of the preset's GSS, pha_lab.bench.dss_variants).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from pha_lab.bench import gpt2_reference
from pha_lab.bench.dss_variants import DSSBench
from pha_lab.bench.timing import prefill_step, train_step
from pha_lab.config import load_config
from pha_lab.models import build_model
from pha_lab.models.blocks import make_branch, make_norm
from pha_lab.models.flops import flops_per_token
from pha_lab.models.gss import GSS
from pha_lab.models.memory import weight_bytes
from pha_lab.training.loss import token_nll


class BranchStack(nn.Module):
    """n_layers x (RMSNorm -> one branch -> residual) at a preset's width: one branch's share of the model."""

    def __init__(self, model_cfg, branch: str):
        super().__init__()
        self.norms = nn.ModuleList(make_norm(model_cfg.norm, model_cfg.d_model) for _ in range(model_cfg.n_layers))
        self.branches = nn.ModuleList(make_branch(branch, model_cfg) for _ in range(model_cfg.n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, branch in zip(self.norms, self.branches):
            x = x + branch(norm(x))
        return x


@dataclass
class Workload:
    """A module to time plus what the bench needs to feed it and count its work.

    kind: lm (a preset: token ids -> hidden states, loss as LMModule computes it), gpt2 (the reference: the loss
    inside its forward, nanoGPT style), branch (a BranchStack on random fp32 activations, as the residual
    stream is) or dss (one DSS layer on v [B, L, H], bf16 on a GPU as autocast makes it, requiring grad)."""

    name: str
    kind: str
    module: nn.Module
    vocab: int
    d_model: int

    def batch(self, b: int, t: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        if self.kind == "branch":
            return (torch.randn(b, t, self.d_model, device=device, generator=gen),)
        if self.kind == "dss":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            return (torch.randn(b, t, self.d_model, device=device, generator=gen, dtype=dtype).requires_grad_(),)
        idx = torch.randint(1, self.vocab, (b, t + 1), device=device, generator=gen)  # random ids, never all zero
        return idx[:, :-1], idx[:, 1:]

    def loss(self, fwd: Callable, batch: tuple) -> torch.Tensor:
        if self.kind == "gpt2":
            return fwd(*batch)
        if self.kind in ("branch", "dss"):
            return fwd(batch[0]).float().square().mean()
        hidden = fwd(batch[0], return_hidden=True)  # as LMModule: the chunked head + cross-entropy (training/loss.py),
        compiled = fwd is not self.module  # its chunk kernels compiled when the model is
        return token_nll(hidden, self.module.lm_head.weight, batch[1], "sum", compiled=compiled) / batch[1].numel()

    def forward(self, fwd: Callable, batch: tuple) -> torch.Tensor:
        return fwd(batch[0])

    def flops_per_token(self, seq_len: int, training: bool) -> float:
        if self.kind == "lm":
            return self.module.flops_per_token(seq_len, training)["total"]
        if self.kind == "dss":
            return (3.0 if training else 1.0) * self.module.flops_per_token(seq_len)
        return analytic_flops_per_token(self.module, seq_len, training)

    def sizes(self) -> dict[str, int]:
        """Per-token widths behind the byte floors: sum of Linear (in+out) and of Linear in, GSS channels;
        io_bytes: a DSS layer's own input and output (bf16)."""
        linears = [m for m in self.module.modules() if isinstance(m, nn.Linear)]
        return {
            "n_params": sum(p.numel() for p in self.module.parameters()),
            "linear_io": sum(m.in_features + m.out_features for m in linears),
            "linear_in": sum(m.in_features for m in linears),
            "gss_h": sum(m.dss.skip.numel() for m in self.module.modules() if isinstance(m, GSS)),
            "vocab": self.vocab if self.kind in ("lm", "gpt2") else 0,
            "io_bytes": 4 * self.d_model if self.kind == "dss" else 0,
        }


def memory_columns(
    workload: Workload,
    batch: int,
    seq_len: int,
    cache_dtype_bytes: int,
    optimizer_bytes: int | None,
    peak_mem_gb: float | None,
) -> dict[str, float]:
    """A cell's memory parts (GB = 1e9 bytes; pha_lab.models.memory): weights_gb, the parameters as stored (fp32:
    autocast reads them); cache_gb (presets only), the analytic inference cache (KV + recurrent state) of `batch`
    sequences at context `seq_len`, `cache_dtype_bytes` per number; optimizer_gb, the AdamW moments allocated
    (measured; 0 before the first training cell); activations_gb = peak_mem_gb - weights_gb - optimizer_gb,
    everything else live at the peak: activations kept for the backward, the gradients allocated by then (at most
    weights_gb), workspaces, the batch. Parts that cannot be known (no peak on a CPU) are left out."""
    out = {"weights_gb": weight_bytes(workload.module) / 1e9}
    if workload.kind == "lm":
        out["cache_gb"] = workload.module.cache_bytes(batch, seq_len, cache_dtype_bytes) / 1e9
    if optimizer_bytes is not None:
        out["optimizer_gb"] = optimizer_bytes / 1e9
        if peak_mem_gb is not None:
            out["activations_gb"] = peak_mem_gb - out["weights_gb"] - out["optimizer_gb"]
    return out


def optimizer_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the tensors an optimizer holds in its state (AdamW: two moments per parameter and a step count)."""
    if optimizer is None:
        return 0
    return sum(
        t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)
    )


def analytic_flops_per_token(module: nn.Module, seq_len: int, training: bool) -> float:
    """The models' one FLOPs rule (pha_lab.models.flops) for any module."""
    return flops_per_token(module, seq_len, training)["total"]


def make_workload(name: str, device: torch.device | str, max_len: int = 1024) -> Workload:
    """The workload a name describes (see the module docstring); max_len: the GPT-2 reference's position table."""
    with torch.device(device):
        if name.startswith("gpt2_"):
            model = gpt2_reference.build(name, max_len, device)
            c = model.config
            return Workload(name, "gpt2", model, c.vocab_size, c.n_embd)
        if ":" in name:
            preset, branch = name.split(":", 1)
            impl = branch.partition("-")[2] if branch.startswith("gss-") else None  # gss-chunked: that conv_impl
            cfg = load_config(preset, [f"model.gss.conv_impl={impl}"] if impl else []).model
            branch = "gss" if impl else branch
            if branch.startswith("dss-"):
                variant, _, chunk = branch[len("dss-") :].partition("-")
                module = DSSBench(cfg.gss.d_hidden, cfg.gss.n_modes, variant, int(chunk or 128))
                return Workload(name, "dss", module, 0, cfg.gss.d_hidden)
            return Workload(name, "branch", BranchStack(cfg, branch), 0, cfg.d_model)
        cfg = load_config(name).model
        return Workload(name, "lm", build_model(cfg), cfg.vocab_size, cfg.d_model)


@functools.cache
def meta_workload(name: str, max_len: int) -> Workload:
    """The workload on the meta device (no memory, no init): its sizes and FLOPs for the floors and the plan."""
    return make_workload(name, "meta", max_len)


def make_optimizer(module: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as the suite trains (fused on CUDA); one group: the fused kernel's cost doesn't depend on it.
    Deliberately not training/optim.py's `build_optimizer`: a workload is a bare module (a branch stack, a DSS
    kernel, a model) timed in an independent reference loop, with no experiment config to build from."""
    return torch.optim.AdamW(
        module.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True if device.type == "cuda" else None
    )


def build_step(
    mode: str,
    workload: Workload,
    fwd: Callable,
    optimizer: torch.optim.Optimizer | None,
    batches: list,
    amp: AbstractContextManager,
) -> Callable[[], object]:
    """The function one timed step calls: train = forward, loss, backward, optimizer step; prefill = the
    inference forward of every position under inference_mode."""
    if mode == "train":
        return train_step(lambda batch: workload.loss(fwd, batch), batches, optimizer, amp)
    return prefill_step(lambda batch: workload.forward(fwd, batch), batches, amp)

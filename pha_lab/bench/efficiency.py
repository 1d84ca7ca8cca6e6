"""`pha-lab bench`: training and prefill throughput, peak memory and MFU vs context length.

One call runs the parts a bench YAML lists (bench/efficiency.yaml), in its order:
  targets   issue 6's T=1024 checks, compiled: the GPT-2 reference vs transformer_125m, PHA-125M MFU
  overhead  the same LMModule trained by a plain PyTorch loop and by Lightning with the suite's callbacks
  models    every preset x context length x {prefill, train} at a constant number of tokens per step
  branches  one branch alone: n_layers x (RMSNorm -> branch -> residual) of a preset's width, on random
            activations (no embedding or LM head), so the cost of GSS, GQA and FFN is seen separately
  dss       one DSS long convolution (a preset's H, N) in each candidate implementation of
            pha_lab.bench.dss_variants (the model's FFT path, skip folded into the kernel, chunked scan)
Each cell is timed with CUDA events (`steps` timed steps after `warmup`, median and p10/p90), its peak
memory is `max_memory_allocated` after a reset, an out-of-memory cell is recorded as OOM and the run goes
on. Analytic FLOPs give TFLOP/s and MFU (vs the measured or configured bf16 matmul peak and vs the
datasheet); `floor_ms` is the larger of FLOPs/peak and the minimum bytes/bandwidth (see `floors`).
Without a GPU the YAML's `cpu:` section turns the same command into a tiny run (the tests use it).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import gc
import json
import math
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pha_lab.config import BENCH_DIR, ConfigError, flatten, load_config, load_yaml

PARTS = ("targets", "overhead", "models", "dss", "branches")
MODES = ("prefill", "train")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = [
    "part", "model", "mode", "seq_len", "batch_size", "tokens_per_step", "status", "tokens_per_s", "step_ms_median",
    "step_ms_p10", "step_ms_p90", "warmup_s", "peak_mem_gb", "mem_floor_gb", "flops_per_step", "tflops",
    "mfu_measured_peak", "mfu_datasheet", "min_bytes_gb", "floor_ms", "floor_bound", "n_params", "gpu", "torch",
    "compile", "dtype", "git_sha", "note",
]


# --------------------------------------------------------------------------- the bench spec
@dataclass
class BranchesSpec:
    of: str = "pha_180m"  # the preset whose width and branch settings are used
    names: list[str] = field(default_factory=lambda: ["gss", "attn", "ffn"])


@dataclass
class DSSSpec:
    of: str = "pha_180m"  # the preset whose GSS H (d_hidden) and N (n_modes) are used
    variants: list[str] = field(default_factory=lambda: ["fft", "fft_skipfold", "chunked"])
    chunk: int = 128  # chunked variant: tokens per chunk (seq_lens must be multiples of it)


@dataclass
class TargetsSpec:
    models: list[str] = field(default_factory=lambda: ["gpt2_reference", "transformer_125m", "pha_125m"])
    seq_len: int = 1024
    batch_size: int = 12
    modes: list[str] = field(default_factory=lambda: ["train"])
    compile: bool = True
    warmup: int = 5


@dataclass
class OverheadSpec:
    model: str = "pha_125m"
    seq_len: int = 1024
    batch_size: int = 16
    warmup: int = 5
    steps: int = 30
    rounds: int = 2  # plain, Lightning, plain, Lightning, ...: each loop timed twice shows the noise
    compile: bool = True


@dataclass
class BenchSpec:
    name: str = "efficiency"
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    models: list[str] = field(default_factory=lambda: ["pha_125m", "transformer_125m", "pha_180m", "transformer_180m",
                                                       "gss_125m"])
    seq_lens: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384, 32768])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    tokens_per_step: int = 32768  # batch = tokens_per_step // seq_len (at least 1)
    warmup: int = 3
    steps: int = 20
    compile: bool = False  # models/branches parts: one compile per cell (each length is a new graph)
    dtype: str = "bf16"  # autocast dtype on GPU; CPU runs fp32
    branches: BranchesSpec = field(default_factory=BranchesSpec)
    dss: DSSSpec = field(default_factory=DSSSpec)
    targets: TargetsSpec = field(default_factory=TargetsSpec)
    overhead: OverheadSpec = field(default_factory=OverheadSpec)
    max_minutes: float = 9.0  # cells not started by then are recorded as skipped (the CSV is always written)
    peak_tflops: float = 778.0  # bf16 8192^3 matmul on an H100 (issue 6), used unless --measure-peak
    bandwidth_tbs: float = 3.0  # device-to-device copy, read + write (an H100 here, KINDS.md), unless measured
    datasheet_tflops: float = 989.4  # H100 SXM dense bf16, used when Lightning's table lacks the card
    cpu_threads: int = 1
    experiment: str = "efficiency"
    seed: int = 0
    cpu: Optional[dict[str, Any]] = None  # overrides that make the tiny CPU version


def load_spec(name_or_path: str = "efficiency", overrides: list[str] = (), tiny: bool = False) -> DictConfig:
    """Schema <- bench YAML (its `extends:` chain) <- its `cpu:` section when `tiny` <- key=value overrides."""
    spec = load_yaml(BenchSpec, name_or_path, BENCH_DIR, "bench spec", overrides, sections={"cpu": tiny})
    for key, values, valid in (("parts", spec.parts, PARTS), ("modes", spec.modes, MODES),
                               ("targets.modes", spec.targets.modes, MODES), ("dtype", [spec.dtype], tuple(DTYPES))):
        bad = [v for v in values if v not in valid]
        if bad:
            raise ConfigError(f"bench {key}: unknown {bad}; choose from {', '.join(valid)}")
    return spec


# --------------------------------------------------------------------------- workloads
class BranchStack(nn.Module):
    """n_layers x (RMSNorm -> one branch -> residual) at a preset's width: one branch's share of the model."""

    def __init__(self, model_cfg, branch: str):
        super().__init__()
        from pha_lab.models.blocks import make_branch, make_norm

        self.norms = nn.ModuleList(make_norm(model_cfg.norm, model_cfg.d_model) for _ in range(model_cfg.n_layers))
        self.branches = nn.ModuleList(make_branch(branch, model_cfg) for _ in range(model_cfg.n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, branch in zip(self.norms, self.branches):
            x = x + branch(norm(x))
        return x


@dataclass
class Workload:
    """A module to time plus what the bench needs to feed it and count its work.

    kind: lm (a preset: token ids -> logits, loss as LMModule computes it), gpt2 (the reference: the loss
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
        logits = fwd(batch[0])  # as LMModule: fp32 cross-entropy over the flattened logits
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[1].flatten())

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
        from pha_lab.models.gss import GSS

        linears = [m for m in self.module.modules() if isinstance(m, nn.Linear)]
        return {"n_params": sum(p.numel() for p in self.module.parameters()),
                "linear_io": sum(m.in_features + m.out_features for m in linears),
                "linear_in": sum(m.in_features for m in linears),
                "gss_h": sum(m.dss.skip.numel() for m in self.module.modules() if isinstance(m, GSS)),
                "vocab": self.vocab if self.kind in ("lm", "gpt2") else 0,
                "io_bytes": 4 * self.d_model if self.kind == "dss" else 0}


def analytic_flops_per_token(module: nn.Module, seq_len: int, training: bool) -> float:
    """LanguageModel.flops_per_token's rule for any module: 2 per Linear weight, plus the sequence mixing
    of every submodule that defines `flops_per_token(seq_len)` (attention, GSS); x3 for training."""
    matmul = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
    mixing = sum(m.flops_per_token(seq_len) for m in module.modules()
                 if m is not module and callable(getattr(m, "flops_per_token", None)))
    return (3.0 if training else 1.0) * (2.0 * matmul + mixing)


def make_workload(name: str, device: torch.device | str, max_len: int = 1024) -> Workload:
    """`gpt2_*`: the reference (position table of max_len); `PRESET:BRANCH`: a BranchStack;
    `PRESET:dss-VARIANT[-CHUNK]`: one DSS layer of that preset's GSS; else a preset."""
    from pha_lab.bench import gpt2_reference
    from pha_lab.models import build_model

    with torch.device(device):
        if name.startswith("gpt2_"):
            model = gpt2_reference.build(name, max_len, device)
            c = model.config
            return Workload(name, "gpt2", model, c.vocab_size, c.n_embd)
        if ":" in name:
            preset, branch = name.split(":", 1)
            cfg = load_config(preset).model
            if branch.startswith("dss-"):
                from pha_lab.bench.dss_variants import DSSBench

                variant, _, chunk = branch[len("dss-"):].partition("-")
                module = DSSBench(cfg.gss.d_hidden, cfg.gss.n_modes, variant, int(chunk or 128))
                return Workload(name, "dss", module, 0, cfg.gss.d_hidden)
            return Workload(name, "branch", BranchStack(cfg, branch), 0, cfg.d_model)
        cfg = load_config(name).model
        return Workload(name, "lm", build_model(cfg), cfg.vocab_size, cfg.d_model)


# --------------------------------------------------------------------------- floors
def floors(sizes: dict[str, int], flops_per_token: float, seq_len: int, batch: int, training: bool,
           peak_flops: float, bandwidth: float) -> dict[str, Any]:
    """The analytic floor of one step (docs/perf-notes.md explains each term).

    min bytes (HBM traffic no implementation avoids, assuming elementwise ops fused into the matmuls):
      weights    train 42 B/param: fp32 read + bf16 write of the autocast copy (6), bf16 reads in the
                 forward and in both backward matmuls (6), fp32 grad write (4), fused AdamW reads
                 p, g, m, v and writes p, m, v (28); prefill 6 B/param (the autocast copy)
      matmul I/O 2 B x (in + out) per Linear per token, x3 in training (backward reads both, writes dX)
      logits     prefill 2V (bf16 write); train 16V (bf16 write + read, fp32 copy write + read, fp32 grad)
      GSS FFTs   fp32 rfft/product/irfft over [H, 2L]: ~48 B per channel per token, x3 in training
      DSS alone  (the dss part) its bf16 input and output, x3 in training: the function's own floor
    memory floor (capacity): train 16 B/param (fp32 weights, grads, Adam m and v) + the bf16 inputs of
      every Linear saved for backward + fp32 and bf16 logits (6V); prefill 4 B/param + bf16 logits."""
    tokens = seq_len * batch
    k = 3 if training else 1
    per_token = (k * 2 * sizes["linear_io"] + (16 if training else 2) * sizes["vocab"] + k * 48 * sizes["gss_h"]
                 + k * sizes.get("io_bytes", 0))
    min_bytes = tokens * per_token + sizes["n_params"] * (42 if training else 6)
    mem = sizes["n_params"] * (16 if training else 4) + tokens * (
        (2 * sizes["linear_in"] + 6 * sizes["vocab"]) if training else 2 * sizes["vocab"])
    flops = flops_per_token * tokens
    t_flops, t_bytes = flops / peak_flops, min_bytes / bandwidth
    return {"flops_per_step": flops, "min_bytes_gb": min_bytes / 1e9, "mem_floor_gb": mem / 1e9,
            "floor_ms": 1e3 * max(t_flops, t_bytes), "floor_bound": "compute" if t_flops >= t_bytes else "memory"}


# --------------------------------------------------------------------------- timing
def time_steps(step: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each of `steps` calls after `warmup` untimed ones. On a GPU, back-to-back CUDA
    events: the host may run ahead, so each interval is device time including any idle gap (a host-bound
    loop shows up); on a CPU, the wall clock."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            step()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        return [events[i].elapsed_time(events[i + 1]) for i in range(steps)]
    marks = [time.perf_counter()]
    for _ in range(steps):
        step()
        marks.append(time.perf_counter())
    return [1e3 * (b - a) for a, b in zip(marks, marks[1:])]


def percentiles(times_ms: list[float]) -> tuple[float, float, float]:
    import numpy as np

    p10, p50, p90 = np.percentile(np.asarray(times_ms, dtype=float), [10, 50, 90])
    return float(p10), float(p50), float(p90)


def measure_peak(device: torch.device) -> tuple[float, float]:
    """(FLOP/s of a bf16 8192^3 matmul, B/s of a 1 GiB device copy counting read + write); on CPU a
    512^3 fp32 matmul and a 64 MiB copy. Random data: zeros run faster than real data."""
    cuda = device.type == "cuda"
    n, dtype, copy_bytes = (8192, torch.bfloat16, 2**30) if cuda else (512, torch.float32, 2**26)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    mm = percentiles(time_steps(lambda: torch.mm(a, b, out=out), 3, 20, device))[1]
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    cp = percentiles(time_steps(lambda: dst.copy_(src), 3, 20, device))[1]
    return 2 * n**3 / (mm / 1e3), 2 * copy_bytes / (cp / 1e3)


# --------------------------------------------------------------------------- one cell
def autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def make_optimizer(module: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as the suite trains (fused on CUDA); one group: the fused kernel's cost doesn't depend on it."""
    return torch.optim.AdamW(module.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                             fused=True if device.type == "cuda" else None)


def build_step(mode: str, workload: Workload, fwd: Callable, optimizer, batches: list, amp) -> Callable[[], None]:
    """The function one timed step calls: train = forward, loss, backward, optimizer step; prefill = the
    inference forward of every position (as perplexity evaluation runs it) under inference_mode."""
    counter = [0]

    def train() -> None:
        batch = batches[counter[0] % len(batches)]
        counter[0] += 1
        with amp:
            loss = workload.loss(fwd, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def prefill() -> None:
        batch = batches[counter[0] % len(batches)]
        counter[0] += 1
        with torch.inference_mode(), amp:
            workload.forward(fwd, batch)

    return train if mode == "train" else prefill


def free_memory(device: torch.device) -> None:
    """Return cached blocks (and cyclic garbage holding tensors) so each cell's peak starts from the same
    floor; a GPU-only concern (gc.collect alone takes ~0.5 s on a CPU with MLflow and Lightning loaded)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


@dataclass
class Cell:
    part: str
    model: str
    mode: str
    seq_len: int
    batch_size: int
    compile: bool
    warmup: int
    steps: int


def plan(spec: DictConfig) -> list[Cell]:
    """Every cell of the parts `models`, `branches`, `dss` and `targets`, in run order (the overhead part has its own)."""
    cells = []
    for part in spec.parts:
        if part == "targets":
            t = spec.targets
            cells += [Cell(part, m, mode, t.seq_len, t.batch_size, t.compile, t.warmup, spec.steps)
                      for m in t.models for mode in t.modes]
        elif part in ("models", "branches", "dss"):
            names = {"models": list(spec.models),
                     "branches": [f"{spec.branches.of}:{b}" for b in spec.branches.names],
                     "dss": [f"{spec.dss.of}:dss-{v}" + (f"-{spec.dss.chunk}" if v == "chunked" else "")
                             for v in spec.dss.variants]}[part]
            cells += [Cell(part, m, mode, t, max(1, spec.tokens_per_step // t), spec.compile, spec.warmup, spec.steps)
                      for m in names for mode in spec.modes for t in spec.seq_lens]
    return cells


def run_cell(cell: Cell, workload: Workload, state: dict, device: torch.device, amp) -> dict[str, Any]:
    """Time one cell; returns status (ok | OOM | error), timings and peak memory."""
    gen = torch.Generator(device=device).manual_seed(cell.seq_len * 7919 + cell.batch_size)
    result: dict[str, Any] = {"status": "ok", "note": ""}
    module = workload.module
    try:
        batches = [workload.batch(cell.batch_size, cell.seq_len, device, gen) for _ in range(2)]
        if cell.compile:
            torch._dynamo.reset()  # a fresh graph per cell: no silent fallback after the recompile limit
        fwd = torch.compile(module) if cell.compile else module
        module.train(cell.mode == "train")
        if cell.mode == "train" and "optimizer" not in state:
            state["optimizer"] = make_optimizer(module, device)
        step = build_step(cell.mode, workload, fwd, state.get("optimizer"), batches, amp)
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        times = time_steps(step, cell.warmup, cell.steps, device)
        result["warmup_s"] = time.perf_counter() - t0 - sum(times) / 1e3
        p10, p50, p90 = percentiles(times)
        result.update(step_ms_median=p50, step_ms_p10=p10, step_ms_p90=p90,
                      tokens_per_s=cell.seq_len * cell.batch_size / (p50 / 1e3))
        if device.type == "cuda":
            result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    except torch.cuda.OutOfMemoryError as exc:
        result.update(status="OOM", note=str(exc).splitlines()[0][:300] if str(exc) else "out of memory")
    except Exception as exc:  # record and go on: one broken cell must not cost the whole GPU call
        traceback.print_exc(file=sys.stderr)
        result.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    if result["status"] != "ok":  # the exception (and its frames' tensors) is gone here: free the memory
        batches = step = fwd = None
        if state.get("optimizer") is not None:
            state["optimizer"].zero_grad(set_to_none=True)
        free_memory(device)
    return result


# --------------------------------------------------------------------------- environment and output
def environment(device: torch.device, spec: DictConfig, peak: tuple[float, str], bandwidth: tuple[float, str]) -> dict:
    """The header: what a reader needs to reproduce or compare the numbers."""
    from pha_lab import tracking

    cuda = device.type == "cuda"
    git = tracking.git_info()  # (PHA_GIT_SHA where the tree has no .git, as on the GPU machine)
    header = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "driver": tracking._driver_version() if cuda else "none",
        "cuda": torch.version.cuda or "none",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_sha": git["git_sha"],
        "git_dirty": git["git_dirty"],
        "command": tracking.command_line(),
        "dtype": f"{spec.dtype}-autocast" if cuda and spec.dtype != "fp32" else "fp32",
        "compile": f"models/branches={spec.compile} targets={spec.targets.compile} overhead={spec.overhead.compile}",
        "tokens_per_step": spec.tokens_per_step,
        "warmup_steps": spec.warmup,
        "timed_steps": spec.steps,
        "peak_tflops": float(f"{peak[0] / 1e12:.4g}") if math.isfinite(peak[0]) else "n/a",
        "peak_source": peak[1],
        "bandwidth_tbs": float(f"{bandwidth[0] / 1e12:.4g}"),
        "bandwidth_source": bandwidth[1],
        "datasheet_tflops": round(datasheet_flops(device, spec) / 1e12, 1) if cuda else "n/a",
    }
    if cuda:
        header["sdpa_flash_gqa"] = _probe_flash_gqa(device)
        header["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)
    return header


def datasheet_flops(device: torch.device, spec: DictConfig) -> float:
    if device.type != "cuda":
        return float("nan")
    try:
        from lightning.fabric.utilities.throughput import get_available_flops

        flops = get_available_flops(device, DTYPES[spec.dtype])
    except Exception:
        flops = None
    return float(flops or spec.datasheet_tflops * 1e12)


def _probe_flash_gqa(device: torch.device) -> str:
    """Whether SDPA's flash kernel takes the suite's GQA call (else long contexts fall back to slower kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 12, 256, 64, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, 4, 256, 64, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return "yes"
    except RuntimeError as exc:
        return f"no ({str(exc).splitlines()[0][:120]})"


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
    tmp.replace(path)


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return "" if value is None else value


def table(rows: list[dict]) -> str:
    import pandas as pd

    cols = {"part": "part", "model": "model", "mode": "mode", "seq_len": "T", "batch_size": "B", "status": "status",
            "tokens_per_s": "tok/s", "step_ms_median": "ms", "peak_mem_gb": "mem GB", "tflops": "TFLOP/s",
            "mfu_measured_peak": "MFU", "floor_ms": "floor ms", "compile": "compile"}
    df = pd.DataFrame(rows).reindex(columns=list(cols)).rename(columns=cols)
    fmt = {"tok/s": "{:,.0f}", "ms": "{:.2f}", "mem GB": "{:.2f}", "TFLOP/s": "{:.1f}", "MFU": "{:.1%}",
           "floor ms": "{:.2f}"}
    for col, f in fmt.items():
        df[col] = [f.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "" for v in df[col]]
    return df.to_string(index=False)


def summary(rows: list[dict]) -> list[str]:
    """The issue's comparisons, from whatever cells this run has."""
    ok = [r for r in rows if r["status"] == "ok"]
    find = {(r["part"], r["model"], r["mode"], r["seq_len"]): r for r in ok}
    lines = []
    refs = [r for r in ok if r["part"] == "targets" and r["model"].startswith("gpt2_") and r["mode"] == "train"]
    for ref in refs:
        for r in ok:
            if r["part"] == "targets" and r is not ref and r["mode"] == "train" and r["seq_len"] == ref["seq_len"]:
                lines.append(f"{r['model']} vs {ref['model']} (train, T={r['seq_len']}, B={r['batch_size']}, compile="
                             f"{r['compile']}): {r['tokens_per_s'] / ref['tokens_per_s']:.3f}x tokens/s (target >= 1.10x)")
    for r in ok:
        if r["part"] == "targets" and r["mode"] == "train" and not r["model"].startswith("gpt2_"):
            pct = {k: f"{r[k]:.1%}" if math.isfinite(r.get(k, math.nan)) else "n/a" for k in ("mfu_measured_peak", "mfu_datasheet")}
            lines.append(f"{r['model']} MFU (train, T={r['seq_len']}): {pct['mfu_measured_peak']} of the measured peak, "
                         f"{pct['mfu_datasheet']} of the datasheet (PHA target >= 45% of measured)")
    for (part, model, mode, t), r in find.items():
        other = find.get((part, model.replace("pha", "transformer"), mode, t))
        if part == "models" and model.startswith(("pha", "tiny_pha")) and other is not None and other is not r:
            mem = (f", {r['peak_mem_gb'] / other['peak_mem_gb']:.2f}x peak memory"
                   if r.get("peak_mem_gb") and other.get("peak_mem_gb") else "")
            lines.append(f"{model} / {other['model']} ({mode}, T={t}): {r['tokens_per_s'] / other['tokens_per_s']:.2f}x "
                         f"tokens/s{mem} (paper: 1.24x, <= 0.6x at T >= 8k)")
    loops = {}
    for r in ok:
        if r["part"] == "overhead":
            loops.setdefault(r["mode"], []).append(r["tokens_per_s"])
    if "loop_plain" in loops and "loop_lightning" in loops:
        plain, light = max(loops["loop_plain"]), max(loops["loop_lightning"])
        lines.append(f"Lightning loop vs plain loop: {light / plain - 1:+.1%} tokens/s (best of {len(loops['loop_plain'])}"
                     f" rounds each; target within 3%); rounds plain {[round(v) for v in loops['loop_plain']]}, "
                     f"Lightning {[round(v) for v in loops['loop_lightning']]}")
    return lines


def log_mlflow(rows: list[dict], header: dict, spec: dict, files: list[Path], tracking_uri: str | None,
               runs_dir: str, experiment: str) -> str:
    """One MLflow run: params = settings + header, metrics `{metric}/{part}/{model}/{mode}/{seq_len}` (the
    overhead rounds as steps), the CSV and header as artifacts. Returns the run id."""
    from mlflow.entities import Metric, Param

    from pha_lab import tracking

    tcfg = OmegaConf.create({"runs_dir": runs_dir, "tracking_uri": tracking_uri})
    client = tracking.client(tracking.tracking_uri(tcfg))
    exp_id = tracking.ensure_experiment(client, experiment, tcfg)
    tags = {"gpu": str(header.get("gpu")), "git_sha": str(header.get("git_sha")), "kind": "bench"}
    run = client.create_run(exp_id, run_name=f"{spec.get('name', 'bench')} {header.get('gpu')} {header.get('date')}",
                            tags=tags)
    run_id = run.info.run_id
    params = {**{f"bench.{k}": v for k, v in flatten(spec).items()}, **{f"env.{k}": v for k, v in header.items()}}
    plist = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(plist), 100):
        client.log_batch(run_id, params=plist[i:i + 100])
    now, metrics, seen = int(time.time() * 1000), [], {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        key = f"{r['part']}/{r['model']}/{r['mode']}/{r['seq_len']}"
        step = seen[key] = seen.get(key, -1) + 1
        for name in ("tokens_per_s", "step_ms_median", "peak_mem_gb", "tflops", "mfu_measured_peak", "mfu_datasheet"):
            value = r.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                metrics.append(Metric(f"{name}/{key}", float(value), now, step))
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for path in files:
        if path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id


# --------------------------------------------------------------------------- the run
@dataclass
class BenchOptions:
    config: str = "efficiency"
    overrides: list[str] = field(default_factory=list)
    out: Optional[str] = None  # CSV path; default runs/bench/<name>-<date>.csv
    measure_peak: bool = False
    compile: Optional[bool] = None  # overrides every part's compile flag
    tiny: Optional[bool] = None  # None: tiny exactly when there is no GPU
    device: Optional[str] = None
    mlflow: bool = True
    tracking_uri: Optional[str] = None
    runs_dir: str = "runs"
    plan_only: bool = False


def resolve(opts: BenchOptions) -> tuple[DictConfig, torch.device]:
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = opts.tiny if opts.tiny is not None else (device.type != "cuda" and not opts.plan_only)  # a plan is for the GPU
    overrides = list(opts.overrides)
    if opts.compile is not None:
        overrides += [f"{k}={opts.compile}" for k in ("compile", "targets.compile", "overhead.compile")]
    return load_spec(opts.config, overrides, tiny=tiny), device


def run(opts: BenchOptions) -> tuple[list[dict], dict, Path]:
    """Run every part; write the CSV after each cell (a killed run keeps what it measured); print and log."""
    spec, device = resolve(opts)
    if opts.plan_only:
        print(plan_table(spec))
        return [], {}, Path()
    threads = torch.get_num_threads()
    if device.type == "cpu" and spec.cpu_threads:
        torch.set_num_threads(spec.cpu_threads)
    try:
        return _run(spec, device, opts)
    finally:
        torch.set_num_threads(threads)


def _run(spec: DictConfig, device: torch.device, opts: BenchOptions) -> tuple[list[dict], dict, Path]:
    start = time.monotonic()
    deadline = start + 60 * spec.max_minutes
    torch.manual_seed(spec.seed)
    if opts.measure_peak:
        flops, bw = measure_peak(device)
        peak, bandwidth = (flops, "measured (8192^3 bf16 matmul)" if device.type == "cuda" else "measured (cpu)"), \
                          (bw, "measured (device copy)")
    elif device.type == "cuda":
        peak, bandwidth = (spec.peak_tflops * 1e12, "config"), (spec.bandwidth_tbs * 1e12, "config")
    else:
        peak, bandwidth = (float("nan"), "none (cpu; use --measure-peak)"), (spec.bandwidth_tbs * 1e12, "config")
    header = environment(device, spec, peak, bandwidth)
    out = Path(opts.out or Path(opts.runs_dir) / "bench" / f"{spec.name}-{dt.datetime.now():%Y%m%d-%H%M%S}.csv")
    header_path = out.with_name(out.stem + ".header.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    header_path.write_text(json.dumps({**header, "spec": OmegaConf.to_container(spec, resolve=True)}, indent=1))
    print("\n".join(f"# {k}: {v}" for k, v in header.items()), flush=True)
    dtype = DTYPES[spec.dtype] if device.type == "cuda" else torch.float32
    amp = autocast(device, dtype)
    datasheet = datasheet_flops(device, spec)
    common = {"gpu": header["gpu"], "torch": header["torch"], "dtype": header["dtype"], "git_sha": header["git_sha"]}
    rows: list[dict] = []
    meta_cache: dict[str, Workload] = {}

    def finish(cell: Cell, result: dict) -> None:
        if cell.model not in meta_cache:
            meta_cache[cell.model] = make_workload(cell.model, "meta", max(spec.seq_lens + [spec.targets.seq_len]))
        meta = meta_cache[cell.model]
        training = cell.mode != "prefill"
        fl = floors(meta.sizes(), meta.flops_per_token(cell.seq_len, training), cell.seq_len, cell.batch_size,
                    training, peak[0] if math.isfinite(peak[0]) else 1.0, bandwidth[0])
        if not math.isfinite(peak[0]):
            fl["floor_ms"], fl["floor_bound"] = float("nan"), ""
        row = {**dataclasses.asdict(cell), "tokens_per_step": cell.seq_len * cell.batch_size, **common,
               "n_params": meta.sizes()["n_params"], **fl, **result}
        row.pop("warmup", None), row.pop("steps", None)
        if row["status"] == "ok":
            achieved = row["flops_per_step"] / (row["step_ms_median"] / 1e3)
            row.update(tflops=achieved / 1e12, mfu_measured_peak=achieved / peak[0], mfu_datasheet=achieved / datasheet)
        rows.append(row)
        write_csv(rows, out)
        tps = f"{row['tokens_per_s']:>12,.0f} tok/s" if row["status"] == "ok" else ""
        mem = f"{row['peak_mem_gb']:.2f} GB" if row.get("peak_mem_gb") else ""
        print(f"[{time.monotonic() - start:6.0f}s] {cell.part:<9} {cell.model:<20} {cell.mode:<14} T={cell.seq_len:<6} "
              f"B={cell.batch_size:<4} {row['status']:<7} {tps} {mem} {row.get('note', '')}", flush=True)

    cells = plan(spec)
    for part in spec.parts:
        if part == "overhead":
            if time.monotonic() > deadline:
                o = spec.overhead
                finish(Cell("overhead", o.model, "loop_plain", o.seq_len, o.batch_size, o.compile, o.warmup, o.steps),
                       {"status": "skipped", "note": "time budget (max_minutes)"})
                continue
            from pha_lab.bench.overhead import measure_loops

            for cell, result in measure_loops(spec.overhead, device, dtype, opts.runs_dir):
                finish(cell, result)
            continue
        part_cells = [c for c in cells if c.part == part]
        for model in dict.fromkeys(c.model for c in part_cells):
            group = [c for c in part_cells if c.model == model]
            if time.monotonic() > deadline:
                for cell in group:
                    finish(cell, {"status": "skipped", "note": "time budget (max_minutes)"})
                continue
            torch.manual_seed(spec.seed)
            try:
                workload = make_workload(model, device, max(c.seq_len for c in group))
            except torch.cuda.OutOfMemoryError as exc:
                for cell in group:
                    finish(cell, {"status": "OOM", "note": f"building the model: {str(exc).splitlines()[0][:200]}"})
                free_memory(device)
                continue
            state: dict[str, Any] = {}
            for cell in group:
                if time.monotonic() > deadline:
                    finish(cell, {"status": "skipped", "note": "time budget (max_minutes)"})
                    continue
                finish(cell, run_cell(cell, workload, state, device, amp))
            workload = state = None
            free_memory(device)
            if any(c.compile for c in group):
                torch._dynamo.reset()

    text = table(rows) + "\n\n" + "\n".join(summary(rows))
    print("\n" + text, flush=True)
    table_path = out.with_name(out.stem + ".txt")
    table_path.write_text("\n".join(f"# {k}: {v}" for k, v in header.items()) + "\n\n" + text + "\n")
    print(f"\ncsv: {out}\nheader: {header_path}\ntook {time.monotonic() - start:.0f} s", flush=True)
    if opts.mlflow:
        try:
            run_id = log_mlflow(rows, header, OmegaConf.to_container(spec, resolve=True), [out, header_path, table_path],
                                opts.tracking_uri, opts.runs_dir, spec.experiment)
            print(f"mlflow: run {run_id} in experiment '{spec.experiment}'")
        except Exception as exc:  # e.g. a GPU image without mlflow: the CSV is the record, log it later
            print(f"mlflow not logged ({type(exc).__name__}: {exc}); later: pha-lab bench --from-csv {out}", file=sys.stderr)
    return rows, header, out


def read_csv(path: Path) -> list[dict]:
    """Rows of a bench CSV with numbers as numbers (for --from-csv and the tests)."""
    def num(v: str) -> Any:
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v if v != "" else float("nan")

    with Path(path).open() as f:
        return [{k: (num(v) if k not in ("model", "mode", "part", "status", "note", "git_sha", "gpu", "torch",
                                            "dtype", "floor_bound") else v) for k, v in row.items()}
                for row in csv.DictReader(f)]


def log_csv(path: Path, opts: BenchOptions) -> str:
    """Log a CSV written elsewhere (e.g. on the GPU machine) with its header JSON as one MLflow run."""
    path = Path(path)
    header_path = path.with_name(path.stem + ".header.json")
    header = json.loads(header_path.read_text()) if header_path.is_file() else {}
    spec = header.pop("spec", None) or OmegaConf.to_container(resolve(BenchOptions(opts.config, opts.overrides, tiny=False))[0])
    files = [path, header_path, path.with_name(path.stem + ".txt")]
    experiment = spec.get("experiment", "efficiency")
    run_id = log_mlflow(read_csv(path), header, spec, files, opts.tracking_uri, opts.runs_dir, experiment)
    print(f"mlflow: run {run_id} in experiment '{experiment}' from {path}")
    return run_id


# --------------------------------------------------------------------------- planning (no device)
PLAN_EFFICIENCY = 0.4  # assumed fraction of the floor reached, for the time estimate only
PLAN_COMPILE_S = 45.0  # assumed torch.compile warm-up of a 12-layer model, forward + backward
PLAN_RECOMPILE_S = 15.0  # the same graph again (inductor's on-disk caches): dynamo tracing only
PLAN_CELL_S = 0.5  # inputs, allocator churn, printing
PLAN_MODEL_S = 2.0  # building and initialising a model on the device
PLAN_FIXED_S = 20.0  # imports, peak measurement, Lightning start-up, MLflow


def plan_table(spec: DictConfig, peak_tflops: float | None = None, bandwidth_tbs: float | None = None) -> str:
    """Every cell's analytic floor on the target card, and an estimate of the whole run's time."""
    import pandas as pd

    peak = (peak_tflops or spec.peak_tflops) * 1e12
    bw = (bandwidth_tbs or spec.bandwidth_tbs) * 1e12
    cells = plan(spec)
    if "overhead" in spec.parts:
        o = spec.overhead
        cells += [Cell("overhead", o.model, m, o.seq_len, o.batch_size, o.compile and r == 0 and m == "loop_plain",
                       o.warmup, o.steps) for r in range(o.rounds) for m in ("loop_plain", "loop_lightning")]
        cells.sort(key=lambda c: spec.parts.index(c.part))
    meta: dict[str, Workload] = {}
    rows, total, compiled = [], PLAN_FIXED_S + PLAN_MODEL_S * len({(c.part, c.model) for c in cells}), set()
    for c in cells:
        if c.model not in meta:
            meta[c.model] = make_workload(c.model, "meta", max(spec.seq_lens + [spec.targets.seq_len]))
        wl = meta[c.model]
        training = c.mode != "prefill"
        fl = floors(wl.sizes(), wl.flops_per_token(c.seq_len, training), c.seq_len, c.batch_size, training, peak, bw)
        est = (c.warmup + c.steps) * fl["floor_ms"] / 1e3 / PLAN_EFFICIENCY + PLAN_CELL_S
        if c.compile:
            key = (c.model, c.mode != "prefill", c.seq_len, c.batch_size)
            est += PLAN_RECOMPILE_S if key in compiled else PLAN_COMPILE_S
            compiled.add(key)
        total += est
        rows.append({"part": c.part, "model": c.model, "mode": c.mode, "T": c.seq_len, "B": c.batch_size,
                     "GFLOP/step": fl["flops_per_step"] / 1e9, "min GB moved": fl["min_bytes_gb"],
                     "mem floor GB": fl["mem_floor_gb"], "floor ms": fl["floor_ms"], "bound": fl["floor_bound"],
                     "est s": est})
    df = pd.DataFrame(rows)
    return (df.to_string(index=False, float_format=lambda v: f"{v:,.2f}") +
            f"\n\n{len(cells)} cells; estimated {total / 60:.1f} min at {peak / 1e12:.0f} TFLOP/s, {bw / 1e12:.1f} TB/s, "
            f"{PLAN_EFFICIENCY:.0%} of the floor, {PLAN_COMPILE_S:.0f} s per compile ({PLAN_RECOMPILE_S:.0f} s for a graph "
            f"compiled before), {PLAN_CELL_S} s per cell, {PLAN_MODEL_S} s per model build, {PLAN_FIXED_S:.0f} s fixed")

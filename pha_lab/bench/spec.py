"""What a bench run measures: the spec (the schema of bench/*.yaml, as dataclasses) and its cells.

A part is a list of cells (`plan`); a cell is one timed configuration and one CSV row. Adding a part means
a name in PARTS, its settings dataclass as a field of BenchSpec, its cells in `plan`, and how it runs in
pha_lab/bench/efficiency.py (a step-timed part needs nothing more; a part with its own loop, as `overhead`,
yields its cells' results).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from pha_lab.config import BENCH_DIR, ConfigError, load_yaml

PARTS = ("targets", "overhead", "models", "dss", "branches", "targets_mini", "overhead_mini", "decode")
TARGET_PARTS = ("targets", "targets_mini")  # suite models beside their plain GPT-2-style twin (gpt2_*), one scale each
OVERHEAD_PARTS = ("overhead", "overhead_mini")  # one LMModule trained by a plain loop and by Lightning
MODES = ("prefill", "train")
DECODE_PARTS = ("decode",)  # a prompt's prefill, then tokens one at a time from the model's state (bench/decode.py)
OVERHEAD_LOOPS = ("loop_plain", "loop_lightning")  # the overhead part's modes
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class BranchesSpec:
    of: str = "pha_180m"  # the preset whose width and branch settings are used
    names: list[str] = field(default_factory=lambda: ["gss", "attn", "ffn"])  # gss-chunked: model.gss.conv_impl=chunked
    compile: bool | None = None  # None: the spec's `compile`


@dataclass
class DSSSpec:
    of: str = "pha_180m"  # the preset whose GSS H (d_hidden) and N (n_modes) are used
    variants: list[str] = field(default_factory=lambda: ["fft_autograd", "fft", "chunked"])
    chunk: int = 128  # chunked variant: positions per chunk


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
    rounds: int = 3  # plain, Lightning, plain, Lightning, ...: the summary reports each loop's median round
    compile: bool = True


@dataclass
class DecodeSpec:
    """The decode part: per model x context x batch, the prompt is `context - warmup - steps` tokens, so the decoded
    tokens end at `context` and the state made for max_len = context is full when the cell ends."""

    models: list[str] = field(
        default_factory=lambda: ["transformer_180m", "pha_180m", "pha_sparse_180m", "pha_swa_180m", "gss_125m"]
    )
    contexts: list[int] = field(default_factory=lambda: [1024, 4096, 8192, 16384, 32768])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    prefill_warmup: int = 1  # untimed prefills (each from a fresh state)
    prefill_repeats: int = 2  # timed prefills: prefill_ms is their median
    warmup: int = 8  # untimed decode steps (one token per sequence each)
    steps: int = 32  # timed decode steps
    max_cache_gb: float | None = None  # a cell whose analytic cache + weights exceed it is a skipped row;
    # None: the GPU's memory (no limit on a CPU)


@dataclass
class BenchSpec:
    name: str = "efficiency"
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    models: list[str] = field(
        default_factory=lambda: ["pha_125m", "transformer_125m", "pha_180m", "transformer_180m", "gss_125m"]
    )
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
    # the mini scale (~30M): mini_transformer beside a plain GPT loop of its shape, and its Lightning-vs-plain loops
    targets_mini: TargetsSpec = field(
        default_factory=lambda: TargetsSpec(models=["gpt2_mini", "mini_transformer", "mini_pha"], batch_size=16)
    )
    overhead_mini: OverheadSpec = field(default_factory=lambda: OverheadSpec(model="mini_transformer", batch_size=16))
    decode: DecodeSpec = field(default_factory=DecodeSpec)
    max_minutes: float = 9.0  # cells not started by then are recorded as skipped (the CSV is always written)
    peak_tflops: float = 778.0  # bf16 8192^3 matmul measured on an H100 (2026-11-27), used unless --measure-peak
    bandwidth_tbs: float = 3.0  # device-to-device copy, read + write (an H100's, 2026-11-27), unless measured
    datasheet_tflops: float = 989.4  # H100 SXM dense bf16, used when Lightning's table lacks the card
    cpu_threads: int = 1
    experiment: str = "efficiency"
    seed: int = 0
    cpu: dict[str, Any] | None = None  # overrides that make the tiny CPU version


def load_spec(name_or_path: str = "efficiency", overrides: list[str] = (), tiny: bool = False) -> DictConfig:
    """Schema <- bench YAML (its `extends:` chain) <- its `cpu:` section when `tiny` <- key=value overrides."""
    spec = load_yaml(BenchSpec, name_or_path, BENCH_DIR, "bench spec", overrides, sections={"cpu": tiny})
    for key, values, valid in (
        ("parts", spec.parts, PARTS),
        ("modes", spec.modes, MODES),
        ("targets.modes", spec.targets.modes, MODES),
        ("targets_mini.modes", spec.targets_mini.modes, MODES),
        ("dtype", [spec.dtype], tuple(DTYPES)),
    ):
        bad = [v for v in values if v not in valid]
        if bad:
            raise ConfigError(f"bench {key}: unknown {bad}; choose from {', '.join(valid)}")
    d = spec.decode
    decoded = d.warmup + d.steps
    if d.warmup < 0 or d.steps < 1 or d.prefill_warmup < 0 or d.prefill_repeats < 1:
        raise ConfigError(
            f"bench decode: need warmup >= 0, steps >= 1, prefill_warmup >= 0, prefill_repeats >= 1 "
            f"(got {d.warmup}, {d.steps}, {d.prefill_warmup}, {d.prefill_repeats})"
        )
    if any(t <= decoded for t in d.contexts) or any(b < 1 for b in d.batch_sizes):
        raise ConfigError(
            f"bench decode.contexts={list(d.contexts)} must each exceed decode.warmup + decode.steps = "
            f"{decoded} (the prompt is the rest), and decode.batch_sizes={list(d.batch_sizes)} be >= 1"
        )
    return spec


@dataclass
class Cell:
    """One timed configuration: a row of the CSV (with its result and floors)."""

    part: str
    model: str
    mode: str
    seq_len: int
    batch_size: int
    compile: bool
    warmup: int
    steps: int


def overhead_cells(o: OverheadSpec | DictConfig, part: str = "overhead") -> list[Cell]:
    """Plain loop, Lightning loop, plain loop, ...: `rounds` of both, on one module."""
    return [
        Cell(part, o.model, mode, o.seq_len, o.batch_size, o.compile, o.warmup, o.steps)
        for _ in range(o.rounds)
        for mode in OVERHEAD_LOOPS
    ]


def plan(spec: DictConfig) -> list[Cell]:
    """Every cell of every part in `spec.parts`, in run order (a decode cell: seq_len = the context, batch_size = the
    sequences decoded together, warmup/steps = decode steps). Workload names: `PRESET` (a model),
    `gpt2_*` (the reference loop), `PRESET:BRANCH` (a branch stack), `PRESET:dss-VARIANT[-CHUNK]` (one DSS)."""
    cells = []
    for part in spec.parts:
        if part in TARGET_PARTS:
            t = spec[part]
            cells += [
                Cell(part, m, mode, t.seq_len, t.batch_size, t.compile, t.warmup, spec.steps)
                for m in t.models
                for mode in t.modes
            ]
        elif part in OVERHEAD_PARTS:
            cells += overhead_cells(spec[part], part)
        elif part in DECODE_PARTS:
            d = spec[part]
            cells += [
                Cell(part, m, "decode", t, b, False, d.warmup, d.steps)
                for m in d.models
                for t in d.contexts
                for b in d.batch_sizes
            ]
        else:
            names = {
                "models": list(spec.models),
                "branches": [f"{spec.branches.of}:{b}" for b in spec.branches.names],
                "dss": [
                    f"{spec.dss.of}:dss-{v}" + (f"-{spec.dss.chunk}" if v == "chunked" else "")
                    for v in spec.dss.variants
                ],
            }[part]
            compile = spec.compile if part != "branches" or spec.branches.compile is None else spec.branches.compile
            cells += [
                Cell(part, m, mode, t, max(1, spec.tokens_per_step // t), compile, spec.warmup, spec.steps)
                for m in names
                for mode in spec.modes
                for t in spec.seq_lens
            ]
    return cells

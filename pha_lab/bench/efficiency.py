"""`pha-lab bench`: training and prefill throughput, peak memory and MFU vs context length.

One call runs the parts a bench YAML lists (bench/efficiency.yaml), in its order:
  targets   the T=1024 speed targets, compiled: the GPT-2 reference vs transformer_125m, PHA-125M MFU
  overhead  the same LMModule trained by a plain PyTorch loop and by Lightning with the suite's callbacks
  models    every preset x context length x {prefill, train} at a constant number of tokens per step
  branches  one branch alone: n_layers x (RMSNorm -> branch -> residual) of a preset's width, on random
            activations (no embedding or LM head), so the cost of GSS, GQA and FFN is seen separately
  dss       one DSS long convolution (a preset's H, N) in each candidate implementation of
            pha_lab.bench.dss_variants (the FFT path before the GSS rewrite, the model's conv_impl fft and chunked)
  decode    a prompt's prefill, then one token at a time from the decoding state, by context x batch, and the
            cache that state holds (pha_lab.bench.decode; bench/decode.yaml runs only this part)
Each cell is timed by pha_lab.bench.timing (CUDA events, `steps` timed steps after `warmup`, median and
p10/p90; peak memory after a reset; an out-of-memory cell is recorded as OOM and the run goes on).
Analytic FLOPs give TFLOP/s and MFU, and `floor_ms` is the larger of FLOPs/peak and the minimum
bytes/bandwidth (pha_lab.bench.roofline). Without a GPU the YAML's `cpu:` section turns the same command
into a tiny run (the tests use it).
The package's layout is in pha_lab/bench/__init__.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from pha_lab.bench import report
from pha_lab.bench.decode import prompt_len, run_decode
from pha_lab.bench.roofline import Rate, datasheet_flops, decode_floors, device_peaks, utilisation, workload_floors
from pha_lab.bench.spec import DECODE_PARTS, DTYPES, OVERHEAD_PARTS, Cell, load_spec, plan
from pha_lab.bench.timing import autocast, free_memory, measure, time_steps
from pha_lab.bench.workloads import (
    Workload,
    build_step,
    make_optimizer,
    make_workload,
    memory_columns,
    meta_workload,
    optimizer_bytes,
)


@dataclass
class BenchOptions:
    config: str = "efficiency"
    overrides: list[str] = field(default_factory=list)
    out: str | None = None  # CSV path; default runs/bench/<name>-<date>.csv
    measure_peak: bool = False
    compile: bool | None = None  # overrides every part's compile flag
    tiny: bool | None = None  # None: tiny exactly when there is no GPU
    device: str | None = None
    mlflow: bool = True
    tracking_uri: str | None = None
    runs_dir: str = "runs"
    plan_only: bool = False


def resolve(opts: BenchOptions) -> tuple[DictConfig, torch.device]:
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # tiny exactly without a GPU, unless asked; a plan is for the GPU
    tiny = opts.tiny if opts.tiny is not None else (device.type != "cuda" and not opts.plan_only)
    overrides = list(opts.overrides)
    if opts.compile is not None:
        keys = (
            "compile",
            "branches.compile",
            "targets.compile",
            "overhead.compile",
            "targets_mini.compile",
            "overhead_mini.compile",
        )
        overrides += [f"{k}={opts.compile}" for k in keys]
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


def model_lengths(cells: list[Cell]) -> dict[tuple[str, str], int]:
    """(part, model) -> the longest sequence its cells run: the GPT-2 reference's position table."""
    longest: dict[tuple[str, str], int] = {}
    for c in cells:
        longest[c.part, c.model] = max(longest.get((c.part, c.model), 0), c.seq_len)
    return longest


def cell_floors(cell: Cell, meta: Workload, peak: float, bandwidth: float, cache_dtype_bytes: int) -> dict:
    """A cell's analytic floors (pha_lab.bench.roofline): a decode step's and its prompt's prefill, or a step's."""
    if cell.part in DECODE_PARTS:
        return decode_floors(meta, cell.seq_len, cell.batch_size, prompt_len(cell), cache_dtype_bytes, peak, bandwidth)
    return workload_floors(meta, cell.seq_len, cell.batch_size, cell.mode != "prefill", peak, bandwidth)


class Rows:
    """The run's rows: each finished cell gets its floors and MFU, is appended, written and printed."""

    def __init__(
        self,
        cells: list[Cell],
        header: dict,
        peak: Rate,
        bandwidth: Rate,
        datasheet: float,
        out: Path,
        start: float,
        cache_dtype_bytes: int = 4,
    ):
        self.peak, self.bandwidth, self.datasheet, self.out, self.start = peak[0], bandwidth[0], datasheet, out, start
        self.cache_dtype_bytes = cache_dtype_bytes  # the run's dtype: what a KV cache would be kept in
        self.lengths = model_lengths(cells)
        self.common = {k: header[k] for k in ("gpu", "torch", "dtype", "git_sha")}
        self.rows: list[dict] = []

    def add(self, cell: Cell, result: dict) -> None:
        meta = meta_workload(cell.model, self.lengths.get((cell.part, cell.model), cell.seq_len))
        floors = cell_floors(cell, meta, self.peak, self.bandwidth, self.cache_dtype_bytes)
        row = {
            **dataclasses.asdict(cell),
            "tokens_per_step": cell.seq_len * cell.batch_size,
            **self.common,
            "n_params": meta.sizes()["n_params"],
            **floors,
            **result,
        }
        row.update(
            memory_columns(
                meta,
                cell.batch_size,
                cell.seq_len,
                self.cache_dtype_bytes,
                result.get("optimizer_bytes"),
                result.get("peak_mem_gb"),
            )
        )
        if row["status"] == "ok":
            row.update(utilisation(row["flops_per_step"], row["step_ms_median"], self.peak, self.datasheet))
        self.rows.append(row)
        report.write_csv(self.rows, self.out)
        print(report.progress_line(row, time.monotonic() - self.start), flush=True)

    def skip(self, cells: list[Cell]) -> None:
        for cell in cells:
            self.add(cell, {"status": "skipped", "note": "time budget (max_minutes)"})


def _run(spec: DictConfig, device: torch.device, opts: BenchOptions) -> tuple[list[dict], dict, Path]:
    start = time.monotonic()
    deadline = start + 60 * spec.max_minutes
    torch.manual_seed(spec.seed)
    peak, bandwidth = device_peaks(device, spec, opts.measure_peak)
    datasheet = datasheet_flops(device, spec)
    header = report.environment(device, spec, peak, bandwidth, datasheet)
    out = Path(opts.out or Path(opts.runs_dir) / "bench" / f"{spec.name}-{dt.datetime.now():%Y%m%d-%H%M%S}.csv")
    header_path = report.write_header(header, spec, out)
    print(report.header_lines(header), flush=True)
    dtype = DTYPES[spec.dtype] if device.type == "cuda" else torch.float32
    amp = autocast(device, dtype)
    cells = plan(spec)
    rows = Rows(cells, header, peak, bandwidth, datasheet, out, start, dtype.itemsize)
    for part in spec.parts:
        part_cells = [c for c in cells if c.part == part]
        if time.monotonic() > deadline:
            rows.skip(part_cells)
        elif part in OVERHEAD_PARTS:
            # here, not at the top: the overhead parts import Lightning (~5 s), which no other part needs
            from pha_lab.bench.overhead import measure_loops

            for cell, result in measure_loops(spec[part], device, dtype, part):
                rows.add(cell, result)
        elif part in DECODE_PARTS:
            run_decode(spec, part_cells, device, dtype, amp, rows.add, rows.skip, deadline)
        else:
            for model in dict.fromkeys(c.model for c in part_cells):
                run_model(spec, [c for c in part_cells if c.model == model], device, amp, rows, deadline)

    text, table_path = report.write_table(rows.rows, header, out)
    print("\n" + text, flush=True)
    print(f"\ncsv: {out}\nheader: {header_path}\ntook {time.monotonic() - start:.0f} s", flush=True)
    if opts.mlflow:
        try:
            run_id = report.log_mlflow(
                rows.rows,
                header,
                OmegaConf.to_container(spec, resolve=True),
                [out, header_path, table_path],
                opts.tracking_uri,
                opts.runs_dir,
                spec.experiment,
            )
            print(f"mlflow: run {run_id} in experiment '{spec.experiment}'")
        except Exception as exc:  # e.g. a GPU image without mlflow: the CSV is the record, log it later
            print(
                f"mlflow not logged ({type(exc).__name__}: {exc}); later: pha-lab bench --from-csv {out}",
                file=sys.stderr,
            )
    return rows.rows, header, out


def run_model(spec: DictConfig, group: list[Cell], device: torch.device, amp, rows: Rows, deadline: float) -> None:
    """The cells of one workload of a step-timed part: build it once on the device, time each cell."""
    if time.monotonic() > deadline:
        rows.skip(group)
        return
    torch.manual_seed(spec.seed)
    try:
        workload = make_workload(group[0].model, device, max(c.seq_len for c in group))
    except torch.cuda.OutOfMemoryError as exc:
        for cell in group:
            rows.add(cell, {"status": "OOM", "note": f"building the model: {str(exc).splitlines()[0][:200]}"})
        free_memory(device)
        return
    state: dict[str, Any] = {}
    for cell in group:
        if time.monotonic() > deadline:
            rows.skip([cell])
        else:
            rows.add(cell, run_cell(cell, workload, state, device, amp))
    workload = state = None
    free_memory(device)
    if any(c.compile for c in group):
        torch._dynamo.reset()


def run_cell(cell: Cell, workload: Workload, state: dict, device: torch.device, amp) -> dict[str, Any]:
    """Time one cell (timing.measure's result); `state` keeps the workload's optimizer across its cells."""
    module = workload.module

    def prepare():
        gen = torch.Generator(device=device).manual_seed(cell.seq_len * 7919 + cell.batch_size)
        batches = [workload.batch(cell.batch_size, cell.seq_len, device, gen) for _ in range(2)]
        if cell.compile:
            torch._dynamo.reset()  # a fresh graph per cell: no silent fallback after the recompile limit
        fwd = torch.compile(module) if cell.compile else module
        module.train(cell.mode == "train")
        if cell.mode == "train" and "optimizer" not in state:
            state["optimizer"] = make_optimizer(module, device)
        step = build_step(cell.mode, workload, fwd, state.get("optimizer"), batches, amp)
        return lambda: time_steps(step, cell.warmup, cell.steps, device)

    result = measure(prepare, cell.seq_len * cell.batch_size, device)
    if result["status"] == "ok":
        result["optimizer_bytes"] = optimizer_bytes(state.get("optimizer"))
    else:  # the failed cell's tensors are gone with `prepare`'s frame: free the memory
        if state.get("optimizer") is not None:
            state["optimizer"].zero_grad(set_to_none=True)
        free_memory(device)
    return result


def log_csv(path: Path, opts: BenchOptions) -> str:
    """Log a CSV written elsewhere (e.g. on the GPU machine) with its header JSON as one MLflow run."""
    path = Path(path)
    header_path, table_path = report.paths(path)
    header = json.loads(header_path.read_text()) if header_path.is_file() else {}
    spec = header.pop("spec", None) or OmegaConf.to_container(
        resolve(BenchOptions(opts.config, opts.overrides, tiny=False))[0]
    )
    experiment = spec.get("experiment", "efficiency")
    run_id = report.log_mlflow(
        report.read_csv(path),
        header,
        spec,
        [path, header_path, table_path],
        opts.tracking_uri,
        opts.runs_dir,
        experiment,
    )
    print(f"mlflow: run {run_id} in experiment '{experiment}' from {path}")
    return run_id


# --------------------------------------------------------------------------- planning (no device)
# A cell's estimate: its warm-up and timed steps at PLAN_EFFICIENCY of the floor, a fixed cost, and for a compiled
# cell a compile allowance fit to the compiled cells of the 2026-11-27 H100 run (docs/benchmarks/h100/efficiency.csv,
# `warmup_s` = compile + warm-up steps): gpt2_reference 27.0 s (49 Linear layers), transformer_125m 29.3 s (61),
# pha_125m 45.0 s (109), the overhead part's pha_125m again 46.7 s (its LMModule graph is not the bench's: no cache
# hit): ~12 s + 0.3 s per Linear. The same run's Lightning loops started in 12.6 s the first time, 3.0 s after.
PLAN_EFFICIENCY = 0.4  # assumed fraction of the floor reached, for the time estimate only
PLAN_COMPILE_BASE_S = 12.0
PLAN_COMPILE_PER_LINEAR_S = 0.3
PLAN_LIGHTNING_START_S = (12.6, 3.0)  # the first Lightning loop of an overhead part, each later one
PLAN_CELL_S = 0.5  # inputs, allocator churn, printing
PLAN_MODEL_S = 2.0  # building and initialising a model on the device
PLAN_FIXED_S = 20.0  # imports, peak measurement, MLflow
# A decode step in eager PyTorch is host-bound below its floor: a 12-layer preset launches ~500 kernels per token
# (projections, RoPE, cache writes, attention, the GSS recurrence, mixer, norms) at ~15 us each. An assumption, not a
# measurement: the decode part's own rows will say (docs/perf-notes.md).
PLAN_DECODE_STEP_MS = 8.0


def compile_allowance(workload: Workload) -> float:
    """Seconds torch.compile is assumed to take for one workload's forward + backward (see above)."""
    linears = sum(isinstance(m, torch.nn.Linear) for m in workload.module.modules())
    return PLAN_COMPILE_BASE_S + PLAN_COMPILE_PER_LINEAR_S * linears


def cell_estimate_s(
    c: Cell, floor_ms: float, first_of_part: bool, lightning_started: bool, workload: Workload
) -> float:
    """One cell's estimated seconds (steps + fixed + compile + Lightning start-up), as `plan_table` sums them."""
    est = (c.warmup + c.steps) * floor_ms / 1e3 / PLAN_EFFICIENCY + PLAN_CELL_S
    if c.compile and (c.part not in OVERHEAD_PARTS or first_of_part):  # an overhead part compiles its module once
        est += compile_allowance(workload)
    if c.mode == "loop_lightning":
        est += PLAN_LIGHTNING_START_S[lightning_started]
    return est


def decode_estimate_s(c: Cell, fl: dict, d: DictConfig) -> float:
    """One decode cell's estimated seconds: its prefills at PLAN_EFFICIENCY of their floor, its steps at the larger of
    that and PLAN_DECODE_STEP_MS, and the fixed per-cell cost."""
    step_ms = max(fl["floor_ms"] / PLAN_EFFICIENCY, PLAN_DECODE_STEP_MS)
    prefill_s = (d.prefill_warmup + d.prefill_repeats) * fl["prefill_floor_ms"] / 1e3 / PLAN_EFFICIENCY
    return prefill_s + (c.warmup + c.steps) * step_ms / 1e3 + PLAN_CELL_S


def plan_table(spec: DictConfig, peak_tflops: float | None = None, bandwidth_tbs: float | None = None) -> str:
    """Every cell's analytic floor on the target card, and an estimate of the whole run's time."""
    peak = (peak_tflops or spec.peak_tflops) * 1e12
    bw = (bandwidth_tbs or spec.bandwidth_tbs) * 1e12
    cells = plan(spec)
    lengths = model_lengths(cells)
    rows, total, parts_seen, lightning_parts = [], PLAN_FIXED_S + PLAN_MODEL_S * len(lengths), set(), set()
    for c in cells:
        meta = meta_workload(c.model, lengths[c.part, c.model])
        fl = cell_floors(c, meta, peak, bw, DTYPES[spec.dtype].itemsize)
        if c.part in DECODE_PARTS:
            est = decode_estimate_s(c, fl, spec[c.part])
        else:
            est = cell_estimate_s(c, fl["floor_ms"], c.part not in parts_seen, c.part in lightning_parts, meta)
        parts_seen.add(c.part)
        if c.mode == "loop_lightning":
            lightning_parts.add(c.part)
        total += est
        rows.append(
            {
                "part": c.part,
                "model": c.model,
                "mode": c.mode,
                "T": c.seq_len,
                "B": c.batch_size,
                "compile": c.compile,
                "GFLOP/step": fl["flops_per_step"] / 1e9,
                "min GB moved": fl["min_bytes_gb"],
                "mem floor GB": fl["mem_floor_gb"],
                "floor ms": fl["floor_ms"],
                "bound": fl["floor_bound"],
                **({"prefill floor ms": fl["prefill_floor_ms"]} if c.part in DECODE_PARTS else {}),
                "est s": est,
            }
        )
    df = pd.DataFrame(rows)
    if "prefill floor ms" in df:  # decode rows only: blank elsewhere, not NaN
        df["prefill floor ms"] = [f"{v:,.2f}" if v == v else "" for v in df["prefill floor ms"]]
    by_part = df.groupby("part", sort=False)["est s"].sum()
    return (
        df.to_string(index=False, float_format=lambda v: f"{v:,.2f}")
        + "\n\nestimated seconds by part: "
        + ", ".join(f"{p} {v:.0f}" for p, v in by_part.items())
        + f"\n{len(cells)} cells; estimated {total / 60:.1f} min ({total:.0f} s) at {peak / 1e12:.0f} TFLOP/s, "
        f"{bw / 1e12:.1f} TB/s, {PLAN_EFFICIENCY:.0%} of the floor, compile {PLAN_COMPILE_BASE_S:.0f} s + "
        f"{PLAN_COMPILE_PER_LINEAR_S} s per Linear, Lightning start {PLAN_LIGHTNING_START_S[0]} s then "
        f"{PLAN_LIGHTNING_START_S[1]} s, {PLAN_CELL_S} s per cell, {PLAN_MODEL_S} s per model build, "
        f"decode steps >= {PLAN_DECODE_STEP_MS} ms (decode rows: the floors of one step at the context, "
        f"GFLOP and GB per step; prefill floor ms: the prompt's), "
        f"{PLAN_FIXED_S:.0f} s fixed; max_minutes = {spec.max_minutes}"
    )

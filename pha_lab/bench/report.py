"""What a bench run leaves behind: the CSV (one row per cell, COLUMNS), the header JSON beside it (GPU,
driver, torch, git SHA, dtype, compile flags, peaks and the resolved spec: what a reader needs to
reproduce or compare the numbers), the printed table with the target comparisons, and one MLflow run.
The CSV format is read back by `read_csv` (--from-csv) and by pha_lab/analysis/efficiency.py. Over 400 lines on
purpose: every output format of the bench (CSV, header, printed tables and summaries of every part, MLflow) in one
place, so a new column or part changes one module.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

from pha_lab import tracking
from pha_lab.analysis.runs import baseline_pairs
from pha_lab.bench.spec import DECODE_PARTS, MODES, OVERHEAD_PARTS, TARGET_PARTS
from pha_lab.config import flatten

COLUMNS = [
    "part",
    "model",
    "mode",
    "seq_len",
    "batch_size",
    "tokens_per_step",
    "status",
    "tokens_per_s",
    "step_ms_median",
    "step_ms_p10",
    "step_ms_p90",
    "warmup_s",
    "peak_mem_gb",
    "weights_gb",
    "optimizer_gb",
    "activations_gb",
    "cache_gb",  # memory parts: workloads.memory_columns
    "prefill_ms",
    "prefill_tok_s",
    "decode_tok_s",
    "decode_tok_s_per_seq",
    "cache_bytes_analytic",  # decode part
    "cache_bytes_measured",
    "decode_peak_mem_gb",  # (pha_lab.bench.decode)
    "mem_floor_gb",
    "flops_per_step",
    "tflops",
    "mfu_measured_peak",
    "mfu_datasheet",
    "min_bytes_gb",
    "floor_ms",
    "prefill_floor_ms",
    "floor_bound",
    "n_params",
    "gpu",
    "torch",
    "compile",
    "dtype",
    "git_sha",
    "note",
]
TEXT_COLUMNS = ("model", "mode", "part", "status", "note", "git_sha", "gpu", "torch", "dtype", "floor_bound")
MLFLOW_METRICS = (
    "tokens_per_s",
    "step_ms_median",
    "peak_mem_gb",
    "tflops",
    "mfu_measured_peak",
    "mfu_datasheet",
    "prefill_ms",
    "decode_tok_s",
    "decode_tok_s_per_seq",
    "cache_bytes_measured",
    "decode_peak_mem_gb",
)


# --------------------------------------------------------------------------- header
def environment(
    device: torch.device, spec: DictConfig, peak: tuple[float, str], bandwidth: tuple[float, str], datasheet: float
) -> dict:
    """The header: what a reader needs to reproduce or compare the numbers."""
    cuda = device.type == "cuda"
    git = tracking.git_info()  # (PHA_GIT_SHA where the tree has no .git, as on the GPU machine)
    header = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "driver": tracking._driver_version() if cuda else "none",
        "cuda": torch.version.cuda or "none",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_sha": git["git_sha"],
        "git_dirty": git["git_dirty"],
        "command": tracking.command_line(),
        "dtype": f"{spec.dtype}-autocast" if cuda and spec.dtype != "fp32" else "fp32",
        "compile": (
            f"models={spec.compile} branches={spec.branches.compile} (None: as models) "
            f"targets={spec.targets.compile} overhead={spec.overhead.compile} "
            f"targets_mini={spec.targets_mini.compile} overhead_mini={spec.overhead_mini.compile}"
        ),
        "tokens_per_step": spec.tokens_per_step,
        "warmup_steps": spec.warmup,
        "timed_steps": spec.steps,
        "peak_tflops": float(f"{peak[0] / 1e12:.4g}") if math.isfinite(peak[0]) else "n/a",
        "peak_source": peak[1],
        "bandwidth_tbs": float(f"{bandwidth[0] / 1e12:.4g}"),
        "bandwidth_source": bandwidth[1],
        "datasheet_tflops": round(datasheet / 1e12, 1) if cuda else "n/a",
    }
    if cuda:
        header["sdpa_flash_gqa"] = _probe_flash_gqa(device)
        header["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)
    return header


def _probe_flash_gqa(device: torch.device) -> str:
    """Whether SDPA's flash kernel takes the suite's GQA call (else long contexts fall back to slower kernels)."""
    q = torch.randn(1, 12, 256, 64, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, 4, 256, 64, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return "yes"
    except RuntimeError as exc:
        return f"no ({str(exc).splitlines()[0][:120]})"


def header_lines(header: dict) -> str:
    return "\n".join(f"# {k}: {v}" for k, v in header.items())


def paths(out: Path) -> tuple[Path, Path]:
    """(header JSON, printed table) beside the CSV `out`."""
    return out.with_name(out.stem + ".header.json"), out.with_name(out.stem + ".txt")


def write_header(header: dict, spec: DictConfig, out: Path) -> Path:
    path = paths(out)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, "spec": OmegaConf.to_container(spec, resolve=True)}, indent=1))
    return path


# --------------------------------------------------------------------------- CSV
def write_csv(rows: list[dict], path: Path) -> None:
    """All rows so far, atomically (the CSV is rewritten after every cell: a killed run keeps what it measured)."""
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
        return [{k: (num(v) if k not in TEXT_COLUMNS else v) for k, v in row.items()} for row in csv.DictReader(f)]


# --------------------------------------------------------------------------- printed
def progress_line(row: dict, elapsed_s: float) -> str:
    """One line per finished cell, printed as the run goes."""
    tps = f"{row['tokens_per_s']:>12,.0f} tok/s" if row["status"] == "ok" else ""
    mem = f"{row['peak_mem_gb']:.2f} GB" if row.get("peak_mem_gb") else ""
    return (
        f"[{elapsed_s:6.0f}s] {row['part']:<9} {row['model']:<20} {row['mode']:<14} T={row['seq_len']:<6} "
        f"B={row['batch_size']:<4} {row['status']:<7} {tps} {mem} {row.get('note', '')}"
    )


def table(rows: list[dict]) -> str:
    """The step-timed and loop parts' table, then the decode part's (its own columns) when it ran."""
    decode = [r for r in rows if r["part"] in DECODE_PARTS]
    rest = [r for r in rows if r["part"] not in DECODE_PARTS]
    return "\n\n".join(t for t in ((_step_table(rest) if rest else ""), (decode_table(decode) if decode else "")) if t)


def _formatted(rows: list[dict], cols: dict[str, str], fmt: dict[str, str]) -> str:
    df = pd.DataFrame(rows).reindex(columns=list(cols)).rename(columns=cols)
    for col, f in fmt.items():
        df[col] = [f.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "" for v in df[col]]
    return df.to_string(index=False)


def decode_table(rows: list[dict]) -> str:
    cols = {
        "model": "model",
        "seq_len": "context",
        "batch_size": "B",
        "status": "status",
        "prefill_ms": "prefill ms",
        "prefill_floor_ms": "prefill floor",
        "decode_tok_s": "decode tok/s",
        "decode_tok_s_per_seq": "tok/s/seq",
        "step_ms_median": "step ms",
        "floor_ms": "step floor",
        "cache_bytes_analytic": "cache MB",
        "cache_bytes_measured": "measured MB",
        "peak_mem_gb": "mem GB",
        "decode_peak_mem_gb": "decode mem GB",
        "note": "note",
    }
    rows = [
        {
            **r,
            "cache_bytes_analytic": r.get("cache_bytes_analytic", math.nan) / 1e6,
            "cache_bytes_measured": r.get("cache_bytes_measured", math.nan) / 1e6,
        }
        for r in rows
    ]
    fmt = {
        "prefill ms": "{:,.1f}",
        "prefill floor": "{:,.1f}",
        "decode tok/s": "{:,.0f}",
        "tok/s/seq": "{:,.1f}",
        "step ms": "{:.2f}",
        "step floor": "{:.3f}",
        "cache MB": "{:.4g}",
        "measured MB": "{:.4g}",
        "mem GB": "{:.2f}",
        "decode mem GB": "{:.2f}",
    }
    return _formatted(rows, cols, fmt)


def _step_table(rows: list[dict]) -> str:
    cols = {
        "part": "part",
        "model": "model",
        "mode": "mode",
        "seq_len": "T",
        "batch_size": "B",
        "status": "status",
        "tokens_per_s": "tok/s",
        "step_ms_median": "ms",
        "peak_mem_gb": "mem GB",
        "activations_gb": "act GB",
        "cache_gb": "cache GB",
        "tflops": "TFLOP/s",
        "mfu_measured_peak": "MFU",
        "floor_ms": "floor ms",
        "compile": "compile",
    }
    fmt = {
        "tok/s": "{:,.0f}",
        "ms": "{:.2f}",
        "mem GB": "{:.2f}",
        "act GB": "{:.2f}",
        "cache GB": "{:.4f}",
        "TFLOP/s": "{:.1f}",
        "MFU": "{:.1%}",
        "floor ms": "{:.2f}",
    }
    return _formatted(rows, cols, fmt)


def summary(rows: list[dict]) -> list[str]:
    """The target comparisons (speed targets, long-context ratios), from whatever cells this run has."""
    ok = [r for r in rows if r["status"] == "ok"]
    find = {(r["part"], r["model"], r["mode"], r["seq_len"]): r for r in ok}
    lines = []
    goal = {"targets": "target >= 1.10x", "targets_mini": "the step without Lightning; through Lightning below"}
    twins: dict[str, dict] = {}  # part -> its plain GPT-2-style reference row
    for part in TARGET_PARTS:
        trained = [r for r in ok if r["part"] == part and r["mode"] == "train"]
        for ref in (r for r in trained if r["model"].startswith("gpt2_")):
            twins.setdefault(part, ref)
            for r in trained:
                if not r["model"].startswith("gpt2_") and r["seq_len"] == ref["seq_len"]:
                    ratio = r["tokens_per_s"] / ref["tokens_per_s"]
                    lines.append(
                        f"{r['model']} vs {ref['model']} (train, T={r['seq_len']}, B={r['batch_size']}, "
                        f"compile={r['compile']}): {ratio:.3f}x tokens/s ({goal[part]})"
                    )
        for r in trained:
            if not r["model"].startswith("gpt2_"):
                pct = {
                    k: f"{r[k]:.1%}" if math.isfinite(r.get(k, math.nan)) else "n/a"
                    for k in ("mfu_measured_peak", "mfu_datasheet")
                }
                lines.append(
                    f"{r['model']} MFU (train, T={r['seq_len']}): {pct['mfu_measured_peak']} of the measured "
                    f"peak, {pct['mfu_datasheet']} of the datasheet (PHA target >= 45% of measured)"
                )
    for model, base in baseline_pairs({r["model"] for r in ok if r["part"] == "models"}):
        for mode in MODES:
            both = [
                (r, find["models", base, mode, t])
                for (part, m, md, t), r in find.items()
                if (part, m, md) == ("models", model, mode) and ("models", base, mode, t) in find
            ]
            if both:
                lines.append(f"{model} / {base} ({mode}, by T): " + "; ".join(_ratios(r, b) for r, b in both))
    if any(r["part"] == "models" for r in ok):
        lines.append(
            "(paper: PHA-180M 1.24x tokens/s, <= 0.6x memory at T >= 8k; the long-context goals for the "
            "attention-sparse PHA-180M >= 1.40x tokens/s, <= 0.55x peak training memory, cache <= 0.25x)"
        )
    lines += decode_summary([r for r in ok if r["part"] in DECODE_PARTS])
    for part, twin_part in zip(OVERHEAD_PARTS, TARGET_PARTS):
        loops: dict[str, list[float]] = {}
        for r in ok:
            if r["part"] == part:
                loops.setdefault(r["mode"], []).append(r["tokens_per_s"])
        if not ("loop_plain" in loops and "loop_lightning" in loops):
            continue
        plain, light = statistics.median(loops["loop_plain"]), statistics.median(loops["loop_lightning"])
        model = next(r for r in ok if r["part"] == part)
        lines.append(
            f"{model['model']}: Lightning loop vs plain loop: {light / plain - 1:+.1%} tokens/s (median of "
            f"{len(loops['loop_plain'])} rounds each; target within 3%); rounds plain "
            f"{[round(v) for v in loops['loop_plain']]}, "
            f"Lightning {[round(v) for v in loops['loop_lightning']]}"
        )
        ref = twins.get(twin_part)
        if ref is not None and (ref["seq_len"], ref["batch_size"]) == (model["seq_len"], model["batch_size"]):
            lines.append(
                f"{model['model']} through the Lightning loop vs {ref['model']} (plain loop, "
                f"T={ref['seq_len']}, B={ref['batch_size']}): {light / ref['tokens_per_s']:.3f}x tokens/s "
                "(mini target >= 1.0x)"
            )
    return lines


def decode_summary(ok: list[dict]) -> list[str]:
    """Each PHA model's decode speed and cache over each Transformer baseline's (baseline_pairs), per batch, by context;
    and whether every measured cache equals its analytic count."""
    find = {(r["model"], r["batch_size"], r["seq_len"]): r for r in ok}
    lines = []
    for model, base in baseline_pairs({r["model"] for r in ok}):
        for batch in sorted({r["batch_size"] for r in ok}):
            both = [
                (r, find[base, batch, t])
                for (m, b, t), r in sorted(find.items())
                if (m, b) == (model, batch) and (base, batch, t) in find
            ]
            if both:
                lines.append(
                    f"{model} / {base} (decode, B={batch}, by context): "
                    + "; ".join(
                        f"T={r['seq_len']}: {r['decode_tok_s'] / b['decode_tok_s']:.2f}x tok/s, "
                        f"{r['cache_bytes_measured'] / b['cache_bytes_measured']:.2f}x cache"
                        for r, b in both
                    )
                )
    if ok:
        off = [
            f"{r['model']} T={r['seq_len']} B={r['batch_size']}"
            for r in ok
            if r["cache_bytes_measured"] != r["cache_bytes_analytic"]
        ]
        lines.append(
            "decode: measured cache = analytic in every cell"
            if not off
            else f"decode: measured cache != analytic in {', '.join(off)}"
        )
    return lines


def _ratios(r: dict, base: dict) -> str:
    """T: tokens/s ratio, peak-memory ratio (GPU) and inference-cache ratio of row r over row base."""
    parts = [f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x tok/s"]
    for col, what in (("peak_mem_gb", "peak mem"), ("cache_gb", "cache")):
        a, b = r.get(col), base.get(col)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(a) and math.isfinite(b) and b:
            parts.append(f"{a / b:.2f}x {what}")
    return f"T={r['seq_len']}: " + ", ".join(parts)


def write_table(rows: list[dict], header: dict, out: Path) -> tuple[str, Path]:
    """(the table and comparisons, the .txt beside the CSV holding them under the header)."""
    text = table(rows) + "\n\n" + "\n".join(summary(rows))
    path = paths(out)[1]
    path.write_text(header_lines(header) + "\n\n" + text + "\n")
    return text, path


# --------------------------------------------------------------------------- MLflow
def log_mlflow(
    rows: list[dict],
    header: dict,
    spec: dict,
    files: list[Path],
    tracking_uri: str | None,
    runs_dir: str,
    experiment: str,
) -> str:
    """One MLflow run: params = settings + header, metrics `{metric}/{part}/{model}/{mode}/{seq_len}` (the
    overhead rounds as steps; a decode row's mode is `decode_b{batch}`), the CSV and header as artifacts. Returns the
    run id."""
    # here, not at the top: a GPU run with --no-mlflow (or an image without mlflow) never needs it
    from mlflow.entities import Metric, Param

    tcfg = OmegaConf.create({"runs_dir": runs_dir, "tracking_uri": tracking_uri})
    client = tracking.client(tracking.tracking_uri(tcfg))
    exp_id = tracking.ensure_experiment(client, experiment, tcfg)
    tags = {"gpu": str(header.get("gpu")), "git_sha": str(header.get("git_sha")), "kind": "bench"}
    run = client.create_run(
        exp_id, run_name=f"{spec.get('name', 'bench')} {header.get('gpu')} {header.get('date')}", tags=tags
    )
    run_id = run.info.run_id
    params = {**{f"bench.{k}": v for k, v in flatten(spec).items()}, **{f"env.{k}": v for k, v in header.items()}}
    plist = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(plist), 100):
        client.log_batch(run_id, params=plist[i : i + 100])
    now, metrics, seen = int(time.time() * 1000), [], {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        mode = f"{r['mode']}_b{r['batch_size']}" if r["part"] in DECODE_PARTS else r["mode"]  # both batches per context
        key = f"{r['part']}/{r['model']}/{mode}/{r['seq_len']}"
        step = seen[key] = seen.get(key, -1) + 1
        for name in MLFLOW_METRICS:
            value = r.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                metrics.append(Metric(f"{name}/{key}", float(value), now, step))
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    for path in files:
        if path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id

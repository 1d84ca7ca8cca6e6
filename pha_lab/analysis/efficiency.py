"""`pha-lab bench` results as tables: throughput and peak memory vs context length, and PHA / Transformer
ratios beside the paper's efficiency claim (`PAPER_EFFICIENCY`, the only place it lives).

Rows come from the benchmark CSV when it exists, else from the latest finished run of the `efficiency`
MLflow experiment; each keeps its `source` (file:line or run id).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from pha_lab.analysis import figures
from pha_lab.analysis.families import baseline_pairs
from pha_lab.analysis.render import Table, fixed, scale_label, tokens
from pha_lab.analysis.runs import finished, resolve_uri, search_runs
from pha_lab.config import PROJECT_ROOT

EFFICIENCY_CSV = "docs/benchmarks/efficiency.csv"
# PHA-180M versus a pure-attention baseline at long context: +24% throughput, up to -40% memory.
PAPER_EFFICIENCY = {
    "throughput_ratio": 1.24,
    "memory_ratio": 0.60,
    "model": "PHA-180M",
    "provenance": "PHA paper (arXiv 2606.16093), long context, vs pure attention",
}
# Panel titles of the figures (the bench's `mode` column).
MODE_TITLES = {"train": "training step (forward + backward + AdamW)", "prefill": "prefill (forward only)"}

EFFICIENCY_COLUMNS = [
    "model",
    "n_params",
    "mode",
    "seq_len",
    "batch_size",
    "tokens_per_s",
    "peak_mem_gb",
    "status",
    "gpu",
]
DECODE_CSV = "docs/benchmarks/decode.csv"  # `pha-lab bench decode` (its MLflow experiment: `decode`)
DECODE_COLUMNS = [
    "model",
    "n_params",
    "mode",
    "seq_len",
    "batch_size",
    "status",
    "prefill_ms",
    "decode_tok_s",
    "decode_tok_s_per_seq",
    "cache_bytes_analytic",
    "cache_bytes_measured",
    "cache_gb",
    "decode_peak_mem_gb",
    "gpu",
]


def load_efficiency(
    csv: str | Path | None = EFFICIENCY_CSV,
    tracking_uri: str | None = None,
    experiments: str | list[str] = "efficiency",
    part: str | None = "models",
    columns: list[str] = EFFICIENCY_COLUMNS,
) -> tuple[pd.DataFrame, str]:
    """(benchmark rows of one `part` of `pha-lab bench`, where they came from): the CSV if it exists,
    else the latest finished run of the `efficiency` MLflow experiment (its CSV artifact, or failing
    that its `{metric}/{part}/{model}/{mode}/{seq_len}` metrics); empty when there is neither. A
    `source` column keeps each row's provenance (file:line, or run id)."""
    path = resolve_path(csv) if csv else None
    if path is not None and path.is_file():
        df, where = pd.read_csv(path), f"CSV {path}"
        df["source"] = [f"{path.name}:{i + 2}" for i in range(len(df))]
    else:
        uri = resolve_uri(tracking_uri)
        df, where = _bench_run(experiments, uri)
        names = experiments if isinstance(experiments, str) else ", ".join(experiments)
        where = where or f"no CSV at {csv} and no finished run in {names} at {uri}"
    if part and "part" in df:
        df = df[df["part"] == part]
    return _efficiency_frame(df, columns), where


def load_decode(
    csv: str | Path | None = DECODE_CSV, tracking_uri: str | None = None, experiments: str | list[str] = "decode"
) -> tuple[pd.DataFrame, str]:
    """The decode part's rows (pha_lab.bench.decode: prefill and decode speed, cache bytes by context and batch),
    found as `load_efficiency` finds the models part's."""
    return load_efficiency(csv, tracking_uri, experiments, "decode", DECODE_COLUMNS)


def _bench_run(experiments, uri: str) -> tuple[pd.DataFrame, str | None]:
    import mlflow  # start-up time: ~3 s, and tables built from a CSV need no MLflow

    raw, _ = finished(search_runs(experiments, uri))
    if raw.empty:
        return pd.DataFrame(), None
    run = raw.sort_values("start_time").iloc[-1]
    client = mlflow.MlflowClient(uri)
    for art in [a.path for a in client.list_artifacts(run["run_id"]) if a.path.endswith(".csv")][:1]:
        with tempfile.TemporaryDirectory() as tmp:
            df = pd.read_csv(client.download_artifacts(run["run_id"], art, tmp))
        df["source"] = [f"{run['run_id']}/{art}:{i + 2}" for i in range(len(df))]
        return df, f"run {run['run_id']} ({art}) of {run['experiment']} at {uri}"
    rows: dict[tuple, dict] = {}  # no artifact: rebuild the ok rows from the metric names
    for col, value in run.items():
        parts = str(col).split("/")
        if col.startswith("metrics.") and len(parts) == 5 and pd.notna(value):
            name, part, model, mode, seq_len = parts
            batch = re.fullmatch(r"decode_b(\d+)", mode)  # a decode row's mode carries its batch
            row = rows.setdefault(
                (part, model, mode, seq_len),
                {
                    "part": part,
                    "model": model,
                    "mode": "decode" if batch else mode,
                    "seq_len": int(seq_len),
                    "status": "ok",
                    "gpu": run.get("tags.gpu"),
                    "source": run["run_id"],
                    **({"batch_size": int(batch.group(1))} if batch else {}),
                },
            )
            row[name[len("metrics.") :]] = value
    return pd.DataFrame(list(rows.values())), f"metrics of run {run['run_id']} of {run['experiment']} at {uri}"


def resolve_path(path: str | Path) -> Path:
    """A relative path from the cwd when it exists there, else from the project root."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else PROJECT_ROOT / path


def _efficiency_frame(df: pd.DataFrame, columns: list[str] = EFFICIENCY_COLUMNS) -> pd.DataFrame:
    df = df.reindex(columns=columns + ["source"]).copy()
    df["status"] = df["status"].fillna("ok").astype(str)
    for col in columns:
        if col not in ("model", "mode", "status", "gpu"):
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df.sort_values(["mode", "model", "seq_len", "batch_size"], kind="stable").reset_index(drop=True)


def efficiency_table(bench: pd.DataFrame) -> Table:
    gpus = ", ".join(sorted(bench["gpu"].dropna().astype(str).unique())) or "not given"
    failed = bench.loc[bench["status"] != "ok", "status"].value_counts().sort_index()
    columns = {
        "model": "model",
        "n_params": "params",
        "mode": "mode",
        "seq_len": "context",
        "batch_size": "batch",
        "tokens_per_s": "tokens/s",
        "peak_mem_gb": "peak memory (GB)",
        "status": "status",
        "source": "source",
    }
    notes = [
        f"GPU: {gpus}; throughput = median over timed steps (pha-lab bench); params: total, GPT-2 counting (the "
        "bench CSV has no non-embedding count; the presets' are in the README's preset table)."
    ]
    if len(failed):
        notes.append(
            f"{failed.sum()} configuration(s) without a measurement: "
            + ", ".join(f"{n} {s}" for s, n in failed.items())
            + "."
        )
    return Table(
        "efficiency",
        "Throughput and peak memory vs context length",
        bench,
        columns,
        notes,
        {
            "tokens_per_s": lambda v: "" if pd.isna(v) else f"{v:,.0f}",
            "peak_mem_gb": fixed(2),
            "n_params": scale_label,
            "seq_len": tokens,
            "batch_size": tokens,
        },
    )


def decode_table(decode: pd.DataFrame) -> Table:
    """The decode part: prefill time, decode tokens/s (all sequences and each), the cache (analytic and measured)."""
    gpus = ", ".join(sorted(decode["gpu"].dropna().astype(str).unique())) or "not given"
    columns = {
        "model": "model",
        "n_params": "params",
        "seq_len": "context",
        "batch_size": "batch",
        "prefill_ms": "prefill (ms)",
        "decode_tok_s": "decode tokens/s",
        "decode_tok_s_per_seq": "per sequence",
        "cache_bytes_measured": "cache (MB)",
        "decode_peak_mem_gb": "decode memory (GB)",
        "status": "status",
        "source": "source",
    }
    off = decode[(decode["status"] == "ok") & (decode["cache_bytes_measured"] != decode["cache_bytes_analytic"])]
    notes = [
        f"GPU: {gpus}; pha-lab bench decode: the prompt (context - 40 tokens) prefilled, then 32 timed steps of "
        "one token per sequence up to the context, medians; cache: the decoding state's tensors, "
        + (
            "equal to the analytic count in every row."
            if off.empty
            else f"NOT equal to the analytic count in {len(off)} row(s)."
        )
    ]
    mb = lambda v: "" if pd.isna(v) else f"{v / 1e6:,.1f}"  # noqa: E731
    return Table(
        "decode",
        "Decoding: prefill time and tokens/s vs context and batch",
        decode,
        columns,
        notes,
        {
            "prefill_ms": fixed(1),
            "decode_tok_s": lambda v: "" if pd.isna(v) else f"{v:,.0f}",
            "decode_tok_s_per_seq": fixed(1),
            "cache_bytes_measured": mb,
            "decode_peak_mem_gb": fixed(2),
            "n_params": scale_label,
            "seq_len": tokens,
            "batch_size": tokens,
        },
    )


def model_pairs(models: Iterable[str]) -> list[tuple[str, str]]:
    """(PHA, Transformer) pairs by name: every PHA preset with every Transformer baseline of its scale
    (families.baseline_pairs: pha_sparse_180m with transformer_180m, transformer_deep_180m, transformer_mha_180m)."""
    return baseline_pairs(models)


def efficiency_ratios(bench: pd.DataFrame, pairs: list[tuple[str, str]] | None = None) -> Table:
    """PHA / Transformer throughput and peak-memory ratios at each (mode, context, batch) where both ran."""
    ok = bench[bench["status"] == "ok"]
    key = ["mode", "seq_len", "batch_size"]
    rows = []
    for model, base in pairs if pairs is not None else model_pairs(bench["model"].dropna()):
        a, b = ok[ok["model"] == model], ok[ok["model"] == base]
        both = a.merge(b, on=key, suffixes=("", " base"))
        for _, r in both.iterrows():
            rows.append(
                {
                    "pair": f"{model} / {base}",
                    **{k: r[k] for k in key},
                    "throughput ratio": r["tokens_per_s"] / r["tokens_per_s base"],
                    "memory ratio": r["peak_mem_gb"] / r["peak_mem_gb base"],
                    "runs": f"{r['source']},{r['source base']}",
                }
            )
    frame = pd.DataFrame(rows, columns=["pair", *key, "throughput ratio", "memory ratio", "runs"])
    p = PAPER_EFFICIENCY
    notes = [
        f"Paper ({p['provenance']}): {p['model']} throughput ratio {p['throughput_ratio']:.2f} (+24%), "
        f"memory ratio down to {p['memory_ratio']:.2f} (-40%); reference lines in the figure."
    ]
    return Table(
        "efficiency-ratio",
        "PHA / Transformer: throughput and memory ratios",
        frame,
        {
            "pair": "pair",
            "mode": "mode",
            "seq_len": "context",
            "batch_size": "batch",
            "throughput ratio": "throughput ratio",
            "memory ratio": "memory ratio",
            "runs": "sources",
        },
        notes,
        {
            "throughput ratio": fixed(2),
            "memory ratio": fixed(2),
            "seq_len": tokens,
            "batch_size": tokens,
            "runs": lambda v: str(v).replace(",", ", "),
        },
    )


# --------------------------------------------------------------------------- notebooks


def plot_efficiency(bench: pd.DataFrame, out: str | Path) -> dict[str, object]:
    """`efficiency-tokens_per_s.png` and `efficiency-peak_mem_gb.png` (+ PDFs) under `out`: one line per model
    against context length, a panel per mode; {name: Figure}."""
    ok = bench[bench["status"] == "ok"]
    per_step = sorted({int(b * t) for b, t in zip(ok["batch_size"], ok["seq_len"])})
    note = f"{per_step[0]:,} tokens per step (batch = {per_step[0]:,} / context)" if len(per_step) == 1 else None
    return {
        y: figures.curves(
            ok,
            x="seq_len",
            y=y,
            line=["model"],
            panel=["mode"],
            titles=MODE_TITLES,
            note=note,
            path=Path(out) / f"efficiency-{y}.png",
            xlabel="context length (tokens)",
            ylabel=label,
            logx=2,
        )
        for y, label in (("tokens_per_s", "throughput (tokens/s)"), ("peak_mem_gb", "peak memory (GB)"))
    }


def plot_ratios(ratios: pd.DataFrame, out: str | Path) -> dict[str, object]:
    """`efficiency-throughput-ratio.png` and `efficiency-memory-ratio.png`: PHA / Transformer per pair against
    context length, with the paper's claim and parity as reference lines; {name: Figure}."""
    paper = PAPER_EFFICIENCY
    refs = {
        "throughput ratio": {"paper: +24% (PHA-180M)": paper["throughput_ratio"]},
        "memory ratio": {"paper: -40% (PHA-180M)": paper["memory_ratio"]},
    }
    return {
        y: figures.curves(
            ratios,
            x="seq_len",
            y=y,
            line=["pair"],
            panel=["mode"],
            reference={**ref, "parity": 1.0},
            titles=MODE_TITLES,
            sharey=True,
            path=Path(out) / f"efficiency-{y.replace(' ', '-')}.png",
            xlabel="context length (tokens)",
            ylabel=f"PHA / Transformer {y}",
            logx=2,
        )
        for y, ref in refs.items()
    }


def plot_decode(decode: pd.DataFrame, out: str | Path) -> dict[str, object]:
    """`decode-tokens_per_s.png` (decode tokens/s over the batch), `decode-prefill_ms.png` and `decode-cache.png`
    (the inference cache, MB, log scale: analytic, so cells the run skipped are drawn too; the measured bytes equal
    it wherever a cell ran, as decode_table says) against context length, one panel per batch size."""
    ok = decode[decode["status"] == "ok"]
    cache = decode.dropna(subset=["cache_gb"]).assign(cache_mb=lambda d: d["cache_gb"] * 1e3)  # every row has it
    titles = {b: f"batch {int(b)}" for b in decode["batch_size"].dropna().unique()}
    specs = (
        ("tokens_per_s", ok, "decode_tok_s", "decode tokens/s (all sequences)", False),
        ("prefill_ms", ok, "prefill_ms", "prefill of the prompt (ms)", True),
        ("cache", cache, "cache_mb", "KV cache + state (MB)", True),
    )
    return {
        name: figures.curves(
            frame,
            x="seq_len",
            y=y,
            line=["model"],
            panel=["batch_size"],
            titles=titles,
            note="pha-lab bench decode: eager PyTorch (no CUDA graphs), one token per sequence per step",
            path=Path(out) / f"decode-{name}.png",
            xlabel="context length (tokens)",
            ylabel=label,
            logx=2,
            logy=logy,
        )
        for name, frame, y, label, logy in specs
    }

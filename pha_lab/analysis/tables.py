"""Tables of the paper rebuilt from runs: DataFrames that keep their provenance, written as Markdown,
LaTeX and CSV, plus `render_notebooks` (what `pha-lab tables` runs).

Every table row keeps the ids of the runs it aggregates (`runs` column; shortened in Markdown/LaTeX,
full in the CSV), and its notes print the evaluation protocol and how many runs were left out because
they did not finish. The paper's own numbers live here, in `PAPER_PPL` and `PAPER_EFFICIENCY`, only.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from pha_lab.analysis.runs import (BRANCHES, aggregate, branches_of, finished, layer_metrics, load_runs, model_family,
                                   resolve_uri, scale_label, search_runs)
from pha_lab.config import PROJECT_ROOT

OUT_DIR = PROJECT_ROOT / "analysis" / "out"
NOTEBOOK_DIR = PROJECT_ROOT / "analysis"
NOTEBOOKS = ("perplexity", "ablation", "mixing", "mqar", "efficiency")
# Which sweeps (MLflow experiments) each notebook reads unless told otherwise; `smoke` last, so that
# `make sweep NAME=smoke && make tables` fills the tables on a CPU machine (rows name their sweep).
DEFAULT_SWEEPS = {
    "perplexity": ["baselines", "scale", "repro_baselines", "smoke"],
    "ablation": ["ablation", "repro_ablation", "smoke"],
    "mixing": ["ablation", "baselines", "scale", "repro_ablation", "repro_baselines", "smoke"],
    "mqar": ["mqar", "repro_mqar"],
    "efficiency": ["efficiency"],
}
EFFICIENCY_CSV = "docs/benchmarks/efficiency.csv"

# --------------------------------------------------------------------------- the paper's numbers
# Reported test perplexities (arXiv 2606.16093 and the tables it cites). `regime` says how the model was
# obtained: only "scratch" rows are comparable to ours, and only under the same protocol and budget.
PAPER_PPL = [
    {"dataset": "wikitext103", "model": "PHA-125M", "ppl": 16.51, "training tokens": "not reported",
     "regime": "scratch", "provenance": "PHA paper (arXiv 2606.16093)"},
    {"dataset": "wikitext103", "model": "PHA-180M", "ppl": 16.42, "training tokens": "not reported",
     "regime": "scratch", "provenance": "PHA paper (arXiv 2606.16093)"},
    {"dataset": "wikitext103", "model": "Hedgehog (GPT-2 125M)", "ppl": 16.70, "training tokens": "GPT-2 pretraining",
     "regime": "converted from pretrained GPT-2 (not from scratch)", "provenance": "Hedgehog, as cited by the PHA paper"},
    {"dataset": "wikitext103", "model": "H3-125M", "ppl": 23.70, "training tokens": "Pile",
     "regime": "trained on the Pile, evaluated on WikiText-103", "provenance": "H3 paper, as cited by the PHA paper"},
    {"dataset": "openwebtext", "model": "PHA-125M", "ppl": 19.72, "training tokens": "~23% of 50B (reported)",
     "regime": "scratch", "provenance": "PHA paper (arXiv 2606.16093)"},
    {"dataset": "openwebtext", "model": "Transformer-125M", "ppl": 20.60, "training tokens": "50B",
     "regime": "scratch", "provenance": "H3 paper table (125M, 50B tokens), as cited by the PHA paper"},
    {"dataset": "openwebtext", "model": "GSS-Hybrid-125M", "ppl": 19.80, "training tokens": "50B",
     "regime": "scratch", "provenance": "H3 paper table (125M, 50B tokens), as cited by the PHA paper"},
]
# PHA-180M versus a pure-attention baseline at long context: +24% throughput, up to -40% memory.
PAPER_EFFICIENCY = {"throughput_ratio": 1.24, "memory_ratio": 0.60, "model": "PHA-180M",
                    "provenance": "PHA paper (arXiv 2606.16093), long context, vs pure attention"}

HEADERS = {"experiment": "sweep", "config": "config", "model": "model", "n_params": "params", "n": "seeds",
           "train/tokens_seen": "train tokens", "test/ppl": "test PPL", "test/bpb": "bits/byte",
           "test/accuracy": "accuracy", "runs": "runs"}


# --------------------------------------------------------------------------- the table object
@dataclass
class Table:
    """A table with its provenance: `frame` is what the CSV holds (numbers, full run ids); `columns`
    maps the frame columns shown in Markdown/LaTeX to headers. A column `c` with a `c std` sibling is
    shown as mean ± std."""

    name: str
    title: str
    frame: pd.DataFrame
    columns: dict[str, str]
    notes: list[str] = field(default_factory=list)
    formats: dict[str, Callable] = field(default_factory=dict)

    def display(self) -> pd.DataFrame:
        """The shown cells, as strings."""
        out = {}
        for col, header in self.columns.items():
            if col not in self.frame:
                out[header] = [""] * len(self.frame)
                continue
            fmt = self.formats.get(col, _fmt)
            std = self.frame.get(f"{col} std", pd.Series(np.nan, index=self.frame.index))
            out[header] = [_pm(v, s, fmt) for v, s in zip(self.frame[col], std)]
        return pd.DataFrame(out, columns=list(self.columns.values()))

    def to_markdown(self) -> str:
        shown = self.display()
        lines = [f"**{self.title}**", "", "| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
        lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in shown.itertuples(index=False)]
        if shown.empty:
            lines.append("| " + " | ".join(["–"] * len(shown.columns)) + " |")
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes]) + "\n"

    def to_latex(self) -> str:
        shown = self.display()
        rows = [" & ".join(_tex(v) for v in row) + r" \\" for row in shown.itertuples(index=False)]
        if shown.empty:
            rows = [" & ".join(["--"] * len(shown.columns)) + r" \\"]
        body = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(self.title)}}}",
                r"\begin{tabular}{" + "l" * len(shown.columns) + "}", r"\toprule",
                " & ".join(_tex(c) for c in shown.columns) + r" \\", r"\midrule", *rows, r"\bottomrule", r"\end{tabular}"]
        if self.notes:
            body.append(r"\par\smallskip\footnotesize " + r" \par ".join(_tex(n) for n in self.notes))
        return "\n".join(body + [r"\end{table}"]) + "\n"

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write `<name>.md`, `<name>.tex` and `<name>.csv` under out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {ext: out / f"{self.name}.{ext}" for ext in ("md", "tex", "csv")}
        paths["md"].write_text(self.to_markdown())
        paths["tex"].write_text(self.to_latex())
        self.frame.to_csv(paths["csv"], index=False)
        return paths


def _missing(value) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


def _fmt(value) -> str:
    if _missing(value):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:,.2f}"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return str(value)


def _pm(value, std, fmt) -> str:
    text = fmt(value)
    if text and not _missing(std):
        return f"{text} ± {fmt(std)}"
    return text


def _short_ids(value) -> str:
    return ", ".join(v[:8] for v in str(value).split(",") if v) if isinstance(value, str) else ""


def _tex(value) -> str:
    text = str(value)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        text = text.replace(a, b)
    return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("–", "--")


def _fixed(digits: int) -> Callable:
    return lambda v: "" if v is None or pd.isna(v) else f"{float(v):.{digits}f}"


def _tokens(value) -> str:
    return "" if value is None or pd.isna(value) else f"{int(value):,}"


FORMATS = {"runs": _short_ids, "reference runs": _short_ids, "n_params": scale_label, "train/tokens_seen": _tokens,
           "test/ppl": _fixed(2), "test/bpb": _fixed(3), "test/accuracy": _fixed(3), "delta": _fixed(2)}


# --------------------------------------------------------------------------- protocol notes
def protocol_notes(runs: pd.DataFrame) -> list[str]:
    """One line per distinct evaluation protocol among `runs` (the columns a reader needs to compare)."""
    keys = ["protocol.dataset", "protocol.split", "protocol.tokenizer", "protocol.context", "protocol.stride",
            "protocol.n_tokens", "protocol.n_bytes", "protocol.metric"]
    if runs.empty or "protocol.dataset" not in runs:
        return []
    lines = []
    table = runs.reindex(columns=keys + ["train/tokens_seen"]).astype(object).where(lambda d: d.notna(), None)
    for values, group in table.groupby(keys, dropna=False, sort=False):
        p = dict(zip([k.split(".", 1)[1] for k in keys], values))
        tokens = sorted({int(t) for t in group["train/tokens_seen"] if t is not None})
        if p["metric"] == "ppl":
            scored = f"{_tokens(p['n_tokens'])} scored tokens" + (f" ({_tokens(p['n_bytes'])} bytes)" if p["n_bytes"] else "")
            metric = "token-level PPL and bits per byte"
        else:
            scored, metric = f"{_tokens(p['n_tokens'])} scored answers", str(p["metric"])
        lines.append(f"Protocol: {p['dataset']} / {p['split']}, tokenizer {p['tokenizer']}, context {p['context']}, "
                     f"stride {p['stride']}, {scored}, {metric}; training tokens per run: "
                     f"{', '.join(f'{t:,}' for t in tokens) or 'not logged'}; regime: scratch (trained here).")
    return lines


def _notes(runs: pd.DataFrame, excluded: str | None, *extra: str) -> list[str]:
    notes = protocol_notes(runs) + [e for e in extra if e]
    return notes + ([excluded] if excluded else [])


def _with_model(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    runs["model"] = [model_family(r) for r in runs.to_dict("records")] if len(runs) else []
    return runs


def _where(runs: pd.DataFrame, column: str, test) -> pd.DataFrame:
    return runs[runs[column].map(test)] if column in runs and len(runs) else runs.iloc[0:0]


# --------------------------------------------------------------------------- perplexity
FAMILIES = ("PHA", "Transformer", "GSS-Hybrid", "GSS", "sequential PHA")  # table order (by scale first)


def is_lm(runs: pd.DataFrame) -> pd.Series:
    return runs.get("data.source", pd.Series("", index=runs.index)).astype(str) != "mqar"


def datasets_with_runs(runs: pd.DataFrame) -> list[str]:
    """The `data.source` values that have finished language-modelling runs (one perplexity table each)."""
    done, _ = finished(runs)
    done = done[is_lm(done)]
    if done.empty or "test/ppl" not in done:
        return []
    return sorted(done.loc[done["test/ppl"].notna(), "data.source"].astype(str).unique())


def perplexity_table(runs: pd.DataFrame, dataset: str | None = None) -> Table:
    """Our models on one dataset (`data.source` or protocol dataset name): test PPL and bits per byte,
    mean ± std over seeds, one row per sweep configuration."""
    lm = runs[is_lm(runs)] if len(runs) else runs
    if dataset and len(lm):
        lm = lm[np.logical_or.reduce([lm[c] == dataset for c in ("data.source", "protocol.dataset") if c in lm]
                                     + [np.zeros(len(lm), bool)])]
    done, excluded = finished(lm)
    done = _with_model(done)
    keep = ["model", "n_params", "model.d_model", "train/tokens_seen"]
    frame = aggregate(done, ["test/ppl", "test/bpb"], keep=keep)
    if len(frame):
        rank = frame["model"].map(lambda m: next((i for i, f in enumerate(FAMILIES) if m.startswith(f)), len(FAMILIES)))
        frame = (frame.assign(_r=rank).sort_values(["experiment", "model.d_model", "_r", "model", "config"], kind="stable")
                 .drop(columns="_r").reset_index(drop=True))
    columns = {"experiment": "sweep", "model": "model", "config": "config", "n_params": "params",
               "train/tokens_seen": "train tokens", "n": "seeds", "test/ppl": "test PPL", "test/bpb": "bits/byte",
               "runs": "runs"}
    notes = _notes(done, excluded, "Mean ± sample std over seeds; every row trained from scratch under its sweep's budget.")
    return Table(f"perplexity-{dataset or 'all'}", f"Language modelling, {dataset or 'all datasets'}: our runs",
                 frame, columns, notes, FORMATS)


def reference_key(dataset: str | None) -> str | None:
    """'wikitext-103-raw-v1' / 'wikitext103' -> 'wikitext103'; 'openwebtext(-sample)' -> 'openwebtext'."""
    d = str(dataset or "").lower().replace("-", "").replace("_", "")
    if d.startswith("wikitext103"):
        return "wikitext103"
    if d.startswith("openwebtext"):
        return "openwebtext"
    return None


def reference_table(dataset: str | None) -> Table:
    """The paper's reported numbers for this dataset, beside (never mixed into) ours."""
    key = reference_key(dataset)
    frame = pd.DataFrame([r for r in PAPER_PPL if r["dataset"] == key],
                         columns=["dataset", "model", "ppl", "training tokens", "regime", "provenance"])
    notes = ["Reported numbers, not reproduced here; the regime column says which are comparable to runs "
             "trained from scratch. Protocols (tokenizer, context, stride) are the papers' own."]
    if key is None:
        notes = [f"The paper reports no perplexity on '{dataset}'."]
    return Table(f"perplexity-{dataset or 'all'}-paper", f"Reported in the literature ({key or dataset})", frame,
                 {"model": "model", "ppl": "test PPL", "training tokens": "training tokens", "regime": "regime",
                  "provenance": "provenance"}, notes, {"ppl": _fixed(2)})


# --------------------------------------------------------------------------- ablation
def removed_label(branches) -> str:
    missing = [b for b in BRANCHES if b not in branches_of(branches)]
    return "none" if not missing else "-" + ", -".join(missing)


def ablation_table(runs: pd.DataFrame, metric: str | None = None) -> Table:
    """PHA (parallel layout) with branches removed and with each mixer, mean ± std over seeds, and
    Δ = mean − mean of the full PHA (all branches, static mixer) of the same sweep and width/depth."""
    par = _where(runs, "model.layout", lambda v: v == "parallel")
    done, excluded = finished(par)
    metric = metric or ("test/ppl" if "test/ppl" in done and done["test/ppl"].notna().any() else
                        "test/accuracy" if "test/accuracy" in done else "test/ppl")
    done = done.assign(removed=[removed_label(b) for b in done.get("model.branches", [])])
    scale = ["model.d_model", "model.n_layers"]
    frame = aggregate(done, [metric, "test/bpb"] if metric == "test/ppl" else [metric],
                      keep=["removed", "model.mixer", "n_params", *scale])
    frame["delta"], frame["reference runs"] = np.nan, ""
    for i, row in frame.iterrows():
        same = (frame["experiment"] == row["experiment"]) & (frame["removed"] == "none") & (frame["model.mixer"] == "static")
        for s in scale:
            same &= frame[s] == row[s]
        if same.any():
            ref = frame[same].iloc[0]
            frame.loc[i, ["delta", "reference runs"]] = [row[metric] - ref[metric], ref["runs"]]
    if len(frame):
        order = {"none": 0}
        frame = frame.assign(_o=frame["removed"].map(lambda r: order.get(r, 1)), _m=frame["model.mixer"] != "static")
        frame = frame.sort_values(["experiment", *scale, "_m", "_o", "removed", "model.mixer"], kind="stable")
        frame = frame.drop(columns=["_o", "_m"]).reset_index(drop=True)
    shown = {"experiment": "sweep", "removed": "branches removed", "model.mixer": "mixer", "n_params": "params",
             "n": "seeds", metric: HEADERS.get(metric, metric)}
    if metric == "test/ppl":
        shown["test/bpb"] = "bits/byte"
    shown.update({"delta": f"Δ {HEADERS.get(metric, metric)} vs full PHA", "runs": "runs", "reference runs": "Δ reference runs"})
    notes = _notes(done, excluded, "Δ: difference of seed means against the full PHA (all branches, static mixer, "
                   "same sweep and width/depth); blank where that sweep has no such run.")
    return Table("ablation", "Ablation: branch removal and mixer type", frame, shown, notes, FORMATS)


# --------------------------------------------------------------------------- per-layer tables (mixer, knockout)
def _per_layer(runs: pd.DataFrame, long: pd.DataFrame, name: str, title: str, notes: list[str]) -> Table:
    """Long (run_id, layer, branch, value) -> mean ± std per (sweep, config, layer), one column per branch."""
    branches = [b for b in BRANCHES if b in set(long["branch"])] + sorted(set(long["branch"]) - set(BRANCHES))
    wide = long.pivot_table(index=["run_id", "layer"], columns="branch", values="value", aggfunc="first").reset_index()
    info = runs[["run_id", "experiment", "config_id", "config", "seed"]]
    wide = wide.merge(info, on="run_id")
    frame = aggregate(wide, branches or list(BRANCHES), by=["experiment", "config_id", "layer"])
    if len(frame):
        frame = frame.assign(_l=frame["layer"].map(lambda v: 10**6 if v == "all" else int(v)))
        frame = frame.sort_values(["experiment", "config", "_l"], kind="stable").drop(columns="_l").reset_index(drop=True)
    columns = {"experiment": "sweep", "config": "config", "layer": "layer", **{b: b for b in branches or BRANCHES},
               "n": "seeds", "runs": "runs"}
    return Table(name, title, frame, columns, notes, {**FORMATS, **{b: _fixed(3) for b in BRANCHES}})


def mixer_table(runs: pd.DataFrame) -> Table:
    """Learned mixer weight of each branch in each layer (last validation), mean ± std over seeds."""
    done, excluded = finished(runs)
    long = layer_metrics(done, "mixer")
    notes = _notes(pd.DataFrame(), excluded, "Weights as each mixer reports them at the last validation "
                   "(`mixer/L{i}/{branch}`; static: softmax, gate: mean gate, concat: share of the projection's "
                   "squared norm); layers counted from 0; serial layers have none.")
    return _per_layer(done, long, "mixer-weights", "Learned mixer weights per layer and branch", notes)


def knockout_table(runs: pd.DataFrame, metric: str = "delta_ppl") -> Table:
    """Change in test PPL (or accuracy) when one branch is zeroed in one layer (`pha-lab eval --knockout
    ... --per-layer`; layer `all`: in every layer), mean ± std over seeds."""
    done, excluded = finished(runs)
    long = layer_metrics(done, "knockout", suffix=f"/{metric}")
    notes = _notes(pd.DataFrame(), excluded, f"`{metric}` = knocked-out minus intact, logged by "
                   "`pha-lab eval RUN_ID --knockout gss attn ffn --per-layer`; runs never evaluated so are absent.")
    return _per_layer(done, long, "knockout", f"Branch knockout: {metric.replace('delta_', 'Δ ')} per layer", notes)


def heatmap_frames(table: Table) -> dict[str, pd.DataFrame]:
    """'sweep: config (n seeds)' -> layers x branches mean weights, for figures.mixer_heatmaps."""
    frame, branches = table.frame, [c for c in table.columns if c in BRANCHES]
    out = {}
    for (exp, config), group in frame.groupby(["experiment", "config"], sort=False):
        group = group[group["layer"] != "all"]
        out[f"{exp}: {config} (n={int(group['n'].max())})"] = group.set_index("layer")[branches].astype(float)
    return out


# --------------------------------------------------------------------------- MQAR
_MQAR_FORMATS = {**FORMATS, "optim.lr": lambda v: "" if pd.isna(v) else f"{v:g}"}


def mqar_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return _with_model(_where(runs, "data.source", lambda v: v == "mqar"))


def mqar_by_lr(runs: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per (model, width, task, learning rate), mean ± std over seeds: the LR curves."""
    done, _ = finished(mqar_runs(runs))
    keep = ["model", "model.d_model", "data.seq_len", "data.mqar.num_kv_pairs", "optim.lr"]
    return aggregate(done, ["test/accuracy"], keep=keep)


def mqar_lr_table(runs: pd.DataFrame) -> Table:
    """The learning-rate sensitivity behind `mqar_table`: every learning rate, mean ± std over seeds."""
    frame = mqar_by_lr(runs)
    if len(frame):
        frame = frame.sort_values(["experiment", "model", "model.d_model", "data.seq_len", "optim.lr"]).reset_index(drop=True)
    shown = {"experiment": "sweep", "model": "model", "model.d_model": "width", "data.seq_len": "seq len",
             "data.mqar.num_kv_pairs": "kv pairs", "optim.lr": "lr", "n": "seeds", "test/accuracy": "accuracy", "runs": "runs"}
    return Table("mqar-lr", "MQAR: accuracy per learning rate", frame, shown, [], _MQAR_FORMATS)


def mqar_table(runs: pd.DataFrame) -> Table:
    """Best test accuracy over learning rates per (sweep, model, width, sequence length, kv pairs)."""
    mq = mqar_runs(runs)
    done, excluded = finished(mq)
    by_lr = mqar_by_lr(runs)
    task = ["experiment", "model", "model.d_model", "data.seq_len", "data.mqar.num_kv_pairs"]
    rows = []
    for _, group in by_lr.groupby(task, sort=False, dropna=False) if len(by_lr) else []:
        scored = group[group["test/accuracy"].notna()]
        best = (scored.loc[scored["test/accuracy"].idxmax()] if len(scored) else group.iloc[0]).copy()
        best["learning rates"] = ", ".join(f"{lr:g}" for lr in sorted(group["optim.lr"].dropna()))
        rows.append(best)
    columns = list(by_lr.columns) + ["learning rates"]
    frame = pd.DataFrame(rows, columns=columns)
    if len(frame):
        frame = frame.sort_values(task, kind="stable").reset_index(drop=True)
    shown = {"experiment": "sweep", "model": "model", "model.d_model": "width", "data.seq_len": "seq len",
             "data.mqar.num_kv_pairs": "kv pairs", "optim.lr": "best lr", "learning rates": "lrs tried",
             "n": "seeds", "test/accuracy": "accuracy", "runs": "runs"}
    notes = _notes(done, excluded, "Best over learning rates of the seed-mean test accuracy (zoology's protocol); "
                   "the runs column names the runs at the best learning rate.")
    return Table("mqar", "MQAR: recall accuracy, best over learning rates", frame, shown, notes, _MQAR_FORMATS)


# --------------------------------------------------------------------------- efficiency
EFFICIENCY_COLUMNS = ["model", "mode", "seq_len", "batch_size", "tokens_per_s", "peak_mem_gb", "status", "gpu"]


def load_efficiency(csv: str | Path | None = EFFICIENCY_CSV, tracking_uri: str | None = None,
                    experiments: str | list[str] = "efficiency", part: str | None = "models") -> tuple[pd.DataFrame, str]:
    """(benchmark rows of one `part` of `pha-lab bench`, where they came from): the CSV if it exists,
    else the latest finished run of the `efficiency` MLflow experiment (its CSV artifact, or failing
    that its `{metric}/{part}/{model}/{mode}/{seq_len}` metrics); empty when there is neither. A
    `source` column keeps each row's provenance (file:line, or run id)."""
    path = _resolve(csv) if csv else None
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
    return _efficiency_frame(df), where


def _bench_run(experiments, uri: str) -> tuple[pd.DataFrame, str | None]:
    import tempfile

    import mlflow

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
            row = rows.setdefault((part, model, mode, seq_len), {
                "part": part, "model": model, "mode": mode, "seq_len": int(seq_len), "status": "ok",
                "gpu": run.get("tags.gpu"), "source": run["run_id"]})
            row[name[len("metrics."):]] = value
    return pd.DataFrame(list(rows.values())), f"metrics of run {run['run_id']} of {run['experiment']} at {uri}"


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() or path.exists() else PROJECT_ROOT / path


def _efficiency_frame(df: pd.DataFrame) -> pd.DataFrame:
    df = df.reindex(columns=EFFICIENCY_COLUMNS + ["source"]).copy()
    df["status"] = df["status"].fillna("ok").astype(str)
    for col in ("seq_len", "batch_size", "tokens_per_s", "peak_mem_gb"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df.sort_values(["mode", "model", "seq_len"], kind="stable").reset_index(drop=True)


def efficiency_table(bench: pd.DataFrame) -> Table:
    gpus = ", ".join(sorted(bench["gpu"].dropna().astype(str).unique())) or "not given"
    failed = bench.loc[bench["status"] != "ok", "status"].value_counts().sort_index()
    columns = {"model": "model", "mode": "mode", "seq_len": "context", "batch_size": "batch",
               "tokens_per_s": "tokens/s", "peak_mem_gb": "peak memory (GB)", "status": "status", "source": "source"}
    notes = [f"GPU: {gpus}; throughput = median over timed steps (pha-lab bench)."]
    if len(failed):
        notes.append(f"{failed.sum()} configuration(s) without a measurement: "
                     + ", ".join(f"{n} {s}" for s, n in failed.items()) + ".")
    return Table("efficiency", "Throughput and peak memory vs context length", bench, columns, notes,
                 {"tokens_per_s": lambda v: "" if pd.isna(v) else f"{v:,.0f}", "peak_mem_gb": _fixed(2),
                  "seq_len": _tokens, "batch_size": _tokens})


def model_pairs(models: Iterable[str]) -> list[tuple[str, str]]:
    """(PHA, Transformer) pairs by name: pha_180m with transformer_180m, pha with transformer."""
    models = sorted({str(m) for m in models})
    pairs = []
    for m in models:
        if m.startswith("pha"):
            base = "transformer" + m[len("pha"):]
            if base in models:
                pairs.append((m, base))
    return pairs


def efficiency_ratios(bench: pd.DataFrame, pairs: list[tuple[str, str]] | None = None) -> Table:
    """PHA / Transformer throughput and peak-memory ratios at each (mode, context, batch) where both ran."""
    ok = bench[bench["status"] == "ok"]
    key = ["mode", "seq_len", "batch_size"]
    rows = []
    for model, base in pairs if pairs is not None else model_pairs(bench["model"].dropna()):
        a, b = ok[ok["model"] == model], ok[ok["model"] == base]
        both = a.merge(b, on=key, suffixes=("", " base"))
        for _, r in both.iterrows():
            rows.append({"pair": f"{model} / {base}", **{k: r[k] for k in key},
                         "throughput ratio": r["tokens_per_s"] / r["tokens_per_s base"],
                         "memory ratio": r["peak_mem_gb"] / r["peak_mem_gb base"],
                         "runs": f"{r['source']},{r['source base']}"})
    frame = pd.DataFrame(rows, columns=["pair", *key, "throughput ratio", "memory ratio", "runs"])
    p = PAPER_EFFICIENCY
    notes = [f"Paper ({p['provenance']}): {p['model']} throughput ratio {p['throughput_ratio']:.2f} (+24%), "
             f"memory ratio down to {p['memory_ratio']:.2f} (-40%); reference lines in the figure."]
    return Table("efficiency-ratio", "PHA / Transformer: throughput and memory ratios", frame,
                 {"pair": "pair", "mode": "mode", "seq_len": "context", "batch_size": "batch",
                  "throughput ratio": "throughput ratio", "memory ratio": "memory ratio", "runs": "sources"}, notes,
                 {"throughput ratio": _fixed(2), "memory ratio": _fixed(2), "seq_len": _tokens, "batch_size": _tokens,
                  "runs": lambda v: str(v).replace(",", ", ")})


# --------------------------------------------------------------------------- notebooks
def status_line(runs: pd.DataFrame, sweeps: list[str], uri: str) -> str:
    """The one line a notebook prints about what it found."""
    if runs.empty:
        return f"No runs yet in sweep(s) {', '.join(sweeps)} at {uri}: rendering the empty table skeleton."
    counts = runs["status"].value_counts()
    return (f"{len(runs)} run(s) in {', '.join(sorted(runs['experiment'].unique()))} at {uri} "
            f"({', '.join(f'{n} {s}' for s, n in counts.items())}).")


def sweeps_for(notebook: str, sweeps: list[str] | str | None = None) -> list[str]:
    if sweeps is None:
        return list(DEFAULT_SWEEPS[notebook])
    return [sweeps] if isinstance(sweeps, str) else list(sweeps)


def out_dir(path: str | Path | None = None) -> Path:
    return Path(path) if path else OUT_DIR


def render_notebooks(tracking_uri: str, out: str | Path = OUT_DIR, sweeps: dict[str, list[str]] | None = None,
                     notebooks: Iterable[str] = NOTEBOOKS, efficiency_csv: str | None = EFFICIENCY_CSV,
                     datasets: list[str] | None = None, jobs_at_once: int = 2, log=print) -> list[str]:
    """Execute the analysis notebooks headlessly (papermill) into `out`; return the failures.

    The perplexity notebook runs once per dataset that has runs (or once for WikiText-103, showing
    the paper's numbers beside an empty table)."""
    import papermill as pm

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sweeps = {nb: sweeps_for(nb, (sweeps or {}).get(nb)) for nb in NOTEBOOKS}
    jobs = []
    for nb in notebooks:  # (perplexity: one notebook per dataset)
        params = {"tracking_uri": tracking_uri, "sweeps": sweeps[nb], "out_dir": str(out)}
        if nb == "perplexity":
            found = datasets or datasets_with_runs(load_runs(sweeps[nb], tracking_uri)) or ["wikitext103"]
            jobs += [(nb, f"perplexity-{d}", {**params, "dataset": d}) for d in found]
        elif nb == "efficiency":
            csv = str(_resolve(efficiency_csv)) if efficiency_csv else None
            jobs.append((nb, nb, {**params, "csv": csv}))
        else:
            jobs.append((nb, nb, params))

    def execute(job) -> str | None:
        nb, name, params = job
        target = out / f"{name}.ipynb"
        log(f"[tables] {nb}.ipynb -> {target}")
        try:
            pm.execute_notebook(str(NOTEBOOK_DIR / f"{nb}.ipynb"), str(target), parameters=params, kernel_name="python3",
                                progress_bar=False, cwd=str(PROJECT_ROOT))
        except Exception as exc:  # PapermillExecutionError names the failing cell; a dead kernel lands here too
            print(f"[tables] FAILED {name} (executed notebook: {target}):\n{exc}", file=sys.stderr)
            return f"{name}: {type(exc).__name__}"
        return None

    # Each notebook is its own kernel process, mostly importing: run `jobs_at_once` of them at a time.
    with ThreadPoolExecutor(max(1, jobs_at_once)) as pool:
        return [f for f in pool.map(execute, jobs) if f]

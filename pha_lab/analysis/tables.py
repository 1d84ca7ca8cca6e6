"""The paper's tables rebuilt from runs (perplexity, ablation, mixer weights, knockout, MQAR, long context) as
`render.Table`s; the notebooks in analysis/ render them (pha_lab.analysis.notebooks runs those).

Runs are pooled by configuration, not by sweep: a row is one `config_id` (the resolved config minus seed and
bookkeeping keys) over every run of it in the store, and `sweeps` says where its runs came from. A table's
`sweeps` argument picks which configurations get a row. Differences carry a 95% Welch t interval and read
"within noise" when it covers 0; every row shows total and non-embedding parameters and keeps the ids of its
runs (`runs` column; shortened in Markdown/LaTeX, full in the CSV); the notes print the evaluation protocol and
how many runs were left out because they did not finish (what the rows share: pha_lab.analysis.rows). The
paper's reported perplexities live here, in `PAPER_PPL`, only (its efficiency claim: `efficiency.PAPER_EFFICIENCY`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from pha_lab.analysis.families import PHA_BRANCHES, branch_order, branches_of
from pha_lab.analysis.render import FORMATS, Table, fixed, scale_label, tokens
from pha_lab.analysis.rows import (HEADERS, INTERVAL_NOTE, PARAMS, POOLING_NOTE, compare, family_note, family_rank,
                                   in_scope, rows_where, shown_columns, table_notes, with_model)
from pha_lab.analysis.runs import config_key, finished, layer_metrics, longctx_metrics
from pha_lab.analysis.stats import aggregate
from pha_lab.branches import BRANCH_REGISTRY

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


# --------------------------------------------------------------------------- perplexity
SCALE = ["recipe_id", "model.d_model", "model.n_layers"]  # what a comparison holds equal: data, budget, optimizer, shape


def is_lm(runs: pd.DataFrame) -> pd.Series:
    return runs.get("data.source", pd.Series("", index=runs.index)).astype(str) != "mqar"


def datasets_with_runs(runs: pd.DataFrame) -> list[str]:
    """The `data.source` values that have finished language-modelling runs (one perplexity table each)."""
    done, _ = finished(runs)
    done = done[is_lm(done)]
    if done.empty or "test/ppl" not in done:
        return []
    return sorted(done.loc[done["test/ppl"].notna(), "data.source"].astype(str).unique())


def perplexity_table(runs: pd.DataFrame, dataset: str | None = None, sweeps: Iterable[str] | None = None) -> Table:
    """Our models on one dataset (`data.source` or protocol dataset name): test PPL and bits per byte, mean ± std
    over the pooled runs, one row per configuration that `sweeps` ran, and Δ test PPL against the PHA trained
    with the same recipe and width/depth."""
    lm = runs[is_lm(runs)] if len(runs) else runs
    if dataset and len(lm):
        lm = lm[np.logical_or.reduce([lm[c] == dataset for c in ("data.source", "protocol.dataset") if c in lm]
                                     + [np.zeros(len(lm), bool)])]
    done, excluded = finished(in_scope(lm, sweeps))
    done = with_model(done)
    keep = ["model", *PARAMS, "recipe_id", "model.d_model", "model.n_layers", "train/tokens_seen"]
    frame = aggregate(done, ["test/ppl", "test/bpb"], keep=keep)
    if len(frame):
        frame = (frame.assign(_r=frame["model"].map(family_rank))
                 .sort_values(["model.d_model", "_r", "model", "config"], kind="stable")
                 .drop(columns="_r").reset_index(drop=True))
        frame = compare(frame, done, "test/ppl", frame["model"] == "PHA", SCALE)
    columns = {"sweeps": "sweeps (runs)", "model": "model", "config": "config", **PARAMS, "train/tokens_seen": "train tokens",
               "n": "seeds", "test/ppl": "test PPL", "test/bpb": "bits/byte", "delta": "Δ test PPL vs PHA [95% CI]",
               "reading": "reading", "runs": "runs"}
    notes = table_notes(done, excluded, frame, POOLING_NOTE, INTERVAL_NOTE,
                   "Δ against the PHA (parallel GSS+GQA+FFN, static mixer) with the same recipe (data, budget, optimizer: "
                   "`recipe_id`) and width/depth; blank where there is none. Every row trained from scratch.",
                   family_note(done))
    return Table(f"perplexity-{dataset or 'all'}", f"Language modelling, {dataset or 'all datasets'}: our runs",
                 frame, shown_columns(frame, columns), notes, FORMATS)


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
                  "provenance": "provenance"}, notes, {"ppl": fixed(2)})


# --------------------------------------------------------------------------- ablation
def removed_label(branches) -> str:
    """The PHA branches a model lacks: '-gss', '-gss, -attn'; 'none' for a full PHA."""
    missing = [b for b in PHA_BRANCHES if b not in branches_of(branches)]
    return "none" if not missing else "-" + ", -".join(missing)


def ablation_table(runs: pd.DataFrame, metric: str | None = None, sweeps: Iterable[str] | None = None) -> Table:
    """PHA (parallel layout) with branches removed and with each mixer, mean ± std over the pooled runs, and
    Δ = mean − mean of the full PHA (all branches, static mixer) with the same recipe and width/depth, with its
    interval. The variants are not parameter-matched: the Δ params column says by how much."""
    par = rows_where(runs, "model.layout", lambda v: v == "parallel")
    done, excluded = finished(in_scope(par, sweeps))
    metric = metric or ("test/ppl" if "test/ppl" in done and done["test/ppl"].notna().any() else
                        "test/accuracy" if "test/accuracy" in done else "test/ppl")
    done = done.assign(removed=[removed_label(b) for b in done.get("model.branches", [])])
    frame = aggregate(done, [metric, "test/bpb"] if metric == "test/ppl" else [metric],
                      keep=["removed", "model.mixer", *PARAMS, *SCALE])
    if len(frame):
        order = {"none": 0}
        frame = frame.assign(_o=frame["removed"].map(lambda r: order.get(r, 1)), _m=frame["model.mixer"] != "static")
        frame = frame.sort_values(["model.d_model", "model.n_layers", "recipe_id", "_m", "_o", "removed", "model.mixer"],
                                  kind="stable")
        frame = frame.drop(columns=["_o", "_m"]).reset_index(drop=True)
        frame = compare(frame, done, metric, (frame["removed"] == "none") & (frame["model.mixer"] == "static"), SCALE)
    header = HEADERS.get(metric, metric)
    shown = {"sweeps": "sweeps (runs)", "removed": "branches removed", "model.mixer": "mixer", **PARAMS,
             "delta params": "Δ non-emb params", "n": "seeds", metric: header}
    if metric == "test/ppl":
        shown["test/bpb"] = "bits/byte"
    shown.update({"delta": f"Δ {header} vs full PHA [95% CI]", "reading": "reading", "runs": "runs",
                  "reference runs": "Δ reference runs"})
    notes = table_notes(done, excluded, frame, POOLING_NOTE, INTERVAL_NOTE,
                   "Δ against the full PHA (all branches, static mixer) with the same recipe (`recipe_id`) and "
                   "width/depth; blank where there is none. Not parameter-matched: removing a branch removes its "
                   "weights, and the concat mixer adds a k·D x D projection (Δ non-emb params).")
    return Table("ablation", "Ablation: branch removal and mixer type", frame, shown_columns(frame, shown), notes, FORMATS)


# --------------------------------------------------------------------------- per-layer tables (mixer, knockout)
def _per_layer(runs: pd.DataFrame, long: pd.DataFrame, name: str, title: str, notes: list[str]) -> Table:
    """Long (run_id, layer, branch, value) -> mean ± std per (configuration, layer), one column per branch."""
    branches = branch_order(long["branch"]) or list(BRANCH_REGISTRY)
    wide = long.pivot_table(index=["run_id", "layer"], columns="branch", values="value", aggfunc="first").reset_index()
    info = with_model(runs).reindex(columns=["run_id", "experiment", "config_id", "config", "seed", "start_time", "model",
                                              *PARAMS] if len(runs) else ["run_id"])
    wide = wide.merge(info, on="run_id") if len(runs) else wide.iloc[0:0]
    frame = aggregate(wide, branches, by=["config_id", "layer"], keep=["model", *PARAMS])
    if len(frame):
        frame = frame.assign(_l=frame["layer"].map(lambda v: 10**6 if v == "all" else int(v)))
        frame = frame.sort_values(["model", "config", "_l"], kind="stable").drop(columns="_l").reset_index(drop=True)
    columns = {"model": "model", "config": "config", **PARAMS, "layer": "layer", **{b: b for b in branches},
               "n": "seeds", "sweeps": "sweeps (runs)", "runs": "runs"}
    notes = [*notes, family_note(runs[runs["run_id"].isin(wide["run_id"])] if len(runs) else runs)]
    return Table(name, title, frame, shown_columns(frame, columns), table_notes(pd.DataFrame(), None, frame, *notes),
                 {**FORMATS, **{b: fixed(3) for b in branches}})


def mixer_table(runs: pd.DataFrame, sweeps: Iterable[str] | None = None) -> Table:
    """Learned mixer weight of each branch in each layer (last validation), mean ± std over the pooled runs."""
    done, excluded = finished(in_scope(runs, sweeps))
    long = layer_metrics(done, "mixer")
    notes = [POOLING_NOTE, "Weights as each mixer reports them at the last validation (`mixer/L{i}/{branch}`; static: "
             "softmax, gate: mean gate, concat: share of the projection's squared norm); layers counted from 0; "
             "serial layers have none.", excluded]
    return _per_layer(done, long, "mixer-weights", "Learned mixer weights per layer and branch", [n for n in notes if n])


def knockout_table(runs: pd.DataFrame, metric: str = "delta_ppl", sweeps: Iterable[str] | None = None) -> Table:
    """Change in test PPL (or accuracy) when one branch is zeroed in one layer (`pha-lab eval --knockout
    ... --per-layer`; layer `all`: in every layer), mean ± std over the pooled runs."""
    done, excluded = finished(in_scope(runs, sweeps))
    long = layer_metrics(done, "knockout", suffix=f"/{metric}")
    notes = [POOLING_NOTE, f"`{metric}` = knocked-out minus intact, logged by `pha-lab eval RUN_ID --knockout gss attn "
             "ffn --per-layer`; runs never evaluated so are absent.", excluded]
    return _per_layer(done, long, "knockout", f"Branch knockout: {metric.replace('delta_', 'Δ ')} per layer",
                      [n for n in notes if n])


def heatmap_frames(table: Table) -> dict[str, pd.DataFrame]:
    """'model (params), n=...' + config -> layers x branches mean weights, for figures.mixer_heatmaps."""
    frame = table.frame
    branches = [c for c in table.columns if f"{c} std" in frame]  # a per-layer table's aggregated metrics
    out = {}
    for _, group in frame.groupby("config_id", sort=False):
        first = group.iloc[0]
        group = group[group["layer"] != "all"]
        title = f"{first['model']}, {scale_label(first.get('n_params'))} (n={int(group['n'].max())})\n{first['config']}"
        out[title] = group.set_index("layer")[branches].astype(float)
    return out


# --------------------------------------------------------------------------- MQAR
_MQAR_FORMATS = {**FORMATS, "optim.lr": lambda v: "" if pd.isna(v) else f"{v:g}"}
_MQAR_TASK = ["model", *PARAMS, "model.d_model", "data.seq_len", "data.mqar.num_kv_pairs"]


def mqar_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return with_model(rows_where(runs, "data.source", lambda v: v == "mqar"))


def mqar_by_lr(runs: pd.DataFrame, sweeps: Iterable[str] | None = None) -> pd.DataFrame:
    """Validation and test accuracy per configuration (one learning rate each), mean ± std over the pooled runs;
    `task_id` groups the configurations that differ only in the learning rate (the LR curves)."""
    done, _ = finished(in_scope(mqar_runs(runs), sweeps))
    done = done.assign(task_id=[config_key(i, drop=("optim.lr",)) for i in done["identity"]])
    return aggregate(done, ["val/accuracy", "test/accuracy"], keep=["task_id", *_MQAR_TASK, "optim.lr"])


def mqar_lr_table(runs: pd.DataFrame, sweeps: Iterable[str] | None = None) -> Table:
    """The learning-rate sensitivity behind `mqar_table`: every learning rate, mean ± std over the pooled runs."""
    frame = mqar_by_lr(runs, sweeps)
    if len(frame):
        frame = frame.sort_values(["model", "model.d_model", "data.seq_len", "task_id", "optim.lr"]).reset_index(drop=True)
    shown = {"sweeps": "sweeps (runs)", "model": "model", **PARAMS, "model.d_model": "width", "data.seq_len": "seq len",
             "data.mqar.num_kv_pairs": "kv pairs", "optim.lr": "lr", "n": "seeds", "val/accuracy": "val accuracy",
             "test/accuracy": "test accuracy", "runs": "runs"}
    done, _ = finished(in_scope(mqar_runs(runs), sweeps))
    return Table("mqar-lr", "MQAR: accuracy per learning rate", frame, shown_columns(frame, shown),
                 table_notes(pd.DataFrame(), None, frame, POOLING_NOTE, family_note(done)), _MQAR_FORMATS)


def mqar_table(runs: pd.DataFrame, sweeps: Iterable[str] | None = None) -> Table:
    """Per task (model x width x sequence length x kv pairs): the learning rate with the best seed-mean
    validation accuracy, and the test accuracy at it (selection never looks at test)."""
    done, excluded = finished(in_scope(mqar_runs(runs), sweeps))
    by_lr = mqar_by_lr(runs, sweeps)
    rows, unscored = [], 0
    for _, group in by_lr.groupby("task_id", sort=False) if len(by_lr) else []:
        group = group.sort_values("optim.lr")
        scored = group[group["val/accuracy"].notna()]
        if len(scored):
            best = scored.loc[scored["val/accuracy"].idxmax()].copy()
        else:
            best, unscored = group.iloc[0].copy(), unscored + 1
            best[["optim.lr", "val/accuracy", "test/accuracy", "test/accuracy std"]] = np.nan
        best["learning rates"] = ", ".join(f"{lr:g}" for lr in group["optim.lr"].dropna())
        rows.append(best)
    frame = pd.DataFrame(rows, columns=list(by_lr.columns) + ["learning rates"])
    if len(frame):
        frame = frame.sort_values(["model", "model.d_model", "data.seq_len", "data.mqar.num_kv_pairs"], kind="stable")
        frame = frame.reset_index(drop=True)
    shown = {"sweeps": "sweeps (runs)", "model": "model", **PARAMS, "model.d_model": "width", "data.seq_len": "seq len",
             "data.mqar.num_kv_pairs": "kv pairs", "optim.lr": "lr (best val)", "learning rates": "lrs tried",
             "n": "seeds", "val/accuracy": "val accuracy", "test/accuracy": "test accuracy", "runs": "runs"}
    notes = table_notes(done, excluded, frame, POOLING_NOTE,
                   "The learning rate is picked on the seed-mean validation accuracy (ties: the smallest); the test "
                   "accuracy is reported at it, so test never enters the selection. The runs column names the runs "
                   "at that learning rate.",
                   f"{unscored} task(s) without val/accuracy: no learning rate picked." if unscored else "",
                   family_note(done))
    return Table("mqar", "MQAR: recall accuracy at the learning rate picked on validation", frame, shown_columns(frame, shown),
                 notes, _MQAR_FORMATS)


# --------------------------------------------------------------------------- long context
LONGCTX_BY = ["config_id", "context", "stride", "max_book_tokens"]  # runs pool only under one protocol


def _longctx_long(runs: pd.DataFrame, sweeps: Iterable[str] | None, split: str) -> tuple[pd.DataFrame, str | None]:
    """(one row per finished run, context and bucket with the run's model and sizes, the excluded-runs note)."""
    done, excluded = finished(in_scope(runs, sweeps))
    done = with_model(done)
    info = ["run_id", "experiment", "config_id", "config", "seed", "start_time", "model", *PARAMS, "data.seq_len"]
    return longctx_metrics(done, split).merge(done.reindex(columns=info), on="run_id"), excluded


def _longctx_labels(frame: pd.DataFrame) -> pd.Series:
    """A line label per row: the model and its training context, the stride where it is not the context, the
    per-book cap where there is one, and the configuration id where two configurations would share a label."""
    if frame.empty:
        return pd.Series([], dtype=object)
    base = [f"{r['model']} (train {int(r['data.seq_len'])})" if pd.notna(r.get("data.seq_len")) else str(r["model"])
            for _, r in frame.iterrows()]
    base = pd.Series(base, index=frame.index)
    clash = frame.groupby(base)["config_id"].transform("nunique") > 1
    base = base.where(~clash, base + " " + frame["config_id"].astype(str).str[:6])
    stride = [("" if pd.isna(s) or s == c else f", stride {int(s)}") for s, c in zip(frame["stride"], frame["context"])]
    cap = ["" if pd.isna(m) else f", first {int(m):,} tokens/book" for m in frame["max_book_tokens"]]
    return base + pd.Series(stride, index=frame.index) + pd.Series(cap, index=frame.index)


def long_context_buckets(runs: pd.DataFrame, sweeps: Iterable[str] | None = None, kind: str = "all",
                         split: str = "test") -> pd.DataFrame:
    """PPL and bits per byte per configuration, evaluation context and bucket of `kind` (all: whole books; window:
    position in the window; position: in the book), mean ± std over the pooled runs, with a line `label`."""
    long, _ = _longctx_long(runs, sweeps, split)
    long = long[long["kind"] == kind]
    keep = ["model", *PARAMS, "data.seq_len", "books"]
    frame = aggregate(long, ["ppl", "bpb"], by=[*LONGCTX_BY, "lo", "hi"], keep=keep)
    if len(frame):
        frame = (frame.assign(_r=frame["model"].map(family_rank))
                 .sort_values(["_r", "model", "config", "context", "lo"], kind="stable").drop(columns="_r")
                 .reset_index(drop=True))
    frame.insert(0, "label", _longctx_labels(frame).to_numpy() if len(frame) else [])
    return frame


def long_context_table(runs: pd.DataFrame, sweeps: Iterable[str] | None = None, split: str = "test") -> Table:
    """Whole-book PPL and bits per byte against the evaluation context, one row per configuration and context
    (`pha-lab eval RUN --contexts ...`, or a sweep's `post_eval.long_context`)."""
    frame = long_context_buckets(runs, sweeps, "all", split)
    long, excluded = _longctx_long(runs, sweeps, split)
    books = sorted({str(b) for b in long.get("books", pd.Series(dtype=object)).dropna()})
    columns = {"sweeps": "sweeps (runs)", "label": "model", "config": "config", **PARAMS, "data.seq_len": "train ctx",
               "context": "eval ctx", "stride": "stride", "n": "seeds", "ppl": f"{split} PPL", "bpb": "bits/byte",
               "runs": "runs"}
    notes = [POOLING_NOTE,
             f"Protocol (docs/data.md, section 9): the {split} books ({' | '.join(books) or 'none yet'}), each "
             "scored on its own from its first token at evaluation context C with the stride shown (= C: "
             "non-overlapping windows); no window crosses a book, the <|endoftext|> between books is not scored, a "
             "book shorter than C is one window; bits per byte over the UTF-8 bytes of the scored tokens.",
             family_note(long.drop_duplicates("run_id")) if len(long) else "", excluded or ""]
    formats = {**FORMATS, "ppl": fixed(2), "bpb": fixed(3), "context": tokens, "stride": tokens, "data.seq_len": tokens}
    return Table(f"long_context-{split}", f"Long context: {split} PPL against the evaluation context", frame,
                 shown_columns(frame, columns), [n for n in notes if n], formats)

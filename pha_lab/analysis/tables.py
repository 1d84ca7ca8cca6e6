"""The paper's tables rebuilt from runs (perplexity, ablation, mixer weights, knockout, MQAR, long context) as
`render.Table`s; the notebooks in analysis/ render them (pha_lab.analysis.notebooks runs those). The MQAR and
long-context tables live in mqar_tables.py and long_context_tables.py and are re-exported here.

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
from pha_lab.analysis.long_context_tables import (  # (`x as x`: re-exported, so every paper table is tables.<name>)
    long_context_buckets as long_context_buckets,
    long_context_table as long_context_table,
)
from pha_lab.analysis.mqar_tables import mqar_lr_table as mqar_lr_table, mqar_table as mqar_table
from pha_lab.analysis.render import FORMATS, Table, fixed, scale_label
from pha_lab.analysis.rows import (
    HEADERS,
    INTERVAL_NOTE,
    PARAMS,
    POOLING_NOTE,
    compare,
    family_note,
    family_rank,
    in_scope,
    rows_where,
    shown_columns,
    table_notes,
    with_model,
)
from pha_lab.analysis.runs import finished, layer_metrics
from pha_lab.analysis.stats import aggregate
from pha_lab.branches import BRANCH_REGISTRY

# --------------------------------------------------------------------------- the paper's numbers
# Reported test perplexities (arXiv 2606.16093 and the tables it cites). `regime` says how the model was
# obtained: only "scratch" rows are comparable to ours, and only under the same protocol and budget.
PAPER_PPL = [
    {
        "dataset": "wikitext103",
        "model": "PHA-125M",
        "ppl": 16.51,
        "training tokens": "not reported",
        "regime": "scratch",
        "provenance": "PHA paper (arXiv 2606.16093)",
    },
    {
        "dataset": "wikitext103",
        "model": "PHA-180M",
        "ppl": 16.42,
        "training tokens": "not reported",
        "regime": "scratch",
        "provenance": "PHA paper (arXiv 2606.16093)",
    },
    {
        "dataset": "wikitext103",
        "model": "Hedgehog (GPT-2 125M)",
        "ppl": 16.70,
        "training tokens": "GPT-2 pretraining",
        "regime": "converted from pretrained GPT-2 (not from scratch)",
        "provenance": "Hedgehog, as cited by the PHA paper",
    },
    {
        "dataset": "wikitext103",
        "model": "H3-125M",
        "ppl": 23.70,
        "training tokens": "Pile",
        "regime": "trained on the Pile, evaluated on WikiText-103",
        "provenance": "H3 paper, as cited by the PHA paper",
    },
    {
        "dataset": "openwebtext",
        "model": "PHA-125M",
        "ppl": 19.72,
        "training tokens": "~23% of 50B (reported)",
        "regime": "scratch",
        "provenance": "PHA paper (arXiv 2606.16093)",
    },
    {
        "dataset": "openwebtext",
        "model": "Transformer-125M",
        "ppl": 20.60,
        "training tokens": "50B",
        "regime": "scratch",
        "provenance": "H3 paper table (125M, 50B tokens), as cited by the PHA paper",
    },
    {
        "dataset": "openwebtext",
        "model": "GSS-Hybrid-125M",
        "ppl": 19.80,
        "training tokens": "50B",
        "regime": "scratch",
        "provenance": "H3 paper table (125M, 50B tokens), as cited by the PHA paper",
    },
]
# PHA-180M versus a pure-attention baseline at long context: +24% throughput, up to -40% memory.


# --------------------------------------------------------------------------- perplexity
SCALE = [
    "recipe_id",
    "model.d_model",
    "model.n_layers",
]  # what a comparison holds equal: data, budget, optimizer, shape


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
        lm = lm[
            np.logical_or.reduce(
                [lm[c] == dataset for c in ("data.source", "protocol.dataset") if c in lm] + [np.zeros(len(lm), bool)]
            )
        ]
    done, excluded = finished(in_scope(lm, sweeps))
    done = with_model(done)
    keep = ["model", *PARAMS, "recipe_id", "model.d_model", "model.n_layers", "train/tokens_seen"]
    frame = aggregate(done, ["test/ppl", "test/bpb"], keep=keep)
    if len(frame):
        frame = (
            frame.assign(_r=frame["model"].map(family_rank))
            .sort_values(["model.d_model", "_r", "model", "config"], kind="stable")
            .drop(columns="_r")
            .reset_index(drop=True)
        )
        frame = compare(frame, done, "test/ppl", frame["model"] == "PHA", SCALE)
    columns = {
        "sweeps": "sweeps (runs)",
        "model": "model",
        "config": "config",
        **PARAMS,
        "train/tokens_seen": "train tokens",
        "n": "seeds",
        "test/ppl": "test PPL",
        "test/bpb": "bits/byte",
        "delta": "Δ test PPL vs PHA [95% CI]",
        "reading": "reading",
        "runs": "runs",
    }
    notes = table_notes(
        done,
        excluded,
        frame,
        POOLING_NOTE,
        INTERVAL_NOTE,
        "Δ against the PHA (parallel GSS+GQA+FFN, static mixer) with the same recipe (data, budget, optimizer: "
        "`recipe_id`) and width/depth; blank where there is none. Every row trained from scratch.",
        family_note(done),
    )
    return Table(
        f"perplexity-{dataset or 'all'}",
        f"Language modelling, {dataset or 'all datasets'}: our runs",
        frame,
        shown_columns(frame, columns),
        notes,
        FORMATS,
    )


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
    frame = pd.DataFrame(
        [r for r in PAPER_PPL if r["dataset"] == key],
        columns=["dataset", "model", "ppl", "training tokens", "regime", "provenance"],
    )
    notes = [
        "Reported numbers, not reproduced here; the regime column says which are comparable to runs "
        "trained from scratch. Protocols (tokenizer, context, stride) are the papers' own."
    ]
    if key is None:
        notes = [f"The paper reports no perplexity on '{dataset}'."]
    return Table(
        f"perplexity-{dataset or 'all'}-paper",
        f"Reported in the literature ({key or dataset})",
        frame,
        {
            "model": "model",
            "ppl": "test PPL",
            "training tokens": "training tokens",
            "regime": "regime",
            "provenance": "provenance",
        },
        notes,
        {"ppl": fixed(2)},
    )


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
    metric = metric or (
        "test/ppl"
        if "test/ppl" in done and done["test/ppl"].notna().any()
        else "test/accuracy"
        if "test/accuracy" in done
        else "test/ppl"
    )
    done = done.assign(removed=[removed_label(b) for b in done.get("model.branches", [])])
    frame = aggregate(
        done,
        [metric, "test/bpb"] if metric == "test/ppl" else [metric],
        keep=["removed", "model.mixer", *PARAMS, *SCALE],
    )
    if len(frame):
        order = {"none": 0}
        frame = frame.assign(_o=frame["removed"].map(lambda r: order.get(r, 1)), _m=frame["model.mixer"] != "static")
        frame = frame.sort_values(
            ["model.d_model", "model.n_layers", "recipe_id", "_m", "_o", "removed", "model.mixer"], kind="stable"
        )
        frame = frame.drop(columns=["_o", "_m"]).reset_index(drop=True)
        frame = compare(frame, done, metric, (frame["removed"] == "none") & (frame["model.mixer"] == "static"), SCALE)
    header = HEADERS.get(metric, metric)
    shown = {
        "sweeps": "sweeps (runs)",
        "removed": "branches removed",
        "model.mixer": "mixer",
        **PARAMS,
        "delta params": "Δ non-emb params",
        "n": "seeds",
        metric: header,
    }
    if metric == "test/ppl":
        shown["test/bpb"] = "bits/byte"
    shown.update(
        {
            "delta": f"Δ {header} vs full PHA [95% CI]",
            "reading": "reading",
            "runs": "runs",
            "reference runs": "Δ reference runs",
        }
    )
    notes = table_notes(
        done,
        excluded,
        frame,
        POOLING_NOTE,
        INTERVAL_NOTE,
        "Δ against the full PHA (all branches, static mixer) with the same recipe (`recipe_id`) and "
        "width/depth; blank where there is none. Not parameter-matched: removing a branch removes its "
        "weights, and the concat mixer adds a k·D x D projection (Δ non-emb params).",
    )
    return Table(
        "ablation", "Ablation: branch removal and mixer type", frame, shown_columns(frame, shown), notes, FORMATS
    )


# --------------------------------------------------------------------------- per-layer tables (mixer, knockout)
def _per_layer(runs: pd.DataFrame, long: pd.DataFrame, name: str, title: str, notes: list[str]) -> Table:
    """Long (run_id, layer, branch, value) -> mean ± std per (configuration, layer), one column per branch."""
    branches = branch_order(long["branch"]) or list(BRANCH_REGISTRY)
    wide = long.pivot_table(index=["run_id", "layer"], columns="branch", values="value", aggfunc="first").reset_index()
    info = with_model(runs).reindex(
        columns=["run_id", "experiment", "config_id", "config", "seed", "start_time", "model", *PARAMS]
        if len(runs)
        else ["run_id"]
    )
    wide = wide.merge(info, on="run_id") if len(runs) else wide.iloc[0:0]
    frame = aggregate(wide, branches, by=["config_id", "layer"], keep=["model", *PARAMS])
    if len(frame):
        frame = frame.assign(_l=frame["layer"].map(lambda v: 10**6 if v == "all" else int(v)))
        frame = frame.sort_values(["model", "config", "_l"], kind="stable").drop(columns="_l").reset_index(drop=True)
    columns = {
        "model": "model",
        "config": "config",
        **PARAMS,
        "layer": "layer",
        **{b: b for b in branches},
        "n": "seeds",
        "sweeps": "sweeps (runs)",
        "runs": "runs",
    }
    notes = [*notes, family_note(runs[runs["run_id"].isin(wide["run_id"])] if len(runs) else runs)]
    return Table(
        name,
        title,
        frame,
        shown_columns(frame, columns),
        table_notes(pd.DataFrame(), None, frame, *notes),
        {**FORMATS, **{b: fixed(3) for b in branches}},
    )


def mixer_table(runs: pd.DataFrame, sweeps: Iterable[str] | None = None) -> Table:
    """Learned mixer weight of each branch in each layer (last validation), mean ± std over the pooled runs."""
    done, excluded = finished(in_scope(runs, sweeps))
    long = layer_metrics(done, "mixer")
    notes = [
        POOLING_NOTE,
        "Weights as each mixer reports them at the last validation (`mixer/L{i}/{branch}`; static: "
        "softmax, gate: mean gate, concat: share of the projection's squared norm); layers counted from 0; "
        "serial layers have none.",
        excluded,
    ]
    return _per_layer(
        done, long, "mixer-weights", "Learned mixer weights per layer and branch", [n for n in notes if n]
    )


def knockout_table(runs: pd.DataFrame, metric: str = "delta_ppl", sweeps: Iterable[str] | None = None) -> Table:
    """Change in test PPL (or accuracy) when one branch is zeroed in one layer (`pha-lab eval --knockout
    ... --per-layer`; layer `all`: in every layer), mean ± std over the pooled runs."""
    done, excluded = finished(in_scope(runs, sweeps))
    long = layer_metrics(done, "knockout", suffix=f"/{metric}")
    notes = [
        POOLING_NOTE,
        f"`{metric}` = knocked-out minus intact, logged by `pha-lab eval RUN_ID --knockout gss attn "
        "ffn --per-layer`; runs never evaluated so are absent.",
        excluded,
    ]
    return _per_layer(
        done, long, "knockout", f"Branch knockout: {metric.replace('delta_', 'Δ ')} per layer", [n for n in notes if n]
    )


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

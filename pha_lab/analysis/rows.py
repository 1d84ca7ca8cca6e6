"""What every paper table's rows share: the runs in a table's scope (the configurations its sweeps ran, pooled
over every run of them), the Δ of each row against its reference row with a Welch t interval (`compare`), the
notes under a table (evaluation protocol, pooling, guessed families, runs left out), and the table order of the
model families. The tables themselves: pha_lab.analysis.tables.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from pha_lab.analysis.families import model_family
from pha_lab.analysis.render import tokens
from pha_lab.analysis.stats import difference, reading

HEADERS = {
    "test/ppl": "test PPL",
    "test/bpb": "bits/byte",
    "test/accuracy": "test accuracy",
    "val/accuracy": "val accuracy",
}
PARAMS = {"n_params": "params", "n_params_non_embedding": "non-emb params"}
POOLING_NOTE = (
    "Pooled by configuration (`config_id`: the resolved config minus seed and bookkeeping keys) over every "
    "sweep that ran it, `sweeps` giving each one's count; runs of one seed in two sweeps count as two "
    "replicates (on a GPU they differ by its non-determinism). Mean ± sample std over the pooled runs."
)
INTERVAL_NOTE = (
    "Δ [low, high]: difference of means with its 95% Welch t interval (unequal variances; per comparison, "
    "not corrected for the several comparisons of a table); `reading` is 'within noise' when the interval "
    "covers 0, else higher or lower; no interval where a side has a single run."
)


FAMILIES = ("PHA", "Transformer", "GSS-Hybrid", "GSS", "sequential PHA")  # table order (by scale first)


def family_rank(model: str) -> int:
    """A model label's place in FAMILIES (a label starting with one of them sorts with it; others last)."""
    return next((i for i, f in enumerate(FAMILIES) if model.startswith(f)), len(FAMILIES))


# --------------------------------------------------------------------------- protocol notes
def protocol_notes(runs: pd.DataFrame) -> list[str]:
    """One line per distinct evaluation protocol among `runs` (the columns a reader needs to compare)."""
    keys = [
        "protocol.dataset",
        "protocol.split",
        "protocol.tokenizer",
        "protocol.context",
        "protocol.stride",
        "protocol.n_tokens",
        "protocol.n_bytes",
        "protocol.metric",
    ]
    if runs.empty or "protocol.dataset" not in runs:
        return []
    lines = []
    table = runs.reindex(columns=keys + ["train/tokens_seen"]).astype(object).where(lambda d: d.notna(), None)
    for values, group in table.groupby(keys, dropna=False, sort=False):
        p = dict(zip([k.split(".", 1)[1] for k in keys], values))
        seen = sorted({int(t) for t in group["train/tokens_seen"] if t is not None})
        if p["metric"] == "ppl":
            scored = f"{tokens(p['n_tokens'])} scored tokens" + (
                f" ({tokens(p['n_bytes'])} bytes)" if p["n_bytes"] else ""
            )
            metric = "token-level PPL and bits per byte"
        else:
            scored, metric = f"{tokens(p['n_tokens'])} scored answers", str(p["metric"])
        lines.append(
            f"Protocol: {p['dataset']} / {p['split']}, tokenizer {p['tokenizer']}, context {p['context']}, "
            f"stride {p['stride']}, {scored}, {metric}; training tokens per run: "
            f"{', '.join(f'{t:,}' for t in seen) or 'not logged'}; regime: scratch (trained here)."
        )
    return lines


def table_notes(runs: pd.DataFrame, excluded: str | None, frame: pd.DataFrame, *extra: str) -> list[str]:
    notes = protocol_notes(runs) + [e for e in extra if e]
    flagged = frame["duplicates"][frame["duplicates"].astype(bool)] if "duplicates" in frame else []
    if len(flagged):
        notes.append(
            "⚠ Bookkeeping duplicates (a sweep ran one configuration and seed twice; only the first started run "
            "counts): " + "; ".join(dict.fromkeys("; ".join(flagged).split("; "))) + "."
        )
    return notes + ([excluded] if excluded else [])


def shown_columns(frame: pd.DataFrame, columns: dict[str, str]) -> dict[str, str]:
    """`columns`, plus the duplicates flag where a row has one."""
    if "duplicates" in frame and frame["duplicates"].astype(bool).any():
        columns = {**columns, "duplicates": "⚠ duplicate runs left out"}
    return columns


def with_model(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    runs["model"] = [model_family(r) for r in runs.to_dict("records")] if len(runs) else []
    return runs


def family_note(runs: pd.DataFrame) -> str:
    """Says how many of `runs` have a guessed model family (runs.guessed_family), or nothing when none has."""
    guessed = int((runs["family_source"] == "guessed").sum()) if "family_source" in runs else 0
    if not guessed:
        return ""
    return (
        f"Model family guessed from model.layout, model.branches and model.overrides for {guessed} of {len(runs)} "
        "runs: they carry no `family` tag (logged before training recorded `model.family`, or with it unset); "
        "setting the tag on a run records it."
    )


def rows_where(runs: pd.DataFrame, column: str, test) -> pd.DataFrame:
    return runs[runs[column].map(test)] if column in runs and len(runs) else runs.iloc[0:0]


def in_scope(runs: pd.DataFrame, sweeps: Iterable[str] | None) -> pd.DataFrame:
    """The runs of every configuration that `sweeps` ran (None: all runs): what rows for those sweeps pool."""
    if sweeps is None or runs.empty:
        return runs
    ids = set(runs.loc[runs["experiment"].isin(list(sweeps)), "config_id"])
    return runs[runs["config_id"].isin(ids)]


def compare(
    frame: pd.DataFrame, runs: pd.DataFrame, metric: str, is_reference: pd.Series, match: list[str]
) -> pd.DataFrame:
    """`frame` (rows of `aggregate`) with each row's difference from its reference: the one row where
    `is_reference` holds with equal `match` columns. Adds `delta` (mean − reference mean), `delta lo`/`delta hi`
    (95% Welch t interval, from the runs' own values), `reading`, `delta params` (non-embedding, relative) and
    `reference runs`; blank where there is no reference, and 'ambiguous reference' where there are several."""
    frame = frame.assign(
        **{
            "delta": np.nan,
            "delta lo": np.nan,
            "delta hi": np.nan,
            "reading": "",
            "delta params": np.nan,
            "reference runs": "",
        }
    )
    values = runs.set_index("run_id")[metric] if metric in runs else pd.Series(dtype=float)
    for i, row in frame.iterrows():
        same = is_reference.copy()
        for c in match:
            same &= frame[c].eq(row[c]) | (frame[c].isna() & pd.isna(row[c])) if c in frame else True
        refs = frame[same]
        if len(refs) != 1:
            frame.loc[i, "reading"] = "ambiguous reference" if len(refs) else ""
            continue
        ref = refs.iloc[0]
        delta, low, high = (
            (0.0, np.nan, np.nan)
            if ref.name == i
            else difference(values.reindex(row["runs"].split(",")), values.reindex(ref["runs"].split(",")))
        )
        params = pd.to_numeric(
            pd.Series([row.get("n_params_non_embedding"), ref.get("n_params_non_embedding")]), errors="coerce"
        )
        frame.loc[i, ["delta", "delta lo", "delta hi", "delta params"]] = [delta, low, high, params[0] / params[1] - 1]
        frame.loc[i, ["reading", "reference runs"]] = [
            "reference" if ref.name == i else reading(delta, low, high),
            ref["runs"],
        ]
    return frame

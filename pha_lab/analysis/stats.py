"""Pooling runs into table rows: one row per configuration, mean ± std over its runs with their ids kept
(`aggregate`), bookkeeping duplicates left out with a warning (`drop_duplicates`), and the Welch t interval a
difference of two configurations carries (`difference`, `reading`). Works on the frames pha_lab.analysis.runs builds.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd


def aggregate(
    runs: pd.DataFrame, metrics: list[str], by: list[str] | None = None, keep: list[str] = ()
) -> pd.DataFrame:
    """One row per configuration (default: `config_id`, pooled over every sweep that ran it), over seeds.

    Each metric m gives columns `m` (mean over the runs that logged it), `m std` (sample std, ddof=1; NaN for
    one run) and `m n`; `n` counts the runs, `sweeps` says how many came from each sweep and `runs` lists their
    ids (ordered by seed), the provenance of every number in the row. `keep` columns are copied from the first
    run. Two runs of one configuration and seed in one sweep are a bookkeeping duplicate (a grid cell run
    twice), not two replicates: the first started is kept, the others are left out of the statistics and named
    in the `duplicates` column, with a warning."""
    by = list(by or ["config_id"])
    columns = (
        by
        + [c for c in ("config", *keep) if c not in by]
        + [x for m in metrics for x in (m, f"{m} std", f"{m} n")]
        + ["n", "sweeps", "runs", "duplicates"]
    )
    if runs.empty:
        return pd.DataFrame(columns=columns)
    runs, left_out = drop_duplicates(runs, by)
    rows = []
    for key, group in runs.groupby(by, sort=False, dropna=False):
        group = group.sort_values([c for c in ("seed", "experiment", "start_time", "run_id") if c in group])
        first = group.iloc[0]
        row = {c: first.get(c) for c in columns if c in group}
        row["config"] = "; ".join(dict.fromkeys(group["config"].astype(str))) if "config" in group else None
        for m in metrics:
            values = pd.to_numeric(group[m], errors="coerce").dropna() if m in group else pd.Series(dtype=float)
            row[m] = values.mean() if len(values) else np.nan
            row[f"{m} std"] = values.std(ddof=1) if len(values) > 1 else np.nan
            row[f"{m} n"] = len(values)
        row["n"] = len(group)
        row["sweeps"] = ", ".join(
            f"{e} ({k})" for e, k in sorted(group["experiment"].astype(str).value_counts().items())
        )
        row["runs"] = ",".join(group["run_id"])
        row["duplicates"] = left_out.get(key if isinstance(key, tuple) else (key,), "")
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def drop_duplicates(runs: pd.DataFrame, by: list[str] = ("config_id",)) -> tuple[pd.DataFrame, dict[tuple, str]]:
    """(runs without bookkeeping duplicates, {group key of `by`: what was left out}): of several runs with one
    sweep, configuration and seed (and `by` key), only the first started counts; a warning names the others."""
    key = list(dict.fromkeys(["experiment", "config_id", "seed", *by]))
    order = [c for c in ("start_time", "run_id") if c in runs]
    runs = runs.sort_values(order, kind="stable") if order else runs
    dup = runs.duplicated(key, keep="first")
    if not dup.any():
        return runs, {}
    messages: dict[tuple, list[str]] = {}
    for _, group in runs[runs.duplicated(key, keep=False)].groupby(key, sort=False, dropna=False):
        kept, extra = group["run_id"].iloc[0], list(group["run_id"].iloc[1:])
        first = group.iloc[0]
        text = (
            f"{first['experiment']} seed {_seed(first['seed'])}: {len(group)} runs, kept {kept[:8]}, "
            f"left out {', '.join(r[:8] for r in extra)}"
        )
        messages.setdefault(tuple(first[c] for c in by), []).append(text)
    joined = {k: "; ".join(v) for k, v in messages.items()}
    warnings.warn(
        "bookkeeping duplicates (one sweep ran one configuration and seed more than once; only the first "
        "started run counts): " + "; ".join(joined.values()),
        DuplicateRunsWarning,
        stacklevel=3,
    )
    return runs[~dup], joined


class DuplicateRunsWarning(UserWarning):
    """A sweep ran one configuration and seed more than once (e.g. a grid cell claimed by two workers)."""


def _seed(value) -> str:
    return str(int(value)) if isinstance(value, (int, float, np.number)) and not pd.isna(value) else str(value)


def difference(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high): the Welch t interval (unequal variances) on the difference of means at
    `level`; NaN bounds when either side has fewer than 2 runs (no spread to judge the noise by)."""
    from scipy import stats  # start-up time: ~1.5 s, only for tables with intervals

    a = pd.to_numeric(pd.Series(list(a), dtype=object), errors="coerce").dropna().to_numpy(float)
    b = pd.to_numeric(pd.Series(list(b), dtype=object), errors="coerce").dropna().to_numpy(float)
    if not len(a) or not len(b):
        return np.nan, np.nan, np.nan
    delta = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2 or (a.std() == 0 and b.std() == 0):
        return delta, np.nan, np.nan
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(level)
    return delta, float(ci.low), float(ci.high)


def reading(delta: float, low: float, high: float) -> str:
    """How a difference reads: 'within noise' when its interval covers 0, else 'higher' or 'lower'."""
    if pd.isna(delta):
        return ""
    if pd.isna(low) or pd.isna(high):
        return "no interval (a side has < 2 runs)"
    if low <= 0 <= high:
        return "within noise"
    return "higher" if delta > 0 else "lower"

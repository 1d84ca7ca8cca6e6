"""The MQAR tables (multi-query associative recall): per task, the learning rate picked on validation accuracy and
the test accuracy at it (`mqar_table`), and every learning rate behind that choice (`mqar_lr_table`), both pooled over
the runs of each configuration (pha_lab.analysis.rows). Re-exported by pha_lab.analysis.tables.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from pha_lab.analysis.render import FORMATS, Table
from pha_lab.analysis.rows import (
    PARAMS,
    POOLING_NOTE,
    family_note,
    in_scope,
    rows_where,
    shown_columns,
    table_notes,
    with_model,
)
from pha_lab.analysis.runs import config_key, finished
from pha_lab.analysis.stats import aggregate

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
        frame = frame.sort_values(["model", "model.d_model", "data.seq_len", "task_id", "optim.lr"]).reset_index(
            drop=True
        )
    shown = {
        "sweeps": "sweeps (runs)",
        "model": "model",
        **PARAMS,
        "model.d_model": "width",
        "data.seq_len": "seq len",
        "data.mqar.num_kv_pairs": "kv pairs",
        "optim.lr": "lr",
        "n": "seeds",
        "val/accuracy": "val accuracy",
        "test/accuracy": "test accuracy",
        "runs": "runs",
    }
    done, _ = finished(in_scope(mqar_runs(runs), sweeps))
    return Table(
        "mqar-lr",
        "MQAR: accuracy per learning rate",
        frame,
        shown_columns(frame, shown),
        table_notes(pd.DataFrame(), None, frame, POOLING_NOTE, family_note(done)),
        _MQAR_FORMATS,
    )


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
    shown = {
        "sweeps": "sweeps (runs)",
        "model": "model",
        **PARAMS,
        "model.d_model": "width",
        "data.seq_len": "seq len",
        "data.mqar.num_kv_pairs": "kv pairs",
        "optim.lr": "lr (best val)",
        "learning rates": "lrs tried",
        "n": "seeds",
        "val/accuracy": "val accuracy",
        "test/accuracy": "test accuracy",
        "runs": "runs",
    }
    notes = table_notes(
        done,
        excluded,
        frame,
        POOLING_NOTE,
        "The learning rate is picked on the seed-mean validation accuracy (ties: the smallest); the test "
        "accuracy is reported at it, so test never enters the selection. The runs column names the runs "
        "at that learning rate.",
        f"{unscored} task(s) without val/accuracy: no learning rate picked." if unscored else "",
        family_note(done),
    )
    return Table(
        "mqar",
        "MQAR: recall accuracy at the learning rate picked on validation",
        frame,
        shown_columns(frame, shown),
        notes,
        _MQAR_FORMATS,
    )

"""The long-context tables: whole-book PPL and bits per byte against the evaluation context (`long_context_table`),
and the same by position in the window or in the book (`long_context_buckets`, what the figures draw), from the
`longctx/...` metrics that `pha-lab eval --contexts` and a sweep's `post_eval` log. Re-exported by
pha_lab.analysis.tables.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from pha_lab.analysis.render import FORMATS, Table, fixed, tokens
from pha_lab.analysis.rows import PARAMS, POOLING_NOTE, family_note, family_rank, in_scope, shown_columns, with_model
from pha_lab.analysis.runs import finished, longctx_metrics
from pha_lab.analysis.stats import aggregate

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
    base = [
        f"{r['model']} (train {int(r['data.seq_len'])})" if pd.notna(r.get("data.seq_len")) else str(r["model"])
        for _, r in frame.iterrows()
    ]
    base = pd.Series(base, index=frame.index)
    clash = frame.groupby(base)["config_id"].transform("nunique") > 1
    base = base.where(~clash, base + " " + frame["config_id"].astype(str).str[:6])
    stride = [("" if pd.isna(s) or s == c else f", stride {int(s)}") for s, c in zip(frame["stride"], frame["context"])]
    cap = ["" if pd.isna(m) else f", first {int(m):,} tokens/book" for m in frame["max_book_tokens"]]
    return base + pd.Series(stride, index=frame.index) + pd.Series(cap, index=frame.index)


def long_context_buckets(
    runs: pd.DataFrame, sweeps: Iterable[str] | None = None, kind: str = "all", split: str = "test"
) -> pd.DataFrame:
    """PPL and bits per byte per configuration, evaluation context and bucket of `kind` (all: whole books; window:
    position in the window; position: in the book), mean ± std over the pooled runs, with a line `label`."""
    long, _ = _longctx_long(runs, sweeps, split)
    long = long[long["kind"] == kind]
    keep = ["model", *PARAMS, "data.seq_len", "books"]
    frame = aggregate(long, ["ppl", "bpb"], by=[*LONGCTX_BY, "lo", "hi"], keep=keep)
    if len(frame):
        frame = (
            frame.assign(_r=frame["model"].map(family_rank))
            .sort_values(["_r", "model", "config", "context", "lo"], kind="stable")
            .drop(columns="_r")
            .reset_index(drop=True)
        )
    frame.insert(0, "label", _longctx_labels(frame).to_numpy() if len(frame) else [])
    return frame


def long_context_table(runs: pd.DataFrame, sweeps: Iterable[str] | None = None, split: str = "test") -> Table:
    """Whole-book PPL and bits per byte against the evaluation context, one row per configuration and context
    (`pha-lab eval RUN --contexts ...`, or a sweep's `post_eval.long_context`)."""
    frame = long_context_buckets(runs, sweeps, "all", split)
    long, excluded = _longctx_long(runs, sweeps, split)
    books = sorted({str(b) for b in long.get("books", pd.Series(dtype=object)).dropna()})
    columns = {
        "sweeps": "sweeps (runs)",
        "label": "model",
        "config": "config",
        **PARAMS,
        "data.seq_len": "train ctx",
        "context": "eval ctx",
        "stride": "stride",
        "n": "seeds",
        "ppl": f"{split} PPL",
        "bpb": "bits/byte",
        "runs": "runs",
    }
    notes = [
        POOLING_NOTE,
        f"Protocol (docs/data.md, section 9): the {split} books ({' | '.join(books) or 'none yet'}), each "
        "scored on its own from its first token at evaluation context C with the stride shown (= C: "
        "non-overlapping windows); no window crosses a book, the <|endoftext|> between books is not scored, a "
        "book shorter than C is one window; bits per byte over the UTF-8 bytes of the scored tokens.",
        family_note(long.drop_duplicates("run_id")) if len(long) else "",
        excluded or "",
    ]
    formats = {**FORMATS, "ppl": fixed(2), "bpb": fixed(3), "context": tokens, "stride": tokens, "data.seq_len": tokens}
    return Table(
        f"long_context-{split}",
        f"Long context: {split} PPL against the evaluation context",
        frame,
        shown_columns(frame, columns),
        [n for n in notes if n],
        formats,
    )

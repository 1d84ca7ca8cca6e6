"""MLflow runs -> pandas: one row per run, pooled over seeds (and over sweeps) into mean ± std with the run ids kept.

`load_runs(sweeps, tracking_uri)` reads child runs with `mlflow.search_runs` from any tracking URI (the
sweep parent runs are dropped; `sweeps=None` reads every experiment's training runs). Columns: `run_id`,
`experiment`, `status`, `config` (the sweep cell without its seed, else the config name), `family` and
`family_source` (the run's `family` tag, set by training from `model.family`: "recorded"; runs logged before
that tag existed get the family guessed from their layout and branches: "guessed"), `config_id` (what
"the same configuration" means: a hash of the resolved config minus the seed and the keys that change neither
what is trained nor how it is scored, see `NOT_IDENTITY`), `recipe_id` (the same without the `model.*` keys:
data, budget, optimizer), `seed`, `start_time`, `identity` (the hashed key/values), then the config keys
(`model.mixer`, ...), final metrics (`test/ppl`, `mixer/L0/gss`, ...) and tags (`n_params`, `protocol.dataset`,
...) under their own names. Values that are numbers become numbers. Importing this module does not import
torch or lightning.

What a single run is (its family, label, scale) lives in pha_lab.analysis.families, the pooling into rows in
pha_lab.analysis.stats; the names the notebooks and tests use are re-exported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd

from pha_lab.analysis.families import (  # (`x as x`: re-exported, the notebooks, tests and bench use them from here)
    FAMILY_LABELS as FAMILY_LABELS,
    baseline_pairs as baseline_pairs,
    guessed_family,
    model_family as model_family,
    recorded_family,
)
from pha_lab.analysis.stats import (
    DuplicateRunsWarning as DuplicateRunsWarning,
    aggregate as aggregate,
    difference as difference,
    reading as reading,
)
from pha_lab.config import PROJECT_ROOT

BASE_COLUMNS = [
    "run_id",
    "experiment",
    "status",
    "config",
    "family",
    "family_source",
    "config_id",
    "recipe_id",
    "seed",
    "start_time",
    "identity",
]
# Params that change neither what is trained nor how it is scored: runs differing only in these are replicates of
# one configuration (the seed is the replicate; `name` is a preset's label, not its content; `tracking.` covers
# the experiment, run name and sweep tags; `model.family` labels what the other keys build). A key or a prefix
# ending in ".".
NOT_IDENTITY = (
    "seed",
    "resume",
    "name",
    "model.family",
    "tracking.",
    "data.cache_dir",
    "data.data_dir",
    "data.num_proc",
    "data.num_workers",
    "trainer.cpu_threads",
    "trainer.log_every_n_steps",
    "trainer.ckpt_every_n_steps",
)
# Tags that resolve what a param leaves to the machine (trainer.precision=auto: bf16-mixed on a GPU, fp32 on CPU).
IDENTITY_TAGS = ("precision",)
_NOT_NUMERIC = (
    "run_id",
    "parent_run_id",
    "git_sha",
    "protocol.tokenizer_sha256",
    "cell",
    "config",
    "family",
    "config_id",
    "recipe_id",
    "identity",
    "start_time",
)


# --------------------------------------------------------------------------- reading
def resolve_uri(tracking_uri: str | None = None, runs_dir: str | os.PathLike | None = None) -> str:
    """As the suite resolves it (pha_lab.tracking): the URI, else $MLFLOW_TRACKING_URI, else
    sqlite:///<runs_dir>/mlflow.db, runs_dir defaulting to the project's `runs/` (not the cwd, so a
    notebook opened from analysis/ finds the same database as `make`)."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(runs_dir) if runs_dir else PROJECT_ROOT / "runs"
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


def _sqlite_missing(uri: str) -> bool:
    """A sqlite URI whose file does not exist: reading it would create an empty database."""
    if not uri.startswith("sqlite:"):
        return False
    path = unquote(urlparse(uri).path)
    return path not in ("", "/:memory:") and not Path(path).exists()


@contextlib.contextmanager
def _using(uri: str):
    """mlflow.search_runs reads the global tracking URI; set it for one call and restore both the
    global and the MLFLOW_TRACKING_URI variable that mlflow.set_tracking_uri writes."""
    from mlflow.tracking._tracking_service import utils  # start-up time: see search_runs

    old_uri, old_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    utils.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def search_runs(experiments: str | Iterable[str] | None, tracking_uri: str) -> pd.DataFrame:
    """`mlflow.search_runs` of the named experiments (None: every experiment) at `tracking_uri` (missing
    experiments: no rows)."""
    warnings.filterwarnings("ignore", message="IProgress not found")  # mlflow imports tqdm.auto in notebooks
    import mlflow  # here, not at the top: importing mlflow takes ~3 s, and tables from CSVs need none

    empty = pd.DataFrame(columns=["run_id", "experiment_id", "status"])
    names = None if experiments is None else [experiments] if isinstance(experiments, str) else list(experiments)
    if names == [] or _sqlite_missing(tracking_uri):
        return empty
    with _using(tracking_uri):
        client = mlflow.MlflowClient(tracking_uri)
        if names is None:
            ids = {e.experiment_id: e.name for e in client.search_experiments()}
        else:
            found = {n: client.get_experiment_by_name(n) for n in names}
            ids = {e.experiment_id: n for n, e in found.items() if e is not None}
        if not ids:
            return empty
        df = mlflow.search_runs(experiment_ids=list(ids))
    df.insert(1, "experiment", df["experiment_id"].map(ids))
    return df


def load_runs(
    sweeps: str | Iterable[str] | None, tracking_uri: str | None = None, runs_dir: str | None = None
) -> pd.DataFrame:
    """Every child run of the named sweeps (MLflow experiments), any status, one row each. `sweeps=None`:
    the training runs (those that logged a model config) of every experiment, what pooling reads."""
    raw = search_runs(sweeps, resolve_uri(tracking_uri, runs_dir))
    if "tags.sweep_parent" in raw:
        raw = raw[raw["tags.sweep_parent"].fillna("") != "true"].drop(columns="tags.sweep_parent")
    if sweeps is None:
        raw = raw[raw["params.model.layout"].notna()] if "params.model.layout" in raw else raw.iloc[0:0]
    return tidy(raw)


def tidy(raw: pd.DataFrame) -> pd.DataFrame:
    """mlflow.search_runs' frame -> bare column names, numbers as numbers, config label and ids."""
    if raw.empty:
        return pd.DataFrame(columns=BASE_COLUMNS)
    out = {
        "run_id": raw["run_id"],
        "experiment": raw.get("experiment", raw["experiment_id"]),
        "status": raw["status"],
        "start_time": raw.get("start_time"),
    }
    for col in raw.columns:
        kind, _, name = col.partition(".")
        if kind == "params" and name not in out:
            out[name] = raw[col]
    for col in raw.columns:
        kind, _, name = col.partition(".")
        if kind == "metrics":
            out[name] = raw[col]
        elif kind == "tags" and name == "mlflow.parentRunId":
            out["parent_run_id"] = raw[col]
        elif kind == "tags" and not name.startswith("mlflow.") and name not in out:
            out[name] = raw[col]
    df = pd.DataFrame(out).reset_index(drop=True)
    for col in df.columns:
        if col not in _NOT_NUMERIC and not pd.api.types.is_numeric_dtype(df[col]):
            df[col] = _numeric(df[col])
    records = df.to_dict("records")
    df["config"] = [_label(r) for r in records]
    df["family_source"] = ["recorded" if recorded_family(r) else "guessed" for r in records]
    df["family"] = [recorded_family(r) or guessed_family(r) for r in records]
    df["identity"] = _identities(raw.reset_index(drop=True))
    df["config_id"] = [config_key(i) for i in df["identity"]]
    df["recipe_id"] = [config_key(i, drop=("model",)) for i in df["identity"]]
    if "seed" not in df:
        df["seed"] = np.nan
    return df[BASE_COLUMNS + [c for c in df.columns if c not in BASE_COLUMNS]]


def _identities(raw: pd.DataFrame) -> list[dict[str, str]]:
    """Per run: the params that say what is trained and how it is scored (as logged, strings), and the
    `IDENTITY_TAGS`; keys a run did not log are absent, so an old run never matches a new key's value."""
    cols = [c for c in raw.columns if c.startswith("params.") and not c[len("params.") :].startswith(NOT_IDENTITY)]
    cols += [f"tags.{t}" for t in IDENTITY_TAGS if f"tags.{t}" in raw]
    rows = raw[cols].to_dict("records") if cols else [{} for _ in range(len(raw))]
    return [{c.partition(".")[2]: v for c, v in r.items() if isinstance(v, str)} for r in rows]


def config_key(identity: dict[str, str], drop: Sequence[str] = ()) -> str:
    """A short hash of a run's identity minus the `drop` keys (a key also drops its sub-keys: "model" drops
    every `model.*`): runs with equal keys are replicates of one configuration."""
    kept = sorted((k, v) for k, v in identity.items() if not any(k == d or k.startswith(d + ".") for d in drop))
    return hashlib.sha1(json.dumps(kept).encode()).hexdigest()[:10]


def _numeric(col: pd.Series) -> pd.Series:
    col = col.where(~col.isin(["None", "null", ""]), None)
    values = col.dropna()
    if values.empty:
        return col
    parsed = pd.to_numeric(values, errors="coerce")
    return pd.to_numeric(col, errors="coerce") if parsed.notna().all() else col


def _label(row: dict) -> str:
    cell = row.get("cell")
    if isinstance(cell, str) and cell:
        return ",".join(p for p in split_cell(cell) if not p.startswith("seed=")) or cell
    return str(row.get("config_name") or row.get("name") or row["run_id"])


def split_cell(cell: str) -> list[str]:
    """'branches=no_gss,model.mixer=gate,seed=1' -> its `axis=label` parts (labels may hold commas)."""
    return re.split(r",(?=[A-Za-z_][\w.]*=)", cell)


def finished(runs: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """(FINISHED runs, a note counting the others by status, or None): only finished runs enter tables."""
    done = runs[runs["status"] == "FINISHED"]
    other = runs.loc[runs["status"] != "FINISHED", "status"].value_counts().sort_index()
    note = None
    if len(other):
        detail = ", ".join(f"{n} {s}" for s, n in other.items())
        note = f"{len(runs) - len(done)} run(s) excluded because they did not finish ({detail})."
    return done, note


# --------------------------------------------------------------------------- per-layer and long-context metrics
def layer_metrics(runs: pd.DataFrame, prefix: str, suffix: str = "") -> pd.DataFrame:
    """Long frame (run_id, layer, branch, value) of per-layer metrics: `{prefix}/L{i}/{branch}` (mixer,
    rms) without a suffix, `{prefix}/{branch}/L{i}{suffix}` or `{prefix}/{branch}/all{suffix}` with one
    (knockout; layer "all" = the branch zeroed in every layer)."""
    pattern = (
        re.compile(rf"^{re.escape(prefix)}/L(?P<layer>\d+)/(?P<branch>\w+)$")
        if not suffix
        else re.compile(rf"^{re.escape(prefix)}/(?P<branch>\w+)/(?:L(?P<layer>\d+)|(?P<all>all)){re.escape(suffix)}$")
    )
    rows = []
    for col in runs.columns:
        match = pattern.match(str(col))
        if not match:
            continue
        layer = "all" if match.groupdict().get("all") else int(match.group("layer"))
        for run_id, value in zip(runs["run_id"], runs[col]):
            if pd.notna(value):
                rows.append({"run_id": run_id, "layer": layer, "branch": match.group("branch"), "value": float(value)})
    return pd.DataFrame(rows, columns=["run_id", "layer", "branch", "value"])


LONGCTX_METRIC = re.compile(
    r"^longctx/(?P<split>[^/]+)/C(?P<context>\d+)/"
    r"(?:(?P<kind>window|position)/(?P<lo>\d+)-(?P<hi>\d+)/)?(?P<metric>ppl|bpb)$"
)


def longctx_metrics(runs: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Long frame of the long-context results of `runs` on `split` (pha_lab.training.long_context): one row per run,
    context and bucket, with `kind` (all: the whole books; window: position in the window; position: in the book),
    `lo`/`hi` (the bucket; all: 0/0), `ppl`, `bpb`, and the protocol the run's tags give that context: `stride`,
    `max_book_tokens` (NaN: whole books), `books`."""
    rows: dict[tuple, dict] = {}
    for col in runs.columns:
        match = LONGCTX_METRIC.match(str(col))
        if not match or match["split"] != split:
            continue
        context, kind = int(match["context"]), match["kind"] or "all"
        lo, hi = (int(match["lo"]), int(match["hi"])) if match["kind"] else (0, 0)
        for run_id, value in zip(runs["run_id"], runs[col]):
            if pd.notna(value):
                row = rows.setdefault(
                    (run_id, context, kind, lo, hi),
                    {"run_id": run_id, "context": context, "kind": kind, "lo": lo, "hi": hi},
                )
                row[match["metric"]] = float(value)
    frame = pd.DataFrame(list(rows.values()), columns=["run_id", "context", "kind", "lo", "hi", "ppl", "bpb"])
    tags = runs.set_index("run_id") if len(runs) else pd.DataFrame()
    for key in ("stride", "max_book_tokens", "books"):
        frame[key] = [
            tags.at[r, f"longctx.{split}.C{c}.{key}"] if f"longctx.{split}.C{c}.{key}" in tags else np.nan
            for r, c in zip(frame["run_id"], frame["context"])
        ]
    return frame

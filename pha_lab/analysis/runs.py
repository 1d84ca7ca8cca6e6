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
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd

from pha_lab.branches import BRANCH_REGISTRY
from pha_lab.config import PROJECT_ROOT

BASE_COLUMNS = ["run_id", "experiment", "status", "config", "family", "family_source", "config_id", "recipe_id", "seed",
                "start_time", "identity"]
# Params that change neither what is trained nor how it is scored: runs differing only in these are replicates of
# one configuration (the seed is the replicate; `name` is a preset's label, not its content; `tracking.` covers
# the experiment, run name and sweep tags; `model.family` labels what the other keys build). A key or a prefix
# ending in ".".
NOT_IDENTITY = ("seed", "resume", "name", "model.family", "tracking.", "data.cache_dir", "data.data_dir",
                "data.num_proc", "data.num_workers", "trainer.cpu_threads", "trainer.log_every_n_steps",
                "trainer.ckpt_every_n_steps")
# Tags that resolve what a param leaves to the machine (trainer.precision=auto: bf16-mixed on a GPU, fp32 on CPU).
IDENTITY_TAGS = ("precision",)
_NOT_NUMERIC = ("run_id", "parent_run_id", "git_sha", "protocol.tokenizer_sha256", "cell", "config", "family",
                "config_id", "recipe_id", "identity", "start_time")


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


def load_runs(sweeps: str | Iterable[str] | None, tracking_uri: str | None = None, runs_dir: str | None = None) -> pd.DataFrame:
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
    out = {"run_id": raw["run_id"], "experiment": raw.get("experiment", raw["experiment_id"]), "status": raw["status"],
           "start_time": raw.get("start_time")}
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
    cols = [c for c in raw.columns if c.startswith("params.") and not c[len("params."):].startswith(NOT_IDENTITY)]
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


# --------------------------------------------------------------------------- describing runs
def branches_of(value) -> list[str]:
    """`model.branches` as logged ("['gss', 'attn']") -> a list."""
    if isinstance(value, (list, tuple)):
        return list(value)
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        return []
    return [str(b) for b in parsed] if isinstance(parsed, (list, tuple)) else []


def overrides_of(row: dict) -> list[dict]:
    """`model.overrides` as logged ("[{'layers': [1, 6], 'branches': ['attn', 'ffn'], ...}]") -> a list of dicts."""
    value = row.get("model.overrides")
    try:
        parsed = value if isinstance(value, (list, tuple)) else ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        return []
    return [o for o in parsed if isinstance(o, dict)] if isinstance(parsed, (list, tuple)) else []


def branch_order(names: Iterable[str]) -> list[str]:
    """Branch names in the registry's order (pha_lab.branches), then any unregistered ones alphabetically."""
    names = set(names)
    return [b for b in BRANCH_REGISTRY if b in names] + sorted(names - set(BRANCH_REGISTRY))


# The PHA family's branches (the paper's GSS + GQA + FFN): what the ablation's "branches removed" counts from, and
# what `guessed_family` takes a PHA to be. Not the list of branches there are (that is BRANCH_REGISTRY).
PHA_BRANCHES = ("gss", "attn", "ffn")
FAMILY_LABELS = {"pha": "PHA", "transformer": "Transformer", "gss": "GSS", "gss_hybrid": "GSS-Hybrid",
                 "sequential_pha": "sequential PHA", "pha_sparse": "attention-sparse PHA",
                 "transformer_deep": "Transformer (depth-matched)", "transformer_mha": "Transformer (multi-head)",
                 "pha_swa": "PHA, sliding-window attention",
                 }  # model.family -> table label; pha_no_X: "PHA without X"; pha_sparse, pha_swa: with k of L layers


def recorded_family(row: dict) -> str | None:
    """The run's `family` tag (what training logs from `model.family`), None where it has none."""
    family = row.get("family")
    return family if isinstance(family, str) and family else None


def guessed_family(row: dict) -> str:
    """For runs without a recorded family (logged before the `family` tag existed, or with `model.family` unset):
    the family as the tables used to guess it from model.layout, model.branches and model.overrides. Only a guess:
    `tidy` marks it `family_source = "guessed"` and the tables say how many rows rest on it."""
    layout, branches = row.get("model.layout"), branches_of(row.get("model.branches"))
    if layout == "parallel" and "attn" not in branches and "attn" in str(row.get("model.overrides") or ""):
        return "pha_sparse"  # attention in only some layers (the overrides)
    if layout == "parallel":
        missing = [b for b in PHA_BRANCHES if b not in branches]
        return "pha" if not missing else "pha_no_" + "+".join(missing)
    if branches == ["attn", "ffn"]:
        return "transformer"
    if "gss" in branches and "attn" not in branches:
        return "gss_hybrid" if any("attn" in branches_of(o.get("branches")) for o in overrides_of(row)) else "gss"
    if branches == ["gss", "attn", "ffn"]:
        return "sequential_pha"
    return "+".join(branches) + f" ({layout})"


def model_family(row: dict) -> str:
    """The table label of a run's family (recorded, else guessed): PHA, Transformer, GSS, GSS-Hybrid, sequential
    PHA, PHA without gss, ..., with the mixer of a parallel model that does not use the static one: PHA (gate)."""
    family = recorded_family(row) or guessed_family(row)
    name = FAMILY_LABELS.get(family, family)
    if family.startswith("pha_no_"):
        name = "PHA without " + family.removeprefix("pha_no_")
    k, n_layers = _as_int(row.get("model.n_attn_layers")), _as_int(row.get("model.n_layers"))
    if family == "pha_sparse" and k is not None and n_layers is not None:
        name = f"PHA, attention in {k} of {n_layers} layers"
    window = _as_int(row.get("model.swa.window"))
    if family == "pha_swa" and k is not None and n_layers is not None and window is not None:
        name = f"PHA, attention in {k} of {n_layers} layers, a {window}-token window elsewhere"
    mixer = row.get("model.mixer")
    static = mixer in (None, "static") or (isinstance(mixer, float) and np.isnan(mixer))
    return name if row.get("model.layout") != "parallel" or static else f"{name} ({mixer})"


def _scale_and_core(name: str) -> tuple[str, str]:
    """A preset name split into its scale and the rest: pha_sparse_180m -> ("180m", "pha_sparse"), tiny_pha ->
    ("tiny", "pha"), pha -> ("", "pha")."""
    if match := re.fullmatch(r"(.+)_(\d+m)", name):
        return match.group(2), match.group(1)
    if match := re.fullmatch(r"(tiny|mini)_(.+)", name):
        return match.group(1), match.group(2)
    return "", name


def baseline_pairs(models: Iterable[str]) -> list[tuple[str, str]]:
    """(PHA model, Transformer baseline) pairs among preset names: every PHA (pha*, pha_sparse*) with every
    Transformer of its scale (the `_NNNm` suffix, or the tiny_/mini_ prefix): pha_sparse_180m with transformer_180m,
    transformer_deep_180m and transformer_mha_180m; tiny_pha with tiny_transformer. The bench's printed comparisons
    and the efficiency ratio table pair models by this rule."""
    parts = {str(m): _scale_and_core(str(m)) for m in sorted({str(m) for m in models})}
    return [(m, b) for m, (scale, core) in parts.items() if core == "pha" or core.startswith("pha_")
            for b, (b_scale, b_core) in parts.items()
            if b_scale == scale and (b_core == "transformer" or b_core.startswith("transformer_"))]


def _as_int(value) -> int | None:
    """A logged integer (an MLflow param is a string, a DataFrame cell may be a float or NaN), None if there is none."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if np.isfinite(number) else None


def scale_label(n_params) -> str:
    """125,155,620 -> '125M'; 247,328 -> '0.25M'."""
    if n_params is None or pd.isna(n_params):
        return ""
    m = float(n_params) / 1e6
    return f"{m:.0f}M" if m >= 10 else f"{m:.2g}M"


# --------------------------------------------------------------------------- aggregation
def aggregate(runs: pd.DataFrame, metrics: list[str], by: list[str] | None = None,
              keep: list[str] = ()) -> pd.DataFrame:
    """One row per configuration (default: `config_id`, pooled over every sweep that ran it), over seeds.

    Each metric m gives columns `m` (mean over the runs that logged it), `m std` (sample std, ddof=1; NaN for
    one run) and `m n`; `n` counts the runs, `sweeps` says how many came from each sweep and `runs` lists their
    ids (ordered by seed), the provenance of every number in the row. `keep` columns are copied from the first
    run. Two runs of one configuration and seed in one sweep are a bookkeeping duplicate (a grid cell run
    twice), not two replicates: the first started is kept, the others are left out of the statistics and named
    in the `duplicates` column, with a warning."""
    by = list(by or ["config_id"])
    columns = by + [c for c in ("config", *keep) if c not in by] + [
        x for m in metrics for x in (m, f"{m} std", f"{m} n")] + ["n", "sweeps", "runs", "duplicates"]
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
        row["sweeps"] = ", ".join(f"{e} ({k})" for e, k in sorted(group["experiment"].astype(str).value_counts().items()))
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
        text = (f"{first['experiment']} seed {_seed(first['seed'])}: {len(group)} runs, kept {kept[:8]}, "
                f"left out {', '.join(r[:8] for r in extra)}")
        messages.setdefault(tuple(first[c] for c in by), []).append(text)
    joined = {k: "; ".join(v) for k, v in messages.items()}
    warnings.warn("bookkeeping duplicates (one sweep ran one configuration and seed more than once; only the first "
                  "started run counts): " + "; ".join(joined.values()), DuplicateRunsWarning, stacklevel=3)
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


def layer_metrics(runs: pd.DataFrame, prefix: str, suffix: str = "") -> pd.DataFrame:
    """Long frame (run_id, layer, branch, value) of per-layer metrics: `{prefix}/L{i}/{branch}` (mixer,
    rms) without a suffix, `{prefix}/{branch}/L{i}{suffix}` or `{prefix}/{branch}/all{suffix}` with one
    (knockout; layer "all" = the branch zeroed in every layer)."""
    pattern = (re.compile(rf"^{re.escape(prefix)}/L(?P<layer>\d+)/(?P<branch>\w+)$") if not suffix else
               re.compile(rf"^{re.escape(prefix)}/(?P<branch>\w+)/(?:L(?P<layer>\d+)|(?P<all>all)){re.escape(suffix)}$"))
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


LONGCTX_METRIC = re.compile(r"^longctx/(?P<split>[^/]+)/C(?P<context>\d+)/"
                            r"(?:(?P<kind>window|position)/(?P<lo>\d+)-(?P<hi>\d+)/)?(?P<metric>ppl|bpb)$")


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
                row = rows.setdefault((run_id, context, kind, lo, hi), {"run_id": run_id, "context": context,
                                                                         "kind": kind, "lo": lo, "hi": hi})
                row[match["metric"]] = float(value)
    frame = pd.DataFrame(list(rows.values()), columns=["run_id", "context", "kind", "lo", "hi", "ppl", "bpb"])
    tags = runs.set_index("run_id") if len(runs) else pd.DataFrame()
    for key in ("stride", "max_book_tokens", "books"):
        frame[key] = [tags.at[r, f"longctx.{split}.C{c}.{key}"] if f"longctx.{split}.C{c}.{key}" in tags else np.nan
                      for r, c in zip(frame["run_id"], frame["context"])]
    return frame

"""`pha-lab tables`: execute the analysis notebooks (analysis/*.ipynb) headlessly with papermill, and what each
notebook's first cells call: which sweeps give it rows (`DEFAULT_SWEEPS`, `sweeps_for`), where it writes
(`out_dir`), and the line it prints about the runs it found (`status_line`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from pha_lab.analysis.efficiency import EFFICIENCY_CSV, resolve_path
from pha_lab.analysis.rows import in_scope
from pha_lab.analysis.runs import load_runs
from pha_lab.analysis.tables import datasets_with_runs
from pha_lab.config import PROJECT_ROOT

OUT_DIR = PROJECT_ROOT / "analysis" / "out"
NOTEBOOK_DIR = PROJECT_ROOT / "analysis"
NOTEBOOKS = ("perplexity", "ablation", "mixing", "mqar", "efficiency", "long_context")
# Which sweeps (MLflow experiments) give each notebook its rows unless told otherwise (a row's statistics pool every
# run of its configuration in the store); `smoke` last, so that `make sweep NAME=smoke && make tables` fills the
# tables on a CPU machine.
DEFAULT_SWEEPS = {
    "perplexity": ["baselines", "scale", "repro_baselines", "smoke"],
    "ablation": ["ablation", "repro_ablation", "smoke"],
    "mixing": ["ablation", "baselines", "scale", "repro_ablation", "repro_baselines", "smoke"],
    "mqar": ["mqar", "repro_mqar"],
    "efficiency": ["efficiency"],
    "long_context": ["long_context", "repro_baselines"],
}


def status_line(runs: pd.DataFrame, sweeps: list[str], uri: str) -> str:
    """The one line a notebook prints about what it found: the runs of `sweeps`, and how many runs of the same
    configurations other sweeps add to the pool."""
    scope = in_scope(runs, sweeps)
    mine = scope[scope["experiment"].isin(sweeps)] if len(scope) else scope
    if mine.empty:
        return f"No runs yet in sweep(s) {', '.join(sweeps)} at {uri}: rendering the empty table skeleton."
    counts = mine["status"].value_counts()
    others = scope[~scope["experiment"].isin(sweeps)]
    pooled = (
        f"; pooled with {len(others)} run(s) of the same configurations in "
        f"{', '.join(sorted(others['experiment'].unique()))}"
        if len(others)
        else ""
    )
    return (
        f"{len(mine)} run(s) in {', '.join(sorted(mine['experiment'].unique()))} at {uri} "
        f"({', '.join(f'{n} {s}' for s, n in counts.items())}){pooled}."
    )


def sweeps_for(notebook: str, sweeps: list[str] | str | None = None) -> list[str]:
    """The sweeps a notebook reads: its `sweeps` parameter as a list, or its DEFAULT_SWEEPS when None."""
    if sweeps is None:
        return list(DEFAULT_SWEEPS[notebook])
    return [sweeps] if isinstance(sweeps, str) else list(sweeps)


def out_dir(path: str | Path | None = None) -> Path:
    """Where a notebook writes its tables and figures: its `out_dir` parameter, else analysis/out."""
    return Path(path) if path else OUT_DIR


def render_notebooks(
    tracking_uri: str,
    out: str | Path = OUT_DIR,
    sweeps: dict[str, list[str]] | None = None,
    notebooks: Iterable[str] = NOTEBOOKS,
    efficiency_csv: str | None = EFFICIENCY_CSV,
    datasets: list[str] | None = None,
    jobs_at_once: int = 2,
    log=print,
) -> list[str]:
    """Execute the analysis notebooks headlessly (papermill) into `out`; return the failures.

    The perplexity notebook runs once per dataset that has runs (or once for WikiText-103, showing
    the paper's numbers beside an empty table)."""
    import papermill as pm  # start-up time: ~1 s (and a Jupyter stack), only to render the notebooks

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
            csv = str(resolve_path(efficiency_csv)) if efficiency_csv else None
            jobs.append((nb, nb, {**params, "csv": csv}))
        else:
            jobs.append((nb, nb, params))

    def execute(job) -> str | None:
        nb, name, params = job
        target = out / f"{name}.ipynb"
        log(f"[tables] {nb}.ipynb -> {target}")
        try:
            pm.execute_notebook(
                str(NOTEBOOK_DIR / f"{nb}.ipynb"),
                str(target),
                parameters=params,
                kernel_name="python3",
                progress_bar=False,
                cwd=str(PROJECT_ROOT),
            )
        except Exception as exc:  # PapermillExecutionError names the failing cell; a dead kernel lands here too
            print(f"[tables] FAILED {name} (executed notebook: {target}):\n{exc}", file=sys.stderr)
            return f"{name}: {type(exc).__name__}"
        return None

    # Each notebook is its own kernel process, mostly importing: run `jobs_at_once` of them at a time.
    with ThreadPoolExecutor(max(1, jobs_at_once)) as pool:
        return [f for f in pool.map(execute, jobs) if f]

"""What a sweep reports: its MLflow parent run (found or created once, however many machines join), the progress
line each worker prints, and the summary table of every trial that the last worker to end logs on the parent run.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from pha_lab import tracking
from pha_lab.sweep.spec import SweepSpec


def parent_run(spec: SweepSpec, tracking_cfg: DictConfig, sweep_path: Path, study) -> str:
    """The sweep's parent run: reused when the sweep is resumed or joined from another machine."""
    client = tracking.client(tracking.tracking_uri(tracking_cfg))
    existing = study.user_attrs.get("mlflow_parent_run_id")
    if existing:
        return existing
    exp_id = tracking.ensure_experiment(client, spec.name, tracking_cfg)
    found = client.search_runs([exp_id], filter_string="tags.sweep_parent = 'true'", max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        tags = {
            **tracking.git_info(),
            "sweep": spec.name,
            "sweep_parent": "true",
            "mlflow.note.content": spec.description,
        }
        run_id = client.create_run(exp_id, run_name=f"sweep:{spec.name}", tags=tags).info.run_id
        client.log_artifact(run_id, str(sweep_path))
        client.log_text(run_id, spec.to_yaml(), "sweep.resolved.yaml")  # after `extends:`
        client.log_param(run_id, "n_cells", len(spec.cells()))
    study.set_user_attr("mlflow_parent_run_id", run_id)
    return run_id


def progress(study, spec: SweepSpec) -> str:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    done = count[TrialState.COMPLETE] + count[TrialState.PRUNED]
    total = spec.n_trials if spec.is_search else len(spec.cells())
    retried = {t.system_attrs.get("failed_trial") for t in trials if "failed_trial" in t.system_attrs}
    failed = sum(t.state == TrialState.FAIL and t.number not in retried for t in trials)
    left = max(0, total - done - failed - count[TrialState.RUNNING])
    try:
        best = f"best {spec.metric} {study.best_value:.4g} ({study.best_trial.params.get('cell')})"
    except ValueError:
        best = "best: none yet"
    return (
        f"[sweep {spec.name}] done {done}/{total}  running {count[TrialState.RUNNING]}  "
        f"failed {failed}  left {left}  | {best}"
    )


def summary_table(study):
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "trial": t.number,
                "cell": t.params.get("cell") or t.system_attrs.get("fixed_params", {}).get("cell"),
                "state": t.state.name,
                "value": t.value,
                "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                "failure_reason": t.user_attrs.get("failure_reason"),
                "retry_of": t.system_attrs.get("failed_trial"),
                **{k: v for k, v in t.params.items() if k != "cell"},
            }
        )
    return pd.DataFrame(rows)


def finish(spec: SweepSpec, study, tracking_cfg: DictConfig, parent_id: str, status: str = "FINISHED"):
    """Summary table (CSV artifact on the parent run); the parent is FINISHED only when no cell is left.
    While a trial is RUNNING (on another worker or machine, or on a dead one not found stale yet), this
    worker writes nothing: the last worker to end writes it (else a late, partial table could win)."""
    table = summary_table(study)
    if table.state.eq("RUNNING").any():
        print(f"{progress(study, spec)}  (the last worker to end writes the summary)", flush=True)
        return table
    out = tracking.runs_dir(tracking_cfg) / "sweeps" / spec.name / "summary.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    client = tracking.client(tracking_cfg.tracking_uri)
    client.log_artifact(parent_id, str(out))
    unfinished = table.empty or table.state.isin(["WAITING", "RUNNING"]).any()
    client.set_terminated(parent_id, "KILLED" if status != "FINISHED" or unfinished else "FINISHED")
    print(progress(study, spec), flush=True)
    return table

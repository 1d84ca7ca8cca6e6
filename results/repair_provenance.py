"""One-off repair of the provenance of the committed H100 results (issue 11, item 4). Idempotent.

    .venv/bin/python results/repair_provenance.py      # from the project root

What was wrong: until the fix, `tracking.git_info()` ignored git's exit code. On the GPU machine the
project is a copy without `.git`, where `git rev-parse HEAD` fails after printing the word "HEAD" and
`git status` fails with no output, so every run in results/mlflow.db recorded git_sha="HEAD" and
git_dirty="false", and so did the benchmark (the H100 one, now docs/benchmarks/h100/efficiency.header.json, and
the CSV's git_sha column). Neither value says anything.

What is known instead (so this is what the tags now say):
- the commit: ccfaa05, named by README.md ("Results": "commit `ccfaa05`") and docs/benchmarks.md. It is
  the last commit before the runs (committed 18:41:39 UTC; the runs started 18:42:56-18:56:04 and the
  benchmark header is dated 18:59:44, 2026-11-27; the next commit, 24a8439, only adds these results)
  and the first with the runs' budget (600 steps, warmup 60, in each run's config.yaml artifact);
- whether the GPU machine's copy had uncommitted changes: not recorded, so git_dirty="unknown";
- the sweep command (first line of results/sweeps/<sweep>/sweep.log), set as `command` on the two sweep
  parent runs; the trials ran in that sweep's worker processes, whose command lines were not recorded.

Each repaired run keeps the recorded value in `git_sha_as_recorded` and says how it was repaired in
`provenance_note`; the sweep parents' MLflow notes (`mlflow.note.content`) say it too.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

SHA = "ccfaa0587a00adc2749a170f3b92ae3fa21a8c6c"
NOTE = (
    "Provenance repaired by results/repair_provenance.py (issue 11): the run recorded git_sha=HEAD and "
    "git_dirty=false, which the old tracking.git_info() wrote on a tree without .git (it ignored git's exit "
    f"code). git_sha={SHA} (ccfaa05) is the commit README.md and docs/benchmarks.md name: the last commit "
    "before the runs started (18:42 UTC, 2026-11-27) and the first with their 600-step budget. Whether the "
    "GPU machine's copy of the tree had uncommitted changes was not recorded: git_dirty=unknown."
)
BENCH_NOTE = (
    "Provenance repaired by results/repair_provenance.py (issue 11): the benchmark recorded git_sha=HEAD and "
    "git_dirty=false, which the old tracking.git_info() wrote on a tree without .git (it ignored git's exit "
    f"code). git_sha={SHA} (ccfaa05) is the commit docs/benchmarks.md names: the last commit before this header's "
    "date (committed 18:41:39 UTC; the next commit only adds the results). Whether the GPU machine's copy of "
    "the tree had uncommitted changes was not recorded: git_dirty=unknown."
)
ROOT = Path(__file__).resolve().parents[1]


def repair_mlflow(db: Path) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    repaired = 0
    for run in client.search_runs(experiments, max_results=10_000):
        tags, run_id = run.data.tags, run.info.run_id
        if tags.get("git_sha") != "HEAD" and "provenance_note" not in tags:
            continue  # recorded correctly (or not by this code): leave it
        client.set_tag(run_id, "git_sha_as_recorded", tags.get("git_sha_as_recorded", tags.get("git_sha")))
        client.set_tag(run_id, "git_sha", SHA)
        client.set_tag(run_id, "git_dirty", "unknown")
        client.set_tag(run_id, "provenance_note", NOTE)
        if tags.get("sweep_parent") == "true":
            log = ROOT / "results" / "sweeps" / tags["sweep"] / "sweep.log"
            client.set_tag(run_id, "command", log.read_text().splitlines()[0].strip())
            note = tags.get("mlflow.note.content", "")
            if "Provenance repaired" not in note:
                client.set_tag(run_id, "mlflow.note.content", f"{note}\n\n{NOTE}".strip())
        repaired += 1
    return repaired


def repair_bench(csv_path: Path) -> None:
    header_path = csv_path.with_name(csv_path.stem + ".header.json")
    header = json.loads(header_path.read_text())
    if header.get("git_sha") in ("HEAD", SHA):
        header.update(git_sha=SHA, git_dirty="unknown", provenance_note=BENCH_NOTE)
        header_path.write_text(json.dumps(header, indent=1))  # as pha-lab bench writes it
    with csv_path.open(newline="") as f:
        rows = list(csv.reader(f))
    col = rows[0].index("git_sha")
    for row in rows[1:]:
        if row[col] == "HEAD":
            row[col] = SHA
    with csv_path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


if __name__ == "__main__":
    n = repair_mlflow(ROOT / "results" / "mlflow.db")
    repair_bench(ROOT / "docs" / "benchmarks" / "h100" / "efficiency.csv")
    print(f"repaired provenance tags of {n} runs in results/mlflow.db and the benchmark CSV/header in docs/benchmarks/")

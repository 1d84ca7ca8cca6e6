"""Shared fixtures (the shared assertion bodies and preset lists are in bodies.py).

- `shared_data`: the offline data root (../shared/data, or $PHA_DATA_DIR), found as the code finds it. A test that
  needs it FAILS, naming the path and PHA_DATA_DIR, when it is missing: it never skips.
- `tiny_config`: a tiny preset as a CPU run tracked under the test's tmp_path (the presets set the tiny widths,
  depths and context; a test adds the steps and whatever else its numbers depend on).
- `family_preset`: parametrises a test over the model families, one tiny preset each, with the family as the id
  (`test_causal_every_family[gss_hybrid]`).
- `one_thread`: tiny models run several times faster on one torch thread than on two shared ones.
- `empty_mlflow_store`: MLflow's schema made once and copied into each run's folder (creating it costs ~5 s a run).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from bodies import FAMILIES, run_config

from pha_lab import PROJECT_ROOT

DATA_FOLDERS = ("gpt2-tokenizer", "pd-english-novels", "wikitext", "openwebtext-sample")  # what the tests read


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolate_mlflow_env(monkeypatch):
    """mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into os.environ; keep tests (and the
    subprocesses they start) from inheriting another test's database."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The local data root (`data.data_dir` unset: $PHA_DATA_DIR, else ../shared/data beside the project), holding
    every folder in DATA_FOLDERS; a missing root or folder fails the test with the path and the fix."""
    from pha_lab.data import DataError, data_root  # (the data package takes ~0.6 s to import)

    default = PROJECT_ROOT.parent / "shared" / "data"
    try:
        root = data_root(SimpleNamespace(data_dir=None))
    except DataError as exc:  # PHA_DATA_DIR set to something that is not a directory
        pytest.fail(f"offline data not found: {exc}", pytrace=False)
    if root is None:
        pytest.fail(
            f"offline data not found: {default} does not exist; set PHA_DATA_DIR to the shared data folder "
            f"(the project's ../shared/data)",
            pytrace=False,
        )
    missing = [name for name in DATA_FOLDERS if not (root / name).is_dir()]
    if missing:
        pytest.fail(
            f"offline data incomplete: {root} lacks {', '.join(missing)}; set PHA_DATA_DIR to the shared "
            f"data folder (the project's ../shared/data)",
            pytrace=False,
        )
    return root


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store holding MLflow's schema and nothing else, made once per session: creating one costs
    MLflow ~5 s (its schema migrations), a copy 0.03 s. A run tracked in a copy is tracked as in a new store
    (the store's creation on first use is still exercised: sweeps, bench, and `tiny_config(fresh_store=True)`)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_store") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{path}")
    client.search_experiments()  # creates the tables
    return path


@pytest.fixture
def tiny_config(tmp_path, shared_data, empty_mlflow_store):
    """`tiny_config("tiny_pha", "trainer.max_steps=10")`: that preset as a CPU run tracked in tmp_path/runs (MLflow
    experiment 'test'), the overrides last. `root=` another folder (two runs side by side); `fresh_store=True`
    leaves the store for the run to create."""

    def make(experiment: str = "tiny_pha", *overrides: str, root: Path | None = None, fresh_store: bool = False):
        return run_config(root or tmp_path, experiment, *overrides, store=None if fresh_store else empty_mlflow_store)

    return make


@pytest.fixture(params=list(FAMILIES.values()), ids=list(FAMILIES))
def family_preset(request) -> str:
    """The tiny preset of each model family (bodies.FAMILIES), one test case each, the family as the id."""
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~20x faster on one thread than on two shared ones (as the tiny presets' cpu_threads says);
    a module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

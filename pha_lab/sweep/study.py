"""The sweep's Optuna study: storage, creation by exactly one process, per-worker sampler seeds, and the atomic
bookkeeping that decides which worker runs which trial (claims, stale trials, the grid's queue, heartbeats).

- Storage: SQLite beside the MLflow database by default (`<runs_dir>/optuna.db`), or any RDB URL (PostgreSQL
  for several machines: each runs workers against the same study).
- Grid cells are enqueued once, in one locked transaction (also when several machines start the sweep
  together), as WAITING trials; a worker claims one with a conditional WAITING -> RUNNING UPDATE, so no two
  workers run the same cell, on SQLite as on PostgreSQL. Search trials come from the sampler (TPE / random),
  seeded per worker (`worker_seed`).
- A running trial sends heartbeats (`Heartbeat`), so one whose worker died is found stale by the next worker
  and re-queued, by exactly one worker (`fail_stale_trials`).

What runs a trial and the sweep around it: pha_lab.sweep.runner.
"""

from __future__ import annotations

import hashlib
import socket
import sys
import threading
import time
import warnings
from datetime import UTC, datetime

from omegaconf import DictConfig

from pha_lab import tracking
from pha_lab.sweep.spec import SweepSpec


def default_storage(tracking_cfg: DictConfig) -> str:
    root = tracking.runs_dir(tracking_cfg)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'optuna.db'}"


def create_study_once(spec: SweepSpec, storage_url: str, attempts: int = 8) -> bool:
    """Create the sweep's study unless it exists; True in the one process that created it. Several machines
    starting together on a fresh PostgreSQL database race on the schema (IntegrityError on `pg_type`) and
    on the study row (DuplicatedStudyError): retry the first, read the winner's study on the second."""
    import optuna
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    attempt = 0
    while True:
        try:
            optuna.create_study(study_name=spec.name, storage=storage_url, direction=spec.direction)
            return True
        except optuna.exceptions.DuplicatedStudyError:
            return False
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError):
            attempt += 1
            if attempt >= attempts:
                raise
            time.sleep(0.25 * attempt)


def wait_for_creator(study, timeout_s: float = 120.0) -> None:
    """The study was created by another process: let it create the sweep's MLflow parent run first (one
    parent run, however many machines start together), unless it has not after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while "mlflow_parent_run_id" not in study.user_attrs:
        if time.monotonic() > deadline:
            print(
                f"[sweep {study.study_name}] the study has no MLflow parent run {timeout_s:.0f} s after it was "
                "created elsewhere (that process stopped?): finding or creating it here",
                flush=True,
            )
            return
        time.sleep(1)


def worker_seed(spec: SweepSpec, worker_index: int, n_trials_at_launch: int) -> int:
    """The sampler seed of one worker: distinct per machine, per worker and per launch, reproducible.

    A hash of the sweep's first seed, this machine's hostname (machines running the same command on
    one study), the worker's index among the launcher's workers, and the number of trials the study
    held when the sweep was launched (a resumed sweep must not replay its first launch's draws).
    The same launch on the same machine draws the same seeds again."""
    key = f"{spec.seeds[0]}|{socket.gethostname()}|{worker_index}|{n_trials_at_launch}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def open_study(spec: SweepSpec, storage_url: str, sampler_seed: int | None = None):
    """(study, its RDBStorage). `sampler_seed`: this worker's `worker_seed`; the launcher, which
    never samples, leaves it None."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = optuna.storages.RDBStorage(
        storage_url,
        engine_kwargs={"connect_args": {"timeout": 60}} if storage_url.startswith("sqlite") else None,
        heartbeat_interval=spec.heartbeat_interval,
        grace_period=spec.grace_period,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retries),
    )
    # constant_liar: a TPE worker treats the others' running trials as bad, so it samples elsewhere
    sampler = (
        optuna.samplers.TPESampler(seed=sampler_seed, constant_liar=True)
        if spec.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=sampler_seed)
    )
    pruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=spec.pruning.n_startup_trials, n_warmup_steps=spec.pruning.n_warmup_steps
        )
        if spec.pruning.enabled
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        direction=spec.direction,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    return study, storage


# Atomic bookkeeping. Optuna's own state changes read the trial and then write it; the row lock
# (SELECT ... FOR UPDATE) that should make that safe is ignored by SQLite, so two workers can both
# take one WAITING trial (optuna/optuna#4002). Here every change that decides *who* runs a trial is
# a single conditional UPDATE (`... WHERE state = <expected>`) whose row count says whether this
# process won: SQLite runs writers one at a time, PostgreSQL and MySQL re-check the WHERE clause on
# the row they lock, so exactly one process wins on each engine. The SQL uses Optuna's RDB schema
# (optuna.storages._rdb.models, Optuna pinned in requirements.lock) through the storage's engine.
def _transition(storage, trial_id: int, old, new) -> bool:
    """Set a trial's state from `old` to `new` iff it is still `old`; True if this call did it."""
    import sqlalchemy as sa
    from optuna.storages._rdb.models import TrialModel
    from optuna.trial import TrialState

    now = datetime.now(UTC).replace(tzinfo=None)  # Optuna stores naive UTC datetimes
    trials = TrialModel.__table__
    values = {"state": new}
    if new == TrialState.RUNNING:
        values["datetime_start"] = now
    if new.is_finished():
        values["datetime_complete"] = now
    with storage.engine.begin() as conn:
        changed = conn.execute(
            sa.update(trials).where(trials.c.trial_id == trial_id, trials.c.state == old).values(**values)
        ).rowcount
    return changed == 1


def claim_waiting(study, storage):
    """Take one WAITING trial (WAITING -> RUNNING, atomic), or None when none is left."""
    import optuna
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if _transition(storage, t._trial_id, TrialState.WAITING, TrialState.RUNNING):
            storage.record_heartbeat(t._trial_id)  # stale-checkable from the start
            return optuna.Trial(study, t._trial_id)
    return None


def fail_stale_trials(study, storage) -> list[int]:
    """optuna.storages.fail_stale_trials, with the RUNNING -> FAIL change atomic: a dead worker's
    trial is failed, and re-queued by the storage's retry callback, by exactly one live worker.
    Returns the numbers of the trials this call failed."""
    import copy

    from optuna.trial import TrialState

    failed = []
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        if _transition(storage, trial_id, TrialState.RUNNING, TrialState.FAIL):
            frozen = copy.deepcopy(storage.get_trial(trial_id))
            storage.get_heartbeat_stale_trial_callback()(study, frozen)
            failed.append(frozen.number)
    return failed


def enqueue_grid(study, storage, spec: SweepSpec, retry_failed: bool = False) -> int:
    """Queue every cell not yet in the study; with retry_failed, also cells that only failed.

    Idempotent also when several machines start the sweep at once: the check and the inserts are
    one transaction that begins by writing the study's row. That write is the lock Optuna's own
    trial creation takes (SELECT ... FOR UPDATE on `studies`), and on SQLite it takes the database's
    write lock at once (as BEGIN IMMEDIATE would), so a second enqueuer waits and then sees the
    first one's cells. (A unique marker row per cell would do it too, but --retry-failed must queue
    a cell again, and the marker would have to count generations.) The trials are written as
    `study.enqueue_trial({"cell": key}, user_attrs=...)` writes them, which cannot join a transaction."""
    import json

    import sqlalchemy as sa
    from optuna.storages._rdb import models
    from optuna.trial import TrialState
    from sqlalchemy.orm import Session

    if spec.is_search:
        return 0
    Trial, System, User = models.TrialModel, models.TrialSystemAttributeModel, models.TrialUserAttributeModel
    study_id = study._study_id
    alive = {TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED}
    added = 0
    with Session(storage.engine) as session, session.begin():
        studies = models.StudyModel.__table__
        session.execute(
            sa.update(studies).where(studies.c.study_id == study_id).values(study_name=studies.c.study_name)
        )  # the lock, held to commit
        by_cell: dict[str, set] = {}
        rows = session.execute(
            sa.select(Trial.state, System.value_json)
            .join(System, System.trial_id == Trial.trial_id)
            .where(Trial.study_id == study_id, System.key == "fixed_params")
        )
        for state, fixed in rows:
            by_cell.setdefault(json.loads(fixed).get("cell"), set()).add(state)
        for key in spec.cells():
            states = by_cell.get(key, set())
            if states and not (retry_failed and not states & alive):
                continue
            trial = Trial(study_id=study_id, number=None, state=TrialState.WAITING)
            session.add(trial)
            session.flush()
            trial.number = trial.count_past_trials(session)
            session.add_all(
                [
                    System(trial_id=trial.trial_id, key="fixed_params", value_json=json.dumps({"cell": key})),
                    User(trial_id=trial.trial_id, key="retry_of_failed", value_json=json.dumps(bool(states))),
                ]
            )
            added += 1
    return added


def tell(study, trial, value: float | None = None, state=None) -> bool:
    """study.tell that tolerates a trial already finished elsewhere (another worker failed it as
    stale while this one's heartbeats were late): say so and go on. True if this call finished it."""
    import optuna

    try:
        study.tell(trial, value, state=state)
        return True
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        now = study._storage.get_trial(trial._trial_id).state
        if not now.is_finished():
            raise
        print(
            f"[sweep {study.study_name}] trial {trial.number} was already {now.name} (failed as stale by "
            f"another worker?); its result ({state.name if state else value}) is not recorded",
            file=sys.stderr,
        )
        return False


def next_trial(study, storage, spec: SweepSpec):
    """The next trial this worker runs: a queued one (grid cells, re-queued trials), else for a
    search a newly sampled one while the budget lasts; None when there is nothing left."""
    from optuna.trial import TrialState

    fail_stale_trials(study, storage)  # dead workers' trials -> FAIL + re-queued copy
    trial = claim_waiting(study, storage)
    if trial is None and spec.is_search:
        started = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.state != TrialState.WAITING and "failed_trial" not in t.system_attrs
        ]
        if len(started) < spec.n_trials:
            trial = study.ask()
    return trial


class Heartbeat:
    """Records the trial's heartbeat every `interval` s (Optuna's RDB heartbeat protocol)."""

    def __init__(self, storage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.is_set():
            self.storage.record_heartbeat(self.trial_id)
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

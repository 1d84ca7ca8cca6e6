"""Sweep files: a base experiment, fixed overrides, a grid of axes, an optional Optuna search space.

    name: smoke
    experiment: tiny_pha                 # base preset of every trial
    overrides: {trainer.max_steps: 60}   # applied to every trial
    grid:                                # the cross product of the axes (x seeds) is the set of cells
      model:                             # a *bundle* axis: named sets of overrides (may switch experiment)
        pha: {}
        transformer: {experiment: tiny_transformer}
      model.mixer: [static, gate]        # a *key* axis: a config key and its values
    search:                              # sampled by Optuna on top of each cell (hpo sweeps)
      optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    seeds: [0, 1, 2]
    objective: {metric: val/loss, direction: minimize}
    post_eval:                           # evaluations of each trial's run after it trained (training/post_eval.py)
      long_context: {contexts: [1024, 4096], window_bucket: 256}

A sweep may `extends:` another (a name in sweeps/ or a path) and change only what differs: mappings merge key by
key, lists are replaced, a grid axis or search parameter named again is replaced whole (in its place), and one
set to null is removed; `name` must be the file's own. The file loads through the structured schema below
(`pha_lab.loading.load_yaml`, as experiments and bench specs do), so a misspelt key or a wrong type fails naming
the file, the key and the nearest valid keys. Then everything else is validated before any trial starts: axis keys
that are not config keys and cells whose config would be invalid are reported together.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf

from pha_lab.config import BENCH_DIR, PROJECT_ROOT, ConfigError, load_config, load_yaml, resolve_yaml, yaml_names
from pha_lab.training.post_eval import PostEval

SWEEPS_DIR = PROJECT_ROOT / "sweeps"
SEARCH_TYPES = ("float", "int", "categorical")


@dataclass
class SearchSpace:
    """One sampled config key: float or int in [low, high] (log-uniform if `log`), or one of `choices`."""

    type: str = MISSING  # float | int | categorical
    low: Any = None
    high: Any = None
    log: bool = False
    choices: list[Any] | None = None


@dataclass
class Objective:
    metric: str = "val/loss"  # a val/... or test/... metric the runs log
    direction: str = "minimize"  # minimize | maximize


@dataclass
class Pruning:
    """Optuna's median pruner on the validation objective, reported at optimizer steps (sweep/pruning.py)."""

    enabled: bool = False
    n_startup_trials: int = 2  # finished trials never pruned (the median's base)
    n_warmup_steps: int = 0  # optimizer steps before a trial may be pruned


@dataclass
class SweepSpec:
    name: str = MISSING  # the Optuna study and the MLflow experiment
    experiment: str = MISSING
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)  # axis -> list of values, or mapping label -> bundle
    search: dict[str, SearchSpace | None] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    objective: Objective = field(default_factory=Objective)
    n_trials: int | None = None  # search sweeps: total sampled trials (the grid cell is sampled too)
    sampler: str = "tpe"  # tpe | random (search sweeps)
    pruning: Pruning = field(default_factory=Pruning)
    gpus_per_trial: int = 1
    max_retries: int = 2  # re-runs of a trial whose worker died (heartbeat), from its checkpoint
    heartbeat_interval: int = 30  # seconds between a running trial's heartbeats
    grace_period: int = 120  # a RUNNING trial without heartbeat for this long is taken as dead
    description: str = ""
    post_eval: PostEval = field(default_factory=PostEval)  # run on each trial's run after training

    # ----------------------------------------------------------------- cells
    def axes(self) -> list[tuple[str, list[tuple[str, dict[str, Any]]]]]:
        """[(axis, [(label, overrides)])]; a key axis's label is its value."""
        out = []
        for axis, values in self.grid.items():
            if isinstance(values, dict):
                out.append((axis, [(str(label), dict(bundle or {})) for label, bundle in values.items()]))
            else:
                out.append((axis, [(_fmt(v), {axis: v}) for v in values]))
        return out

    def cells(self) -> dict[str, dict[str, Any]]:
        """cell key -> {"experiment", "overrides", "seed", "labels"} for the whole grid x seeds."""
        axes = self.axes()
        result = {}
        for combo in itertools.product(*[choices for _, choices in axes]) if axes else [()]:
            overrides, experiment, labels = dict(self.overrides), self.experiment, {}
            for (axis, _), (label, bundle) in zip(axes, combo):
                bundle = dict(bundle)
                experiment = bundle.pop("experiment", experiment)
                overrides.update(bundle)
                labels[axis] = label
            for seed in self.seeds:
                key = ",".join([f"{a}={lab}" for a, lab in labels.items()] + [f"seed={seed}"])
                result[key] = {
                    "experiment": experiment,
                    "overrides": {**overrides, "seed": seed},
                    "seed": seed,
                    "labels": labels,
                }
        return result

    def cell_config(
        self, cell: dict[str, Any], params: dict[str, Any] | None = None, extra: list[str] = ()
    ) -> DictConfig:
        overrides = {**cell["overrides"], **(params or {})}
        return load_config(cell["experiment"], [f"{k}={_yaml_value(v)}" for k, v in overrides.items()] + list(extra))

    @property
    def is_search(self) -> bool:
        return bool(self.search)

    @property
    def metric(self) -> str:
        return self.objective.metric

    @property
    def direction(self) -> str:
        return self.objective.direction

    def to_yaml(self) -> str:
        """The resolved spec (after `extends:`), as the parent run records it."""
        return OmegaConf.to_yaml(OmegaConf.structured(self))


def _fmt(value: Any) -> str:
    return str(value).replace(" ", "")


def _yaml_value(value: Any) -> str:
    """A value as it must appear after `key=` in a dotlist override."""
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return "null" if value is None else str(value)


def sweep_names() -> list[str]:
    return yaml_names(SWEEPS_DIR)


def sweep_path(name_or_path: str) -> Path:
    """A sweep YAML path, or a bare name in sweeps/ (a bench spec's name gets pointed to `pha-lab bench`)."""
    if (
        not Path(name_or_path).is_file()
        and not (SWEEPS_DIR / f"{name_or_path}.yaml").is_file()
        and (BENCH_DIR / f"{name_or_path}.yaml").is_file()
    ):
        raise ConfigError(
            f"'{name_or_path}' is a benchmark spec ({BENCH_DIR.name}/{name_or_path}.yaml), not a sweep: "
            f"run it with `pha-lab bench {name_or_path}` (bench specs live in {BENCH_DIR}, sweeps in {SWEEPS_DIR})"
        )
    return resolve_yaml(name_or_path, SWEEPS_DIR, "sweep")


def read_sweep(name_or_path: str) -> SweepSpec:
    """The sweep file through the typed schema, after its `extends:` chain; its cells are not checked yet."""
    raw = load_yaml(SweepSpec, sweep_path(name_or_path), SWEEPS_DIR, "sweep", replace=("grid", "search"), own=("name",))
    spec: SweepSpec = OmegaConf.to_object(raw)
    spec.grid = {axis: values for axis, values in spec.grid.items() if values is not None}  # null: axis removed
    spec.search = {key: space for key, space in spec.search.items() if space is not None}
    return spec


def load_sweep(name_or_path: str, extra: list[str] = ()) -> SweepSpec:
    """Read and validate a sweep; `extra` overrides apply to every trial (checked too)."""
    spec = read_sweep(name_or_path)
    validate_sweep(spec, list(extra), sweep_path(name_or_path))
    return spec


def validate_sweep(spec: SweepSpec, extra: list[str], path: Path | str = "sweep") -> None:
    if spec.direction not in ("minimize", "maximize"):
        raise ConfigError(f"{path}: objective.direction must be minimize or maximize, got '{spec.direction}'")
    if not spec.metric.startswith(("val/", "test/")):
        raise ConfigError(f"{path}: objective.metric must be a val/... or test/... metric, got '{spec.metric}'")
    if spec.sampler not in ("tpe", "random"):
        raise ConfigError(f"{path}: sampler must be tpe or random, got '{spec.sampler}'")
    if spec.pruning.enabled and not spec.metric.startswith("val/"):
        raise ConfigError(f"{path}: pruning needs a val/... objective metric (it is reported at each validation)")
    if spec.pruning.enabled and spec.gpus_per_trial > 1:
        raise ConfigError(f"{path}: pruning with gpus_per_trial > 1 (DDP) is not supported")
    if spec.is_search and not spec.n_trials:
        raise ConfigError(f"{path}: a sweep with a `search` space needs n_trials (the total number of sampled trials)")
    for key, dist in spec.search.items():
        if dist.type not in SEARCH_TYPES:
            raise ConfigError(f"{path}: search.{key}.type must be one of {', '.join(SEARCH_TYPES)}, got '{dist.type}'")
        if dist.type == "categorical" and not dist.choices:
            raise ConfigError(f"{path}: search.{key} needs a non-empty `choices` list")
        if dist.type != "categorical" and not (dist.low is not None and dist.high is not None and dist.low < dist.high):
            raise ConfigError(f"{path}: search.{key} needs low < high")
    for axis, values in spec.grid.items():
        if not isinstance(values, (list, dict)) or not values:
            raise ConfigError(
                f"{path}: grid axis '{axis}' must be a non-empty list of values or a mapping of named bundles"
            )
    try:
        spec.post_eval.check()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    errors = []
    cells = spec.cells()
    for key, cell in cells.items():
        try:
            corner = {k: (d.choices[0] if d.type == "categorical" else d.low) for k, d in spec.search.items()}
            spec.post_eval.check(spec.cell_config(cell, corner, extra))
        except ConfigError as exc:
            errors.append(f"  cell {key}: {exc}")
    if errors:
        raise ConfigError(f"{path}: {len(errors)} of {len(cells)} cells have invalid configs:\n" + "\n".join(errors))


def suggest(trial, spec: SweepSpec) -> dict[str, Any]:
    """Sample the search space on an Optuna trial."""
    params = {}
    for key, d in spec.search.items():
        if d.type == "float":
            params[key] = trial.suggest_float(key, d.low, d.high, log=d.log)
        elif d.type == "int":
            params[key] = trial.suggest_int(key, d.low, d.high, log=d.log)
        else:
            params[key] = trial.suggest_categorical(key, list(d.choices))
    return params

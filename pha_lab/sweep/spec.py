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

Everything is validated before any trial starts: unknown sweep keys, axis keys that are not config
keys, and cells whose config would be invalid are all reported together.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from pha_lab.config import BENCH_DIR, PROJECT_ROOT, ConfigError, load_config

SWEEPS_DIR = PROJECT_ROOT / "sweeps"
SEARCH_TYPES = ("float", "int", "categorical")


@dataclass
class SweepSpec:
    name: str
    experiment: str
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)
    search: dict[str, dict] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    objective: dict[str, str] = field(default_factory=lambda: {"metric": "val/loss", "direction": "minimize"})
    n_trials: int | None = None  # search sweeps: total sampled trials (the grid cell is sampled too)
    sampler: str = "tpe"  # tpe | random (search sweeps)
    pruning: dict[str, Any] = field(default_factory=dict)  # {enabled, n_startup_trials, n_warmup_steps (optimizer steps)}
    gpus_per_trial: int = 1
    max_retries: int = 2  # re-runs of a trial whose worker died (heartbeat), from its checkpoint
    heartbeat_interval: int = 30  # seconds between a running trial's heartbeats
    grace_period: int = 120  # a RUNNING trial without heartbeat for this long is taken as dead
    description: str = ""

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
                result[key] = {"experiment": experiment, "overrides": {**overrides, "seed": seed},
                               "seed": seed, "labels": labels}
        return result

    def cell_config(self, cell: dict[str, Any], params: dict[str, Any] | None = None,
                    extra: list[str] = ()) -> DictConfig:
        overrides = {**cell["overrides"], **(params or {})}
        return load_config(cell["experiment"], [f"{k}={_yaml_value(v)}" for k, v in overrides.items()] + list(extra))

    @property
    def is_search(self) -> bool:
        return bool(self.search)

    @property
    def metric(self) -> str:
        return self.objective["metric"]

    @property
    def direction(self) -> str:
        return self.objective.get("direction", "minimize")


def _fmt(value: Any) -> str:
    return str(value).replace(" ", "")


def _yaml_value(value: Any) -> str:
    """A value as it must appear after `key=` in a dotlist override."""
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return "null" if value is None else str(value)


def sweep_names() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def load_sweep(name_or_path: str, extra: list[str] = ()) -> SweepSpec:
    """Read and validate a sweep; `extra` overrides apply to every trial (checked too)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = SWEEPS_DIR / f"{name_or_path}.yaml"
    if not path.is_file() and (BENCH_DIR / f"{name_or_path}.yaml").is_file():
        raise ConfigError(f"'{name_or_path}' is a benchmark spec ({BENCH_DIR.name}/{name_or_path}.yaml), not a sweep: "
                          f"run it with `pha-lab bench {name_or_path}` (bench specs live in {BENCH_DIR}, sweeps in {SWEEPS_DIR})")
    if not path.is_file():
        near = difflib.get_close_matches(str(name_or_path), sweep_names(), n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        raise ConfigError(f"unknown sweep '{name_or_path}'.{hint} Available sweeps: {', '.join(sweep_names())}")
    raw = yaml.safe_load(path.read_text()) or {}
    valid = [f.name for f in fields(SweepSpec)]
    for key in raw:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            raise ConfigError(f"{path}: unknown sweep key '{key}'" + (f"; did you mean {', '.join(near)}?" if near else "")
                              + f" Valid keys: {', '.join(valid)}")
    for key in ("name", "experiment"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required key '{key}'")
    spec = SweepSpec(**raw)
    validate_sweep(spec, list(extra), path)
    return spec


def validate_sweep(spec: SweepSpec, extra: list[str], path: Path | str = "sweep") -> None:
    if spec.direction not in ("minimize", "maximize"):
        raise ConfigError(f"{path}: objective.direction must be minimize or maximize, got '{spec.direction}'")
    if not spec.metric.startswith(("val/", "test/")):
        raise ConfigError(f"{path}: objective.metric must be a val/... or test/... metric, got '{spec.metric}'")
    if spec.sampler not in ("tpe", "random"):
        raise ConfigError(f"{path}: sampler must be tpe or random, got '{spec.sampler}'")
    if spec.pruning.get("enabled") and not spec.metric.startswith("val/"):
        raise ConfigError(f"{path}: pruning needs a val/... objective metric (it is reported at each validation)")
    if spec.pruning.get("enabled") and spec.gpus_per_trial > 1:
        raise ConfigError(f"{path}: pruning with gpus_per_trial > 1 (DDP) is not supported")
    if spec.is_search and not spec.n_trials:
        raise ConfigError(f"{path}: a sweep with a `search` space needs n_trials (the total number of sampled trials)")
    for key, dist in spec.search.items():
        kind = dist.get("type")
        if kind not in SEARCH_TYPES:
            raise ConfigError(f"{path}: search.{key}.type must be one of {', '.join(SEARCH_TYPES)}, got '{kind}'")
        if kind == "categorical" and not dist.get("choices"):
            raise ConfigError(f"{path}: search.{key} needs a non-empty `choices` list")
        if kind != "categorical" and not ("low" in dist and "high" in dist and dist["low"] < dist["high"]):
            raise ConfigError(f"{path}: search.{key} needs low < high")
    for axis, values in spec.grid.items():
        if not isinstance(values, (list, dict)) or not values:
            raise ConfigError(f"{path}: grid axis '{axis}' must be a non-empty list of values or a mapping of named bundles")
    errors = []
    cells = spec.cells()
    for key, cell in cells.items():
        try:
            corner = {k: (d["choices"][0] if d["type"] == "categorical" else d["low"]) for k, d in spec.search.items()}
            spec.cell_config(cell, corner, extra)
        except ConfigError as exc:
            errors.append(f"  cell {key}: {exc}")
    if errors:
        raise ConfigError(f"{path}: {len(errors)} of {len(cells)} cells have invalid configs:\n" + "\n".join(errors))


def suggest(trial, spec: SweepSpec) -> dict[str, Any]:
    """Sample the search space on an Optuna trial."""
    params = {}
    for key, d in spec.search.items():
        if d["type"] == "float":
            params[key] = trial.suggest_float(key, d["low"], d["high"], log=bool(d.get("log", False)))
        elif d["type"] == "int":
            params[key] = trial.suggest_int(key, d["low"], d["high"], log=bool(d.get("log", False)))
        else:
            params[key] = trial.suggest_categorical(key, list(d["choices"]))
    return params

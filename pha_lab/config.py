"""Structured configuration: one OmegaConf schema, experiment YAML overlays, `key=value` overrides.

`load_config(path_or_name, overrides)` merges schema defaults <- experiment YAML (following its
`extends:` chain) <- dotlist overrides, then validates everything that can be checked before a
tensor is built. Every failure is a `ConfigError` whose message names the key and the fix.
Each registered branch contributes its own section `model.<name>` and validates it (pha_lab.branches).
`load_yaml` is the loader for any dataclass schema: sweeps (sweep/spec.py) and bench specs (bench/spec.py)
load through it too. This module deliberately imports no torch/lightning so that light commands stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pha_lab import PROJECT_ROOT
from pha_lab.branches import BRANCH_REGISTRY
from pha_lab.errors import ConfigError, check_choice as _choice

EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"
BENCH_DIR = PROJECT_ROOT / "bench"  # `pha-lab bench` specs (not sweeps: nothing is trained)

# Names the model code registers; a test checks that the registries agree with these tuples (branches: see
# pha_lab.branches, whose registry is the only list of them).
MIXERS = ("static", "scalar", "channel", "concat", "gate", "mean")
LAYOUTS = ("parallel", "serial")
NORMS = ("rmsnorm", "layernorm")
DATA_SOURCES = ("novels", "wikitext103", "wikitext2", "openwebtext", "text", "mqar")
PRECISIONS = ("auto", "32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# --------------------------------------------------------------------------- schema: model
@dataclass
class LayerOverride:
    """Give some layers their own layout/branches/mixer and branch settings, e.g. attention in 2 layers of a GSS
    stack, or a wider FFN where a layer has no attention.

    The layers are picked by index (`layers`) or as every layer that lacks a branch at that point (`without`).
    Besides these keys an override takes one optional section per registered branch, holding only the keys it
    changes for those layers (`ffn: {hidden: 3648}`; schema() adds these fields; a null value means "not set
    here"). Overrides apply in list order, after model.n_attn_layers."""

    layers: list[int] = field(default_factory=list)  # 0-based; negative counts from the end
    without: Optional[str] = None  # instead of layers: every layer whose branches lack this one (may be none)
    layout: Optional[str] = None
    branches: Optional[list[str]] = None
    mixer: Optional[str] = None


@dataclass
class ModelConfig:
    """The model section. Each registered branch adds its own section beside these keys, `model.<name>` (e.g.
    model.attn, model.gss, model.ffn: pha_lab.branches), when `schema()` builds the structured config."""

    # What the analysis groups runs by, logged as the run's `family` tag: pha, transformer, gss, gss_hybrid,
    # sequential_pha, and for the ablation pha_no_<branch> (removing a branch changes the architecture, so the
    # family; the mixer does not: model.mixer says it). Set by every preset and by each sweep cell that changes
    # the architecture; null: unrecorded (the tables then guess it from the layout and branches, and say so).
    family: Optional[str] = None
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    d_model: int = 768
    n_layers: int = 12
    layout: str = "parallel"  # parallel (PHA) | serial (Transformer, GSS, sequential PHA)
    branches: list[str] = field(default_factory=lambda: ["gss", "attn", "ffn"])
    mixer: str = "static"  # parallel layout only
    # Attention in only k layers (the attention-sparse PHA): the layers placed by `attention_layers` keep every
    # branch of model.branches, the others run them without `attn`. null: attention wherever model.branches says.
    n_attn_layers: Optional[int] = None
    overrides: list[LayerOverride] = field(default_factory=list)  # per-layer changes, in order (LayerOverride)
    norm: str = "rmsnorm"
    tie_embeddings: bool = True
    init_std: float = 0.02
    dropout: float = 0.0


# --------------------------------------------------------------------------- schema: data
@dataclass
class TokenizerConfig:
    name: str = "gpt2"  # hub name; "gpt2" is first looked for in <data root>/gpt2-tokenizer
    path: Optional[str] = None  # local dir with tokenizer.json or vocab.json+merges.txt (else $PHA_TOKENIZER_DIR)
    train_vocab_size: Optional[int] = None  # train a byte-level BPE of this size on the train split instead (cached)


@dataclass
class MQARConfig:
    """Multi-query associative recall (zoology's definition)."""

    vocab_size: int = 8192
    num_kv_pairs: int = 8
    power_a: float = 0.01  # query gaps follow a power law with this exponent
    random_non_queries: bool = True
    num_train_examples: int = 100_000  # a fixed training set, cycled (sample i -> example i mod this)
    num_test_examples: int = 3_000  # per eval split (valid and test use different seeds)


@dataclass
class DataConfig:
    """Data sources and the evaluation protocol; docs/data.md describes every key."""

    source: str = "novels"  # novels | wikitext103 | wikitext2 | openwebtext | text | mqar
    data_dir: Optional[str] = None  # local files root; default $PHA_DATA_DIR or ../shared/data
    hub: str = "auto"  # auto: local files first, then the Hugging Face hub | never: local only | always: hub only
    hub_revision: str = "main"  # hub dataset revision (branch, tag or commit); part of the token cache key
    wikitext_variant: str = "raw"  # raw: wikitext-*-raw-v1 (GPT-2-style PPL) | tokens: wikitext-*-v1 (<unk>)
    train_files: list[str] = field(default_factory=list)  # `text` source: files or folders (*.txt), relative
    valid_files: list[str] = field(default_factory=list)  # to the data root or the current directory
    test_files: list[str] = field(default_factory=list)
    documents: str = "file"  # `text` source: one document per file | blank_line: blank-line-separated documents
    split_seed: int = 1234  # seeded split by document where a source has no given split
    valid_fraction: Optional[float] = None  # carved from train by document; None: source default
    test_fraction: Optional[float] = None  # (text: 0.05, openwebtext: 0.0005); a positive fraction takes >= 1 doc
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = 1024
    batch_size: int = 8  # per device, per micro-batch
    eval_batch_size: int = 8
    eval_stride: Optional[int] = None  # None: non-overlapping windows of seq_len; smaller: only new tokens scored
    max_eval_tokens: Optional[int] = None  # cap on tokens scored per eval split (None: whole split)
    cache_dir: str = ".cache/tokens"  # relative: from the project root (source checkout) or the cwd
    num_proc: int = 2  # processes for tokenization (datasets.map)
    num_workers: int = 0  # DataLoader workers
    mqar: MQARConfig = field(default_factory=MQARConfig)


# --------------------------------------------------------------------------- schema: training
@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    fused: bool = True  # fused AdamW (CUDA, CPU): a non-finite step is skipped on the device, no host sync


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    val_every_n_steps: int = 200
    log_every_n_steps: int = 10
    ckpt_every_n_steps: int = 200
    accumulate_grad_batches: int = 1
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    accelerator: str = "auto"
    devices: int = 1  # per node
    num_nodes: int = 1  # > 1: a multi-node DDP job (one task per device, e.g. under SLURM)
    # torch.compile of the whole LanguageModel (+ the loss's chunk kernels): auto = on when training on a GPU, off
    # on the CPU (where compiling costs more than it gains); true | false force it
    compile: Union[bool, str] = "auto"
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    loss_chunk_tokens: int = 4096  # tokens per chunk of the LM head + cross-entropy (pha_lab.training.loss)
    test_ckpt: str = "last"  # last | best: which weights the final test evaluation uses
    early_stop_value: Optional[float] = None  # stop once the val objective reaches this (MQAR: 0.99)
    # true: two runs of one config give identical numbers on the same GPU and software (CUBLAS_WORKSPACE_CONFIG,
    # strict torch.use_deterministic_algorithms: SDPA's deterministic backward, no cuDNN attention; an op without
    # a deterministic kernel raises). Speed cost: to be measured on GPU (docs/perf-notes.md, deterministic mode)
    deterministic: bool = False
    cpu_threads: Optional[int] = None  # torch threads when training on CPU (None: torch's default)


@dataclass
class TrackingConfig:
    runs_dir: str = "runs"  # checkpoints and the default SQLite database live here
    # None: <runs_dir>/checkpoints; on a filesystem shared between machines, they resume each other's trials
    checkpoints_dir: Optional[str] = None
    tracking_uri: Optional[str] = None  # None: sqlite:///<runs_dir>/mlflow.db; any MLflow URI works
    experiment: str = "default"
    run_name: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    name: str = "unnamed"
    seed: int = 0
    resume: Optional[str] = None  # an MLflow run id to continue
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------- loading
def schema() -> DictConfig:
    """The defaults, with one `model.<name>` section per registered branch (its config dataclass) and, in every
    `model.overrides` entry, an optional per-layer section of the same keys, so a branch registered after this
    module was imported (a plugin, a test) is part of the schema too."""
    taken = {f.name for f in dataclasses.fields(ModelConfig)} | {f.name for f in dataclasses.fields(LayerOverride)}
    for name, branch in BRANCH_REGISTRY.items():
        if name in taken:
            raise ConfigError(f"branch '{name}' ({branch.module}) clashes with the key model.{name} or "
                              f"model.overrides[i].{name}: register it under another name")
    override = _schema_class("LayerOverrideSchema", [(name, Optional[_partial(name, b.config)], None)
                                                     for name, b in BRANCH_REGISTRY.items()], LayerOverride)
    override._where = "a model.overrides entry (LayerOverride)"
    model = _schema_class("ModelConfigSchema", [
        *[(name, b.config, field(default_factory=b.config)) for name, b in BRANCH_REGISTRY.items()],
        ("overrides", list[override], field(default_factory=list)),
    ], ModelConfig)
    cfg = OmegaConf.structured(Config)
    cfg.model = OmegaConf.structured(model)
    return cfg


def _partial(name: str, config: type) -> type:
    """A branch section in which every key is optional and unset (None): what an override changes."""
    hints = typing.get_type_hints(config)
    cls = _schema_class(f"LayerOverride_{name}", [(f.name, Optional[hints[f.name]], None)
                                                  for f in dataclasses.fields(config)])
    cls._where = f"a model.overrides[i].{name} section"
    return cls


def _schema_class(name: str, fields: list, base: type | None = None) -> type:
    """A dataclass built from the registry, reachable as pha_lab.config.<name> so that configs pickle
    (a fresh process rebuilds it through the module's __getattr__)."""
    cls = dataclasses.make_dataclass(name, fields, bases=(base,) if base else ())
    cls.__module__ = __name__
    globals()[name] = cls
    return cls


def __getattr__(name: str) -> Any:  # PEP 562: unpickling a config in a process that has not built the schema yet
    if name in ("LayerOverrideSchema", "ModelConfigSchema") or name.startswith("LayerOverride_"):
        schema()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- loading (every YAML of the suite)
# Experiments (Config, experiments/), sweeps (SweepSpec, sweeps/) and bench specs (BenchSpec, bench/) all load
# through `load_yaml`: one structured schema, `extends:` chains, did-you-mean errors naming the file and the key.
def yaml_names(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def experiment_names() -> list[str]:
    return yaml_names(EXPERIMENTS_DIR)


def resolve_yaml(name_or_path: str | os.PathLike, directory: Path, kind: str, relative_to: Path | None = None) -> Path:
    """A YAML path, or a bare name looked up in `directory` (`kind` names what is looked for in the error)."""
    raw = str(name_or_path)
    candidates = [Path(raw)]
    if relative_to is not None:
        candidates.insert(0, relative_to / raw)
    if not raw.endswith((".yaml", ".yml")):
        candidates.append(directory / f"{raw}.yaml")
    for path in candidates:
        if path.is_file():
            return path
    names = yaml_names(directory)
    near = difflib.get_close_matches(Path(raw).stem, names, n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    raise ConfigError(
        f"unknown {kind} '{raw}': not found (looked for a file and for {directory}/{Path(raw).stem}.yaml).{hint} "
        f"Available: {', '.join(names)}"
    )


def _read_yaml_chain(path: Path, directory: Path, kind: str, seen: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """The YAML at `path` preceded by the files its `extends:` key names (recursively): a name is looked up
    beside the file, then in `directory`."""
    if path.resolve() in [p.resolve() for p in seen]:
        raise ConfigError(f"'extends' cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml syntax errors etc.
        raise ConfigError(f"cannot parse {kind} file {path}: {exc}") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{kind} file {path} must hold a mapping at top level")
    parent = node.pop("extends", None)
    if parent is None:
        return [(path, node)]
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must name one {kind} (a name or a path), got {parent!r}")
    try:
        parent_path = resolve_yaml(parent, directory, kind, path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: 'extends: {parent}': {exc}") from None
    return [*_read_yaml_chain(parent_path, directory, kind, (*seen, path)), (path, node)]


def _keys_at(cfg: DictConfig, dotted: str) -> list[str]:
    node: Any = cfg
    for part in [p for p in dotted.split(".") if p]:
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return []
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _merge(base: DictConfig, overlay: DictConfig | dict, origin: str) -> DictConfig:
    """OmegaConf.merge with errors rewritten to name the key, its origin and the nearest valid keys."""
    try:
        return OmegaConf.merge(base, overlay)
    except ConfigKeyError as exc:
        full = str(exc.full_key or exc.key)
        parent, _, leaf = full.rpartition(".")
        valid = [k for k in _keys_at(base, parent) if not k.startswith("_")]
        where = f"'{parent}'" if parent else "the top level"
        if dataclasses.is_dataclass(exc.object_type) and exc.object_type is not OmegaConf.get_type(base) and (
            not parent or not valid
        ):
            # a key inside a list entry (model.overrides[i]: OmegaConf reports no path) or below a key with a dot
            # in its name (a sweep's search.optim.lr): name the entry's schema instead of a path
            valid = [f.name for f in dataclasses.fields(exc.object_type)]
            where = getattr(exc.object_type, "_where", f"a {exc.object_type.__name__} entry")
        near = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.5)
        hint = f" Nearest valid keys: {', '.join((parent + '.' if parent else '') + k for k in near)}." if near else ""
        raise ConfigError(
            f"unknown config key '{full}' (from {origin}).{hint} Valid keys under {where}: {', '.join(valid)}"
        ) from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).split("\n")[0]
        raise ConfigError(f"bad value for config key '{key}' (from {origin}): {msg}") from None


def load_yaml(
    schema: type | DictConfig,
    name_or_path: str | os.PathLike | None,
    directory: Path,
    kind: str,
    overrides: list[str] | tuple[str, ...] = (),
    sections: dict[str, bool] | None = None,
    replace: tuple[str, ...] = (),
    own: tuple[str, ...] = (),
) -> DictConfig:
    """The dataclass `schema`'s defaults <- the YAML's `extends:` chain, base first <- the YAML's `sections` that are
    switched on <- `key=value` overrides. Every step type-checks against the schema and fails naming the file (or
    the override), the key and the nearest valid keys; a required key (MISSING in the schema) left unset fails too.

    sections: keys holding an optional overlay of the file itself ({"cpu": True}: bench's tiny CPU version); they
        are always taken out of the result, and merged only when switched on.
    replace: mappings whose entries a later file replaces whole rather than merges into (a sweep's grid axes and
        search spaces), keeping the entry's position.
    own: keys that a file which extends another must set itself (a sweep's `name`, which keys its study).
    """
    cfg = schema.copy() if isinstance(schema, DictConfig) else OmegaConf.structured(schema)
    origin = "defaults"
    if name_or_path is not None:
        path = resolve_yaml(name_or_path, directory, kind)
        chain = _read_yaml_chain(path, directory, kind)
        for origin_path, node in chain:
            for key in replace:  # (the schema types these entries Optional)
                entries = node.get(key)
                for entry in entries if isinstance(entries, DictConfig) and cfg[key] is not None else ():
                    if entry in cfg[key]:
                        cfg[key][entry] = None  # then the merge puts the file's entry in its place
            cfg = _merge(cfg, node, str(origin_path))
        missing = [key for key in own if len(chain) > 1 and key not in chain[-1][1]]
        if missing:
            raise ConfigError(f"{path} extends {chain[-2][0]} but does not set its own {', '.join(missing)}: set it "
                              f"in {path} (an inherited value would make two {kind}s share it)")
        origin = str(path)
    for key, switched_on in (sections or {}).items():
        section = OmegaConf.to_container(cfg[key]) if cfg[key] is not None else None
        cfg[key] = None
        if switched_on and section:
            cfg = _merge(cfg, section, f"{origin}, its {key}: section")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    for override in overrides:
        try:
            node = OmegaConf.from_dotlist([override])
        except Exception as exc:
            raise ConfigError(f"cannot parse override '{override}' (YAML after '='): {str(exc).splitlines()[0]}") from None
        cfg = _merge(cfg, node, "command-line overrides")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{origin}: missing required key{'s' * (len(missing) > 1)} {', '.join(missing)}")
    return cfg


def load_config(experiment: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema defaults <- experiment YAML chain <- `key=value` overrides, validated."""
    cfg = load_yaml(schema(), experiment, EXPERIMENTS_DIR, "experiment", overrides)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation
def _branches(key: str, branches: Any) -> list[str]:
    names, registered = list(branches), tuple(BRANCH_REGISTRY)
    for b in names:
        _choice(key, b, registered, prep="in")
    if not names:
        raise ConfigError(f"{key} is empty: a layer needs at least one of {', '.join(registered)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}={names} repeats a branch")
    return names


def round_to(x: float, multiple: int = 64) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def attention_layers(n_layers: int, k: int) -> list[int]:
    """Where model.n_attn_layers=k puts attention: the middle layer of each of k equal groups of layers,
    floor((2j + 1) L / 2k) for j < k. 12 layers: k=1 -> [6], 2 -> [3, 9], 3 -> [2, 6, 10], 4 -> [1, 4, 7, 10];
    32 layers, k=4 -> [4, 12, 20, 28] (Jamba's 1-in-8 with offset 4). Never the first layer, nor the last
    while k < L/2: the ends are where PHA's paper saw GSS dominate its mixer weights."""
    return [(2 * j + 1) * n_layers // (2 * k) for j in range(k)]


def _override_layers(ov: Any, specs: list[dict[str, Any]], key: str) -> list[int]:
    """The layers (0-based, ascending) an override applies to: its `layers`, or those lacking `without`."""
    n, without = len(specs), ov.get("without")  # (get: a config saved before the key existed has none)
    if without is not None:
        _choice(f"{key}.without", without, tuple(BRANCH_REGISTRY))
        if ov.layers:
            raise ConfigError(f"{key} sets both layers={list(ov.layers)} and without={without}: pick the layers "
                              f"one way")
        return [i for i, spec in enumerate(specs) if without not in spec["branches"]]
    if not ov.layers:
        raise ConfigError(f"{key}.layers is empty: list the 0-based layer indices it applies to (or pick the "
                          f"layers lacking a branch with {key}.without)")
    for layer in ov.layers:
        if not -n <= layer < n:
            raise ConfigError(
                f"{key}.layers contains {layer}, out of range for model.n_layers={n} (valid: 0..{n - 1}, or -{n}..-1)"
            )
    return sorted({layer % n for layer in ov.layers})


def layer_specs(model: ModelConfig | DictConfig) -> list[dict[str, Any]]:
    """Every layer's resolved layout, branches, mixer and branch sections, after model.n_attn_layers and then
    model.overrides in order. `sections[b]` is model.<b> with the overrides' per-layer values for b on top;
    `keys[b]` names where it was last changed (model.<b> or model.overrides[i].<b>), for error messages.
    Validates the structure as it goes (the sections' values: `validate`)."""
    n = model.n_layers
    if n < 1:
        raise ConfigError(f"model.n_layers={n} must be >= 1")
    branches = list(model.branches)
    keep_attn = range(n)
    k = model.get("n_attn_layers")
    if k is not None:
        if "attn" not in branches:
            raise ConfigError(f"model.n_attn_layers={k} keeps the attention branch in {k} layers, but "
                              f"model.branches={branches} has no attn: add it, or set model.n_attn_layers=null")
        if not 0 <= k <= n:
            raise ConfigError(f"model.n_attn_layers={k} must be in 0..model.n_layers ({n})")
        keep_attn = attention_layers(n, k)
    specs = [{"layout": model.layout, "mixer": model.mixer, "patches": {},
              "branches": branches if i in keep_attn else [b for b in branches if b != "attn"]} for i in range(n)]
    for i, ov in enumerate(model.overrides):
        key = f"model.overrides[{i}]"
        changes = {b: {field: value for field, value in ov[b].items() if value is not None}
                   for b in BRANCH_REGISTRY if ov.get(b) is not None}
        for layer in _override_layers(ov, specs, key):
            spec = specs[layer]
            for name in ("layout", "branches", "mixer"):
                if ov[name] is not None:
                    spec[name] = list(ov[name]) if name == "branches" else ov[name]
            for b, values in changes.items():
                if b not in spec["branches"]:
                    raise ConfigError(f"{key}.{b} sets {', '.join(values) or 'nothing'} for layer {layer}, which has "
                                      f"no '{b}' branch (its branches: {spec['branches']})")
                spec["patches"].setdefault(b, []).append((key, values))
    for idx, spec in enumerate(specs):
        where = f"layer {idx} (model.layout/branches/mixer after model.n_attn_layers and model.overrides)"
        _choice(f"{where}: layout", spec["layout"], LAYOUTS)
        _branches(f"{where}: branches", spec["branches"])
        _choice(f"{where}: mixer", spec["mixer"], MIXERS)
        patches = spec.pop("patches")
        spec["sections"] = {b: OmegaConf.merge(OmegaConf.structured(BRANCH_REGISTRY[b].config), model[b],
                                               *[values for _, values in patches.get(b, [])])
                            for b in spec["branches"]}
        spec["keys"] = {b: f"{patches[b][-1][0]}.{b}" if b in patches else f"model.{b}" for b in spec["branches"]}
    return specs


def validate(cfg: DictConfig) -> None:
    """Every check that can fail before a tensor is built."""
    m = cfg.model
    _choice("model.layout", m.layout, LAYOUTS)
    _choice("model.mixer", m.mixer, MIXERS)
    _branches("model.branches", m.branches)
    _choice("model.norm", m.norm, NORMS)
    for key in ("vocab_size", "d_model"):
        if m[key] < 1:
            raise ConfigError(f"model.{key}={m[key]} must be positive")
    checked = set()
    for spec in layer_specs(m):  # each branch checks its section (per layer, with its overrides), as its dataclass
        for name, section in spec["sections"].items():
            if (spec["keys"][name], str(section)) not in checked:
                checked.add((spec["keys"][name], str(section)))
                OmegaConf.to_object(section).validate(m, spec["keys"][name])

    d = cfg.data
    _choice("data.source", d.source, DATA_SOURCES)
    _choice("data.hub", d.hub, ("auto", "never", "always"))
    _choice("data.documents", d.documents, ("file", "blank_line"))
    _choice("data.wikitext_variant", d.wikitext_variant, ("raw", "tokens"))
    for key in ("seq_len", "batch_size", "eval_batch_size", "num_proc"):
        if d[key] < 1:
            raise ConfigError(f"data.{key}={d[key]} must be >= 1")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers={d.num_workers} must be >= 0")
    if d.eval_stride is not None and not 1 <= d.eval_stride <= d.seq_len:
        raise ConfigError(f"data.eval_stride={d.eval_stride} must be in 1..data.seq_len ({d.seq_len})")
    if d.max_eval_tokens is not None and d.max_eval_tokens < 1:
        raise ConfigError(f"data.max_eval_tokens={d.max_eval_tokens} must be >= 1 (or null for the whole split)")
    fractions = [d[k] or 0.0 for k in ("valid_fraction", "test_fraction")]
    if any(not 0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
        raise ConfigError(
            f"data.valid_fraction={d.valid_fraction} and data.test_fraction={d.test_fraction} must be in [0, 1) "
            f"with a sum below 1 (null: the source's default)"
        )
    if d.source != "text" and (d.train_files or d.valid_files or d.test_files):
        raise ConfigError(
            f"data.train_files/valid_files/test_files are read only by data.source=text (got data.source={d.source})"
        )
    if d.source == "text" and not d.train_files:
        raise ConfigError("data.source=text needs data.train_files: files or folders of *.txt")
    v = d.tokenizer.train_vocab_size
    if v is not None and d.source != "mqar":
        if v < 258:
            raise ConfigError(f"data.tokenizer.train_vocab_size={v} must be >= 258 (256 bytes + <|endoftext|> + 1)")
        if v > m.vocab_size:
            raise ConfigError(
                f"data.tokenizer.train_vocab_size={v} exceeds model.vocab_size={m.vocab_size}; raise model.vocab_size "
                f"or lower data.tokenizer.train_vocab_size"
            )
    if d.source == "mqar":
        from pha_lab.data.mqar import check_config  # here, not at the top: the data package takes ~0.6 s to import

        check_config(d, m.vocab_size)  # MQAR's rules live beside its generator

    o = cfg.optim
    if o.lr <= 0 or not 0 <= o.min_lr_ratio <= 1 or o.warmup_steps < 0 or o.weight_decay < 0:
        raise ConfigError(
            f"optim: need lr > 0 (got {o.lr}), 0 <= min_lr_ratio <= 1 (got {o.min_lr_ratio}), "
            f"warmup_steps >= 0 (got {o.warmup_steps}), weight_decay >= 0 (got {o.weight_decay})"
        )
    t = cfg.trainer
    _choice("trainer.precision", t.precision, PRECISIONS)
    _choice("trainer.test_ckpt", t.test_ckpt, ("last", "best"))
    if t.compile not in (True, False, "auto"):
        raise ConfigError(f"invalid value '{t.compile}' for trainer.compile; choose one of: true, false, auto")
    _choice("trainer.compile_mode", t.compile_mode, COMPILE_MODES)
    for key in ("max_steps", "val_every_n_steps", "log_every_n_steps", "ckpt_every_n_steps", "accumulate_grad_batches",
                "devices", "num_nodes", "loss_chunk_tokens"):
        if t[key] < 1:
            raise ConfigError(f"trainer.{key}={t[key]} must be >= 1")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (lists kept as strings), for MLflow params and DataFrame columns."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, Any] = {}
    for k, v in container.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if not isinstance(v, (list, dict)) else str(v)
    return out

"""Structured configuration: one OmegaConf schema, experiment YAML overlays, `key=value` overrides.

`load_config(path_or_name, overrides)` merges schema defaults <- experiment YAML (following its
`extends:` chain) <- dotlist overrides, then validates everything that can be checked before a
tensor is built. Every failure is a `ConfigError` whose message names the key and the fix.
Each registered branch contributes its own section `model.<name>` and validates it (pha_lab.branches).
Beside it: pha_lab.loading (`load_yaml`, the loader every YAML of the suite goes through: experiments, sweeps,
bench specs) and pha_lab.layers (`layer_specs`, each layer's layout, branches and mixer after model.n_attn_layers
and model.overrides); their public names are re-exported here, where callers import them. This module deliberately
imports no torch/lightning so that light commands stay fast.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pha_lab import PROJECT_ROOT
from pha_lab.branches import BRANCH_REGISTRY
from pha_lab.errors import ConfigError, check_choice as _choice
from pha_lab.layers import LAYOUTS, MIXERS, attention_layers as attention_layers, check_branches, layer_specs
from pha_lab.loading import load_yaml, resolve_yaml as resolve_yaml, yaml_names

# (pha_lab.layers and pha_lab.loading hold those names; callers import them from here: `x as x` marks a re-export)

EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"
BENCH_DIR = PROJECT_ROOT / "bench"  # `pha-lab bench` specs (not sweeps: nothing is trained)

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
    without: str | None = None  # instead of layers: every layer whose branches lack this one (may be none)
    layout: str | None = None
    branches: list[str] | None = None
    mixer: str | None = None


@dataclass
class ModelConfig:
    """The model section. Each registered branch adds its own section beside these keys, `model.<name>` (e.g.
    model.attn, model.gss, model.ffn: pha_lab.branches), when `schema()` builds the structured config."""

    # What the analysis groups runs by, logged as the run's `family` tag: pha, transformer, gss, gss_hybrid,
    # sequential_pha, and for the ablation pha_no_<branch> (removing a branch changes the architecture, so the
    # family; the mixer does not: model.mixer says it). Set by every preset and by each sweep cell that changes
    # the architecture; null: unrecorded (the tables then guess it from the layout and branches, and say so).
    family: str | None = None
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    d_model: int = 768
    n_layers: int = 12
    layout: str = "parallel"  # parallel (PHA) | serial (Transformer, GSS, sequential PHA)
    branches: list[str] = field(default_factory=lambda: ["gss", "attn", "ffn"])
    mixer: str = "static"  # parallel layout only
    # Attention in only k layers (the attention-sparse PHA): the layers placed by `attention_layers` keep every
    # branch of model.branches, the others run them without `attn`. null: attention wherever model.branches says.
    n_attn_layers: int | None = None
    overrides: list[LayerOverride] = field(default_factory=list)  # per-layer changes, in order (LayerOverride)
    norm: str = "rmsnorm"
    tie_embeddings: bool = True
    init_std: float = 0.02
    dropout: float = 0.0


# --------------------------------------------------------------------------- schema: data
@dataclass
class TokenizerConfig:
    name: str = "gpt2"  # hub name; "gpt2" is first looked for in <data root>/gpt2-tokenizer
    path: str | None = None  # local dir with tokenizer.json or vocab.json+merges.txt (else $PHA_TOKENIZER_DIR)
    train_vocab_size: int | None = None  # train a byte-level BPE of this size on the train split instead (cached)


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
    data_dir: str | None = None  # local files root; default $PHA_DATA_DIR or ../shared/data
    hub: str = "auto"  # auto: local files first, then the Hugging Face hub | never: local only | always: hub only
    hub_revision: str = "main"  # hub dataset revision (branch, tag or commit); part of the token cache key
    wikitext_variant: str = "raw"  # raw: wikitext-*-raw-v1 (GPT-2-style PPL) | tokens: wikitext-*-v1 (<unk>)
    train_files: list[str] = field(default_factory=list)  # `text` source: files or folders (*.txt), relative
    valid_files: list[str] = field(default_factory=list)  # to the data root or the current directory
    test_files: list[str] = field(default_factory=list)
    documents: str = "file"  # `text` source: one document per file | blank_line: blank-line-separated documents
    split_seed: int = 1234  # seeded split by document where a source has no given split
    valid_fraction: float | None = None  # carved from train by document; None: source default
    test_fraction: float | None = None  # (text: 0.05, openwebtext: 0.0005); a positive fraction takes >= 1 doc
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = 1024
    batch_size: int = 8  # per device, per micro-batch
    eval_batch_size: int = 8
    eval_stride: int | None = None  # None: non-overlapping windows of seq_len; smaller: only new tokens scored
    max_eval_tokens: int | None = None  # cap on tokens scored per eval split (None: whole split)
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
    compile: bool | str = "auto"
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    loss_chunk_tokens: int = 4096  # tokens per chunk of the LM head + cross-entropy (pha_lab.training.loss)
    test_ckpt: str = "last"  # last | best: which weights the final test evaluation uses
    early_stop_value: float | None = None  # stop once the val objective reaches this (MQAR: 0.99)
    # true: two runs of one config give identical numbers on the same GPU and software (CUBLAS_WORKSPACE_CONFIG,
    # strict torch.use_deterministic_algorithms: SDPA's deterministic backward, no cuDNN attention; an op without
    # a deterministic kernel raises). Speed cost: to be measured on GPU (docs/perf-notes.md, deterministic mode)
    deterministic: bool = False
    cpu_threads: int | None = None  # torch threads when training on CPU (None: torch's default)


@dataclass
class TrackingConfig:
    runs_dir: str = "runs"  # checkpoints and the default SQLite database live here
    # None: <runs_dir>/checkpoints; on a filesystem shared between machines, they resume each other's trials
    checkpoints_dir: str | None = None
    tracking_uri: str | None = None  # None: sqlite:///<runs_dir>/mlflow.db; any MLflow URI works
    experiment: str = "default"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    name: str = "unnamed"
    seed: int = 0
    resume: str | None = None  # an MLflow run id to continue
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------- the schema with the branches' sections
def schema() -> DictConfig:
    """The defaults, with one `model.<name>` section per registered branch (its config dataclass) and, in every
    `model.overrides` entry, an optional per-layer section of the same keys, so a branch registered after this
    module was imported (a plugin, a test) is part of the schema too."""
    taken = {f.name for f in dataclasses.fields(ModelConfig)} | {f.name for f in dataclasses.fields(LayerOverride)}
    for name, branch in BRANCH_REGISTRY.items():
        if name in taken:
            raise ConfigError(
                f"branch '{name}' ({branch.module}) clashes with the key model.{name} or "
                f"model.overrides[i].{name}: register it under another name"
            )
    override = _schema_class(
        "LayerOverrideSchema",
        [(name, _partial(name, b.config) | None, None) for name, b in BRANCH_REGISTRY.items()],
        LayerOverride,
    )
    override._where = "a model.overrides entry (LayerOverride)"
    model = _schema_class(
        "ModelConfigSchema",
        [
            *[(name, b.config, field(default_factory=b.config)) for name, b in BRANCH_REGISTRY.items()],
            ("overrides", list[override], field(default_factory=list)),
        ],
        ModelConfig,
    )
    cfg = OmegaConf.structured(Config)
    cfg.model = OmegaConf.structured(model)
    return cfg


def _partial(name: str, config: type) -> type:
    """A branch section in which every key is optional and unset (None): what an override changes."""
    hints = typing.get_type_hints(config)
    cls = _schema_class(
        f"LayerOverride_{name}", [(f.name, hints[f.name] | None, None) for f in dataclasses.fields(config)]
    )
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


# --------------------------------------------------------------------------- loading (pha_lab.loading) and validation
def experiment_names() -> list[str]:
    return yaml_names(EXPERIMENTS_DIR)


def load_config(experiment: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema defaults <- experiment YAML chain <- `key=value` overrides, validated."""
    cfg = load_yaml(schema(), experiment, EXPERIMENTS_DIR, "experiment", overrides)
    validate(cfg)
    return cfg


def round_to(x: float, multiple: int = 64) -> int:
    """`x` to the nearest multiple of `multiple`, at least one (the branches' derived widths)."""
    return max(multiple, int(round(x / multiple)) * multiple)


def validate(cfg: DictConfig) -> None:
    """Every check that can fail before a tensor is built."""
    m = cfg.model
    _choice("model.layout", m.layout, LAYOUTS)
    _choice("model.mixer", m.mixer, MIXERS)
    check_branches("model.branches", m.branches)
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
    for key in (
        "max_steps",
        "val_every_n_steps",
        "log_every_n_steps",
        "ckpt_every_n_steps",
        "accumulate_grad_batches",
        "devices",
        "num_nodes",
        "loss_chunk_tokens",
    ):
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

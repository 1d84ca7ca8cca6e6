"""The branch registry: every branch a layer can run, with its config section and its module.

A *branch* is a module that a block runs on its normalised input: in the parallel layout every branch of the
layer on the same input, fused by the mixer; in the serial layout one after another, each with its own norm and
residual. `BRANCH_REGISTRY` maps a branch's name (what `model.branches` and `model.overrides[i].branches` list) to
a `Branch`: its config dataclass, which `pha_lab.config.schema()` mounts as the `model.<name>` section of the
structured schema (typed, misspelt keys refused with the nearest valid ones), and its module, named by a
"package.module:Class" string. This module and pha_lab.config import no torch (light commands stay fast): the
module class is imported when a model is first built. `pha_lab.models` re-exports the registry beside
`MIXER_REGISTRY`.

Adding a branch takes its module, its config dataclass and one registration line. A worked example, a causal
running mean of a projection (tests/test_branch_registry.py builds, trains, counts and knocks out exactly this):

    # pha_lab/models/running_mean.py: the module
    class RunningMean(nn.Module):
        flops_part = "running_mean"               # names its extra FLOPs among flops_per_token's parts

        def __init__(self, d_model: int, width: int):
            super().__init__()
            self.W_in = nn.Linear(d_model, width, bias=False)
            self.W_out = nn.Linear(width, d_model, bias=False)
            self.W_out.is_residual_out = True     # writes to the residual stream: depth-scaled init
            self.gate = nn.Parameter(torch.ones(1, width))
            self.gate.no_weight_decay = True      # a matrix the optimizer must not decay

        @classmethod
        def from_config(cls, cfg, d_model: int) -> "RunningMean":   # cfg: its model.running_mean section
            return cls(d_model, round_to(cfg.expansion * d_model))

        def forward(self, h: torch.Tensor) -> torch.Tensor:      # [B, T, D] -> [B, T, D], causal along T
            t = h.shape[1]
            avg = torch.ones(t, t, device=h.device, dtype=h.dtype).tril()
            return self.W_out(self.gate * ((avg / avg.sum(-1, keepdim=True)) @ self.W_in(h)))

        def flops_per_token(self, seq_len: int) -> float:        # forward work beyond its Linear weights
            return 2.0 * seq_len * self.W_in.out_features

    # pha_lab/branches.py (this file): the config dataclass and the registration line
    @dataclass
    class RunningMeanConfig(BranchConfig):
        expansion: float = 1.0

        def validate(self, model, key: str) -> None:
            if self.expansion <= 0:
                raise ConfigError(f"{key}.expansion={self.expansion} must be positive")

    register_branch("running_mean", RunningMeanConfig, "pha_lab.models.running_mean:RunningMean")

Then `model.branches: [gss, running_mean, ffn]` with `model.running_mean: {expansion: 2.0}` works in any
experiment YAML or override, in both layouts and in `model.overrides` (which also take the branch's keys for some
layers: `{layers: [0], running_mean: {expansion: 4.0}}`); `pha-lab eval --knockout running_mean`,
the FLOPs count (pha_lab.models.flops), the weight-decay groups, the mixer logging and the analysis tables pick
it up. Nothing else changes.

The contract, stated once:
- name: a Python identifier that is not a `ModelConfig` or `LayerOverride` field (it becomes the keys `model.<name>`
  and `model.overrides[i].<name>`, and appears in metric names such as `mixer/L0/<name>`).
- config: a dataclass subclassing `BranchConfig`, typed fields with defaults; `validate(model, key)` raises a
  ConfigError naming `key` (= "model.<name>") for a bad value, `model` being the whole model section (d_model,
  ...). It runs when some layer uses the branch: a section no layer uses is never read, so never checked.
- module: `from_config(cfg, d_model)` builds it from its section; `forward(h)` maps [B, T, D] to [B, T, D] and is
  causal along T. Optional, read where present: `flops_per_token(seq_len)`, the forward FLOPs per token that are
  not a Linear weight's (attention's QK^T and AV, GSS's FFTs), and `flops_part`, the name of that part (default:
  the class name); `is_residual_out` on each Linear that writes to the residual stream; `no_init` on a weight that
  keeps its own init; `no_weight_decay = True` on a matrix the optimizer must not decay (an unmarked matrix is
  decayed, an unmarked vector such as a bias is not: training.optim.param_groups); `cache_bytes(batch, seq_len,
  dtype_bytes) -> int`, the bytes it keeps between decoding steps for `batch` sequences at context `seq_len` (KV
  cache, recurrent state; 0 for a position-wise branch), summed by LanguageModel.cache_bytes, which names a branch
  lacking it (pha_lab.models.memory).
- decoding: optional `init_state(batch, max_len, *, device, dtype) -> state`, `prefill(h [B, T, D], state)
  -> (out, state)` (the forward's math over a prompt, after the state's tokens) and `step(h [B, 1, D], state) -> (out,
  state)`; the state is the module's own object, carries its position `pos` and is advanced in place. A model decodes
  when every branch of every layer has the three (else an error names the branch); pha_lab.models.decoding states
  the contract in full (what counts as the state's bytes, the model-level prefill / step / generate).

A branch may extend another's section and module. The sliding-window attention branch `swa` is
`SlidingWindowConfig(AttnConfig)` (the attention keys plus `window`) and `SlidingWindowAttention(GroupedQueryAttention)`
(pha_lab.models.sliding_window): its section `model.swa` sits beside `model.attn`, so a model can have full attention
in some layers and windowed attention in others (experiments/tiny_pha_swa.yaml).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

from pha_lab.errors import ConfigError, check_choice

FFN_KINDS = ("gelu", "swiglu")
DSS_KERNELS = ("dss_exp", "s4d_lin_noscale")
DSS_CONV_IMPLS = ("fft", "chunked")


@dataclass
class BranchConfig:
    """Base of a branch's `model.<name>` section."""

    def validate(self, model: Any, key: str) -> None:
        """Raise a ConfigError naming `key` for a bad value (`model`: the whole model section). Default: no checks."""


@dataclass
class AttnConfig(BranchConfig):
    """Grouped-query causal self-attention with RoPE (models/attention.py)."""

    n_heads: int = 12
    n_kv_heads: int = 4  # grouped-query attention; = n_heads gives plain multi-head attention
    rope_base: float = 10000.0
    dropout: float = 0.0

    def validate(self, model: Any, key: str) -> None:
        if self.n_heads < 1 or self.n_kv_heads < 1:
            raise ConfigError(f"{key}.n_heads={self.n_heads} and n_kv_heads={self.n_kv_heads} must be >= 1")
        d = model.d_model
        if d % self.n_heads:
            raise ConfigError(
                f"model.d_model={d} is not divisible by {key}.n_heads={self.n_heads}; "
                f"pick n_heads among {[h for h in range(1, 65) if d % h == 0]}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{key}.n_heads={self.n_heads} is not a multiple of {key}.n_kv_heads={self.n_kv_heads}; "
                f"pick n_kv_heads among {[k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]}"
            )
        if (d // self.n_heads) % 2:
            raise ConfigError(
                f"head dim d_model/n_heads = {d // self.n_heads} must be even for RoPE (model.d_model, {key}.n_heads)"
            )


@dataclass
class SlidingWindowConfig(AttnConfig):
    """Sliding-window causal attention (models/sliding_window.py): attention's keys, each query seeing itself and
    the window - 1 positions before it; its KV cache holds at most `window` positions."""

    window: int = 1024

    def validate(self, model: Any, key: str) -> None:
        super().validate(model, key)
        if self.window < 1:
            raise ConfigError(
                f"{key}.window={self.window} must be >= 1: the positions each query sees, itself "
                f"included (window >= the context is full causal attention)"
            )


@dataclass
class GSSConfig(BranchConfig):
    """Gated State Space branch (Mehta et al. 2022): u = GELU(W_u h) of width F = expansion*D,
    v = GELU(W_v h) of width H = d_hidden, y = DSS(v), out = W_o((W_g y) * u)."""

    expansion: float = 1.0  # F = expansion * d_model (rounded to a multiple of 64)
    d_hidden: int = 256  # H: width of the DSS input
    n_modes: int = 64  # N: complex diagonal state size
    # dss_exp: DSS-EXP (Gupta et al. 2022; GSS's kernel), skew-HiPPO Lambda init, learned per-mode step dt |
    # s4d_lin_noscale: the kernel used before (S4D-Lin init, no (exp(dt Lambda) - 1) / Lambda factor).
    # See models/gss.py.
    kernel: str = "dss_exp"
    dt_min: float = 1e-3  # initial step sizes dt: log-uniform at random per mode (dss_exp, as the DSS reference),
    dt_max: float = 1e-1  # geometric over the modes (s4d_lin_noscale)
    # How y = K * v is computed (the same function; models/gss.py): fft (fp32 FFTs of a fast length >= 2L) |
    # chunked (the diagonal scan in chunks of `chunk` positions, matmuls only; timed by `pha-lab bench`'s dss part).
    conv_impl: str = "fft"
    chunk: int = 128

    def validate(self, model: Any, key: str) -> None:
        check_choice(f"{key}.kernel", self.kernel, DSS_KERNELS)
        check_choice(f"{key}.conv_impl", self.conv_impl, DSS_CONV_IMPLS)
        if self.chunk < 1:
            raise ConfigError(f"{key}.chunk={self.chunk} must be >= 1 (positions per chunk of conv_impl=chunked)")
        if self.expansion <= 0 or self.d_hidden < 1 or self.n_modes < 1:
            raise ConfigError(
                f"{key}.expansion={self.expansion}, d_hidden={self.d_hidden}, n_modes={self.n_modes} "
                "must all be positive"
            )
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"need 0 < {key}.dt_min <= {key}.dt_max, got {self.dt_min}, {self.dt_max}")


@dataclass
class FFNConfig(BranchConfig):
    """Position-wise feed-forward branch (models/ffn.py)."""

    kind: str = "gelu"  # gelu | swiglu
    expansion: float = 4.0  # hidden = expansion * d_model, rounded to a multiple of 64 ...
    hidden: int | None = None  # ... unless given explicitly

    def validate(self, model: Any, key: str) -> None:
        check_choice(f"{key}.kind", self.kind, FFN_KINDS)
        if self.expansion <= 0 and self.hidden is None:
            raise ConfigError(f"{key}.expansion={self.expansion} must be positive (or set {key}.hidden)")


@dataclass(frozen=True)
class Branch:
    """A registered branch: `config` is the dataclass of its `model.<name>` section, `module` its nn.Module class
    or a "package.module:Class" string naming it (imported at the first build)."""

    name: str
    config: type[BranchConfig]
    module: str | type

    def module_class(self) -> type:
        if not isinstance(self.module, str):
            return self.module
        path, _, attr = self.module.partition(":")
        return getattr(importlib.import_module(path), attr)

    def build(self, model: Any, section: Any = None):
        """This branch's module for a model section: its own settings `section` (a layer's, with the overrides
        applied: pha_lab.config.layer_specs), by default `model.<name>`."""
        return self.module_class().from_config(getattr(model, self.name) if section is None else section, model.d_model)


BRANCH_REGISTRY: dict[str, Branch] = {}  # in the order tables and logs list branches


def register_branch(name: str, config: type[BranchConfig], module: str | type) -> Branch:
    """Add a branch (see the module docstring); refuses a taken or unusable name and a malformed entry."""
    if not name.isidentifier():
        raise ValueError(f"branch name {name!r} must be a Python identifier (it becomes the key model.{name})")
    if name in BRANCH_REGISTRY:
        raise ValueError(f"branch '{name}' is already registered ({BRANCH_REGISTRY[name].module})")
    if not (dataclasses.is_dataclass(config) and isinstance(config, type) and issubclass(config, BranchConfig)):
        raise TypeError(f"branch '{name}': config must be a dataclass subclassing BranchConfig, got {config!r}")
    if isinstance(module, str) and (module.count(":") != 1 or not all(module.split(":"))):
        raise ValueError(f"branch '{name}': module must be 'package.module:Class' or the class, got {module!r}")
    BRANCH_REGISTRY[name] = Branch(name, config, module)
    return BRANCH_REGISTRY[name]


register_branch("gss", GSSConfig, "pha_lab.models.gss:GSS")
register_branch("attn", AttnConfig, "pha_lab.models.attention:GroupedQueryAttention")
register_branch("ffn", FFNConfig, "pha_lab.models.ffn:FFN")
register_branch("swa", SlidingWindowConfig, "pha_lab.models.sliding_window:SlidingWindowAttention")

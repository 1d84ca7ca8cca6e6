"""The per-layer plan of a model config: which layout, branches, mixer and branch settings every layer gets once
model.n_attn_layers and then model.overrides are applied (`layer_specs`, what the model builder and `validate`
read), and where model.n_attn_layers puts attention (`attention_layers`). Structure only: each branch checks its
own section's values (pha_lab.config.validate). Imports no torch, like pha_lab.config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from pha_lab.branches import BRANCH_REGISTRY
from pha_lab.errors import ConfigError, check_choice as _choice

if TYPE_CHECKING:
    from pha_lab.config import ModelConfig

# Names the model code registers; a test checks that the registries agree with these tuples (branches: see
# pha_lab.branches, whose registry is the only list of them).
MIXERS = ("static", "scalar", "channel", "concat", "gate", "mean")
LAYOUTS = ("parallel", "serial")


def check_branches(key: str, branches: Any) -> list[str]:
    """`branches` as a list, each registered, none repeated, not empty (`key` names it in the error)."""
    names, registered = list(branches), tuple(BRANCH_REGISTRY)
    for b in names:
        _choice(key, b, registered, prep="in")
    if not names:
        raise ConfigError(f"{key} is empty: a layer needs at least one of {', '.join(registered)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}={names} repeats a branch")
    return names


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
            raise ConfigError(
                f"{key} sets both layers={list(ov.layers)} and without={without}: pick the layers one way"
            )
        return [i for i, spec in enumerate(specs) if without not in spec["branches"]]
    if not ov.layers:
        raise ConfigError(
            f"{key}.layers is empty: list the 0-based layer indices it applies to (or pick the "
            f"layers lacking a branch with {key}.without)"
        )
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
            raise ConfigError(
                f"model.n_attn_layers={k} keeps the attention branch in {k} layers, but "
                f"model.branches={branches} has no attn: add it, or set model.n_attn_layers=null"
            )
        if not 0 <= k <= n:
            raise ConfigError(f"model.n_attn_layers={k} must be in 0..model.n_layers ({n})")
        keep_attn = attention_layers(n, k)
    specs = [
        {
            "layout": model.layout,
            "mixer": model.mixer,
            "patches": {},
            "branches": branches if i in keep_attn else [b for b in branches if b != "attn"],
        }
        for i in range(n)
    ]
    for i, ov in enumerate(model.overrides):
        key = f"model.overrides[{i}]"
        changes = {
            b: {field: value for field, value in ov[b].items() if value is not None}
            for b in BRANCH_REGISTRY
            if ov.get(b) is not None
        }
        for layer in _override_layers(ov, specs, key):
            spec = specs[layer]
            for name in ("layout", "branches", "mixer"):
                if ov[name] is not None:
                    spec[name] = list(ov[name]) if name == "branches" else ov[name]
            for b, values in changes.items():
                if b not in spec["branches"]:
                    raise ConfigError(
                        f"{key}.{b} sets {', '.join(values) or 'nothing'} for layer {layer}, which has "
                        f"no '{b}' branch (its branches: {spec['branches']})"
                    )
                spec["patches"].setdefault(b, []).append((key, values))
    for idx, spec in enumerate(specs):
        where = f"layer {idx} (model.layout/branches/mixer after model.n_attn_layers and model.overrides)"
        _choice(f"{where}: layout", spec["layout"], LAYOUTS)
        check_branches(f"{where}: branches", spec["branches"])
        _choice(f"{where}: mixer", spec["mixer"], MIXERS)
        patches = spec.pop("patches")
        spec["sections"] = {
            b: OmegaConf.merge(
                OmegaConf.structured(BRANCH_REGISTRY[b].config), model[b], *[values for _, values in patches.get(b, [])]
            )
            for b in spec["branches"]
        }
        spec["keys"] = {b: f"{patches[b][-1][0]}.{b}" if b in patches else f"model.{b}" for b in spec["branches"]}
    return specs

"""What a run is, read from its logged params and tags: its branches and overrides, its model family (the `family`
tag that training records from `model.family`, else a guess from the layout and branches), the label the tables
print for it, and which PHA / Transformer presets the efficiency comparisons pair. Row-level helpers:
no MLflow, no pooling (pha_lab.analysis.runs reads the runs, pha_lab.analysis.stats pools them).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable

import numpy as np

from pha_lab.branches import BRANCH_REGISTRY


def branches_of(value) -> list[str]:
    """`model.branches` as logged ("['gss', 'attn']") -> a list."""
    if isinstance(value, (list, tuple)):
        return list(value)
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        return []
    return [str(b) for b in parsed] if isinstance(parsed, (list, tuple)) else []


def overrides_of(row: dict) -> list[dict]:
    """`model.overrides` as logged ("[{'layers': [1, 6], 'branches': ['attn', 'ffn'], ...}]") -> a list of dicts."""
    value = row.get("model.overrides")
    try:
        parsed = value if isinstance(value, (list, tuple)) else ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        return []
    return [o for o in parsed if isinstance(o, dict)] if isinstance(parsed, (list, tuple)) else []


def branch_order(names: Iterable[str]) -> list[str]:
    """Branch names in the registry's order (pha_lab.branches), then any unregistered ones alphabetically."""
    names = set(names)
    return [b for b in BRANCH_REGISTRY if b in names] + sorted(names - set(BRANCH_REGISTRY))


# The PHA family's branches (the paper's GSS + GQA + FFN): what the ablation's "branches removed" counts from, and
# what `guessed_family` takes a PHA to be. Not the list of branches there are (that is BRANCH_REGISTRY).
PHA_BRANCHES = ("gss", "attn", "ffn")
FAMILY_LABELS = {
    "pha": "PHA",
    "transformer": "Transformer",
    "gss": "GSS",
    "gss_hybrid": "GSS-Hybrid",
    "sequential_pha": "sequential PHA",
    "pha_sparse": "attention-sparse PHA",
    "transformer_deep": "Transformer (depth-matched)",
    "transformer_mha": "Transformer (multi-head)",
    "pha_swa": "PHA, sliding-window attention",
}  # model.family -> table label; pha_no_X: "PHA without X"; pha_sparse, pha_swa: with k of L layers


def recorded_family(row: dict) -> str | None:
    """The run's `family` tag (what training logs from `model.family`), None where it has none."""
    family = row.get("family")
    return family if isinstance(family, str) and family else None


def guessed_family(row: dict) -> str:
    """For runs without a recorded family (logged before the `family` tag existed, or with `model.family` unset):
    the family as the tables used to guess it from model.layout, model.branches and model.overrides. Only a guess:
    `tidy` marks it `family_source = "guessed"` and the tables say how many rows rest on it."""
    layout, branches = row.get("model.layout"), branches_of(row.get("model.branches"))
    k, n_layers = _as_int(row.get("model.n_attn_layers")), _as_int(row.get("model.n_layers"))
    sparse = k is not None and n_layers is not None and k < n_layers  # model.n_attn_layers: attention in k layers
    if layout == "parallel" and sparse and any("swa" in branches_of(o.get("branches")) for o in overrides_of(row)):
        return "pha_swa"  # a sliding window in the other layers
    if layout == "parallel" and (sparse or "attn" not in branches and "attn" in str(row.get("model.overrides") or "")):
        return "pha_sparse"  # attention in only some layers (n_attn_layers, or the overrides)
    if layout == "parallel":
        missing = [b for b in PHA_BRANCHES if b not in branches]
        return "pha" if not missing else "pha_no_" + "+".join(missing)
    if branches == ["attn", "ffn"]:
        return "transformer"
    if "gss" in branches and "attn" not in branches:
        return "gss_hybrid" if any("attn" in branches_of(o.get("branches")) for o in overrides_of(row)) else "gss"
    if branches == ["gss", "attn", "ffn"]:
        return "sequential_pha"
    return "+".join(branches) + f" ({layout})"


def model_family(row: dict) -> str:
    """The table label of a run's family (recorded, else guessed): PHA, Transformer, GSS, GSS-Hybrid, sequential
    PHA, PHA without gss, ..., with the mixer of a parallel model that does not use the static one: PHA (gate)."""
    family = recorded_family(row) or guessed_family(row)
    name = FAMILY_LABELS.get(family, family)
    if family.startswith("pha_no_"):
        name = "PHA without " + family.removeprefix("pha_no_")
    k, n_layers = _as_int(row.get("model.n_attn_layers")), _as_int(row.get("model.n_layers"))
    if family == "pha_sparse" and k is not None and n_layers is not None:
        name = f"PHA, attention in {k} of {n_layers} layers"
    window = _as_int(row.get("model.swa.window"))
    if family == "pha_swa" and k is not None and n_layers is not None and window is not None:
        name = f"PHA, attention in {k} of {n_layers} layers, a {window}-token window elsewhere"
    mixer = row.get("model.mixer")
    static = mixer in (None, "static") or (isinstance(mixer, float) and np.isnan(mixer))
    return name if row.get("model.layout") != "parallel" or static else f"{name} ({mixer})"


def _scale_and_core(name: str) -> tuple[str, str]:
    """A preset name split into its scale and the rest: pha_sparse_180m -> ("180m", "pha_sparse"), tiny_pha ->
    ("tiny", "pha"), pha -> ("", "pha")."""
    if match := re.fullmatch(r"(.+)_(\d+m)", name):
        return match.group(2), match.group(1)
    if match := re.fullmatch(r"(tiny|mini)_(.+)", name):
        return match.group(1), match.group(2)
    return "", name


def baseline_pairs(models: Iterable[str]) -> list[tuple[str, str]]:
    """(PHA model, Transformer baseline) pairs among preset names: every PHA (pha*, pha_sparse*) with every
    Transformer of its scale (the `_NNNm` suffix, or the tiny_/mini_ prefix): pha_sparse_180m with transformer_180m,
    transformer_deep_180m and transformer_mha_180m; tiny_pha with tiny_transformer. The bench's printed comparisons
    and the efficiency ratio table pair models by this rule."""
    parts = {str(m): _scale_and_core(str(m)) for m in sorted({str(m) for m in models})}
    return [
        (m, b)
        for m, (scale, core) in parts.items()
        if core == "pha" or core.startswith("pha_")
        for b, (b_scale, b_core) in parts.items()
        if b_scale == scale and (b_core == "transformer" or b_core.startswith("transformer_"))
    ]


def _as_int(value) -> int | None:
    """A logged integer (an MLflow param is a string, a DataFrame cell may be a float or NaN), None if there is none."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if np.isfinite(number) else None

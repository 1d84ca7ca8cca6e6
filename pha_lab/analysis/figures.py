"""Plotting helpers (matplotlib, headless): each saves a PNG (and a PDF beside it when asked).

The analysis helpers return the saved Figure (closed from pyplot, still inspectable: tests read its
axes labels). With no data they still draw labelled, empty axes saying so, so an empty sweep gives
the figure's skeleton rather than an error.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

NO_DATA = "no runs yet"


def save(fig, path: Path, pdf: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    if pdf:
        fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return path


def _heatmap(ax, weights: pd.DataFrame, title: str):
    image = ax.imshow(weights.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_xticks(range(weights.shape[1]), list(weights.columns))
    ax.set_yticks(range(weights.shape[0]), [str(i) for i in weights.index])
    ax.set_xlabel("branch")
    ax.set_ylabel("layer")
    ax.set_title(title)
    for (r, c), v in pd.DataFrame(weights.to_numpy(dtype=float)).stack().items():
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="w", fontsize=7)
    return image


def mixer_heatmap(weights: pd.DataFrame, path: Path, title: str = "mixer weights", pdf: bool = False) -> Path:
    """Layers (rows) x branches (columns) heatmap of mixer weights: the paper's "sandwich" figure."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * max(1, weights.shape[1]), 0.9 + 0.35 * max(1, weights.shape[0])))
    image = _heatmap(ax, weights, title)
    fig.colorbar(image, ax=ax, label="weight")
    return save(fig, path, pdf)


def _grid(n: int, width: float = 3.6, height: float = 2.8, cols: int = 3):
    cols = max(1, min(cols, n))
    rows = math.ceil(max(n, 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _empty(ax, xlabel: str, ylabel: str, title: str = "") -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.text(0.5, 0.5, NO_DATA, ha="center", va="center", transform=ax.transAxes, color="gray")


def mixer_heatmaps(frames: dict[str, pd.DataFrame], path: Path, pdf: bool = True):
    """One layers x branches heatmap per configuration (seed-mean weights), side by side."""
    fig, axes = _grid(len(frames), width=1.6 + 1.1 * 3, height=0.9 + 0.35 * max([len(f) for f in frames.values()] + [2]))
    if not frames:
        _empty(axes[0], "branch", "layer", "mixer weights")
    for ax, (title, weights) in zip(axes, frames.items()):
        fig.colorbar(_heatmap(ax, weights, title), ax=ax, label="weight")
    fig.tight_layout()
    save(fig, path, pdf)
    return fig


def metric_bars(frame: pd.DataFrame, metric: str, labels: list[str], path: Path, xlabel: str,
                ylabel: str = "model", pdf: bool = True):
    """Horizontal bars of a seed-mean metric with ± std error bars, one per row of `frame`."""
    fig, ax = plt.subplots(figsize=(6.5, 1.0 + 0.35 * max(len(frame), 2)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if frame.empty or metric not in frame or frame[metric].isna().all():
        _empty(ax, xlabel, ylabel)
    else:
        names = [" | ".join(str(r[c]) for c in labels) for _, r in frame.iterrows()]
        std = frame.get(f"{metric} std", pd.Series(np.nan, index=frame.index)).fillna(0.0)
        ax.barh(range(len(frame)), frame[metric].astype(float), xerr=std.astype(float), color="C0", capsize=3)
        ax.set_yticks(range(len(frame)), names, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.6)
    save(fig, path, pdf)
    return fig


def per_layer_lines(frame: pd.DataFrame, branches: list[str], path: Path, ylabel: str, pdf: bool = True):
    """One panel per (sweep, config): value per layer, a line per branch with ± std error bars
    (rows with layer "all" are left out)."""
    frame = frame[frame["layer"] != "all"] if len(frame) else frame
    groups = list(frame.groupby(["experiment", "config"], sort=False)) if len(frame) else []
    fig, axes = _grid(len(groups))
    if not groups:
        _empty(axes[0], "layer", ylabel)
    for ax, ((exp, config), g) in zip(axes, groups):
        layers = g["layer"].astype(int)
        for b in branches:
            if b in g and g[b].notna().any():
                ax.errorbar(layers, g[b].astype(float), yerr=g.get(f"{b} std", 0 * layers).fillna(0).astype(float),
                            marker="o", capsize=3, label=b)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(sorted(layers.unique()))
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{exp}: {config}", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path, pdf)
    return fig


def curves(frame: pd.DataFrame, x: str, y: str, line: list[str], panel: list[str], path: Path, xlabel: str,
           ylabel: str, logx: int | None = None, reference: dict[str, float] | None = None, pdf: bool = True):
    """Generic panels of y vs x, one line per `line` group (± `{y} std` when present); `reference`
    draws labelled horizontal lines (the paper's claims); `logx` is the log base of the x axis."""
    if frame.empty:
        groups = []
    else:
        groups = list(frame.groupby(panel, sort=True, dropna=False)) if panel else [((), frame)]
    fig, axes = _grid(len(groups))
    if not groups:
        _empty(axes[0], xlabel, ylabel)
    for ax, (key, g) in zip(axes, groups):
        for name, h in g.groupby(line, sort=True, dropna=False):
            h = h.sort_values(x)
            std = h.get(f"{y} std")
            ax.errorbar(h[x].astype(float), h[y].astype(float), marker="o", capsize=3,
                        yerr=None if std is None else std.fillna(0).astype(float),
                        label=" ".join(str(n) for n in (name if isinstance(name, tuple) else (name,))))
        ax.set_title(", ".join(f"{p}={k}" for p, k in zip(panel, key if isinstance(key, tuple) else (key,))), fontsize=8)
    for ax in axes[: max(1, len(groups))]:
        if logx and groups:
            ax.set_xscale("log", base=logx)
        for label, value in (reference or {}).items():
            ax.axhline(value, color="r", ls="--", lw=1, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if groups or reference:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path, pdf)
    return fig

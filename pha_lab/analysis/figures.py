"""Plotting helpers (matplotlib, headless): each saves a PNG (and a PDF beside it when asked).

The analysis helpers return the saved Figure (closed from pyplot, still inspectable: tests read its
axes labels). With no data they still draw labelled, empty axes saying so, so an empty sweep gives
the figure's skeleton rather than an error. Legends sit outside the axes, colours follow the line's
label (the same model has the same colour in every panel), and panels of one figure share their scale.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

NO_DATA = "no runs yet"


def save(fig, path: Path, pdf: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    if pdf:
        fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return path


def _heatmap(ax, weights: pd.DataFrame, title: str, vmin: float | None = None, vmax: float | None = None):
    values = weights.to_numpy(dtype=float)
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(weights.shape[1]), list(weights.columns))
    ax.set_yticks(range(weights.shape[0]), [str(i) for i in weights.index])
    ax.set_xlabel("branch")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=8)
    for (r, c), v in np.ndenumerate(values):
        if np.isnan(v):
            ax.text(c, r, "absent", ha="center", va="center", color="gray", fontsize=6)
            continue
        red, green, blue, _ = image.cmap(image.norm(v))  # dark text on light cells, light text on dark ones
        ax.text(
            c,
            r,
            f"{v:.2f}",
            ha="center",
            va="center",
            fontsize=7,
            color="k" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "w",
        )
    return image


def mixer_heatmap(weights: pd.DataFrame, path: Path, title: str = "mixer weights", pdf: bool = False) -> Path:
    """Layers (rows) x branches (columns) heatmap of mixer weights: the paper's "sandwich" figure."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * max(1, weights.shape[1]), 0.9 + 0.35 * max(1, weights.shape[0])))
    image = _heatmap(ax, weights, title)
    fig.colorbar(image, ax=ax, label="weight")
    return save(fig, path, pdf)


def _grid(n: int, width: float = 3.6, height: float = 2.8, cols: int = 3, sharey: bool = False):
    """Axes for n panels; n = 0 still gives one (visible) axes for the empty skeleton."""
    cols = max(1, min(cols, n))
    rows = math.ceil(max(n, 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharey=sharey)
    for ax in axes.flat[max(n, 1) :]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _empty(ax, xlabel: str, ylabel: str, title: str = "") -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.text(0.5, 0.5, NO_DATA, ha="center", va="center", transform=ax.transAxes, color="gray")


def _short(value: float) -> str:
    """1024 -> '1k', 32768 -> '32k', 512 -> '512' (tick labels of context lengths)."""
    return f"{value / 1024:g}k" if value >= 1024 and value % 1024 == 0 else f"{value:g}"


def _colours(labels) -> dict[str, str]:
    """One colour per label, the same in every panel of a figure."""
    labels = list(dict.fromkeys(labels))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


MARKERS = "osD^vP*X"  # one per line label too, so lines that coincide still show each glyph


def _legend_outside(fig, axes) -> None:
    """One legend for the whole figure, right of the panels (labels deduplicated across panels)."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=8,
            frameon=False,
        )


def mixer_heatmaps(frames: dict[str, pd.DataFrame], path: Path, pdf: bool = True):
    """One layers x branches heatmap per configuration (seed-mean weights), side by side, on one colour scale
    from 0 (so equal weights look equal across panels; the numbers are printed in the cells)."""
    fig, axes = _grid(
        len(frames), width=1.4 + 1.0 * 3, height=1.1 + 0.35 * max([len(f) for f in frames.values()] + [2])
    )
    if not frames:
        _empty(axes[0], "branch", "layer", "mixer weights")
        save(fig, path, pdf)
        return fig
    top = max(float(np.nanmax(f.to_numpy(dtype=float))) for f in frames.values() if f.size)
    image = None
    for ax, (title, weights) in zip(axes, frames.items()):
        image = _heatmap(ax, weights, title, vmin=0.0, vmax=top)
    fig.tight_layout()
    fig.colorbar(image, ax=[a for a in axes if a.get_visible()], label="mixer weight (shared scale)", shrink=0.6)
    save(fig, path, pdf)
    return fig


def intervals(
    frame: pd.DataFrame,
    value: str,
    labels: list[str],
    path: Path,
    xlabel: str,
    low: str | None = None,
    high: str | None = None,
    zero: bool = False,
    ylabel: str = "",
    pdf: bool = True,
):
    """One dot per row of `frame` at `value` with a whisker from `low` to `high` (columns; default: ± `{value}
    std`), rows top to bottom; `zero` draws the line a difference is judged against. The x axis spans the data,
    not 0, so differences of a few percent stay visible."""
    fig, ax = plt.subplots(figsize=(7.0, 1.0 + 0.38 * max(len(frame), 2)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if frame.empty or value not in frame or frame[value].isna().all():
        _empty(ax, xlabel, ylabel)
        save(fig, path, pdf)
        return fig
    centre = frame[value].astype(float).to_numpy()
    if low and high:
        lo, hi = frame[low].astype(float).to_numpy(), frame[high].astype(float).to_numpy()
    else:
        std = frame.get(f"{value} std", pd.Series(np.nan, index=frame.index)).astype(float).to_numpy()
        lo, hi = centre - std, centre + std
    err = np.vstack([centre - lo, hi - centre])
    rows = np.arange(len(frame))
    ax.errorbar(centre, rows, xerr=np.nan_to_num(err), fmt="o", color="C0", ecolor="C0", capsize=3)
    ax.set_yticks(rows, [" | ".join(str(r[c]) for c in labels) for _, r in frame.iterrows()], fontsize=7)
    ax.set_ylim(len(frame) - 0.5, -0.5)
    ax.grid(axis="x", alpha=0.3)
    if zero:
        ax.axvline(0, color="k", lw=0.8)
    save(fig, path, pdf)
    return fig


def per_layer_lines(frame: pd.DataFrame, branches: list[str], path: Path, ylabel: str, pdf: bool = True):
    """One panel per configuration: value per layer, a line per branch with ± std error bars (rows with
    layer "all" are left out); one legend outside the panels."""
    frame = frame[frame["layer"] != "all"] if len(frame) else frame
    groups = list(frame.groupby("config_id", sort=False)) if len(frame) else []
    fig, axes = _grid(len(groups))
    colours = _colours(branches)
    if not groups:
        _empty(axes[0], "layer", ylabel)
    for ax, (_, g) in zip(axes, groups):
        layers = g["layer"].astype(int)
        for b in branches:
            if b in g and g[b].notna().any():
                ax.errorbar(
                    layers,
                    g[b].astype(float),
                    yerr=g.get(f"{b} std", 0 * layers).fillna(0).astype(float),
                    marker="o",
                    capsize=3,
                    label=b,
                    color=colours[b],
                )
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(sorted(layers.unique()))
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        first = g.iloc[0]
        ax.set_title(f"{first.get('model', '')} (n={int(g['n'].max())})\n{first['config']}", fontsize=8)
    fig.tight_layout()
    _legend_outside(fig, axes)
    save(fig, path, pdf)
    return fig


def curves(
    frame: pd.DataFrame,
    x: str,
    y: str,
    line: list[str],
    panel: list[str],
    path: Path,
    xlabel: str,
    ylabel: str,
    logx: int | None = None,
    reference: dict[str, float] | None = None,
    titles: dict | None = None,
    note: str | None = None,
    sharey: bool = False,
    pdf: bool = True,
    logy: bool = False,
):
    """Panels of y vs x, one per `panel` group (titled by `titles[key]`, else `name=key`), one line per `line`
    group (± `{y} std` when present) with the same colour in every panel; `reference` draws labelled horizontal
    lines (the paper's claims; red dashed, then black dotted); `logx` is the log base of the x axis (base 2: ticks
    at the data, as 512, 1k, ...); `note` goes above the panels; `logy`: a log y axis (values spanning decades, as
    cache bytes). One legend, outside the panels."""
    groups = [] if frame.empty else list(frame.groupby(panel, sort=True, dropna=False)) if panel else [((), frame)]
    name = lambda key: " ".join(str(n) for n in (key if isinstance(key, tuple) else (key,)))  # noqa: E731
    colours = _colours(sorted(name(k) for k, _ in frame.groupby(line, sort=True, dropna=False))) if groups else {}
    markers = {label: MARKERS[i % len(MARKERS)] for i, label in enumerate(colours)}
    fig, axes = _grid(len(groups), sharey=sharey)
    if not groups:
        _empty(axes[0], xlabel, ylabel)
    for ax, (key, g) in zip(axes, groups):
        for label, h in g.groupby(line, sort=True, dropna=False):
            h = h.sort_values(x)
            std = h.get(f"{y} std")
            ax.errorbar(
                h[x].astype(float),
                h[y].astype(float),
                marker=markers[name(label)],
                mfc="none",
                capsize=3,
                color=colours[name(label)],
                yerr=None if std is None else std.fillna(0).astype(float),
                label=name(label),
            )
        key1 = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        title = (titles or {}).get(key1) or ", ".join(
            f"{p}={k}" for p, k in zip(panel, key if isinstance(key, tuple) else (key,))
        )
        ax.set_title(title, fontsize=9)
    for ax, (_, g) in zip(axes, groups or [((), frame)]):
        if logx and groups:
            ax.set_xscale("log", base=logx)
            if logx == 2:
                ticks = sorted(set(g[x].dropna().astype(float)))
                ax.set_xticks(ticks, [_short(t) for t in ticks])
                ax.minorticks_off()
        if logy:
            ax.set_yscale("log")
        if groups and frame[y].abs().max() >= 1e4 and not logy:
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        for (label, value), (colour, style) in zip(
            (reference or {}).items(), [("r", "--"), ("k", ":"), ("gray", "-.")] * 9
        ):
            ax.axhline(value, color=colour, ls=style, lw=1, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if note:
        fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    _legend_outside(fig, axes[: max(1, len(groups))])
    save(fig, path, pdf)
    return fig

"""Plotting helpers (matplotlib, headless): each saves a PNG (and a PDF beside it when asked)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def save(fig, path: Path, pdf: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    if pdf:
        fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return path


def mixer_heatmap(weights: pd.DataFrame, path: Path, title: str = "mixer weights", pdf: bool = False) -> Path:
    """Layers (rows) x branches (columns) heatmap of mixer weights: the paper's "sandwich" figure."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * max(1, weights.shape[1]), 0.9 + 0.35 * max(1, weights.shape[0])))
    image = ax.imshow(weights.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_xticks(range(weights.shape[1]), list(weights.columns))
    ax.set_yticks(range(weights.shape[0]), [str(i) for i in weights.index])
    ax.set_xlabel("branch")
    ax.set_ylabel("layer")
    ax.set_title(title)
    for (r, c), v in pd.DataFrame(weights.to_numpy(dtype=float)).stack().items():
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax, label="weight")
    return save(fig, path, pdf)

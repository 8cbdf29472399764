"""PNG figures: learning curves of a run, metric box plots and segmentation overlays.

All figures are drawn with matplotlib's non-interactive Agg backend and written atomically
(temporary file, then rename), so a crash never leaves a half-written PNG behind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from kanseg.files import atomic_write  # noqa: E402

_COLORS = plt.get_cmap("tab10").colors


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (PNG) atomically and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight"),
                            suffix=".png")
    finally:
        plt.close(fig)


def box_plot(
    values: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, title: str = ""
) -> Path:
    """One panel per metric (``{"dice": {"TC": [...], ...}, "hd95": {...}}``), one box per label.

    Non-finite values are left out of the boxes; a label without finite values shows no box.
    """
    metrics = list(values)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        labels = list(values[metric])
        data = [[v for v in values[metric][lb] if np.isfinite(v)] for lb in labels]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1), labels)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


def best_slice(mask: np.ndarray, axis: int = -1) -> int:
    """Index along ``axis`` with the most foreground in ``mask`` (the middle one if empty)."""
    axis = axis % mask.ndim
    area = (mask != 0).sum(axis=tuple(a for a in range(mask.ndim) if a != axis))
    return int(area.argmax()) if area.any() else mask.shape[axis] // 2


def overlay_plot(
    label: np.ndarray,
    pred: np.ndarray,
    path: str | Path,
    image: np.ndarray | None = None,
    title: str = "",
    axis: int = -1,
    spacing: Sequence[float] | None = None,
) -> Path:
    """Contours of ground truth (solid) and prediction (dashed) for each label value.

    ``label``/``pred`` are integer label maps of the same 2D or 3D shape; ``image`` (same
    spatial shape, optional) is the grey background. 3D volumes are shown at the slice along
    ``axis`` with the most ground-truth foreground. ``spacing`` (per axis) sets the aspect.
    """
    if label.shape != pred.shape or (image is not None and image.shape != label.shape):
        raise ValueError(
            f"overlay needs equal shapes, got label {label.shape}, prediction {pred.shape}"
            + (f", image {image.shape}" if image is not None else "")
        )
    if label.ndim == 3:
        index = best_slice(label if label.any() else pred, axis)
        take = lambda a: np.take(a, index, axis=axis)  # noqa: E731
        label, pred = take(label), take(pred)
        image = None if image is None else take(image)
        title = f"{title} (slice {index})".strip()
        if spacing is not None:
            spacing = [sp for i, sp in enumerate(spacing) if i != axis % 3]
    fig, ax = plt.subplots(figsize=(5, 5))
    background = np.zeros(label.shape) if image is None else image
    aspect = spacing[1] / spacing[0] if spacing is not None else 1.0
    ax.imshow(background.T, cmap="gray", origin="lower", aspect=aspect)
    values = sorted((set(np.unique(label).tolist()) | set(np.unique(pred).tolist())) - {0})
    for i, value in enumerate(values):
        color = _COLORS[i % len(_COLORS)]
        for mask, style in ((label, "solid"), (pred, "dashed")):
            if (mask == value).any():
                ax.contour((mask == value).T.astype(float), levels=[0.5], colors=[color],
                           linestyles=style, linewidths=1.2, origin="lower")
        ax.plot([], [], color=color, label=f"label {value}")
    ax.plot([], [], color="k", linestyle="solid", label="ground truth")
    ax.plot([], [], color="k", linestyle="dashed", label="prediction")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_curves(rows: Sequence[dict[str, Any]], run_dir: Path) -> list[Path]:
    """``loss.png``, ``dice.png`` and ``metrics.png`` of a run folder from its per-epoch metric
    rows (train loss and validation metrics); returns the files written."""
    val_keys = sorted({k for r in rows for k in r if k.startswith("val_")})
    groups = {
        "loss.png": ("loss", [k for k in ["train_loss", *val_keys] if "loss" in k]),
        "dice.png": ("Dice", [k for k in val_keys if "dice" in k]),
        "metrics.png": ("metric", [k for k in val_keys if "dice" not in k and "loss" not in k]),
    }
    written = []
    for name, (ylabel, keys) in groups.items():
        points = {k: [(r["epoch"], r[k]) for r in rows if r.get(k) not in (None, "")]
                  for k in keys}
        points = {k: p for k, p in points.items() if p}
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for key, pts in points.items():
            ax.plot(*zip(*pts), marker="o", markersize=3, label=key.removeprefix("val_"))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save_figure(fig, Path(run_dir) / name, dpi=100))
    return written

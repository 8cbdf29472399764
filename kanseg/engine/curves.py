"""Learning-curve PNGs of a run folder (``loss.png``, ``dice.png``, ``metrics.png``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence


def plot_curves(rows: Sequence[dict[str, Any]], run_dir: Path) -> list[Path]:
    """Plot per-epoch train loss and validation metrics; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        path = Path(run_dir) / name
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written

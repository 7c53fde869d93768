"""ROC and reliability (calibration) plots as PNG, with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from MMCAFNetLib.evaluate.metrics import calibration_curve, roc_auc, roc_curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from MMCAFNetLib.atomic import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    return path


def plot_roc(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path, title: str = "ROC") -> Path:
    """``curves``: (legend name, labels 0/1, scores) per curve; the AUROC goes into the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, y, s in curves:
        y = np.asarray(y)
        if y.min() == y.max():
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=2, label=f"{name} (AUROC {roc_auc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_calibration(y_true: np.ndarray, probabilities: np.ndarray, path: Path, num_bins: int = 10,
                     title: str = "Calibration", ece: Optional[float] = None) -> Path:
    """Reliability diagram: observed frequency against mean predicted probability per bin."""
    plt = _pyplot()
    conf, freq, count = calibration_curve(y_true, probabilities, num_bins)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    if len(conf):
        ax.plot(conf, freq, marker="o", lw=2, label="model" + (f" (ECE {ece:.3f})" if ece is not None else ""))
        for c, f, n in zip(conf, freq, count):
            ax.annotate(str(int(n)), (c, f), textcoords="offset points", xytext=(4, -10), fontsize=7)
    multi = np.asarray(probabilities).ndim == 2
    ax.set_xlabel("mean predicted probability" + (" (top class)" if multi else ""))
    ax.set_ylabel("observed accuracy" if multi else "observed frequency of the positive class")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)

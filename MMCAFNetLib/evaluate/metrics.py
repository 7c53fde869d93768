"""Classification metrics in plain numpy, so evaluation needs no scikit-learn at run time.

Conventions (the same everywhere in the library):
- binary scores are the probability of the positive class (for the AG task, squamous G);
  a case is called positive when ``score >= threshold``;
- multi-class scores are an ``[N, C]`` array of class probabilities, labels are ints in ``0..C-1``;
- a metric whose denominator is empty (e.g. sensitivity with no positive case) is ``nan``,
  never a silent 0 or 1.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

THRESHOLD_METHODS = ("youden", "accuracy")


def _as_binary(y_true: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise ValueError(f"binary labels must be 0 or 1; found {np.unique(y[bad])[:5].tolist()}")
    return y.astype(np.int64)


def _as_scores(scores: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"expected {n} scores (one per label), got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    return s


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (what the Mann-Whitney U statistic needs)."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    return ranks


def roc_auc(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive outranks a random negative
    (ties count one half). ``nan`` when only one class is present."""
    y = _as_binary(y_true)
    s = _as_scores(scores, len(y))
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(
    y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending; the first point is (0, 0) at threshold +inf."""
    y = _as_binary(y_true)
    s = _as_scores(scores, len(y))
    thresholds = np.r_[np.inf, np.unique(s)[::-1]]
    n_pos = max(int(y.sum()), 0)
    n_neg = len(y) - n_pos
    tpr = np.array([_safe_div(((s >= t) & (y == 1)).sum(), n_pos) for t in thresholds])
    fpr = np.array([_safe_div(((s >= t) & (y == 0)).sum(), n_neg) for t in thresholds])
    return fpr, tpr, thresholds


def confusion_matrix(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_classes: int
) -> np.ndarray:
    """``[num_classes, num_classes]`` counts, rows = true class, columns = predicted class."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"labels and predictions differ in shape: {t.shape} vs {p.shape}")
    for name, arr in (("labels", t), ("predictions", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def binary_metrics(
    y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> dict[str, float]:
    """Accuracy, F1, sensitivity, specificity, PPV, NPV (and the four counts) at ``threshold``."""
    y = _as_binary(y_true)
    s = _as_scores(scores, len(y))
    pred = (s >= threshold).astype(np.int64)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    return {
        "accuracy": _safe_div(tp + tn, len(y)),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
        "sensitivity": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "ppv": _safe_div(tp, tp + fp),
        "npv": _safe_div(tn, tn + fn),
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "threshold": float(threshold),
    }


def select_threshold(
    y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, method: str = "youden"
) -> float:
    """Decision threshold chosen on VALIDATION data (never on the test set).

    ``youden`` maximises sensitivity + specificity - 1 (insensitive to class imbalance, the
    default); ``accuracy`` maximises accuracy. Candidates are the midpoints between consecutive
    distinct scores plus one point below the smallest and one above the largest, so the threshold
    lies between cases rather than on one. Ties between equally good candidates are broken
    towards 0.5 (the prior-free choice). With a single class present 0.5 is returned.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown threshold method {method!r}; choose one of {THRESHOLD_METHODS}")
    y = _as_binary(y_true)
    s = _as_scores(scores, len(y))
    if len(y) == 0 or y.min() == y.max():
        return 0.5
    u = np.unique(s)
    mids = (u[1:] + u[:-1]) / 2.0
    candidates = np.r_[u[0] - 1e-6, mids, u[-1] + 1e-6]
    values = []
    for t in candidates:
        m = binary_metrics(y, s, t)
        if method == "youden":
            values.append(m["sensitivity"] + m["specificity"] - 1.0)
        else:
            values.append(m["accuracy"])
    values = np.asarray(values)
    best = np.flatnonzero(np.isclose(values, values.max(), rtol=0, atol=1e-12))
    pick = best[np.argmin(np.abs(candidates[best] - 0.5))]
    return float(candidates[pick])


def expected_calibration_error(
    y_true: Sequence[int] | np.ndarray, probabilities: np.ndarray, num_bins: int = 10
) -> float:
    """ECE with ``num_bins`` equal-width bins on [0, 1]: sum over bins of (bin share) x
    |observed frequency - mean confidence|.

    Binary (1-D probabilities of the positive class): the frequency of positives in each bin versus
    the mean predicted probability. Multi-class (``[N, C]``): top-label calibration, i.e. accuracy of
    the arg-max class versus its mean probability. Bins are closed on the right, (a, b], except
    the first, [0, b].
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    if p.ndim == 1:
        conf, hit = p, (y == 1).astype(np.float64)
    elif p.ndim == 2:
        conf = p.max(axis=1)
        hit = (p.argmax(axis=1) == y).astype(np.float64)
    else:
        raise ValueError(f"probabilities must be [N] or [N, C], got shape {p.shape}")
    if len(conf) != len(y):
        raise ValueError("probabilities and labels differ in length")
    if len(y) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(hit[sel].mean() - conf[sel].mean())
    return float(ece)


def calibration_curve(
    y_true: Sequence[int] | np.ndarray, probabilities: np.ndarray, num_bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin: (mean confidence, observed frequency, count); binning as the ECE."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    if p.ndim == 2:
        conf, hit = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    else:
        conf, hit = p, (y == 1).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
    out = [(conf[bins == b].mean(), hit[bins == b].mean(), int((bins == b).sum())) for b in range(num_bins) if (bins == b).any()]
    if not out:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
    c, h, n = zip(*out)
    return np.asarray(c), np.asarray(h), np.asarray(n, dtype=np.int64)


def one_vs_rest_auroc(y_true: Sequence[int] | np.ndarray, probabilities: np.ndarray) -> list[float]:
    """AUROC of each class against the others (``nan`` for a class absent from the labels)."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != len(y):
        raise ValueError(f"probabilities must be [N, C] with N = {len(y)}, got shape {p.shape}")
    return [roc_auc((y == c).astype(np.int64), p[:, c]) for c in range(p.shape[1])]


def macro_auroc(y_true: Sequence[int] | np.ndarray, probabilities: np.ndarray) -> float:
    """Unweighted mean of the one-vs-rest AUROCs over the classes present (sklearn's ``ovr``/``macro``)."""
    values = [v for v in one_vs_rest_auroc(y_true, probabilities) if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def multiclass_metrics(y_true: Sequence[int] | np.ndarray, probabilities: np.ndarray) -> dict:
    """Arg-max predictions: accuracy, macro F1, macro AUROC, per-class one-vs-rest metrics."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    num_classes = p.shape[1]
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, num_classes)
    aucs = one_vs_rest_auroc(y, p)
    per_class = []
    for c in range(num_classes):
        yc = (y == c).astype(np.int64)
        m = binary_metrics(yc, (pred == c).astype(np.float64), 0.5)
        m.pop("threshold")
        m["auroc"] = aucs[c]
        m["support"] = int(yc.sum())
        per_class.append(m)
    f1s = [m["f1"] for m in per_class if m["support"] > 0]
    return {
        "accuracy": _safe_div(int(np.trace(cm)), len(y)),
        "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "auroc": macro_auroc(y, p),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y_true: Sequence[int] | np.ndarray,
    scores: np.ndarray,
    groups: Optional[Sequence] = None,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``metric(y, scores)``.

    Resampling is by patient: with ``groups`` (one patient id per row) whole patients are drawn
    with replacement and all their rows kept, so windows of one patient never count as independent
    evidence; without ``groups`` each row is a patient. Resamples where the metric is undefined
    (e.g. one class only for AUROC) are dropped. Seeded, so a report is reproducible.
    """
    y = np.asarray(y_true)
    s = np.asarray(scores)
    if len(y) != len(s):
        raise ValueError("labels and scores differ in length")
    if groups is None:
        members = [np.array([i]) for i in range(len(y))]
    else:
        g = np.asarray(groups)
        if len(g) != len(y):
            raise ValueError("groups and labels differ in length")
        _, inverse = np.unique(g, return_inverse=True)
        members = [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)] if len(g) else []
    if not members:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_resamples):
        pick = rng.integers(0, len(members), size=len(members))
        idx = np.concatenate([members[k] for k in pick])
        v = metric(y[idx], s[idx])
        if not np.isnan(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(np.asarray(values), [alpha, 1.0 - alpha])
    return float(lo), float(hi)

"""Window scores -> one score per patient.

The paper scores a patient by the MAX over its windows (a lesion seen clearly in one window is
enough); the mean is offered as a smoother alternative. For multi-class probabilities the max is
taken per class and the result renormalised to sum to one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

AGGREGATIONS = ("max", "mean")


def aggregate_by_patient(
    patient_ids: Sequence[str], probabilities: np.ndarray, labels: Sequence[int], method: str = "max"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return (patient ids in first-seen order, per-patient probabilities, per-patient labels).

    ``probabilities`` is [N] (binary, positive class) or [N, C]. Every window of a patient must carry
    the same label, otherwise the cohort is inconsistent and a ValueError names the patient.
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {AGGREGATIONS}")
    ids = [str(p) for p in patient_ids]
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if not (len(ids) == len(p) == len(y)):
        raise ValueError(f"patient ids ({len(ids)}), probabilities ({len(p)}) and labels ({len(y)}) differ in length")
    order: list[str] = []
    rows: dict[str, list[int]] = {}
    for i, pid in enumerate(ids):
        if pid not in rows:
            rows[pid] = []
            order.append(pid)
        rows[pid].append(i)
    out_p = []
    out_y = []
    for pid in order:
        idx = rows[pid]
        labs = np.unique(y[idx])
        if len(labs) != 1:
            raise ValueError(f"patient {pid} has windows with different labels {labs.tolist()}")
        block = p[idx]
        agg = block.max(axis=0) if method == "max" else block.mean(axis=0)
        if agg.ndim == 1 and method == "max":
            agg = agg / agg.sum() if agg.sum() > 0 else np.full_like(agg, 1.0 / len(agg))
        out_p.append(agg)
        out_y.append(int(labs[0]))
    return order, np.asarray(out_p), np.asarray(out_y, dtype=np.int64)

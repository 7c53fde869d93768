"""Patient-level stratified train/val/test split and k-fold assignment, seeded and reproducible."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _stratified_order(labels: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """Indices ordered so every prefix holds the classes in their overall proportions.

    Each class is shuffled, its members get evenly spaced ranks (i + u) / n in [0, 1), and all
    patients are sorted by rank: taking the first m gives a stratified sample of size m.
    """
    labels = np.asarray(labels, dtype=object)
    ranks = np.empty(len(labels), dtype=np.float64)
    for cls in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        ranks[members] = (np.arange(len(members)) + rng.uniform(0.0, 1.0)) / len(members)
    tie_break = rng.permutation(len(labels))
    return np.lexsort((tie_break, ranks))


def assign_splits(
    labels: Sequence[str],
    seed: int = 0,
    test_fraction: float = 0.15,
    val_fraction: float = 0.15,
    folds: int = 5,
) -> tuple[list[str], list[int]]:
    """One label per patient -> (split per patient, fold per patient).

    The split is "train", "val" or "test", stratified by class, with round(N * fraction) patients
    in test and in val. ``fold`` (0..folds-1) partitions train+val into stratified folds for
    k-fold cross-validation; test patients get fold -1.
    """
    if not 0.0 <= test_fraction < 1.0 or not 0.0 <= val_fraction < 1.0 or test_fraction + val_fraction >= 1.0:
        raise ValueError(
            f"test and val fractions must be in [0, 1) with a sum below 1, got {test_fraction} and {val_fraction}"
        )
    if int(folds) < 1:
        raise ValueError(f"folds must be at least 1, got {folds}")
    n = len(labels)
    rng = np.random.default_rng(seed)
    order = _stratified_order(labels, rng)
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    split = np.full(n, "train", dtype=object)
    split[order[:n_test]] = "test"
    split[order[n_test : n_test + n_val]] = "val"
    fold = np.full(n, -1, dtype=np.int64)
    rest = np.flatnonzero(split != "test")
    # Deal each class's shuffled members round-robin, continuing the count across classes: every
    # class is spread over the folds within one patient, and fold sizes differ by at most one.
    counter = 0
    rest_labels = np.asarray([labels[i] for i in rest], dtype=object)
    for cls in sorted(set(rest_labels.tolist())):
        members = rest[rest_labels == cls]
        members = members[rng.permutation(len(members))]
        fold[members] = (counter + np.arange(len(members))) % int(folds)
        counter += len(members)
    return split.tolist(), fold.tolist()

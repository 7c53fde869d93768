"""Splits too small to measure: a class with a handful of patients in a split.

Lung-PET-CT-Dx has 5 large-cell patients in all, so a test split of 15 % holds one or none; any
metric of that class on it, and any bootstrap confidence interval over it, says nothing. The
indexer and the evaluation name such classes instead of printing numbers that look meaningful.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from MMCAFNetLib.results import CLASS_LABELS

#: Fewer patients of a class than this in a split: warned about; no confidence interval is computed.
MIN_PATIENTS_PER_CLASS = 5


def _named(letter: str) -> str:
    label = CLASS_LABELS.get(letter, (0, "", None))[1]
    return f"{letter} ({label})" if label else letter


def small_classes(counts: Mapping[str, int], minimum: int = MIN_PATIENTS_PER_CLASS) -> dict[str, int]:
    """The classes of ``counts`` (class -> patients) with fewer than ``minimum`` patients."""
    return {c: int(n) for c, n in counts.items() if int(n) < minimum}


def small_split_warning(split: str, counts: Mapping[str, int], minimum: int = MIN_PATIENTS_PER_CLASS) -> str:
    """One line naming the classes of ``split`` with fewer than ``minimum`` patients ("" when none)."""
    few = small_classes(counts, minimum)
    if not few:
        return ""
    listed = ", ".join(f"{n} of class {_named(c)}" for c, n in sorted(few.items()))
    return (
        f"the {split} split holds only {listed} (fewer than {minimum}): metrics of such a class on it are "
        "not meaningful and no confidence interval is given for it"
    )


def cohort_split_warnings(
    labels: Iterable[str], splits: Iterable[str], minimum: int = MIN_PATIENTS_PER_CLASS
) -> list[str]:
    """Warnings for every split of a cohort table (its ``label`` and ``split`` columns)."""
    pairs = list(zip(labels, splits))
    classes = sorted({label for label, _ in pairs})
    lines = []
    for split in ("train", "val", "test"):
        counts = {c: sum(1 for label, s in pairs if s == split and label == c) for c in classes}
        if any(s == split for _, s in pairs):
            line = small_split_warning(split, counts, minimum)
            if line:
                lines.append(line)
    return lines

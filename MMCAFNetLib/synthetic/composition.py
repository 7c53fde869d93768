"""Cohort composition: class proportions and patient counts per class."""

from __future__ import annotations

import math
from typing import Sequence

from MMCAFNetLib.synthetic.design import CLASS_LETTERS, DEFAULT_CLASS_PROPORTIONS
from MMCAFNetLib.synthetic.draw import _check_label

# --------------------------------------------------------------------------------------------------
# Cohort composition


def parse_classes(spec: str | dict[str, float] | Sequence[str] | None) -> dict[str, float]:
    """'A,G' or 'A=0.6,G=0.4' (or a dict / list) -> normalised class proportions."""
    if spec is None:
        return dict(DEFAULT_CLASS_PROPORTIONS)
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if str(p).strip()]
        items = []
        for part in parts:
            if "=" in part:
                k, v = part.split("=", 1)
                try:
                    items.append((k, float(v)))
                except ValueError:
                    raise ValueError(f"class weight {part!r} is not a number; write e.g. A=0.6,G=0.4") from None
            else:
                letter = _check_label(part)
                items.append((letter, DEFAULT_CLASS_PROPORTIONS[letter]))
    out: dict[str, float] = {}
    for k, v in items:
        letter = _check_label(k)
        if v < 0:
            raise ValueError(f"class weight for {letter} must be >= 0, got {v}")
        out[letter] = float(v)
    total = sum(out.values())
    if not out or total <= 0:
        raise ValueError("no class with a positive weight; give e.g. --classes A,G or A=0.6,G=0.4")
    return {k: v / total for k, v in out.items() if v > 0}


def class_counts(patients: int, proportions: dict[str, float]) -> dict[str, int]:
    """Largest-remainder split of ``patients`` over the classes; every class gets one when possible."""
    if patients < 1:
        raise ValueError(f"patients must be at least 1, got {patients}")
    letters = [c for c in CLASS_LETTERS if c in proportions]
    raw = {c: proportions[c] * patients for c in letters}
    counts = {c: math.floor(raw[c]) for c in letters}
    order = sorted(letters, key=lambda c: (-(raw[c] - counts[c]), -proportions[c]))
    for c in order[: patients - sum(counts.values())]:
        counts[c] += 1
    if patients >= len(letters):  # no requested class left empty
        for c in letters:
            if counts[c] == 0:
                donor = max(letters, key=lambda d: counts[d])
                counts[donor] -= 1
                counts[c] = 1
    return {c: n for c, n in counts.items() if n > 0}


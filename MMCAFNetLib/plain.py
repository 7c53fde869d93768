"""Plain Python data from numpy values: what JSON files and ``weights_only`` checkpoints can hold."""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

import numpy as np


def to_plain(value: Any, *, nonfinite_as_none: bool = False) -> Any:
    """dicts, lists and tuples recursively; numpy arrays -> lists, numpy scalars -> Python scalars,
    paths -> str. With ``nonfinite_as_none`` NaN and infinities become None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): to_plain(v, nonfinite_as_none=nonfinite_as_none) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, nonfinite_as_none=nonfinite_as_none) for v in value]
    if isinstance(value, np.ndarray):
        return to_plain(value.tolist(), nonfinite_as_none=nonfinite_as_none)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, PurePath):
        return str(value)
    if nonfinite_as_none and isinstance(value, float) and not math.isfinite(value):
        return None
    return value

"""The one JSON writer of the library: strict JSON only (no bare NaN or Infinity), written atomically.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which strict parsers (JavaScript,
``jq``, most JSON libraries) refuse. Metrics of a tiny split (an AUC with one class present), a
failed fit or a damaged header can produce them. Here every non-finite float becomes ``null``, and a
top-level object gets a note saying which entries were replaced, so a reader can tell "not
computable" from "not recorded".
"""

from __future__ import annotations

import json
import math
import os
from pathlib import PurePath
from typing import Any

import numpy as np

#: Key of the note added to a top-level object when non-finite values were written as null.
NONFINITE_NOTE_KEY = "nonfinite_as_null"


def _plain(value: Any, where: str, replaced: list[str]) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}" if where else str(k), replaced) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", replaced) for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where, replaced)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        replaced.append(f"{where or '(value)'}: {value!r}")
        return None
    return value


def strict_plain(value: Any) -> tuple[Any, list[str]]:
    """(plain JSON-ready data with non-finite floats as None, the replaced entries as 'path: nan')."""
    replaced: list[str] = []
    return _plain(value, "", replaced), replaced


def dumps(value: Any, *, note: bool = True, default: Any = None, **kwargs: Any) -> str:
    """Strict JSON text. With ``note`` a top-level object that had non-finite values gets
    ``nonfinite_as_null`` listing them (e.g. ``["auc: nan"]``)."""
    data, replaced = strict_plain(value)
    if note and replaced and isinstance(data, dict):
        data = {**data, NONFINITE_NOTE_KEY: replaced}
    return json.dumps(data, allow_nan=False, default=default, **kwargs)


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2, note: bool = True,
               default: Any = None) -> None:
    """Write ``value`` as strict JSON to ``path`` atomically (see :mod:`MMCAFNetLib.atomic`)."""
    from MMCAFNetLib.atomic import write_text_atomic

    write_text_atomic(path, dumps(value, note=note, indent=indent, default=default) + "\n")


def loads_strict(text: str) -> Any:
    """Parse JSON refusing NaN and Infinity (what a strict reader does): for tests and checks."""

    def refuse(token: str) -> Any:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)

"""The checkpoint file: tensors and plain Python data only, readable with ``weights_only=True``.

A checkpoint downloaded from the internet must never be able to run code, so nothing here
unpickles arbitrary objects.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1

#: Keys every checkpoint carries (see DESIGN.md "Contracts").
REQUIRED_KEYS = (
    "format_version",  # int
    "model_name",  # registry name, e.g. "mmcafnet-lite"
    "model_config",  # dict of config overrides (plain data) passed to create_model
    "class_names",  # list[str]; binary tasks list [negative, positive]
    "task",  # "AG" | "ABEG" | custom
    "state_dict",  # dict[str, Tensor]
    "schema",  # clinical schema dict (ehr.ClinicalSchema.to_dict()), including fitted statistics
    "preset",  # preprocessing preset dict (windows.Preset.to_dict())
    "threshold",  # float decision threshold chosen on validation data (binary), else 0.5
    "provenance",  # dict: data_fingerprint, seed, date, library_version, command, ...
    "metrics",  # dict of validation metrics
    "demo",  # bool: trained on synthetic data, not for any clinical use
)


class CheckpointError(ValueError):
    """The file is not a usable MMCAF-Net checkpoint; the message says why and what to do."""


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write atomically: a temp file in the same folder, fsync, then rename over ``path``.

    An interrupted write (kill, full disk) leaves any earlier file at ``path`` intact.
    """
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint payload lacks {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; refuse pickled code, newer formats and foreign files clearly."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(
            f"{path} cannot be loaded safely as a checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). Files holding pickled Python "
            "objects are refused because loading them could run code; convert the file with "
            "`mmcafnet` from a trusted environment, or use a checkpoint written by `mmcafnet train`."
        ) from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(
            f"{path} is not an MMCAF-Net checkpoint (no format_version). A raw state dict from the "
            "authors' reference code can be converted with MMCAFNetLib.models.from_reference_state_dict."
        )
    version = payload["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, but this version of MMCAFNetLib reads "
            f"format versions up to {FORMAT_VERSION}. Update MMCAFNetLib to read it."
        )
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path} is missing the checkpoint entries {missing}")
    return payload

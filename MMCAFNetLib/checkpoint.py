"""The checkpoint file: tensors and plain Python data only, readable with ``weights_only=True``.

A checkpoint downloaded from the internet must never be able to run code, so nothing here
unpickles arbitrary objects.
"""

from __future__ import annotations

import os
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
    from MMCAFNetLib.atomic import atomic_output, raise_if_no_space

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:  # beside the target, permissions from the umask
        try:
            with open(tmp, "wb") as fh:
                torch.save(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
        except (RuntimeError, OSError) as exc:  # torch reports a full disk as a RuntimeError
            raise_if_no_space(exc, tmp, path)
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


# ---------------------------------------------------------------------------------------------
# the network a checkpoint describes: checked before anything is allocated

_PLAIN_CONFIG_TYPES = (bool, int, float, str, type(None))


def _plain_config_value(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain_config_value(v) for v in value)
    return isinstance(value, _PLAIN_CONFIG_TYPES)


def check_class_names(payload: dict[str, Any], source: str = "checkpoint") -> list[str]:
    """The checkpoint's class names: at least two distinct non-empty strings."""
    names = payload.get("class_names")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in names):
        raise CheckpointError(f"{source}: class_names must be a list of class names, got {names!r:.200}")
    if len(names) < 2:
        raise CheckpointError(f"{source}: the checkpoint names {len(names)} class(es); at least 2 are needed")
    if len(set(names)) != len(names):
        raise CheckpointError(f"{source}: class_names {names} repeat a name")
    return [str(n) for n in names]


def model_from_checkpoint(payload: dict[str, Any], source: str = "checkpoint",
                          num_clinical: int | None = None) -> torch.nn.Module:
    """Build the checkpoint's network and load its weights, refusing an inconsistent checkpoint.

    Checked in order, each with a CheckpointError (exit status 2 on the command line) instead of a
    traceback: the class list (at least two names), ``model_config`` (a dict of plain values), the
    network's head against the class list (one logit for two classes, else one per class), then the
    network is built on the ``meta`` device (no memory allocated, so an absurd width cannot exhaust
    memory) and every tensor shape compared with the stored weights, and only then built for real.
    """
    from MMCAFNetLib.models import create_model

    class_names = check_class_names(payload, source)
    name = payload.get("model_name")
    config = payload.get("model_config")
    if config is None:
        config = {}
    if not isinstance(config, dict) or not all(isinstance(k, str) and _plain_config_value(v) for k, v in config.items()):
        raise CheckpointError(f"{source}: model_config must be a dict of plain values, got {config!r:.200}")
    config = dict(config)
    expected = 1 if len(class_names) == 2 else len(class_names)
    heads = config.setdefault("num_classes", expected)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads not in {expected, len(class_names)}:
        raise CheckpointError(
            f"{source}: the network's head has {heads!r} output(s) but the checkpoint names {len(class_names)} "
            f"classes {class_names}; a head has one output for two classes (binary) or one per class. The "
            "checkpoint is inconsistent: use the file written by `mmcafnet train`."
        )
    if num_clinical is not None:
        config.setdefault("num_clinical", int(num_clinical))
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: state_dict must map names to tensors")
    try:
        with torch.device("meta"):
            skeleton = create_model(str(name), **config)
    except Exception as exc:  # any failure to build from stored settings is a bad checkpoint, not a crash
        raise CheckpointError(
            f"{source}: cannot build model {name!r} with model_config {config}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}. The checkpoint is damaged or comes from a "
            "newer MMCAFNetLib; update it or use another checkpoint."
        ) from None
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != stored:
        missing = sorted(set(shapes) - set(stored))[:3]
        extra = sorted(set(stored) - set(shapes))[:3]
        wrong = [f"{k} {stored[k]} (model {shapes[k]})" for k in shapes if k in stored and shapes[k] != stored[k]][:3]
        detail = "; ".join(p for p in (
            f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "",
            f"shapes differ: {', '.join(wrong)}" if wrong else "") if p)
        raise CheckpointError(f"{source}: the weights do not fit model {name!r} with its model_config ({detail})")
    del skeleton
    model = create_model(str(name), **config)
    model.load_state_dict(state, strict=True)
    return model

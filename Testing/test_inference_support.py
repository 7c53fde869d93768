"""Shared helpers for the inference tests (no tests here): an untrained checkpoint written the real way."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

#: Small windows on a coarse grid keep every test to a few forward passes of the lite model.
TEST_PRESET = {
    "name": "test-small",
    "spacing": [6.0, 6.0, 6.0],
    "window": [8, 32, 32],
    "hu_range": [-1000.0, 400.0],
    "mean": 0.3,
}

TRAINING_RECORDS = [
    {"sex": "M", "age": 63, "weight": 72.0, "t_stage": "2", "n_stage": "0", "m_stage": "0", "smoking": "1"},
    {"sex": "F", "age": 58, "weight": 61.0, "t_stage": "1a", "n_stage": "2", "m_stage": "1a", "smoking": "0"},
    {"sex": "M", "age": 71, "weight": 80.0, "t_stage": "4", "n_stage": "1", "m_stage": "0", "smoking": "1"},
]


def write_untrained_checkpoint(
    path: Path, class_names: Sequence[str] = ("A", "G"), seed: int = 0, demo: bool = False, threshold: float = 0.5
) -> Path:
    """An untrained mmcafnet-lite checkpoint, saved with checkpoint.save_checkpoint."""
    from MMCAFNetLib.checkpoint import FORMAT_VERSION, save_checkpoint
    from MMCAFNetLib.ehr import default_schema
    from MMCAFNetLib.models import create_model

    torch.manual_seed(seed)
    schema = default_schema().fit(TRAINING_RECORDS)
    num_classes = 1 if len(class_names) == 2 else len(class_names)
    model = create_model("mmcafnet-lite", num_classes=num_classes, num_clinical=schema.num_features)
    payload = {
        "format_version": FORMAT_VERSION,
        "model_name": "mmcafnet-lite",
        "model_config": {"num_classes": num_classes},
        "class_names": list(class_names),
        "task": "".join(class_names),
        "state_dict": model.state_dict(),
        "schema": schema.to_dict(),
        "preset": dict(TEST_PRESET),
        "threshold": float(threshold),
        "provenance": {"library_version": "test", "seed": seed, "data_fingerprint": "untrained"},
        "metrics": {},
        "demo": demo,
    }
    return save_checkpoint(payload, path)


def box_contains(box, point, tol: float = 1e-6) -> bool:
    lo, hi = np.asarray(box[0]), np.asarray(box[1])
    p = np.asarray(point)
    return bool(np.all(p >= lo - tol) and np.all(p <= hi + tol))


def boxes_intersect(a, b) -> bool:
    return bool(np.all(np.asarray(a[0]) <= np.asarray(b[1])) and np.all(np.asarray(b[0]) <= np.asarray(a[1])))

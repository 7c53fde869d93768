"""numpy values to plain data, for JSON files and weights_only checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from MMCAFNetLib.plain import to_plain


def test_numpy_values_become_python_values_recursively(tmp_path):
    value = {"a": np.float32(0.5), 1: [np.int64(3), (np.bool_(True), np.arange(3))], "p": Path("x/y")}
    out = to_plain(value)
    assert out == {"a": 0.5, "1": [3, [True, [0, 1, 2]]], "p": "x/y"}
    assert type(out["a"]) is float and type(out["1"][0]) is int and type(out["1"][1][0]) is bool
    torch.save(out, tmp_path / "x.pt")
    assert torch.load(tmp_path / "x.pt", weights_only=True) == out


def test_nonfinite_values_become_null_only_when_asked():
    value = {"auroc": float("nan"), "hi": np.float64(np.inf), "ok": 1.5}
    assert to_plain(value, nonfinite_as_none=True) == {"auroc": None, "hi": None, "ok": 1.5}
    kept = to_plain(value)
    assert np.isnan(kept["auroc"]) and kept["hi"] == float("inf")
    json.loads(json.dumps(to_plain(value, nonfinite_as_none=True), allow_nan=False))

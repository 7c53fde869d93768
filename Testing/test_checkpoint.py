"""The checkpoint file format: atomic writes, weights_only loading, clear refusals."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from MMCAFNetLib.checkpoint import (
    FORMAT_VERSION,
    REQUIRED_KEYS,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from MMCAFNetLib.preset import DEFAULT, PAPER, Preset, get_preset


def _payload(**changes):
    payload = {
        "format_version": FORMAT_VERSION,
        "model_name": "mmcafnet-lite",
        "model_config": {},
        "class_names": ["A", "G"],
        "task": "AG",
        "state_dict": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)},
        "schema": {"fields": []},
        "preset": DEFAULT.to_dict(),
        "threshold": 0.42,
        "provenance": {"seed": 0},
        "metrics": {"auroc": 0.9},
        "demo": True,
    }
    payload.update(changes)
    return payload


def test_round_trip_keeps_tensors_and_plain_data(tmp_path):
    path = save_checkpoint(_payload(), tmp_path / "sub" / "model.pt")
    loaded = load_checkpoint(path)
    assert set(REQUIRED_KEYS) <= set(loaded)
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert loaded["threshold"] == pytest.approx(0.42)
    assert get_preset(loaded["preset"]) == DEFAULT
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["model.pt"], "no temp file left behind"


class _CreatesFile:
    """Unpickling this runs ``open(path, 'w')``: the attack a weights_only load must block."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_callable_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned.txt"
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"format_version": 1, "payload": _CreatesFile(str(marker))}, fh)
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(bad)
    assert not marker.exists(), "loading the checkpoint executed code"


def test_newer_format_is_refused_naming_both_versions(tmp_path):
    path = tmp_path / "future.pt"
    torch.save(_payload(format_version=FORMAT_VERSION + 1), path)
    with pytest.raises(CheckpointError, match=rf"version {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}"):
        load_checkpoint(path)


def test_raw_state_dict_and_incomplete_payload_are_refused(tmp_path):
    torch.save({"layer.weight": torch.zeros(2)}, tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match="not an MMCAF-Net checkpoint"):
        load_checkpoint(tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match="lacks"):
        save_checkpoint({"format_version": 1}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_failed_write_leaves_earlier_file_intact(tmp_path):
    path = save_checkpoint(_payload(threshold=0.1), tmp_path / "model.pt")
    before = path.read_bytes()

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(_payload(metrics={"x": Unsaveable()}), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_presets_round_trip_and_normalise():
    import numpy as np

    for preset in (PAPER, DEFAULT):
        assert Preset.from_dict(preset.to_dict()) == preset
    hu = np.array([-5000.0, PAPER.hu_range[0], PAPER.hu_range[1], 5000.0])
    out = PAPER.normalise(hu)
    assert out[0] == out[1] == pytest.approx(-PAPER.mean)
    assert out[2] == out[3] == pytest.approx(1 - PAPER.mean)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")

"""The bundled demo model: loads safely, is flagged as a demo, and on freshly generated synthetic
patients (a seed never used to train it) is about as accurate as its report says."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "Resources" / "Models" / "mmcafnet-lite-demo.pt"
REPORT = REPO / "Resources" / "Models" / "mmcafnet-lite-demo-report" / "metrics.json"

pytestmark = pytest.mark.skipif(not DEMO.is_file(), reason="the demo model has not been trained into Resources/Models yet")

#: Synthetic seeds the demo cohort was NOT generated with (configs/demo.json documents the training seed).
FRESH_SEED = 777_001


def test_demo_checkpoint_is_small_safe_and_flagged():
    assert DEMO.stat().st_size < 20 * 1024 * 1024
    payload = torch.load(DEMO, map_location="cpu", weights_only=True)
    assert payload["demo"] is True and payload["model_name"] == "mmcafnet-lite"
    assert payload["class_names"] == ["A", "G"] and 0.0 < payload["threshold"] < 1.0
    assert payload["provenance"]["seed"] is not None and len(payload["provenance"]["data_fingerprint"]) == 64
    assert REPORT.is_file(), "the demo model ships without its evaluation report"


def test_demo_model_reaches_its_reported_accuracy_on_fresh_patients():
    from MMCAFNetLib.inference import Predictor
    from MMCAFNetLib.synthetic import make_case

    claimed = json.loads(REPORT.read_text())
    predictor = Predictor.load(DEMO, device="cpu")
    assert predictor.is_demo
    cases = [(label, number) for number in range(1, 7) for label in ("A", "G")]
    correct = 0
    for label, number in cases:
        case = make_case(label, FRESH_SEED, size=128, number=number)
        result = predictor.classify(case.volume, case.record, lesion=case.lesion_box_ras, heatmap=None)
        correct += result.predicted_class == label
    n = len(cases)
    accuracy = correct / n
    # "Reaches the claimed accuracy" allowing for the sampling error of n fresh patients: not more
    # than two binomial standard errors below the test-set accuracy in the report.
    p = claimed["accuracy"]
    floor = p - 2 * math.sqrt(max(p * (1 - p), 0.05) / n)
    assert accuracy >= floor, f"{correct}/{n} fresh patients right, report claims {p:.3f} (floor {floor:.3f})"


def _claimed_pointing(run: str) -> float:
    """The bundled report's pointing game of the model's default heatmap for ``run`` (lesion | whole)."""
    claimed = json.loads(REPORT.read_text())
    localisation = claimed.get("localisation") or {}
    block = (localisation.get("methods") or {}).get(localisation.get("default_method"), {}).get(run)
    if block is None:
        pytest.skip(f"the bundled report has no {run} localisation; refresh it with the command in "
                    "docs/training.md ('The bundled demo model')")
    return float(block["pointing_game"])


def _assert_pointing_as_claimed(run: str, margin_mm: float) -> None:
    """The default heatmap's peak falls in the lesion box (+ margin) on 8 fresh phantoms not less
    often than the report claims, less two binomial standard errors."""
    from MMCAFNetLib.evaluate.localisation import localisation_record
    from MMCAFNetLib.inference import Predictor
    from MMCAFNetLib.synthetic import make_case

    p = _claimed_pointing(run)
    predictor = Predictor.load(DEMO, device="cpu")
    cases = [(label, number) for number in range(1, 5) for label in ("A", "G")]
    hits = 0
    for label, number in cases:
        case = make_case(label, FRESH_SEED, size=128, number=number)
        lesion = case.lesion_box_ras if run == "lesion" else None
        result = predictor.classify(case.volume, case.record, lesion=lesion)  # heatmap="model"
        assert result.heatmap.meta["method"] == predictor.default_heatmap
        lo, hi = (np.asarray(c, dtype=float) for c in case.lesion_box_ras)
        hits += localisation_record(result.heatmap, lo, hi, margin_mm=margin_mm)["hit"]
    n = len(cases)
    floor = p - 2 * math.sqrt(max(p * (1 - p), 0.05) / n)
    assert hits / n >= floor, f"{run}: {hits}/{n} peaks in the lesion box, report claims {p:.2f} (floor {floor:.2f})"


def test_demo_default_heatmap_points_at_the_lesion_on_fresh_patients():
    """Given the lesion, the model's own heatmap (its checkpoint's ``heatmap``) peaks in the lesion
    box (+5 mm) on fresh phantoms about as often as its report says."""
    _assert_pointing_as_claimed("lesion", margin_mm=5.0)


def test_demo_default_heatmap_finds_the_lesion_in_a_whole_volume_scan():
    """Without a lesion mark the model's own heatmap peaks in the lesion box (+10 mm) on fresh
    phantoms about as often as its report's whole-volume localisation says."""
    _assert_pointing_as_claimed("whole", margin_mm=10.0)

"""The evaluation report: numbers in the paper-layout table equal the metrics, CIs bracket them,
lesion-size groups split the patients, 4-class reports carry the one-vs-rest table, plots exist."""

from __future__ import annotations

import json

import numpy as np
import pytest

from MMCAFNetLib.evaluate.metrics import binary_metrics, macro_auroc, roc_auc
from MMCAFNetLib.evaluate.report import evaluate_patients, results_table, write_report


def _binary_case(n=40, seed=1):
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    sizes = np.where(np.arange(n) % 4 == 0, 8.0, 25.0)  # every fourth lesion is small
    return [f"P{i:03d}" for i in range(n)], y, p, sizes


def test_binary_report_uses_the_given_threshold_and_splits_by_lesion_size(tmp_path):
    ids, y, p, sizes = _binary_case()
    m = evaluate_patients(ids, y, p, ["A", "G"], threshold=0.6, lesion_size_mm=sizes, num_resamples=200, seed=3)
    expected = binary_metrics(y, p, 0.6)
    for key in ("accuracy", "f1", "sensitivity", "specificity", "ppv", "npv"):
        assert m[key] == pytest.approx(expected[key])
        lo, hi = m["ci95"][key]
        assert lo <= m[key] + 1e-12 and m[key] <= hi + 1e-12
    assert m["auroc"] == pytest.approx(roc_auc(y, p))
    assert m["confusion_matrix"] == [[expected["tn"], expected["fp"]], [expected["fn"], expected["tp"]]]
    groups = m["lesion_size_groups"]
    small = sizes <= 10
    assert groups["small"]["num_patients"] == int(small.sum()) == 10
    assert groups["small"]["auroc"] == pytest.approx(roc_auc(y[small], p[small]))
    assert groups["large"]["accuracy"] == pytest.approx(binary_metrics(y[~small], p[~small], 0.6)["accuracy"])

    report = write_report(m, tmp_path, "Test report", "mmcafnet-lite", {"demo": True, "split": "test"})
    text = report.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| mmcafnet-lite |"))
    cells = [c.strip().split(" ")[0] for c in row.strip("|").split("|")[1:]]
    assert cells == [f"{m[k]:.3f}" for k in ("auroc", "accuracy", "f1", "specificity", "sensitivity", "ppv", "npv")]
    assert "threshold 0.6000, chosen on the validation data" in text and "synthetic phantoms" in text
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["threshold"] == 0.6 and len(saved["patients"]) == len(ids)
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "calibration.png").stat().st_size > 1000
    assert (tmp_path / "predictions.csv").read_text().splitlines()[0] == "patient_id,label,p_G"


def test_four_class_report(tmp_path):
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(4), 8)
    logits = rng.normal(size=(32, 4)) + 1.5 * np.eye(4)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = evaluate_patients([f"P{i}" for i in range(32)], y, p, list("ABEG"), 0.5, num_resamples=100)
    assert m["auroc"] == pytest.approx(macro_auroc(y, p))
    assert [r["class"] for r in m["per_class"]] == list("ABEG") and all(r["support"] == 8 for r in m["per_class"])
    assert np.asarray(m["confusion_matrix"]).sum() == 32
    text = write_report(m, tmp_path, "4 classes", "mmcafnet").read_text()
    assert "| G (n=8) |" in text and "predicted E" in text


def test_results_table_layout_is_the_papers():
    table = results_table([("x", {"auroc": 0.5, "accuracy": 1.0})], with_ci=False).splitlines()
    assert table[0] == "| Method | AUROC | ACC | F1 | Spec | Sens | PPV | NPV |"
    assert table[2] == "| x | 0.500 | 1.000 | n/a | n/a | n/a | n/a | n/a |"

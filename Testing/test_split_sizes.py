"""Splits too small to measure: named by class at index and evaluation time, and no confidence
interval computed over a handful of patients."""

from __future__ import annotations

import numpy as np

from MMCAFNetLib.dataset.split_sizes import MIN_PATIENTS_PER_CLASS, cohort_split_warnings, small_split_warning
from MMCAFNetLib.evaluate.report import evaluate_patients, write_report


def test_the_real_class_sizes_leave_large_cell_too_small_for_a_test_split() -> None:
    # The collection's patients per class (reference counts): 251 A, 38 B, 5 E, 61 G; 15 % test.
    labels = ["A"] * 251 + ["B"] * 38 + ["E"] * 5 + ["G"] * 61
    rng = np.random.default_rng(0)
    splits = rng.choice(["train", "val", "test"], size=len(labels), p=[0.7, 0.15, 0.15]).tolist()
    lines = cohort_split_warnings(labels, splits)
    test_line = next(line for line in lines if line.startswith("the test split"))
    assert "of class E (Large cell carcinoma)" in test_line
    assert "class A" not in test_line  # plenty of adenocarcinomas
    assert small_split_warning("test", {"A": 40, "G": 9}) == ""


def test_evaluation_with_a_tiny_class_warns_and_gives_no_intervals(tmp_path) -> None:
    y = np.array([0] * 30 + [1] * 3)  # three positives
    p = np.clip(0.5 * y + 0.5 * np.random.default_rng(1).random(len(y)), 0, 1)
    m = evaluate_patients([f"P{i}" for i in range(len(y))], y, p, ["A", "E"], 0.5, num_resamples=50)
    assert "ci95" not in m
    assert m["warnings"] and "3 of class E (Large cell carcinoma)" in m["warnings"][0]
    text = write_report(m, tmp_path, "tiny", "mmcafnet-lite").read_text()
    assert "**Warning**: the evaluated split holds only 3 of class E" in text
    row = next(line for line in text.splitlines() if line.startswith("| mmcafnet-lite |"))
    assert "(" not in row  # numbers, no intervals

    y = np.array([0] * 30 + [1] * MIN_PATIENTS_PER_CLASS)
    p = np.clip(0.5 * y + 0.5 * np.random.default_rng(1).random(len(y)), 0, 1)
    m = evaluate_patients([f"P{i}" for i in range(len(y))], y, p, ["A", "E"], 0.5, num_resamples=50)
    assert "auroc" in m["ci95"] and not m.get("warnings")

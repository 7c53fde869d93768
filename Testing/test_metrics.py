"""Metrics against values worked out by hand on small fixed tables (scikit-learn only as a cross-check)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from MMCAFNetLib.evaluate import (
    aggregate_by_patient,
    binary_metrics,
    bootstrap_ci,
    calibration_curve,
    confusion_matrix,
    expected_calibration_error,
    macro_auroc,
    multiclass_metrics,
    one_vs_rest_auroc,
    roc_auc,
    roc_curve,
    select_threshold,
)

# Eight patients: four negatives (A) and four positives (G); one tie across classes at 0.7.
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
S = np.array([0.1, 0.4, 0.35, 0.7, 0.8, 0.7, 0.3, 0.9])


def test_auroc_by_pair_counting():
    # Pairs (positive, negative) with the positive scored higher; a tie counts one half.
    # 0.8 beats all 4 negatives; 0.7 beats 0.1, 0.4, 0.35 and ties 0.7 -> 3.5; 0.3 beats 0.1 -> 1;
    # 0.9 beats all 4. (4 + 3.5 + 1 + 4) / (4 * 4) = 12.5 / 16.
    assert roc_auc(Y, S) == pytest.approx(12.5 / 16)
    assert roc_auc(1 - Y, S) == pytest.approx(1 - 12.5 / 16)  # swapping the classes mirrors it
    assert math.isnan(roc_auc([1, 1, 1], [0.2, 0.3, 0.4]))


def test_auroc_matches_trapezoid_of_roc_curve_and_sklearn():
    fpr, tpr, thr = roc_curve(Y, S)
    assert thr[0] == np.inf and fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    trapezoid = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert trapezoid == pytest.approx(roc_auc(Y, S))
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)  # many ties
    assert roc_auc(y, s) == pytest.approx(sklearn_metrics.roc_auc_score(y, s))


def test_binary_metrics_at_threshold():
    # At 0.75: negatives 0.1 0.4 0.35 0.7 all below -> TN 4, FP 0;
    # positives 0.8 0.9 at or above -> TP 2; 0.7 0.3 below -> FN 2.
    m = binary_metrics(Y, S, 0.75)
    assert (m["tp"], m["tn"], m["fp"], m["fn"]) == (2, 4, 0, 2)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(2 / 4)
    assert m["specificity"] == pytest.approx(4 / 4)
    assert m["ppv"] == pytest.approx(2 / 2)
    assert m["npv"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 2))
    # a score equal to the threshold is called positive
    m = binary_metrics(Y, S, 0.7)
    assert (m["tp"], m["fp"]) == (3, 1)
    # an empty denominator is nan, not 0
    assert math.isnan(binary_metrics([0, 0], [0.1, 0.2], 0.5)["sensitivity"])


def test_threshold_selection_youden_versus_accuracy():
    # Six negatives 0.1 0.2 0.3 0.4 0.62 0.65, two positives 0.6 0.9.
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.62, 0.65, 0.6, 0.9])
    # Cut at 0.5 (midpoint of 0.4 and 0.6): sens 2/2, spec 4/6 -> J = 0.667, accuracy 6/8.
    # Cut at 0.775 (midpoint of 0.65 and 0.9): sens 1/2, spec 6/6 -> J = 0.5, accuracy 7/8.
    # Every other cut is worse on both criteria.
    assert select_threshold(y, s, "youden") == pytest.approx(0.5)
    assert select_threshold(y, s, "accuracy") == pytest.approx(0.775)
    with pytest.raises(ValueError, match="threshold method"):
        select_threshold(y, s, "test-set")


def test_threshold_ties_break_towards_one_half():
    # On Y/S, J = 0.5 at the cut 0.55 (sens 3/4, spec 3/4) and at 0.75 (sens 2/4, spec 4/4);
    # 0.55 is closer to 0.5.
    assert select_threshold(Y, S, "youden") == pytest.approx(0.55)
    assert select_threshold([1, 1], [0.2, 0.9]) == 0.5  # one class only: no information


def test_confusion_matrix_counts():
    cm = confusion_matrix([0, 1, 2, 2, 3, 0], [0, 2, 2, 2, 0, 1], 4)
    expected = np.zeros((4, 4), int)
    expected[0, 0] = 1
    expected[1, 2] = 1
    expected[2, 2] = 2
    expected[3, 0] = 1
    expected[0, 1] = 1
    assert (cm == expected).all()
    with pytest.raises(ValueError):
        confusion_matrix([0, 4], [0, 1], 4)


def test_expected_calibration_error_two_bins():
    p = np.array([0.05, 0.15, 0.45, 0.95, 0.85, 0.55])
    y = np.array([0, 1, 1, 1, 1, 0])
    # Bin [0, 0.5]: probabilities 0.05 0.15 0.45 (mean 0.65/3), positives 2 of 3 -> gap |2/3 - 0.65/3|.
    # Bin (0.5, 1]: 0.95 0.85 0.55 (mean 2.35/3), positives 2 of 3 -> gap |2/3 - 2.35/3|.
    expected = 0.5 * abs(2 / 3 - 0.65 / 3) + 0.5 * abs(2 / 3 - 2.35 / 3)
    assert expected_calibration_error(y, p, num_bins=2) == pytest.approx(expected)
    conf, freq, count = calibration_curve(y, p, num_bins=2)
    assert conf == pytest.approx([0.65 / 3, 2.35 / 3])
    assert count.tolist() == [3, 3] and freq == pytest.approx([2 / 3, 2 / 3])
    # perfectly calibrated certainty has no error
    assert expected_calibration_error([0, 1, 1], [0.0, 1.0, 1.0]) == 0.0


def test_multiclass_top_label_ece():
    p = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    y = np.array([0, 1, 2])
    # Top-label confidences 0.7, 0.6, 0.8 fall in three different bins of ten; hits 1, 0, 1.
    expected = (abs(1 - 0.7) + abs(0 - 0.6) + abs(1 - 0.8)) / 3
    assert expected_calibration_error(y, p) == pytest.approx(expected)


def test_one_vs_rest_and_macro_auroc():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.4, 0.5, 0.1],
            [0.3, 0.6, 0.1],
            [0.5, 0.3, 0.2],
            [0.2, 0.2, 0.6],
            [0.1, 0.3, 0.6],
        ]
    )
    # Class 0: positives 0.8, 0.4 vs negatives 0.3 0.5 0.2 0.1 -> 0.8 beats 4, 0.4 beats 3 -> 7/8.
    # Class 1: positives 0.6, 0.3 vs 0.1 0.5 0.2 0.3 -> 0.6 beats 4; 0.3 beats 0.1 0.2, ties 0.3 -> 2.5 -> 6.5/8.
    # Class 2: positives 0.6 0.6 vs 0.1 0.1 0.1 0.2 -> 8/8.
    aucs = one_vs_rest_auroc(y, p)
    assert aucs == pytest.approx([7 / 8, 6.5 / 8, 1.0])
    assert macro_auroc(y, p) == pytest.approx((7 / 8 + 6.5 / 8 + 1.0) / 3)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert macro_auroc(y, p) == pytest.approx(sklearn_metrics.roc_auc_score(y, p, multi_class="ovr"))
    m = multiclass_metrics(y, p)
    # Arg-max predictions 0, 1, 1, 0, 2, 2 -> 4 of 6 correct.
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [1, 1, 0], [0, 0, 2]]
    # Class 0: TP 1, FP 1, FN 1 -> F1 2/4; class 1 likewise; class 2: F1 1.
    assert m["macro_f1"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_bootstrap_is_seeded_and_resamples_patients_not_rows():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(20, int), np.ones(20, int)]
    s = np.clip(y * 0.3 + rng.random(40) * 0.7, 0, 1)
    ci = bootstrap_ci(roc_auc, y, s, num_resamples=300, seed=5)
    assert ci == bootstrap_ci(roc_auc, y, s, num_resamples=300, seed=5)
    assert ci != bootstrap_ci(roc_auc, y, s, num_resamples=300, seed=6)
    assert ci[0] <= roc_auc(y, s) <= ci[1]
    # Each patient seen in two identical windows: resampling by patient gives exactly the interval of
    # one row per patient (AUROC is unchanged by duplicating every row), resampling rows does not.
    y2, s2, groups = np.repeat(y, 2), np.repeat(s, 2), np.repeat(np.arange(40), 2)
    assert bootstrap_ci(roc_auc, y2, s2, groups=groups, num_resamples=300, seed=5) == pytest.approx(ci)
    assert bootstrap_ci(roc_auc, y2, s2, num_resamples=300, seed=5) != pytest.approx(ci)


def test_patient_aggregation_max_and_mean():
    ids = ["p1", "p1", "p2", "p3", "p3", "p3"]
    probs = np.array([0.2, 0.9, 0.4, 0.1, 0.3, 0.5])
    labels = [1, 1, 0, 0, 0, 0]
    order, agg, lab = aggregate_by_patient(ids, probs, labels, "max")
    assert order == ["p1", "p2", "p3"]
    assert agg == pytest.approx([0.9, 0.4, 0.5])
    assert lab.tolist() == [1, 0, 0]
    _, agg, _ = aggregate_by_patient(ids, probs, labels, "mean")
    assert agg == pytest.approx([0.55, 0.4, 0.3])
    # multi-class max: per-class max, renormalised: p1 windows [.6 .4] and [.2 .8] -> [.6 .8] / 1.4
    _, agg, _ = aggregate_by_patient(["p1", "p1"], np.array([[0.6, 0.4], [0.2, 0.8]]), [1, 1], "max")
    assert agg[0] == pytest.approx([0.6 / 1.4, 0.8 / 1.4])
    with pytest.raises(ValueError, match="p1"):
        aggregate_by_patient(["p1", "p1"], [0.1, 0.2], [0, 1])

"""The one-line decision shown by the command line, the preview and the Slicer result line."""

from __future__ import annotations

import numpy as np

from MMCAFNetLib.results import Classification


def _result(probabilities, predicted, names, threshold):
    return Classification(
        class_names=names,
        class_labels=[f"label {n}" for n in names],
        probabilities=np.asarray(probabilities),
        predicted_index=predicted,
        threshold=0.5,
        windows=[],
        heatmap=None,
        labelmap=None,
        label_value=predicted + 1,
        timings={},
        model={"decision_threshold": threshold},
    )


def test_binary_decision_names_the_positive_probability_and_the_threshold():
    below = _result([0.378, 0.622], 0, ["A", "G"], 0.67)
    assert below.decision_text() == "label A (A): P(G) = 0.62 < decision threshold 0.67"
    above = _result([0.2, 0.8], 1, ["A", "G"], 0.67)
    assert above.decision_text(3) == "label G (G): P(G) = 0.800 >= decision threshold 0.670"


def test_multiclass_decision_gives_the_predicted_probability():
    four = _result([0.1, 0.6, 0.2, 0.1], 1, ["A", "B", "E", "G"], 0.5)
    assert four.decision_text() == "label B (B): p = 0.60"

"""Plain result types passed from the Predictor to the command line and to the Slicer scene."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from MMCAFNetLib.volume import Volume

#: Label values of the labelmap and its colour table, by class letter.
CLASS_LABELS = {
    "A": (1, "Adenocarcinoma", (0.90, 0.35, 0.20)),
    "B": (2, "Small cell carcinoma", (0.25, 0.55, 0.90)),
    "E": (3, "Large cell carcinoma", (0.55, 0.80, 0.30)),
    "G": (4, "Squamous cell carcinoma", (0.85, 0.70, 0.20)),
}


@dataclass
class WindowResult:
    """One evaluated window: its centre and box in RAS, and its class probabilities."""

    center_ras: tuple[float, float, float]
    box_ras: tuple[tuple[float, float, float], tuple[float, float, float]]  # (min corner, max corner)
    probabilities: list[float]


@dataclass
class Candidate:
    """A place the heatmap names for a reader to look at: its RAS position (mm, the CT's frame) and
    the map's value there (0..1). Candidates come highest first, at least 20 mm apart
    (``heatmap.candidate_peaks``); the first is the map's peak."""

    ras: tuple[float, float, float]
    value: float

    @classmethod
    def from_plain(cls, entry: dict[str, Any]) -> Candidate:
        """One candidate as JSON holds it (``ras``, ``value``); three finite coordinates or a
        ValueError."""
        ras = tuple(float(v) for v in entry["ras"])
        if len(ras) != 3 or not all(np.isfinite(ras)):
            raise ValueError(f"a heatmap candidate needs 3 finite RAS coordinates, got {entry['ras']!r}")
        return cls(ras, float(entry["value"]))  # type: ignore[arg-type]


@dataclass
class Classification:
    """What ``Predictor.classify`` returns.

    ``probabilities`` are per class in ``class_names`` order (for a binary model: [1-p, p]).
    ``heatmap`` (float32 0..1) and ``labelmap`` (uint8) are on the input CT's grid, or None;
    ``candidates`` are the heatmap's highest peaks (none without a heatmap).
    """

    class_names: list[str]
    class_labels: list[str]  # display names, e.g. "Adenocarcinoma"
    probabilities: np.ndarray
    predicted_index: int
    threshold: float
    windows: list[WindowResult]
    heatmap: Optional[Volume]
    labelmap: Optional[Volume]
    label_value: int
    timings: dict[str, float]
    model: dict[str, Any] = field(default_factory=dict)  # name, version, demo flag, checkpoint id
    warnings: list[str] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def predicted_class(self) -> str:
        return self.class_names[self.predicted_index]

    @property
    def predicted_label(self) -> str:
        return self.class_labels[self.predicted_index]

    @property
    def probability(self) -> float:
        return float(self.probabilities[self.predicted_index])

    def decision_text(self, digits: int = 2) -> str:
        """One line a reader can check: for a binary model, the positive class's probability
        against the decision threshold chosen on validation data (a class may be predicted with a
        probability under 0.5 when the threshold says so)."""
        head = f"{self.predicted_label} ({self.predicted_class})"
        cut = self.model.get("decision_threshold")
        if len(self.class_names) == 2 and cut is not None:
            positive, p = self.class_names[1], float(self.probabilities[1])
            relation = ">=" if p >= cut else "<"
            return f"{head}: P({positive}) = {p:.{digits}f} {relation} decision threshold {float(cut):.{digits}f}"
        return f"{head}: p = {self.probability:.{digits}f}"


class Cancelled(Exception):
    """Raised by a classification that was cancelled through its cancel event; nothing was written."""

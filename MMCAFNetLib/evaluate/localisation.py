"""Does the heatmap point at the lesion? The pointing game and the heatmap mass in the lesion box.

For each evaluated patient and heatmap method the Predictor classifies the CT twice: once with the
lesion box given (lesion-guided: the windows that cover the lesion) and once without (whole-volume:
sliding windows over the body, the lesion unknown to the model). Two measures per run:

- **pointing game**: the heatmap's peak (``heatmap.peak_ras``) lies inside the lesion box grown by a
  margin on every side (5 mm lesion-guided, 10 mm whole-volume by default: a whole-volume map comes
  from coarser context and a reader looks around the peak anyway). A map that is all zero misses.
- **top-k pointing**: any of the map's ``TOP_K`` highest peaks at least ``CANDIDATE_SEPARATION_MM``
  apart (``candidate_peaks``) lies in the grown box: what a reader shown a short list of candidates
  would find, where the one peak is taken by a brighter structure elsewhere.
- **mass in box**: the share of the heatmap's total value that lies on voxels whose centre is inside
  the (un-grown) lesion box. A map spread evenly over a 32 x 144 x 144 mm window scores the box's
  share of the window; a map concentrated on the lesion approaches 1.

Both are summarised per method and run kind, for all patients and for small lesions (largest box side
<= ``small_lesion_mm``) and larger ones apart, with percentile-bootstrap 95 % intervals over patients.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

from MMCAFNetLib.heatmap import CANDIDATE_COUNT, CANDIDATE_SEPARATION_MM, candidate_peaks, peak_ras
from MMCAFNetLib.volume import Volume

#: The reference row of the lesion-guided pointing game: "peak" at the centre of the evaluated windows.
BASELINE = "window-centre"
#: Default margins (mm) added on every side of the lesion box for the pointing game.
MARGINS_MM = {"lesion": 5.0, "whole": 10.0}
RUN_KINDS = ("lesion", "whole")
#: Candidate peaks per map for the top-k pointing game: the places the Predictor names to the
#: reader (``heatmap.candidate_peaks``).
TOP_K = CANDIDATE_COUNT


def point_in_box(point_ras: Optional[Sequence[float]], box_lo: Sequence[float], box_hi: Sequence[float],
                 margin_mm: float = 0.0) -> bool:
    """Whether a RAS point lies in the box [lo - margin, hi + margin] (False for no point)."""
    if point_ras is None:
        return False
    p = np.asarray(point_ras, dtype=np.float64)
    lo = np.minimum(box_lo, box_hi) - float(margin_mm)
    hi = np.maximum(box_lo, box_hi) + float(margin_mm)
    return bool(np.all(p >= lo - 1e-9) and np.all(p <= hi + 1e-9))


def mass_in_box(heatmap: Volume, box_lo: Sequence[float], box_hi: Sequence[float]) -> float:
    """Share of the heatmap's total value on voxels whose centre lies in the RAS box (``nan`` for an
    all-zero map)."""
    arr = np.asarray(heatmap.array, dtype=np.float64)
    nz = np.argwhere(arr > 0)
    if nz.size == 0:
        return float("nan")
    values = arr[tuple(nz.T)]
    ras = heatmap.ijk_to_ras_points(nz[:, ::-1].astype(np.float64))
    lo, hi = np.minimum(box_lo, box_hi), np.maximum(box_lo, box_hi)
    inside = np.all((ras >= lo - 1e-6) & (ras <= hi + 1e-6), axis=1)
    return float(values[inside].sum() / values.sum())


def localisation_record(heatmap: Optional[Volume], box_lo: Sequence[float], box_hi: Sequence[float],
                        margin_mm: float, top_k: int = TOP_K,
                        candidates: Optional[Sequence[Sequence[float]]] = None) -> dict[str, Any]:
    """One run's measures: the peak (RAS), whether it is in the box (+ margin), its distance to the
    box (mm, 0 inside), the mass share in the box, and whether any of the ``top_k`` candidate
    peaks is in the box (+ margin). ``candidates`` (RAS, highest first) are the places the
    Predictor named to the reader; without them they are found on the map
    (``heatmap.candidate_peaks``)."""
    peak = peak_ras(heatmap) if heatmap is not None else None
    lo, hi = np.minimum(box_lo, box_hi), np.maximum(box_lo, box_hi)
    distance = float("nan")
    if peak is not None:
        outside = np.maximum(np.maximum(lo - peak, peak - hi), 0.0)
        distance = float(np.linalg.norm(outside))
    if candidates is None:
        candidates = [ras for ras, _ in candidate_peaks(heatmap, top_k)] if heatmap is not None else []
    return {
        "peak_ras": None if peak is None else [float(v) for v in peak],
        "hit": point_in_box(peak, lo, hi, margin_mm),
        "top_k_hit": any(point_in_box(c, lo, hi, margin_mm) for c in list(candidates)[:top_k]),
        "distance_mm": distance,
        "mass_in_box": mass_in_box(heatmap, lo, hi) if heatmap is not None else float("nan"),
        "margin_mm": float(margin_mm),
    }


def _bootstrap_mean(values: np.ndarray, num_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile-bootstrap 95 % interval of the mean over patients (``nan`` when empty)."""
    v = values[~np.isnan(values)]
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(num_resamples, len(v)))
    means = v[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _block(records: Sequence[dict[str, Any]], num_resamples: int, seed: int) -> dict[str, Any]:
    hits = np.array([1.0 if r["hit"] else 0.0 for r in records])
    mass = np.array([r["mass_in_box"] for r in records], dtype=np.float64)
    dist = np.array([r["distance_mm"] for r in records], dtype=np.float64)
    out: dict[str, Any] = {"num_patients": len(records)}
    out["pointing_game"] = float(hits.mean()) if len(hits) else float("nan")
    top = np.array([1.0 if r["top_k_hit"] else 0.0 for r in records if "top_k_hit" in r])
    if len(top):
        out["pointing_top_k"] = float(top.mean())
    out["mass_in_box"] = float(np.nanmean(mass)) if np.any(~np.isnan(mass)) else float("nan")
    out["median_distance_mm"] = float(np.nanmedian(dist)) if np.any(~np.isnan(dist)) else float("nan")
    out["ci95"] = {
        "pointing_game": list(_bootstrap_mean(hits, num_resamples, seed)),
        "mass_in_box": list(_bootstrap_mean(mass, num_resamples, seed)),
    }
    if len(top):
        out["ci95"]["pointing_top_k"] = list(_bootstrap_mean(top, num_resamples, seed))
    return out


def summarise(per_patient: Sequence[dict[str, Any]], methods: Sequence[str], kinds: Sequence[str],
              small_lesion_mm: float, num_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per method and run kind: the pointing game and mass in box, overall and by lesion size.

    ``per_patient``: ``{"patient_id", "lesion_size_mm", "runs": {method: {kind: record}}}``.
    """
    summary: dict[str, Any] = {"small_lesion_mm": float(small_lesion_mm), "methods": {}}
    for method in methods:
        summary["methods"][method] = {}
        for kind in kinds:
            rows = [(p["lesion_size_mm"], p["runs"][method][kind]) for p in per_patient
                    if kind in p["runs"].get(method, {})]
            if not rows:
                continue
            block = _block([r for _, r in rows], num_resamples, seed)
            block["margin_mm"] = rows[0][1]["margin_mm"]
            block["small"] = _block([r for s, r in rows if s <= small_lesion_mm], num_resamples, seed)
            block["large"] = _block([r for s, r in rows if s > small_lesion_mm], num_resamples, seed)
            summary["methods"][method][kind] = block
    return summary


def evaluate_localisation(predictor, rows, methods: Sequence[str], kinds: Sequence[str] = RUN_KINDS,
                          margins_mm: Optional[dict[str, float]] = None, small_lesion_mm: float = 10.0,
                          num_resamples: int = 2000, seed: int = 0, read: Optional[Callable] = None,
                          progress: bool = True) -> dict[str, Any]:
    """Run the predictor on every row (a cohort table's rows) for each method and run kind.

    Returns ``{"summary": ..., "patients": [...], "whole_volume_probabilities": {...}}``; the last
    holds each patient's whole-volume probability of the positive class (binary models), so the
    report can say how well a scan without a marked lesion classifies.
    """
    from MMCAFNetLib.train.data import BOX_RAS
    from MMCAFNetLib.volume import read_volume

    margins = {**MARGINS_MM, **(margins_mm or {})}
    read = read or (lambda row: read_volume(row["series_path"], series_uid=_uid(row)))
    fields = list(predictor.schema.field_names)
    records = list(rows.to_dict(orient="records"))
    iterator: Any = records
    if progress and records:
        from tqdm import tqdm

        iterator = tqdm(records, desc="localisation", leave=False, dynamic_ncols=True)
    per_patient = []
    for row in iterator:
        volume = read(row)
        lo = np.array([float(row[c]) for c in BOX_RAS[:3]])
        hi = np.array([float(row[c]) for c in BOX_RAS[3:]])
        record = {f: (None if _missing(row.get(f)) else row.get(f)) for f in fields}
        entry: dict[str, Any] = {"patient_id": str(row["patient_id"]), "label": str(row["label"]),
                                 "lesion_size_mm": float(np.max(hi - lo)), "box_ras": [lo.tolist(), hi.tolist()],
                                 "runs": {}, "probabilities": {}}
        for method in methods:
            entry["runs"][method] = {}
            for kind in kinds:
                result = predictor.classify(volume, record, lesion=np.stack([lo, hi]) if kind == "lesion" else None,
                                            heatmap=method)
                entry["runs"][method][kind] = localisation_record(
                    result.heatmap, lo, hi, margins[kind], candidates=[c.ras for c in result.candidates])
                entry["probabilities"][kind] = [float(v) for v in result.probabilities]
                if kind == "lesion" and BASELINE not in entry["runs"]:
                    entry["runs"][BASELINE] = {"lesion": _centre_record(result.windows, lo, hi, margins[kind])}
        per_patient.append(entry)
    shown = list(methods) + ([BASELINE] if "lesion" in kinds else [])
    summary = summarise(per_patient, shown, list(kinds), small_lesion_mm, num_resamples, seed)
    summary["margins_mm"] = {k: margins[k] for k in kinds}
    return {"summary": summary, "patients": per_patient}


def _centre_record(windows, lo: np.ndarray, hi: np.ndarray, margin_mm: float) -> dict[str, Any]:
    """The trivial pointer: the centre of the evaluated windows' union (a lesion-guided run's
    windows are centred on the lesion, so a map that merely peaks mid-window scores this)."""
    boxes = np.array([[w.box_ras[0], w.box_ras[1]] for w in windows], dtype=np.float64)
    centre = (boxes[:, 0].min(axis=0) + boxes[:, 1].max(axis=0)) / 2.0
    outside = np.maximum(np.maximum(lo - centre, centre - hi), 0.0)
    return {"peak_ras": centre.tolist(), "hit": point_in_box(centre, lo, hi, margin_mm),
            "distance_mm": float(np.linalg.norm(outside)), "mass_in_box": float("nan"), "margin_mm": float(margin_mm)}


def _uid(row) -> Optional[str]:
    uid = row.get("series_uid")
    return uid if isinstance(uid, str) and uid else None


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def report_lines(summary: dict[str, Any]) -> list[str]:
    """Markdown for the report: one row per method and run kind."""
    def fmt(block: dict[str, Any], key: str) -> str:
        v = block.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        ci = block.get("ci95", {}).get(key) or [float("nan")] * 2
        tail = "" if any(math.isnan(c) for c in ci) else f" ({ci[0]:.2f}-{ci[1]:.2f})"
        return f"{v:.2f}{tail}"

    mm = summary["small_lesion_mm"]
    lines = [
        "## Localisation", "",
        "Pointing game: the share of patients whose heatmap peak lies inside the lesion box grown by the margin; "
        "mass in box: the mean share of the heatmap's total value inside the (un-grown) box. Lesion-guided runs "
        "are given the lesion box; whole-volume runs scan the CT without it. 95 % percentile-bootstrap intervals "
        f"over patients; small lesions: largest box side <= {mm:g} mm. The {BASELINE} row is no heatmap: it "
        "points at the centre of the evaluated windows, which a lesion-guided run centres on the lesion, so a "
        "map must beat it to show that it finds the lesion rather than the middle of its window.", "",
    ]
    scan = summary.get("scan")
    if scan:
        lines += [f"Whole-volume scans: neighbouring windows overlap by {scan['overlap']:g} of a window; the "
                  f"attention map is of {'the finest pyramid level' if scan['attention_levels'] == 'finest' else 'all pyramid levels'}.", ""]
    lines += [
        "| Heatmap | Run | Margin | Pointing game | Mass in box | Small lesions: pointing | Larger: pointing | "
        f"Median peak distance to box | Any of the top {TOP_K} peaks (>= {CANDIDATE_SEPARATION_MM:g} mm apart) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, kinds in summary["methods"].items():
        for kind, block in kinds.items():
            label = "lesion given" if kind == "lesion" else "whole volume"
            small, large = block["small"], block["large"]
            lines.append(
                f"| {method} | {label} (n={block['num_patients']}) | {block['margin_mm']:g} mm | "
                f"{fmt(block, 'pointing_game')} | {fmt(block, 'mass_in_box')} | "
                f"{fmt(small, 'pointing_game')} (n={small['num_patients']}) | "
                f"{fmt(large, 'pointing_game')} (n={large['num_patients']}) | "
                f"{block['median_distance_mm']:.1f} mm | {fmt(block, 'pointing_top_k')} |"
            )
    lines.append("")
    return lines

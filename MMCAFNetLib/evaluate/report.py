"""Patient-level evaluation at a fixed threshold, and its Markdown report with plots.

The threshold always comes from outside (the checkpoint's, chosen on validation data): nothing in
this module looks at test labels to choose one. Confidence intervals are percentile bootstraps
over patients (seeded).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from MMCAFNetLib.atomic import write_text_atomic
from MMCAFNetLib.dataset.split_sizes import MIN_PATIENTS_PER_CLASS, small_split_warning
from MMCAFNetLib.evaluate.metrics import (
    binary_metrics,
    bootstrap_ci,
    confusion_matrix,
    expected_calibration_error,
    macro_auroc,
    multiclass_metrics,
    roc_auc,
)
from MMCAFNetLib.plain import to_plain
from MMCAFNetLib.strict_json import dumps as strict_dumps

#: The paper's results-table columns, in its order: (column title, metrics key).
PAPER_COLUMNS = (
    ("AUROC", "auroc"),
    ("ACC", "accuracy"),
    ("F1", "f1"),
    ("Spec", "specificity"),
    ("Sens", "sensitivity"),
    ("PPV", "ppv"),
    ("NPV", "npv"),
)


def _binary_block(y: np.ndarray, p: np.ndarray, threshold: float, num_resamples: int, seed: int,
                  with_ci: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"num_patients": len(y), "num_positive": int(y.sum()),
                           "num_negative": int(len(y) - y.sum())}
    out["auroc"] = roc_auc(y, p) if len(y) else float("nan")
    out.update(binary_metrics(y, p, threshold) if len(y) else {})
    out["ece"] = expected_calibration_error(y, p) if len(y) else float("nan")
    if with_ci and len(y):
        ci = {"auroc": bootstrap_ci(roc_auc, y, p, num_resamples=num_resamples, seed=seed)}
        for key in ("accuracy", "f1", "sensitivity", "specificity", "ppv", "npv"):
            ci[key] = bootstrap_ci(
                lambda yy, pp, key=key: binary_metrics(yy, pp, threshold)[key], y, p,
                num_resamples=num_resamples, seed=seed,
            )
        out["ci95"] = {k: list(v) for k, v in ci.items()}
    return out


def evaluate_patients(
    patient_ids: Sequence[str],
    labels: Sequence[int],
    probabilities: np.ndarray,
    class_names: Sequence[str],
    threshold: float,
    lesion_size_mm: Optional[Sequence[float]] = None,
    small_lesion_mm: float = 10.0,
    num_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of patient-level predictions.

    Binary (``probabilities`` [N], of ``class_names[1]``): AUROC with 95 % CI, accuracy, F1,
    specificity, sensitivity, PPV, NPV (each with a CI) at ``threshold``, confusion matrix, ECE,
    and the same for small lesions (largest box side <= ``small_lesion_mm``) and larger ones
    when sizes are given. Multi-class ([N, C]): macro one-vs-rest AUROC with CI, accuracy with CI,
    macro F1, the one-vs-rest table per class, confusion matrix, top-label ECE.
    """
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    names = list(class_names)
    result: dict[str, Any] = {
        "class_names": names,
        "num_patients": len(y),
        "class_counts": {n: int((y == i).sum()) for i, n in enumerate(names)},
        "threshold": float(threshold),
        "bootstrap": {"resamples": num_resamples, "seed": seed, "confidence": 0.95, "unit": "patient"},
    }
    few = small_split_warning("evaluated", result["class_counts"])
    if few:  # a bootstrap over one or two patients of a class gives an interval that means nothing
        result["warnings"] = [few]
    with_ci = not few
    if p.ndim == 1:
        result["positive_class"] = names[1]
        result.update(_binary_block(y, p, threshold, num_resamples, seed, with_ci=with_ci))
        result["confusion_matrix"] = confusion_matrix(y, (p >= threshold).astype(int), 2).tolist()
        if lesion_size_mm is not None:
            sizes = np.asarray(lesion_size_mm, dtype=np.float64)
            small = sizes <= small_lesion_mm
            result["lesion_size_groups"] = {
                "small_lesion_mm": small_lesion_mm,
                "small": _binary_block(y[small], p[small], threshold, num_resamples, seed,
                                       with_ci=_enough(y[small], len(names))),
                "large": _binary_block(y[~small], p[~small], threshold, num_resamples, seed,
                                       with_ci=_enough(y[~small], len(names))),
            }
    else:
        m = multiclass_metrics(y, p)
        result.update({k: v for k, v in m.items()})
        result["ece"] = expected_calibration_error(y, p)
    if p.ndim != 1 and with_ci:
        result["ci95"] = {
            "auroc": list(bootstrap_ci(macro_auroc, y, p, num_resamples=num_resamples, seed=seed)),
            "accuracy": list(bootstrap_ci(lambda yy, pp: float((pp.argmax(1) == yy).mean()), y, p,
                                          num_resamples=num_resamples, seed=seed)),
        }
    if p.ndim != 1:
        for i, row in enumerate(result["per_class"]):
            row["class"] = names[i]
    result["patients"] = [
        {"patient_id": str(pid), "label": names[int(t)],
         "probability": (float(pp) if np.ndim(pp) == 0 else [float(v) for v in pp])}
        for pid, t, pp in zip(patient_ids, y, p)
    ]
    return to_plain(result)


def _enough(y: np.ndarray, num_classes: int) -> bool:
    """Every class has enough patients in ``y`` for a confidence interval."""
    return all(int((y == i).sum()) >= MIN_PATIENTS_PER_CLASS for i in range(num_classes))


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f}"


def _ci(block: dict[str, Any], key: str) -> str:
    ci = block.get("ci95", {}).get(key)
    if not ci or any(c is None or (isinstance(c, float) and math.isnan(c)) for c in ci):
        return ""
    return f" ({ci[0]:.3f}-{ci[1]:.3f})"


def results_table(rows: Sequence[tuple[str, dict[str, Any]]], with_ci: bool = True) -> str:
    """Markdown table in the paper's layout (AUROC ACC F1 Spec Sens PPV NPV), one row per method."""
    head = "| Method | " + " | ".join(c for c, _ in PAPER_COLUMNS) + " |"
    sep = "|---|" + "---|" * len(PAPER_COLUMNS)
    lines = [head, sep]
    for name, block in rows:
        cells = [_fmt(block.get(k)) + (_ci(block, k) if with_ci else "") for _, k in PAPER_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(metrics: dict[str, Any], out_dir: str | Path, title: str, model_label: str,
                 context: Optional[dict[str, Any]] = None) -> Path:
    """Write metrics.json, predictions.csv, roc.png, calibration.png and report.md into ``out_dir``."""
    from MMCAFNetLib.evaluate.plots import plot_calibration, plot_roc

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    context = dict(context or {})
    names = metrics["class_names"]
    patients = metrics["patients"]
    y = np.asarray([names.index(r["label"]) for r in patients], dtype=np.int64)
    binary = "positive_class" in metrics
    probs = np.asarray([r["probability"] for r in patients], dtype=np.float64)

    lines = [f"# {title}", ""]
    if context.get("demo"):
        lines += ["> **Demo model trained on synthetic phantoms.** These numbers say nothing about real patients.", ""]
    for key, label in (("checkpoint", "Checkpoint"), ("model", "Model"), ("task", "Task"), ("cohort", "Cohort"),
                       ("split", "Split"), ("aggregate", "Patient score"), ("data_fingerprint", "Data fingerprint")):
        if context.get(key) is not None:
            lines.append(f"- {label}: `{context[key]}`")
    lines.append(f"- Patients: {metrics['num_patients']} ("
                 + ", ".join(f"{k}: {v}" for k, v in metrics["class_counts"].items()) + ")")
    if binary:
        lines.append(f"- Positive class: {metrics['positive_class']}; decision threshold "
                     f"{metrics['threshold']:.4f}, chosen on the validation data (never on this split)")
    if metrics.get("warnings"):
        lines += [f"- **Warning**: {w}" for w in metrics["warnings"]]
    lines.append(f"- 95 % confidence intervals: percentile bootstrap over patients, "
                 f"{metrics['bootstrap']['resamples']} resamples, seed {metrics['bootstrap']['seed']}; "
                 f"none for a group with fewer than {MIN_PATIENTS_PER_CLASS} patients of a class")
    if context.get("seen_patients"):
        lines.append(f"- Unseen patients: {context['seen_patients']}")
    lines.append("")

    roc_curves = []
    if binary:
        lines += ["## Results", "", results_table([(model_label, metrics)]), ""]
        groups = metrics.get("lesion_size_groups")
        if groups:
            mm = groups["small_lesion_mm"]
            lines += [f"### By lesion size (largest side of the lesion box; small = <= {mm:g} mm)", "",
                      results_table([(f"small lesions (n={groups['small']['num_patients']})", groups["small"]),
                                     (f"larger lesions (n={groups['large']['num_patients']})", groups["large"])]), ""]
        cm = metrics["confusion_matrix"]
        lines += ["## Confusion matrix (rows: true class, columns: predicted)", "",
                  f"| | predicted {names[0]} | predicted {names[1]} |", "|---|---|---|",
                  f"| true {names[0]} | {cm[0][0]} | {cm[0][1]} |", f"| true {names[1]} | {cm[1][0]} | {cm[1][1]} |", ""]
        lines += [f"Expected calibration error (10 bins): {_fmt(metrics['ece'])}", ""]
        roc_curves.append((model_label, y, probs))
        whole = metrics.get("whole_volume")
        if whole:
            lines += ["### Whole-volume scans (no lesion given; case score = max over sliding windows)", "",
                      results_table([(f"{model_label}, whole volume (n={whole['num_patients']})", whole)]), ""]
    else:
        lines += ["## Results", "",
                  f"Macro one-vs-rest AUROC {_fmt(metrics['auroc'])}{_ci(metrics, 'auroc')}, accuracy "
                  f"{_fmt(metrics['accuracy'])}{_ci(metrics, 'accuracy')}, macro F1 {_fmt(metrics['macro_f1'])}, "
                  f"top-label ECE {_fmt(metrics['ece'])}.", "",
                  "### One vs rest (arg-max decision)", "",
                  results_table([(f"{r['class']} (n={r['support']})", r) for r in metrics["per_class"]], with_ci=False), ""]
        cm = metrics["confusion_matrix"]
        lines += ["## Confusion matrix (rows: true class, columns: predicted)", "",
                  "| | " + " | ".join(f"predicted {n}" for n in names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| true {n} | " + " | ".join(str(v) for v in cm[i]) + " |" for i, n in enumerate(names)]
        lines.append("")
        for i, n in enumerate(names):
            roc_curves.append((f"{n} vs rest", (y == i).astype(int), probs[:, i]))
    plot_roc(roc_curves, out / "roc.png", title=f"ROC - {model_label}")
    plot_calibration(y, probs, out / "calibration.png", title=f"Calibration - {model_label}", ece=metrics["ece"])
    if metrics.get("localisation"):
        from MMCAFNetLib.evaluate.localisation import report_lines

        lines += report_lines(metrics["localisation"])
        default = metrics["localisation"].get("default_method")
        if default:
            lines += [f"The checkpoint's default heatmap method: {default}.", ""]
    lines += ["## Plots", "", "![ROC](roc.png)", "", "![Calibration](calibration.png)", ""]
    if context.get("notes"):
        lines += ["## Notes", "", *context["notes"], ""]
    write_text_atomic(out / "report.md", "\n".join(lines))
    write_text_atomic(out / "metrics.json", strict_dumps({**metrics, "context": to_plain(context)}, indent=2) + "\n")
    csv_lines = ["patient_id,label," + (f"p_{names[1]}" if binary else ",".join(f"p_{n}" for n in names))]
    for r in patients:
        pr = r["probability"]
        csv_lines.append(f"{r['patient_id']},{r['label']}," + (f"{pr:.6f}" if binary else ",".join(f"{v:.6f}" for v in pr)))
    write_text_atomic(out / "predictions.csv", "\n".join(csv_lines) + "\n")
    return out / "report.md"

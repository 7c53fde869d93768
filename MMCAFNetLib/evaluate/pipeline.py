"""Evaluate a checkpoint on one split of a cohort: windows -> patient scores -> metrics -> report.

The model, clinical schema (with its training statistics), preset and decision threshold all come
from the checkpoint; the threshold was chosen on validation data when the model was trained, and
nothing here chooses one on the evaluated split.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch


def predict_cohort(payload: dict[str, Any], df, device: torch.device, batch_size: int = 4,
                   progress: bool = True, cache_dir: Optional[str] = None) -> dict[int, tuple[str, int, list[float]]]:
    """Window probabilities of every lesion window of the rows ``df`` (labels in the checkpoint's
    classes); prepared CTs come from the preprocessed cache ``cache_dir`` when given."""
    from MMCAFNetLib.ehr import ClinicalSchema
    from MMCAFNetLib.preset import get_preset
    from MMCAFNetLib.train import data as data_module
    from MMCAFNetLib.train.config import TrainConfig
    from MMCAFNetLib.train.distributed import DistributedContext
    from MMCAFNetLib.train.loop import predict_windows

    schema = ClinicalSchema.from_dict(payload["schema"])
    preset = get_preset(payload["preset"])
    class_names = list(payload["class_names"])
    config = TrainConfig(progress=progress, amp=True, channels_last=True, cache_dir=cache_dir)
    dataset = data_module.build_dataset(df, config, schema, preset, train=False, progress=progress,
                                        class_names=class_names)
    from MMCAFNetLib.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(payload, num_clinical=schema.num_features)  # checked: classes, config, shapes
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=data_module.collate)
    return predict_windows(model, loader, device, config, DistributedContext(), progress=progress)


def evaluate_checkpoint(checkpoint: str | Path, cohort, split: str, out_dir: str | Path,
                        aggregate: Optional[str] = None, device: str = "auto", num_resamples: int = 2000,
                        seed: int = 0, small_lesion_mm: float = 10.0, batch_size: int = 4,
                        progress: bool = True, title: Optional[str] = None,
                        cache_dir: Optional[str] = None, allow_seen: bool = False,
                        localisation: Optional[Sequence[str]] = None,
                        localisation_kinds: Sequence[str] = ("lesion", "whole"),
                        scan_options: Optional[dict[str, Any]] = None,
                        warn: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Evaluate and write the report (report.md, metrics.json, predictions.csv, roc.png, calibration.png).

    Patients the checkpoint was trained or validated on are refused (:class:`SeenPatientsError`)
    unless ``allow_seen``; a checkpoint without that record is evaluated with a warning.
    ``localisation`` names heatmap methods (``"model"`` for the checkpoint's own) whose pointing
    game and mass in the lesion box are measured (``evaluate.localisation``); ``scan_options``
    (``overlap``, ``levels``) replace the checkpoint's whole-volume scan settings there.
    """
    from MMCAFNetLib.checkpoint import load_checkpoint
    from MMCAFNetLib.evaluate.aggregation import aggregate_by_patient
    from MMCAFNetLib.evaluate.report import evaluate_patients, write_report
    from MMCAFNetLib.train import data as data_module
    from MMCAFNetLib.train.distributed import DistributedContext, device_for
    from MMCAFNetLib.train.loop import data_fingerprint

    payload = load_checkpoint(checkpoint)
    df = data_module.load_cohort(cohort)
    class_names = [str(c) for c in payload["class_names"]]
    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"--split must be train, val, test or all, not {split!r}")
    rows = df if split == "all" else df[df["split"] == split]
    rows = rows[rows["label"].isin(class_names)].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"the cohort has no {split!r} patients of the classes {class_names}")
    from MMCAFNetLib.evaluate import seen as seen_module

    seen = seen_module.check_seen(payload, rows)
    seen_lines = seen_module.describe(seen, len(rows))
    if seen["seen"] and not allow_seen:
        raise SeenPatientsError(
            f"{seen_lines[0]} Refusing to report them as held-out ({seen_module.ids_preview(seen['seen'])}). "
            "Evaluate a split the model never saw, re-index the cohort with the seed used for training, "
            "or pass --allow-seen to score them anyway (the report then says so)."
        )
    say = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
    if not seen["recorded"] or seen["seen"]:
        say(" ".join(seen_lines))
    aggregate = aggregate or (payload.get("train_config") or {}).get("aggregate", "max")
    dev = device_for(device, DistributedContext())
    windows = predict_cohort(payload, rows, dev, batch_size=batch_size, progress=progress, cache_dir=cache_dir)
    order = sorted(windows)
    ids = [windows[i][0] for i in order]
    labels = [windows[i][1] for i in order]
    probs = np.asarray([windows[i][2] for i in order], dtype=np.float64)
    binary = probs.shape[1] == 1
    if binary:
        probs = probs[:, 0]
    patients, p, y = aggregate_by_patient(ids, probs, labels, aggregate)
    sizes = {str(r["patient_id"]): data_module.lesion_size_mm(r) for r in rows.to_dict(orient="records")}
    threshold = float(payload.get("threshold", 0.5))
    metrics = evaluate_patients(
        patients, y, p, class_names, threshold,
        lesion_size_mm=[sizes[pid] for pid in patients] if binary else None,
        small_lesion_mm=small_lesion_mm, num_resamples=num_resamples, seed=seed,
    )
    metrics["num_windows"] = len(order)
    metrics["aggregate"] = aggregate
    metrics["split"] = split
    metrics["threshold_source"] = "checkpoint (chosen on validation data)"
    metrics["seen_patients"] = {"recorded": seen["recorded"], "seen": len(seen["seen"]),
                                "seen_train": seen["seen_train"], "seen_val": seen["seen_val"],
                                "id_only": len(seen["id_only"]), "allowed": bool(allow_seen),
                                "note": " ".join(seen_lines)}
    if localisation:
        from MMCAFNetLib.evaluate.localisation import evaluate_localisation
        from MMCAFNetLib.inference import Predictor

        predictor = Predictor.load(checkpoint, device=device)
        predictor.set_scan_options(**(scan_options or {}))
        methods = list(dict.fromkeys(predictor.resolve_heatmap(m) for m in localisation if m not in (None, "none")))
        found = evaluate_localisation(predictor, rows, methods, localisation_kinds, small_lesion_mm=small_lesion_mm,
                                      num_resamples=num_resamples, seed=seed, progress=progress)
        summary = found["summary"]
        summary["default_method"] = predictor.default_heatmap
        summary["scan"] = {"overlap": predictor.scan_overlap, "attention_levels": predictor.scan_attention_levels}
        metrics["localisation"] = summary
        metrics["localisation_patients"] = found["patients"]
        if binary and "whole" in localisation_kinds:
            metrics["whole_volume"] = _whole_volume_block(found["patients"], class_names, threshold,
                                                          num_resamples, seed)
    context = {
        "checkpoint": str(checkpoint),
        "model": payload["model_name"],
        "task": payload.get("task"),
        "cohort": str(cohort) if not hasattr(cohort, "columns") else None,
        "split": split,
        "aggregate": f"{aggregate} over {len(order)} lesion windows of {len(patients)} patients",
        "data_fingerprint": data_fingerprint(rows),
        "demo": bool(payload.get("demo", False)),
        "validation_metrics": {k: v for k, v in (payload.get("metrics") or {}).items() if isinstance(v, (int, float))},
        "seen_patients": metrics["seen_patients"]["note"],
    }
    name = payload["model_name"] + (" (demo)" if payload.get("demo") else "")
    write_report(metrics, out_dir, title or f"Evaluation of {name} on the {split} split", payload["model_name"], context)
    return metrics


class SeenPatientsError(ValueError):
    """The evaluated split holds patients the checkpoint was trained or validated on."""


def _whole_volume_block(patients: list[dict[str, Any]], class_names: list[str], threshold: float,
                        num_resamples: int, seed: int) -> dict[str, Any]:
    """AUROC and metrics of the whole-volume runs' case probabilities (no lesion given)."""
    from MMCAFNetLib.evaluate.report import _binary_block

    rows = [p for p in patients if "whole" in p.get("probabilities", {})]
    y = np.array([class_names.index(p["label"]) for p in rows], dtype=np.int64)
    prob = np.array([p["probabilities"]["whole"][1] for p in rows], dtype=np.float64)
    return _binary_block(y, prob, threshold, num_resamples, seed)

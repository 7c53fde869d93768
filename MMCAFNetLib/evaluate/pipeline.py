"""Evaluate a checkpoint on one split of a cohort: windows -> patient scores -> metrics -> report.

The model, clinical schema (with its training statistics), preset and decision threshold all come
from the checkpoint; the threshold was chosen on validation data when the model was trained, and
nothing here chooses one on the evaluated split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

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
                        cache_dir: Optional[str] = None) -> dict[str, Any]:
    """Evaluate and write the report (report.md, metrics.json, predictions.csv, roc.png, calibration.png)."""
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
    }
    name = payload["model_name"] + (" (demo)" if payload.get("demo") else "")
    write_report(metrics, out_dir, title or f"Evaluation of {name} on the {split} split", payload["model_name"], context)
    return metrics

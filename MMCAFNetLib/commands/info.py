"""``mmcafnet info``: what a checkpoint holds (model, classes, schema, preprocessing, provenance, metrics)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from MMCAFNetLib.strict_json import dumps as strict_dumps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", metavar="CKPT", help="checkpoint file (default: the bundled demo model)")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """Plain data about a checkpoint, read safely (weights_only); the model is not built."""
    import torch

    from MMCAFNetLib.checkpoint import load_checkpoint
    from MMCAFNetLib.inference.predictor import checkpoint_scan_settings, class_label, file_sha256

    payload = load_checkpoint(path)
    state = payload["state_dict"]
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    schema = payload.get("schema") or {}
    fields = schema.get("fields") if isinstance(schema, dict) else None
    return {
        "checkpoint": str(path),
        "sha256": file_sha256(path),
        "format_version": payload["format_version"],
        "model_name": payload["model_name"],
        "model_config": payload.get("model_config") or {},
        "parameters": _parameter_count(payload, tensors),
        "tensors": len(tensors),
        "task": payload.get("task"),
        "class_names": list(payload["class_names"]),
        "class_labels": [class_label(c) for c in payload["class_names"]],
        "decision_threshold": payload.get("threshold"),
        "clinical_fields": [f.get("name") for f in fields] if isinstance(fields, list) else None,
        "schema": schema,
        "preset": payload.get("preset"),
        "provenance": payload.get("provenance") or {},
        "metrics": payload.get("metrics") or {},
        "demo": bool(payload.get("demo", False)),
        "default_heatmap": _default_heatmap(payload),
        "scan": checkpoint_scan_settings(payload),
        "patients_recorded": isinstance(payload.get("seen_patients"), dict),
    }


def _parameter_count(payload: dict[str, Any], tensors: list[Any]) -> int:
    """Learned parameters, counted as ``mmcafnet models`` counts them: the model built on the meta
    device (no memory, no weights), so buffers such as BatchNorm statistics are left out. A model this
    library cannot build falls back to the floating-point tensors of the state dict."""
    import torch

    from MMCAFNetLib.models import create_model
    from MMCAFNetLib.models.complexity import count_parameters

    try:
        with torch.device("meta"):
            model = create_model(payload["model_name"], **dict(payload.get("model_config") or {}))
        return int(count_parameters(model))
    except Exception:  # an unknown or changed model: what the file holds
        return int(sum(t.numel() for t in tensors if t.is_floating_point()))


FINGERPRINT_NOTE = (
    "SHA-256 of the cohort rows the run used (patient, label, split, lesion box, clinical values); "
    "two checkpoints with the same fingerprint were trained and validated on the same data"
)


def _default_heatmap(payload: dict[str, Any]) -> str:
    from MMCAFNetLib.inference.predictor import HEATMAP_METHODS, LEGACY_HEATMAP

    name = payload.get("heatmap")
    return str(name) if name in HEATMAP_METHODS else f"{LEGACY_HEATMAP} (the checkpoint names none)"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) or "-"
    return str(value)


def run(args: argparse.Namespace) -> int:
    path = args.checkpoint
    if not path:
        from MMCAFNetLib.resources import demo_checkpoint_path

        path = demo_checkpoint_path()
    info = describe_checkpoint(path)
    if args.json:
        print(strict_dumps(info, indent=2, default=str))
        return 0
    preset = info["preset"] or {}
    prov = info["provenance"]
    lines = [
        f"checkpoint:      {info['checkpoint']}",
        f"sha256:          {info['sha256']}",
        f"format version:  {info['format_version']}",
        f"model:           {info['model_name']}  ({info['parameters']:,} parameters)",
        f"model config:    {_fmt(info['model_config'])}",
        f"task:            {info['task']}",
        "classes:         " + ", ".join(f"{c} = {lab}" for c, lab in zip(info["class_names"], info["class_labels"])),
        f"threshold:       {_fmt(info['decision_threshold'])} (decision threshold chosen on validation data)",
        f"clinical fields: {_fmt(info['clinical_fields'])}",
        f"preprocessing:   {_fmt(preset)}",
        f"provenance:      {_fmt({k: v for k, v in prov.items() if k != 'data_fingerprint'})}",
        f"data fingerprint: {prov.get('data_fingerprint') or '-'}",
        f"                 ({FINGERPRINT_NOTE})",
        f"validation metrics: {_fmt(info['metrics'])}",
        "                 (on the validation split, at the decision threshold above; the test split's are in "
        "the report of mmcafnet evaluate)",
        f"demo model:      {'yes: trained on synthetic data, not for clinical use' if info['demo'] else 'no'}",
        f"heatmap:         {info['default_heatmap']} (the default; --heatmap overrides it); attention of "
        f"{info['scan']['lesion_attention_levels']} pyramid levels with a lesion, {info['scan']['attention_levels']} "
        "in a whole-volume scan",
        f"whole-volume scan: windows overlapping by {_fmt(info['scan']['overlap'])} (--scan-overlap and "
        "--scan-levels override it)",
        "seen patients:   " + ("recorded (hashed): evaluate refuses them" if info["patients_recorded"]
                               else "not recorded (older checkpoint): evaluate cannot check for them"),
    ]
    print("\n".join(lines))
    return 0

"""``mmcafnet evaluate``: metrics with confidence intervals and a Markdown report for a checkpoint."""

from __future__ import annotations

import argparse
import sys

from MMCAFNetLib.strict_json import dumps as strict_dumps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint (best.pt of a run, or a shipped model)")
    parser.add_argument("--cohort", required=True, help="cohort table (CSV written by mmcafnet index)")
    parser.add_argument("--split", default="test", help="train, val, test (default) or all")
    parser.add_argument("--out", required=True, help="report folder (report.md, metrics.json, plots)")
    parser.add_argument("--aggregate", choices=("max", "mean"),
                        help="patient score over windows (default: the checkpoint's, max as the paper)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--small-lesion-mm", type=float, default=10.0,
                        help="lesions up to this size (largest box side) are reported apart")
    parser.add_argument("--cache", metavar="DIR",
                        help="preprocessed cache folder (mmcafnet preprocess with the checkpoint's preset)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--allow-seen", action="store_true",
                        help="score patients the checkpoint was trained or validated on (refused by default)")
    parser.add_argument("--localisation", metavar="METHODS",
                        help="also measure whether heatmaps point at the lesion: comma-separated methods "
                             "(model = the checkpoint's own, attention, gradcam, gradcam++) or 'all'")
    parser.add_argument("--localisation-runs", default="lesion,whole",
                        help="lesion (lesion box given), whole (whole-volume scan) or both (default)")
    from MMCAFNetLib.commands.predict import add_scan_arguments

    add_scan_arguments(parser)


def _methods(text: str | None) -> list[str] | None:
    from MMCAFNetLib.inference.predictor import HEATMAP_METHODS, MODEL_DEFAULT

    if not text:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(HEATMAP_METHODS)
    bad = [n for n in names if n not in (MODEL_DEFAULT, *HEATMAP_METHODS)]
    if bad:
        raise SystemExit(f"mmcafnet evaluate: unknown heatmap method(s) {bad} in --localisation; "
                         f"use {MODEL_DEFAULT}, {', '.join(HEATMAP_METHODS)} or all")
    return names


def run(args: argparse.Namespace) -> int:
    from MMCAFNetLib.evaluate.pipeline import SeenPatientsError, evaluate_checkpoint
    from MMCAFNetLib.windows import MAX_SCAN_OVERLAP, is_scan_overlap

    if args.scan_overlap is not None and not is_scan_overlap(args.scan_overlap):
        raise SystemExit(f"mmcafnet evaluate: --scan-overlap must lie in 0..{MAX_SCAN_OVERLAP}, got {args.scan_overlap}")
    kinds = [k.strip() for k in args.localisation_runs.split(",") if k.strip()]
    if not kinds or any(k not in ("lesion", "whole") for k in kinds):
        raise SystemExit(f"mmcafnet evaluate: --localisation-runs takes lesion, whole or both, not {args.localisation_runs!r}")
    try:
        metrics = evaluate_checkpoint(
            args.checkpoint, args.cohort, args.split, args.out, aggregate=args.aggregate, device=args.device,
            num_resamples=args.bootstrap, seed=args.seed, small_lesion_mm=args.small_lesion_mm,
            batch_size=args.batch_size, progress=not args.no_progress, cache_dir=args.cache,
            allow_seen=args.allow_seen, localisation=_methods(args.localisation), localisation_kinds=kinds,
            scan_options={"overlap": args.scan_overlap, "levels": args.scan_levels},
        )
    except SeenPatientsError as exc:
        raise SystemExit(f"mmcafnet evaluate: {exc}") from None
    for line in metrics.get("warnings") or []:
        print(f"warning: {line}", file=sys.stderr)
    keys = ("auroc", "accuracy", "f1", "specificity", "sensitivity", "ppv", "npv", "macro_f1", "ece", "threshold")
    shown = {"report": f"{args.out}/report.md", **{k: metrics[k] for k in keys if k in metrics}}
    for method, runs in (metrics.get("localisation") or {}).get("methods", {}).items():
        for kind, block in runs.items():
            shown[f"pointing_game_{method}_{kind}"] = block["pointing_game"]
    print(strict_dumps(shown, indent=2))
    return 0

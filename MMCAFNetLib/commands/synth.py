"""``mmcafnet synth OUT --patients N --seed S --size PX``: write a synthetic cohort in the real layout."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from MMCAFNetLib.strict_json import dumps as strict_dumps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="new (or empty) folder to write the cohort into")
    parser.add_argument("--patients", type=int, default=40, help="number of patients (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files (default 0)")
    parser.add_argument("--size", type=int, default=512, metavar="PX",
                        help="in-plane pixels per slice (default 512; smaller sizes keep the field of view, so the "
                             "pixel spacing grows)")
    parser.add_argument("--small-lesion-share", type=float, default=None, metavar="F",
                        help="share of lesions of 5-10 mm, whatever the class (default 0.25)")
    parser.add_argument("--classes", default=None, metavar="SPEC",
                        help="classes and optional weights, e.g. 'A,G' or 'A=0.6,G=0.4' "
                             "(default A=0.55,B=0.10,E=0.05,G=0.30)")
    parser.add_argument("--no-extra-series", action="store_true",
                        help="write only the annotated CT series (no PET, secondary capture or second reconstruction)")
    parser.add_argument("--manifest-folder", action="store_true",
                        help="nest the download in OUT/manifest-<digits>/ as the NBIA Data Retriever does")
    parser.add_argument("--truth", metavar="FILE.csv",
                        help="also write the generated truth (class, lesion box, record, evidence) as CSV")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def run(args: argparse.Namespace) -> int:
    from MMCAFNetLib.cli import UsageError
    from MMCAFNetLib.synthetic import DEFAULT_SMALL_LESION_SHARE, write_cohort

    if args.patients < 1:
        raise UsageError(f"--patients must be at least 1, got {args.patients}")
    if args.size < 32 or args.size > 1024:
        raise UsageError(f"--size must be between 32 and 1024 pixels, got {args.size}")
    share = DEFAULT_SMALL_LESION_SHARE if args.small_lesion_share is None else args.small_lesion_share
    if not 0.0 <= share <= 1.0:
        raise UsageError(f"--small-lesion-share must be within [0, 1], got {share}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not empty; pass a new folder")

    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=args.patients, unit="patient", desc="synth", file=sys.stderr)
        except ImportError:
            bar = None

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    start = time.perf_counter()
    try:
        cohort = write_cohort(
            out,
            args.patients,
            args.seed,
            args.size,
            small_lesion_share=share,
            classes=args.classes,
            extra_series=not args.no_extra_series,
            nbia_manifest_folder=args.manifest_folder,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    if args.truth:
        truth = Path(args.truth)
        truth.parent.mkdir(parents=True, exist_ok=True)
        tmp = truth.with_name(truth.name + ".part")
        cohort.to_frame().to_csv(tmp, index=False)
        tmp.replace(truth)
    counts = cohort.class_counts()
    summary = {
        "root": str(cohort.root),
        "patients": len(cohort.patients),
        "classes": counts,
        "size": args.size,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(
        f"wrote {summary['patients']} patients ({', '.join(f'{k} {v}' for k, v in counts.items())}) "
        f"at {args.size} px to {cohort.root} in {summary['seconds']} s"
    )
    print(strict_dumps(summary))
    return 0

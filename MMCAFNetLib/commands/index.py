"""``mmcafnet index ROOT --out COHORT.csv``: scan a Lung-PET-CT-Dx download into a cohort table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", metavar="ROOT", help="download folder holding metadata.csv, Lung-PET-CT-Dx/, Annotation/ and the clinical .xlsx")
    parser.add_argument("--out", required=True, metavar="COHORT.csv", help="cohort table to write (CSV)")
    parser.add_argument("--clinical", metavar="SHEET", help="clinical sheet (.xlsx or .csv); default: the .xlsx found in ROOT")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level split (default 0)")
    parser.add_argument("--test-fraction", type=float, default=0.15, help="share of patients in the test split (default 0.15)")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="share of patients in the validation split (default 0.15)")
    parser.add_argument("--folds", type=int, default=5, help="number of cross-validation folds over train+val (default 5)")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def _warning_sink():
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda line: print(line, file=sys.stderr)
    return lambda line: tqdm.write(line, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from MMCAFNetLib.cli import UsageError
    from MMCAFNetLib.dataset import format_summary, index_download, write_cohort

    root = Path(args.root)
    # flags first: a wrong fraction must not cost a scan of the whole download
    for flag, value in (("--test-fraction", args.test_fraction), ("--val-fraction", args.val_fraction)):
        if not 0.0 <= value < 1.0:
            raise UsageError(f"{flag} must be at least 0 and below 1, got {value}")
    if args.test_fraction + args.val_fraction >= 1.0:
        raise UsageError(
            f"--test-fraction + --val-fraction must stay below 1 (got {args.test_fraction} + {args.val_fraction}); "
            "no patient would be left for training"
        )
    if args.folds < 1:
        raise UsageError(f"--folds must be at least 1, got {args.folds}")
    if not root.is_dir():
        raise UsageError(f"ROOT {root} does not exist or is not a folder; pass the NBIA download folder (where metadata.csv is)")
    if not (root / "metadata.csv").is_file():
        raise UsageError(f"{root} has no metadata.csv; ROOT must be the NBIA download folder (where metadata.csv is)")
    result = index_download(
        root,
        clinical=args.clinical,
        seed=args.seed,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        folds=args.folds,
        progress=not args.no_progress,
        sink=_warning_sink(),
    )
    print(format_summary(result))
    if len(result.cohort):
        from MMCAFNetLib.dataset.split_sizes import cohort_split_warnings

        for line in cohort_split_warnings(result.cohort["label"], result.cohort["split"]):
            print(f"warning: {line}", file=sys.stderr)
    if result.cohort.empty:
        print("mmcafnet index: no patient could be indexed; nothing written (see the warnings above)", file=sys.stderr)
        return 1
    out = write_cohort(result.cohort, args.out)
    print(f"wrote {out} ({len(result.cohort)} patients)")
    return 0

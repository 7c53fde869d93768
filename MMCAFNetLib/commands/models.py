"""``mmcafnet models``: every model variant with its parameters and GFLOPs per window."""

from __future__ import annotations

import argparse
import sys

from MMCAFNetLib.strict_json import dumps as strict_dumps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--window",
        nargs=3,
        type=int,
        metavar=("D", "H", "W"),
        default=[12, 192, 192],
        help="window size in voxels (slices, rows, columns); default: the paper's 12 192 192",
    )
    parser.add_argument("--model", action="append", metavar="NAME", help="only this variant (repeatable)")
    parser.add_argument("--num-classes", type=int, default=1, help="head size: 1 binary (default), 4 for A/B/E/G")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from MMCAFNetLib.models import available_models
    from MMCAFNetLib.models.complexity import measure_model

    names = args.model or available_models()
    unknown = [n for n in names if n not in available_models()]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; available: {', '.join(available_models())}")
    if any(v < 1 for v in args.window):
        raise ValueError(f"--window needs three positive sizes, got {args.window}")
    rows = []
    for n, name in enumerate(names, 1):  # about a second per full-size variant: say which one is counted
        print(f"\rcounting {name} ({n}/{len(names)})...".ljust(60), end="", file=sys.stderr, flush=True)
        rows.append(measure_model(name, tuple(args.window), num_classes=args.num_classes))
    print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
    if args.json:
        sys.stdout.write(strict_dumps([row.to_dict() for row in rows], indent=2))
        sys.stdout.write("\n")
        return 0
    window = "x".join(str(v) for v in args.window)
    print(f"{'model':<30} {'parameters':>14} {'GFLOPs/window':>14}  ({window}, forward, batch 1)")
    for row in rows:
        print(f"{row.name:<30} {row.parameters / 1e6:>12.3f} M {row.gflops:>14.2f}  {row.description}")
    return 0

"""``mmcafnet preprocess --cohort COHORT.csv --preset default|paper --cache DIR``: fill the cache.

``mmcafnet train --cache DIR`` (or ``cache_dir`` in its config) then takes every prepared CT from
there; ``--config`` takes the preset from a training config so that the keys are the ones the run
looks up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort", required=True, metavar="COHORT.csv", help="cohort table written by mmcafnet index")
    parser.add_argument("--preset", help="preprocessing preset: default or paper (default: default)")
    parser.add_argument("--config", metavar="FILE.json",
                        help="training config whose preprocessing preset to use (as mmcafnet train --config)")
    parser.add_argument("--cache", required=True, metavar="DIR", help="cache folder (created if absent)")
    parser.add_argument("--dtype", default="int16", choices=("int16", "float16"),
                        help="storage type of the prepared arrays (default int16 HU)")
    parser.add_argument("--verify", action="store_true",
                        help="check the checksum of every existing entry (rebuild the corrupt ones)")
    parser.add_argument("--split", action="append", choices=("train", "val", "test"),
                        help="only these splits (repeatable; default: every patient)")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def run(args: argparse.Namespace) -> int:

    from MMCAFNetLib.cache import PreprocessCache
    from MMCAFNetLib.cli import UsageError
    from MMCAFNetLib.preset import get_preset

    if args.config and args.preset:
        raise UsageError("give --preset or --config, not both (the config names its preset)")
    if args.config:
        from MMCAFNetLib.train.config import resolve_config

        preset = get_preset(resolve_config(config_file=args.config).preset)
    else:
        preset = get_preset(args.preset or "default")  # ValueError names the choices
    cohort_path = Path(args.cohort)
    if not cohort_path.is_file():
        raise FileNotFoundError(f"cohort table not found: {cohort_path} (create it with: mmcafnet index ROOT --out {cohort_path.name})")
    from MMCAFNetLib.table_files import read_csv_file

    df = read_csv_file(cohort_path, dtype={"series_path": str, "series_uid": str, "patient_id": str})
    missing = [c for c in ("patient_id", "series_path") if c not in df.columns]
    if missing:
        raise UsageError(f"{cohort_path} is not a cohort table: missing column(s) {missing}")
    if args.split:
        if "split" not in df.columns:
            raise UsageError(f"{cohort_path} has no 'split' column; drop --split")
        df = df[df["split"].isin(args.split)]
    base = cohort_path.resolve().parent
    series = []
    seen = set()
    for row in df.to_dict(orient="records"):
        path = Path(row["series_path"])
        path = path if path.is_absolute() else base / path
        uid = row.get("series_uid")
        uid = uid if isinstance(uid, str) and uid.strip() else None
        if (str(path), uid) in seen:
            continue
        seen.add((str(path), uid))
        series.append((str(row["patient_id"]), path, uid))
    if not series:
        raise UsageError(f"{cohort_path}: no series to preprocess")

    cache = PreprocessCache(args.cache, dtype=args.dtype)
    verify = "full" if args.verify else "size"
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(series), unit="series", desc=f"preprocess ({preset.name})", file=sys.stderr)
        except ImportError:
            bar = None
    start = time.perf_counter()
    failed: list[str] = []
    try:
        for patient_id, path, uid in series:
            try:
                cache.ensure(path, preset, uid, verify=verify)
            except (OSError, ValueError) as exc:
                failed.append(f"{patient_id}: {exc}")
                line = f"warning: {patient_id}: {path}: {exc}"
                if bar is not None:
                    bar.write(line, file=sys.stderr)
                else:
                    print(line, file=sys.stderr)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    s = cache.stats
    print(
        f"{len(series)} series, preset {preset.name}: {s['hits']} cached, {s['built']} built, "
        f"{s['rebuilt']} rebuilt (corrupt), {len(failed)} failed; cache {cache.root} "
        f"{cache.size_bytes() / 1e6:.1f} MB; {time.perf_counter() - start:.1f} s"
    )
    return 1 if failed else 0

"""Add the fields a checkpoint written before they existed lacks (maintainer tool):

    python MMCAFNet/Testing/Python/annotate_checkpoint.py CKPT --heatmap gradcam++ \
        [--cohort COHORT.csv] [--out NEW.pt]

``--heatmap`` sets the checkpoint's recommended heatmap method (choose it with
``mmcafnet evaluate --localisation all`` on validation patients). ``--cohort`` adds the hashed
training and validation patients (``seen_patients``) from the cohort table the checkpoint was
trained on; the table must reproduce the checkpoint's data fingerprint exactly, so the record
cannot name the wrong patients. The weights are not touched. The file is rewritten atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def annotate(checkpoint: Path, heatmap: str | None, cohort: Path | None, out: Path) -> dict:
    from MMCAFNetLib.checkpoint import load_checkpoint, save_checkpoint
    from MMCAFNetLib.evaluate.seen import seen_patients_record
    from MMCAFNetLib.inference.predictor import HEATMAP_METHODS
    from MMCAFNetLib.train.config import TrainConfig
    from MMCAFNetLib.train.data import load_cohort, split_cohort
    from MMCAFNetLib.train.loop import data_fingerprint

    payload = load_checkpoint(checkpoint)
    if heatmap is not None:
        if heatmap not in HEATMAP_METHODS:
            raise SystemExit(f"--heatmap must be one of {HEATMAP_METHODS}, not {heatmap!r}")
        payload["heatmap"] = heatmap
    if cohort is not None:
        df = load_cohort(cohort)
        stored = (payload.get("provenance") or {}).get("data_fingerprint")
        if stored != data_fingerprint(df):
            raise SystemExit(f"{cohort} is not the cohort {checkpoint} was trained on (data fingerprint differs)")
        config = TrainConfig.from_dict(dict(payload.get("train_config") or {}))
        train_df, val_df = split_cohort(df, config)
        payload["seen_patients"] = seen_patients_record(train_df, val_df)
    save_checkpoint(payload, out)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--heatmap")
    parser.add_argument("--cohort", type=Path)
    parser.add_argument("--out", type=Path, help="write here instead of over CKPT")
    args = parser.parse_args(argv)
    annotate(args.checkpoint, args.heatmap, args.cohort, args.out or args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A cohort table whose training and validation labels are shuffled (maintainer tool):

    python MMCAFNet/Testing/Python/shuffle_labels.py COHORT.csv OUT.csv [--seed 0]

The negative control of docs/training.md: a model trained on shuffled labels has nothing real to
learn, so its score on new patients shows how high chance alone goes at that test-set size. The
labels are permuted among the training and validation rows (each class keeps its count, every
image and record stays with its patient); test rows are copied unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def shuffle_labels(cohort: Path, out: Path, seed: int) -> dict:
    import numpy as np

    from MMCAFNetLib.train.data import load_cohort

    df = load_cohort(cohort)
    pool = np.flatnonzero((df["split"] != "test").to_numpy())
    rng = np.random.default_rng(seed)
    labels = df["label"].to_numpy().copy()
    labels[pool] = labels[rng.permutation(pool)]
    kept = int((labels[pool] == df["label"].to_numpy()[pool]).sum())
    df = df.assign(label=labels)
    if out.exists():
        raise SystemExit(f"{out} exists; choose another path")
    df.to_csv(out, index=False)
    return {"rows_shuffled": int(len(pool)), "labels_unchanged_by_chance": kept, "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cohort", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(shuffle_labels(args.cohort, args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

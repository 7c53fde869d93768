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


def shuffle_labels(df, seed: int):
    """(the cohort with its training and validation labels permuted, a summary)."""
    import numpy as np

    pool = np.flatnonzero((df["split"] != "test").to_numpy())
    rng = np.random.default_rng(seed)
    labels = df["label"].to_numpy().copy()
    labels[pool] = labels[rng.permutation(pool)]
    kept = int((labels[pool] == df["label"].to_numpy()[pool]).sum())
    return df.assign(label=labels), {"rows_shuffled": len(pool), "labels_unchanged_by_chance": kept}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cohort", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from MMCAFNetLib.train.data import load_cohort

    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose another path")
    shuffled, summary = shuffle_labels(load_cohort(args.cohort), args.seed)
    shuffled.to_csv(args.out, index=False)
    print({**summary, "out": str(args.out)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

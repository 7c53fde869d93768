"""A tiny synthetic cohort and network shared by the training tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

#: The smallest sensible network: every stage one block of a few channels.
TINY_MODEL = {
    "stem_channels": 8,
    "stage_channels": [16, 32, 64],
    "stage_blocks": [1, 1, 1],
    "cardinality": 4,
    "se_reduction": 4,
    "cab_reduction": 4,
}
TINY_PRESET = {"name": "tiny", "spacing": [4.0, 4.0, 4.0], "window": [8, 32, 32], "hu_range": [-1000.0, 400.0], "mean": 0.3}


def tiny_cohort(tmp_path_factory) -> Path:
    """12 synthetic patients (8 A, 4 G) at 64 px, indexed; 4 of them validation."""
    from MMCAFNetLib import synthetic
    from MMCAFNetLib.dataset import index_download, write_cohort

    base = tmp_path_factory.getbasetemp() / "tiny-train-cohort"
    table = base / "cohort.csv"
    if not table.is_file():
        written = synthetic.write_cohort(base / "data", patients=12, seed=3, size=64, classes="A,G", extra_series=False)
        result = index_download(written.root, seed=0, test_fraction=0.0, val_fraction=0.34)
        write_cohort(result.cohort, table)
    return table

"""Locating the project's bundled resources (demo model, model catalog, colour table).

They live in the repository's ``Resources/`` folder, which the Slicer extension installs next to
the module and an editable install keeps next to the package. ``MMCAFNET_RESOURCES`` overrides.
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_CHECKPOINT = "Models/mmcafnet-lite-demo.pt"
MODEL_CATALOG = "Models.json"


def resources_dir() -> Path:
    candidates = []
    if os.environ.get("MMCAFNET_RESOURCES"):
        candidates.append(Path(os.environ["MMCAFNET_RESOURCES"]))
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "Resources", here / "Resources", here.parent / "MMCAFNet" / "Resources"]
    for c in candidates:
        if (c / MODEL_CATALOG).is_file() or (c / DEMO_CHECKPOINT).is_file():
            return c
    raise FileNotFoundError(
        "the MMCAF-Net Resources folder was not found next to the package; set MMCAFNET_RESOURCES "
        "to the folder holding Models.json, or reinstall from a full checkout"
    )


def resource_path(relative: str) -> Path:
    path = resources_dir() / relative
    if not path.is_file():
        raise FileNotFoundError(f"bundled resource {relative} is missing from {path.parent}")
    return path


def demo_checkpoint_path() -> Path:
    return resource_path(DEMO_CHECKPOINT)

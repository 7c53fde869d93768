"""Training: configuration and recipes, losses, samplers, the loop, distributed glue.

``train(config, cohort, out_dir, resume=False)`` is the entry point (``mmcafnet train``); the
heavy modules are imported lazily so ``import MMCAFNetLib.train`` stays cheap.
"""

from __future__ import annotations

from MMCAFNetLib.train.config import TASKS, TrainConfig, read_config_file, resolve_config
from MMCAFNetLib.train.recipes import recipe_settings


def train(*args, **kwargs):
    """See ``MMCAFNetLib.train.loop.train``."""
    from MMCAFNetLib.train.loop import train as _train

    return _train(*args, **kwargs)


__all__ = ["TASKS", "TrainConfig", "read_config_file", "recipe_settings", "resolve_config", "train"]

"""Hard-negative mining for the attention supervision.

A whole-volume scan's heatmap peak is decided by whichever lesion-free window the current model
lights up most, and a random handful of lesion-free windows per patient rarely holds that one.
So every few epochs the trainer scores each training patient's lesion-free windows with the
current weights (the peak of the attention map, by default the mean of the levels, or the map a
scan shows with ``attention_peak_maps="shown"``) and the
next epochs draw from the hottest of them (``LesionWindowDataset.set_hard_negatives``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from MMCAFNetLib.heatmap import combine_attention_levels
from MMCAFNetLib.train.distributed import DistributedContext, gather_objects


def is_mining_epoch(epoch: int, hard_negatives: int, every: int) -> bool:
    """Mining happens before epoch ``epoch`` (0-based) when it is on, never before the first
    epoch (untrained weights rank nothing) and then every ``every`` epochs."""
    return hard_negatives > 0 and epoch > 0 and epoch % max(int(every), 1) == 0


def score_lesion_free_windows(model: torch.nn.Module, patients: Sequence[Any], device: torch.device,
                              forward: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], Any],
                              batch_size: int = 32, levels: str = "all",
                              ctx: Optional[DistributedContext] = None) -> list[np.ndarray]:
    """Per patient, the peak of each lesion-free window's attention map of the pyramid ``levels``
    ``[K]`` (an empty array for a patient without lesion-free windows). Evaluation mode, no
    gradients; the model's training mode is restored afterwards.

    Under DDP (``ctx``) each rank scores every ``world_size``-th patient and the shares are
    gathered, so the pass costs 1 / world_size per rank and every rank gets the same ranking (one
    rank's BatchNorm statistics can differ from another's, and ranks must draw from one ranking
    for a resumed run to repeat the original).
    """
    distributed = ctx is not None and ctx.enabled
    indices = range(ctx.rank, len(patients), ctx.world_size) if distributed else range(len(patients))
    own = score_shard(model, patients, indices, device, forward, batch_size, levels)
    parts = gather_objects(own, ctx) if distributed else [own]
    return merge_shards(parts, len(patients))


def score_shard(model: torch.nn.Module, patients: Sequence[Any], indices: Iterable[int], device: torch.device,
                forward: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], Any],
                batch_size: int = 32, levels: str = "all") -> dict[int, np.ndarray]:
    """The scores of the patients at ``indices``: ``{patient index: [K] peaks}``."""
    was_training = model.training
    model.eval()
    scores: dict[int, np.ndarray] = {}
    try:
        with torch.no_grad():
            for i in indices:
                pw = patients[i]
                if pw.negatives is None or not len(pw.negatives):
                    scores[i] = np.zeros(0, dtype=np.float32)
                    continue
                peaks = []
                clinical = torch.from_numpy(np.asarray(pw.clinical, dtype=np.float32))[None].to(device)
                for start in range(0, len(pw.negatives), batch_size):
                    chunk = np.ascontiguousarray(pw.negatives[start:start + batch_size], dtype=np.float32)
                    image = torch.from_numpy(chunk)[:, None].to(device)
                    out = forward(model, image, clinical.expand(len(chunk), -1))
                    combined = combine_attention_levels(list(out.attention), levels)
                    peaks.append(combined.flatten(1).amax(dim=1).float().cpu().numpy())
                scores[i] = np.concatenate(peaks)
    finally:
        model.train(was_training)
    return scores


def merge_shards(parts: Sequence[dict[int, np.ndarray]], num_patients: int) -> list[np.ndarray]:
    """The ranks' shares in patient order; a patient no rank scored is a bug, not a silent gap."""
    merged: dict[int, np.ndarray] = {}
    for part in parts:
        merged.update(part)
    missing = [i for i in range(num_patients) if i not in merged]
    if missing:
        raise RuntimeError(f"hard-negative mining: no rank scored patients {missing[:10]}")
    return [np.asarray(merged[i], dtype=np.float32) for i in range(num_patients)]

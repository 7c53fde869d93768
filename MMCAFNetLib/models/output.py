"""What every model returns: logits plus the maps a heatmap needs, from one forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class ModelOutput:
    """Result of ``model(image, clinical)``.

    ``logits`` is ``[B, num_classes]`` (one logit for the binary head). ``attention`` holds the
    spatial-attention (SAB) sigmoid maps ``[B, 1, d, h, w]`` of the pyramid levels, finest first,
    empty for tabular-only models. ``features`` is the last pyramid map ``[B, C, d, h, w]`` before
    the readout pooling (still in the autograd graph, so Grad-CAM can differentiate through it),
    None for tabular-only models.
    """

    logits: torch.Tensor
    attention: List[torch.Tensor] = field(default_factory=list)
    features: Optional[torch.Tensor] = None

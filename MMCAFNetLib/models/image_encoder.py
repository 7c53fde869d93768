"""The image encoder: PENet backbone -> feature pyramid -> readout (a 24-d embedding per window)."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from .backbone import PENetBackbone
from .pyramid import FeaturePyramid, Readout


class ImageEncoder(nn.Module):
    """Returns (embedding [B, E], last pyramid map [B, C, d, h, w], SAB maps finest first)."""

    def __init__(
        self,
        embed_dim: int = 24,
        stem_channels: int = 64,
        stage_channels: Sequence[int] = (256, 512, 1024),
        stage_blocks: Sequence[int] = (3, 4, 6),
        cardinality: int = 32,
        se_reduction: int = 16,
        final_survival_prob: float = 0.5,
        input_replicas: int = 3,
        level_dropout: float = 0.3,
        cab_reduction: int = 16,
        sab_kernel: int = 7,
        dcfb_expansion: int = 2,
        dcfb_kernels: Sequence[int] = (1, 3, 5),
        bfpu_conv: str = "dense",
        readout_dropout: float = 0.5,
        bfpu_gate: str = "linear",
    ) -> None:
        super().__init__()
        self.backbone = PENetBackbone(
            stem_channels, stage_channels, stage_blocks, cardinality, se_reduction, final_survival_prob, input_replicas
        )
        self.pyramid = FeaturePyramid(
            stage_channels, level_dropout, cab_reduction, sab_kernel, dcfb_expansion, dcfb_kernels, bfpu_conv,
            bfpu_gate,
        )
        self.readout = Readout(stage_channels[-1], embed_dim, readout_dropout)
        self.stride = self.backbone.stride

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        features, attention = self.pyramid(self.backbone(image))
        return self.readout(features), features, attention

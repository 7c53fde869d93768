"""E3D-MSCA: the 3D multi-scale convolutional attention applied to every pyramid level.

A 3D port of EMCAD's attention (Rahman et al., CVPR 2024): channel attention (CAB), spatial
attention (SAB, one instance shared by all levels, its sigmoid map is the model's own heatmap)
and the depthwise-convolution fusion block (DCFB).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNorm3d, channel_shuffle


class CAB(nn.Module):
    """Channel attention block: avg- and max-pooled descriptors through a shared bottleneck MLP."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Conv3d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv3d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        pooled = torch.cat([x.mean(dim=(2, 3, 4), keepdim=True), x.amax(dim=(2, 3, 4), keepdim=True)])
        scores = self.fc2(F.relu(self.fc1(pooled)))  # both descriptors in one pass
        return x * torch.sigmoid(scores[:batch] + scores[batch:])


class SAB(nn.Module):
    """Spatial attention block: channel mean and max -> 7x7x7 conv -> sigmoid map.

    Returns the attended features and the map ``[B, 1, d, h, w]`` (values in 0..1).
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        descriptor = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        attention = torch.sigmoid(self.conv(descriptor))
        return x * attention, attention


class DCFB(nn.Module):
    """Depthwise-convolution fusion block: expand 1x1x1, parallel depthwise k=1/3/5 summed,
    channel shuffle, project 1x1x1, residual add (EMCAD's MSCB in 3D)."""

    def __init__(self, channels: int, expansion: int = 2, kernel_sizes: Sequence[int] = (1, 3, 5)) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand = ConvNorm3d(channels, hidden, 1)
        self.branches = nn.ModuleList(ConvNorm3d(hidden, hidden, k, groups=hidden) for k in kernel_sizes)
        self.project = ConvNorm3d(hidden, channels, 1)
        self.shuffle_groups = math.gcd(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu6(self.expand(x), inplace=True)
        mixed = F.relu6(self.branches[0](hidden), inplace=True)
        for branch in self.branches[1:]:
            mixed = mixed + F.relu6(branch(hidden), inplace=True)
        mixed = channel_shuffle(mixed, self.shuffle_groups)
        return x + self.project(mixed)


class E3DMSCA(nn.Module):
    """One level's attention: CAB -> (shared) SAB -> DCFB.

    The SAB is owned by the pyramid and passed in, so the one shared instance appears once in
    the state dict.
    """

    def __init__(
        self, channels: int, reduction: int = 16, expansion: int = 2, kernel_sizes: Sequence[int] = (1, 3, 5)
    ) -> None:
        super().__init__()
        self.cab = CAB(channels, reduction)
        self.dcfb = DCFB(channels, expansion, kernel_sizes)

    def forward(self, x: torch.Tensor, sab: SAB) -> Tuple[torch.Tensor, torch.Tensor]:
        x, attention = sab(self.cab(x))
        return self.dcfb(x), attention

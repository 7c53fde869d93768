"""Small building blocks shared by the image modules: conv + norm pairs and channel shuffle."""

from __future__ import annotations

import torch
from torch import nn


def group_norm(channels: int, channels_per_group: int = 16) -> nn.GroupNorm:
    """GroupNorm with one group per 16 channels (PENet's choice), at least one group."""
    return nn.GroupNorm(max(channels // channels_per_group, 1), channels)


class ConvNorm3d(nn.Module):
    """A bias-free 3D convolution followed by a normalisation (no activation: callers choose)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
        )
        if norm == "batch":
            self.norm: nn.Module = nn.BatchNorm3d(out_channels)
        elif norm == "group":
            self.norm = group_norm(out_channels)
        else:
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class SeparableConv3d(nn.Module):
    """Depthwise 3x3x3 then pointwise 1x1x1: the cheap stand-in for a dense 3x3x3 convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.depthwise = nn.Conv3d(
            in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv3d(in_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def conv3x3x3(in_channels: int, out_channels: int, kind: str = "dense") -> nn.Module:
    """A 3x3x3 convolution with bias, dense or depthwise-separable."""
    if kind == "dense":
        return nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=True)
    if kind == "separable":
        return SeparableConv3d(in_channels, out_channels)
    raise ValueError(f"convolution kind must be 'dense' or 'separable', got {kind!r}")


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: view channels as [groups, C/groups], transpose, flatten."""
    batch, channels = x.shape[:2]
    if groups in (1, channels):
        return x  # the permutation is the identity
    spatial = x.shape[2:]
    x = x.reshape(batch, groups, channels // groups, *spatial).transpose(1, 2)
    return x.reshape(batch, channels, *spatial)

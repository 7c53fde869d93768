"""The feature pyramid over the backbone levels: top-down path with E3D-MSCA and UCB, bottom-up
path with BFPU, and the readout that turns the last map into the image embedding."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import E3DMSCA, SAB
from .layers import conv3x3x3


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resize (corners aligned, as the reference); no-op when the size already matches."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=True)


class LevelNorm(nn.Module):
    """BatchNorm + ReLU + dropout applied to each backbone level before the pyramid."""

    def __init__(self, channels: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.norm = nn.BatchNorm3d(channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.relu(self.norm(x), inplace=True))


class UCB(nn.Module):
    """Up-convolution block: trilinear x2, depthwise 3x3x3 + BN + ReLU, pointwise to C/2, then
    resize to the finer level's exact size.

    EMCAD's channel shuffle here uses as many groups as channels, which is the identity, so it
    is not computed.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv3d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.norm = nn.BatchNorm3d(channels)
        self.pwconv = nn.Conv3d(channels, channels // 2, 1, bias=True)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="trilinear", align_corners=True)
        x = self.pwconv(F.relu(self.norm(self.dwconv(x)), inplace=True))
        return resize(x, size)


class BFPU(nn.Module):
    """Bidirectional feature propagation unit: merges a deeper map ``x`` (C channels) with the
    shallower path's map ``y`` (C/2 channels, larger), on ``x``'s grid.

    att = sigmoid(query(x) * key(y)); each input and its attended copy are mixed by two
    per-voxel weights predicted from their concatenation; the two mixes are summed.
    """

    def __init__(self, channels: int, conv: str = "dense", gate: str = "linear") -> None:
        super().__init__()
        self.bounded = gate == "sigmoid"
        self.adjust = nn.Conv3d(channels // 2, channels, 1, bias=True)
        self.query = conv3x3x3(channels, channels, conv)
        self.key = conv3x3x3(channels, channels, conv)
        self.gate_deep = nn.Conv3d(2 * channels, 2, 3, padding=1, bias=True)
        self.gate_shallow = nn.Conv3d(2 * channels, 2, 3, padding=1, bias=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = self.adjust(resize(y, x.shape[2:]))
        attention = torch.sigmoid(self.query(x) * self.key(y))
        x_att, y_att = x * attention, y * attention
        gx = self.gate_deep(torch.cat([x, x_att], dim=1))
        gy = self.gate_shallow(torch.cat([y, y_att], dim=1))
        if self.bounded:
            gx, gy = torch.sigmoid(gx), torch.sigmoid(gy)
        return x * gx[:, 0:1] + x_att * gx[:, 1:2] + y * gy[:, 0:1] + y_att * gy[:, 1:2]


class FeaturePyramid(nn.Module):
    """Top-down: d_L = MSCA(l_L); d_i = MSCA(l_i + UCB(d_{i+1})). Bottom-up: b = d_1;
    b = BFPU(d_{i+1}, b) for each deeper level. Returns the last map and the SAB maps
    (finest first)."""

    def __init__(
        self,
        channels: Sequence[int] = (256, 512, 1024),
        level_dropout: float = 0.3,
        cab_reduction: int = 16,
        sab_kernel: int = 7,
        dcfb_expansion: int = 2,
        dcfb_kernels: Sequence[int] = (1, 3, 5),
        bfpu_conv: str = "dense",
        bfpu_gate: str = "linear",
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        self.levels = nn.ModuleList(LevelNorm(c, level_dropout) for c in channels)
        self.sab = SAB(sab_kernel)
        self.msca = nn.ModuleList(E3DMSCA(c, cab_reduction, dcfb_expansion, dcfb_kernels) for c in channels)
        # ucb[i] lifts level i+1 onto level i; bfpu[i] merges level i+1 with the path below it.
        self.ucb = nn.ModuleList(UCB(c) for c in channels[1:])
        self.bfpu = nn.ModuleList(BFPU(c, bfpu_conv, bfpu_gate) for c in channels[1:])
        self.out_channels = channels[-1]

    def forward(self, levels: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        feats = [norm(level) for norm, level in zip(self.levels, levels)]
        n = len(feats)
        decoded: List[torch.Tensor] = [feats[-1]] * n
        maps: List[torch.Tensor] = [feats[-1]] * n
        for i in reversed(range(n)):
            x = feats[i] if i == n - 1 else feats[i] + self.ucb[i](decoded[i + 1], feats[i].shape[2:])
            decoded[i], maps[i] = self.msca[i](x, self.sab)
        merged = decoded[0]
        for i in range(n - 1):
            merged = self.bfpu[i](decoded[i + 1], merged)
        return merged, maps


class Readout(nn.Module):
    """Global max pool -> Linear -> ReLU -> dropout: the image embedding."""

    def __init__(self, channels: int = 1024, embed_dim: int = 24, dropout: float = 0.5) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.relu(self.fc(x.amax(dim=(2, 3, 4)))))

"""The PENet-style 3D ResNeXt backbone: stem, three stages of bottleneck blocks, three feature levels.

PENet (Huang et al., npj Digit. Med. 2020) as used by MMCAF-Net: GroupNorm, LeakyReLU,
squeeze-excitation and stochastic depth in every block; the reference also builds an ASPP head and
decoders that it never uses, so they are not built here.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNorm3d, group_norm


class SqueezeExcitation(nn.Module):
    """Channel gate from the global average: Linear -> LeakyReLU -> Linear -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.leaky_relu(self.fc1(x.mean(dim=(2, 3, 4))))))
        return x * gate[:, :, None, None, None]


class PENetBottleneck(nn.Module):
    """ResNeXt bottleneck: 1x1x1 -> grouped 3x3x3 (cardinality) -> 1x1x1, SE, residual, LeakyReLU.

    Stochastic depth: while training, each sample's residual branch survives with probability
    ``survival_prob`` and is scaled by ``1 / survival_prob`` (inverted, per sample), so evaluation
    uses the plain sum, exactly as the reference does, and every parameter takes part in every
    step (no unused parameters under DistributedDataParallel). The reference instead drops the
    branch for the whole batch and does not rescale (``drop_rule = "batch"``), so its training
    sees a branch weighted by ``survival_prob`` on average and evaluation by 1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        cardinality: int = 32,
        survival_prob: float = 1.0,
        se_reduction: int = 16,
    ) -> None:
        super().__init__()
        mid_channels = cardinality * ((out_channels // 2) // cardinality)
        if mid_channels == 0:
            raise ValueError(
                f"a bottleneck with {out_channels} output channels is too narrow for cardinality "
                f"{cardinality}: use out_channels >= {2 * cardinality} or a smaller cardinality"
            )
        self.survival_prob = float(survival_prob)
        #: "sample" (default) or "batch" (the reference's rule); see :func:`set_stochastic_depth_rule`
        self.drop_rule = "sample"
        self.shortcut = (
            ConvNorm3d(in_channels, out_channels, 1, stride=stride, norm="group")
            if stride != 1 or in_channels != out_channels
            else None
        )
        self.conv1 = nn.Conv3d(in_channels, mid_channels, 1, bias=False)
        self.norm1 = group_norm(mid_channels)
        self.conv2 = nn.Conv3d(
            mid_channels, mid_channels, 3, stride=stride, padding=1, groups=cardinality, bias=False
        )
        self.norm2 = group_norm(mid_channels)
        self.conv3 = nn.Conv3d(mid_channels, out_channels, 1, bias=False)
        self.norm3 = group_norm(out_channels)
        self.se = SqueezeExcitation(out_channels, se_reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        y = F.leaky_relu(self.norm1(self.conv1(x)), inplace=True)
        y = F.leaky_relu(self.norm2(self.conv2(y)), inplace=True)
        y = self.se(self.norm3(self.conv3(y)))
        if self.training and self.survival_prob < 1.0:
            if self.drop_rule == "batch":  # the reference: the whole batch, no rescaling
                keep = torch.rand((), device=y.device) < self.survival_prob
                y = y * keep.to(y.dtype)
            else:
                keep = torch.rand(y.shape[0], 1, 1, 1, 1, device=y.device, dtype=y.dtype) < self.survival_prob
                y = y * keep / self.survival_prob
        return F.leaky_relu(y + skip, inplace=True)


class PENetStage(nn.Module):
    """A run of bottleneck blocks; the first one changes width and applies the stage's stride."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        stride: int,
        cardinality: int,
        survival_probs: Sequence[float],
        se_reduction: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            PENetBottleneck(
                in_channels if i == 0 else out_channels,
                out_channels,
                stride=stride if i == 0 else 1,
                cardinality=cardinality,
                survival_prob=survival_probs[i],
                se_reduction=se_reduction,
            )
            for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PENetStem(nn.Module):
    """Conv 7x7x7 stride (1,2,2) + GroupNorm + LeakyReLU, then max-pool 3x3x3 stride 2.

    The reference copies the one CT channel ``input_replicas`` times (PENet was pre-trained on
    RGB video). Convolving identical copies equals convolving the one channel with the weights
    summed over the copies, so the weight keeps the reference's shape (checkpoints load as they
    are) while the forward does a third of the work.
    """

    def __init__(self, out_channels: int = 64, input_replicas: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv3d(input_replicas, out_channels, 7, stride=(1, 2, 2), padding=3, bias=False)
        self.norm = group_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight
        if weight.shape[1] != 1:
            weight = weight.sum(dim=1, keepdim=True)
        x = F.conv3d(x, weight, None, self.conv.stride, self.conv.padding)
        x = F.leaky_relu(self.norm(x), inplace=True)
        return F.max_pool3d(x, 3, stride=2, padding=1)


class PENetBackbone(nn.Module):
    """Stem + stages; returns every stage's output (the pyramid levels), finest first."""

    def __init__(
        self,
        stem_channels: int = 64,
        stage_channels: Sequence[int] = (256, 512, 1024),
        stage_blocks: Sequence[int] = (3, 4, 6),
        cardinality: int = 32,
        se_reduction: int = 16,
        final_survival_prob: float = 0.5,
        input_replicas: int = 3,
    ) -> None:
        super().__init__()
        self.stem = PENetStem(stem_channels, input_replicas)
        total = sum(stage_blocks)
        # Linearly decaying survival probability over the whole network (Huang et al. 2016).
        probs = [1.0 - i / total * (1.0 - final_survival_prob) for i in range(total)]
        stages = []
        in_channels, first = stem_channels, 0
        for i, (channels, blocks) in enumerate(zip(stage_channels, stage_blocks)):
            stages.append(
                PENetStage(
                    in_channels,
                    channels,
                    blocks,
                    stride=1 if i == 0 else 2,
                    cardinality=cardinality,
                    survival_probs=probs[first : first + blocks],
                    se_reduction=se_reduction,
                )
            )
            in_channels, first = channels, first + blocks
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(stage_channels)
        #: total stride (depth, height, width) of the deepest level relative to the input
        self.stride = (2 ** len(stage_channels), 2 ** (len(stage_channels) + 1), 2 ** (len(stage_channels) + 1))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(x)
        levels = []
        for stage in self.stages:
            x = stage(x)
            levels.append(x)
        return levels


def set_stochastic_depth_rule(model: nn.Module, rule: str) -> int:
    """Set the stochastic-depth rule of every bottleneck in ``model``: ``"sample"`` (per sample,
    rescaled; the default) or ``"batch"`` (whole batch, not rescaled; the reference code).
    A training-time rule only: evaluation is the same under both. Returns the blocks changed."""
    if rule not in ("sample", "batch"):
        raise ValueError(f"stochastic depth rule must be 'sample' or 'batch', got {rule!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, PENetBottleneck):
            module.drop_rule = rule
            count += 1
    return count

"""One configuration dataclass per model variant (plain data: stored in checkpoints as a dict).

Field groups are shared through small base classes; each variant only changes defaults. Every
field can be overridden through ``create_model(name, **overrides)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Tuple


@dataclass
class BaseConfig:
    """Fields every variant has."""

    num_classes: int = 1  # 1 = binary head (one logit); >1 = softmax head (e.g. 4 for A/B/E/G)
    num_clinical: int = 7  # width of the encoded clinical vector
    embed_dim: int = 24  # width of the image and clinical embeddings

    def __post_init__(self) -> None:
        if int(self.num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1 (1 = binary head), got {self.num_classes}")
        if int(self.num_clinical) < 1:
            raise ValueError(f"num_clinical must be >= 1, got {self.num_clinical}")
        if int(self.embed_dim) < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (lists for tuples), accepted back by ``create_model(name, **d)``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class ImageEncoderConfig(BaseConfig):
    """The image encoder: PENet backbone, pyramid with E3D-MSCA/UCB/BFPU, readout."""

    input_replicas: int = 3  # the reference feeds the CT channel 3 times (PENet's RGB stem)
    stem_channels: int = 64
    stage_channels: Tuple[int, ...] = (256, 512, 1024)
    stage_blocks: Tuple[int, ...] = (3, 4, 6)
    cardinality: int = 32
    se_reduction: int = 16
    final_survival_prob: float = 0.5  # stochastic depth: survival of the last block
    level_dropout: float = 0.3
    cab_reduction: int = 16
    sab_kernel: int = 7
    dcfb_expansion: int = 2
    dcfb_kernels: Tuple[int, ...] = (1, 3, 5)
    bfpu_conv: str = "dense"  # "dense" (reference) or "separable" (depthwise + pointwise)
    #: "linear" (reference): the BFPU's per-voxel mixing weights are raw convolution outputs, so
    #: its output scales like the square of its input; "sigmoid" bounds them to (0, 1).
    bfpu_gate: str = "linear"
    readout_dropout: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        channels, blocks = tuple(self.stage_channels), tuple(self.stage_blocks)
        if len(channels) < 2 or len(channels) != len(blocks):
            raise ValueError(
                f"stage_channels {channels} and stage_blocks {blocks} must have the same length >= 2"
            )
        if any(b < 1 for b in blocks):
            raise ValueError(f"every stage needs at least one block, got stage_blocks {blocks}")
        if any(b != 2 * a for a, b in zip(channels, channels[1:])):
            raise ValueError(
                f"stage_channels must double from level to level (the pyramid halves them back), got {channels}"
            )
        if self.bfpu_gate not in ("linear", "sigmoid"):
            raise ValueError(f"bfpu_gate must be 'linear' or 'sigmoid', got {self.bfpu_gate!r}")
        if self.bfpu_conv not in ("dense", "separable"):
            raise ValueError(f"bfpu_conv must be 'dense' or 'separable', got {self.bfpu_conv!r}")
        if not 0.0 < self.final_survival_prob <= 1.0:
            raise ValueError(f"final_survival_prob must be in (0, 1], got {self.final_survival_prob}")


@dataclass
class KANFields:
    """The KAN tabular encoder: B-splines of ``kan_order`` on ``kan_intervals`` over ``kan_range``."""

    kan_intervals: int = 5
    kan_order: int = 3
    kan_range: Tuple[float, ...] = (-1.0, 1.0)


@dataclass
class MMCAFNetConfig(ImageEncoderConfig, KANFields):
    """``mmcafnet``: the reference network with its defects fixed (final BSF concatenates so the
    classifier takes 2 x 24 = 48 features; the unused ASPP and decoders are not built)."""

    fusion_heads: Tuple[int, ...] = (4, 2, 2)  # heads at widths 24, 12, 6
    fusion_dropout: float = 0.5


@dataclass
class MMCAFNetLiteConfig(MMCAFNetConfig):
    """``mmcafnet-lite``: the same topology at under a tenth of the parameters and FLOPs.

    Choices (measured by ``mmcafnet models``): one CT channel into the stem (no replicas) and a
    32-channel stem (the 7x7x7 stem is a large share of the backbone's cost at full in-plane
    resolution); stages a quarter as wide (64/128/256, so every dense layer and pyramid block
    shrinks about 16x) with the same 3/4/6 blocks; the BFPU's dense 3x3x3 query/key
    convolutions, over half of the reference's cost, replaced by depthwise-separable ones. The
    fusion, KAN and classifier are unchanged. At 12x192x192: about 1.7% of the parameters and 5%
    of the FLOPs of ``mmcafnet``.
    """

    input_replicas: int = 1
    stem_channels: int = 32
    stage_channels: Tuple[int, ...] = (64, 128, 256)
    bfpu_conv: str = "separable"


@dataclass
class ImageOnlyConfig(ImageEncoderConfig):
    """``image-only``: the image encoder and a linear head on its embedding."""


@dataclass
class TabularKANConfig(BaseConfig, KANFields):
    """``tabular-kan``: the KAN encoder and a linear head."""


@dataclass
class TabularMLPConfig(BaseConfig):
    """``tabular-mlp``: the ablation's MLP encoder (Linear-ReLU-Dropout-Linear) and a linear head."""

    mlp_dropout: float = 0.2


@dataclass
class LateFusionConfig(ImageEncoderConfig, KANFields):
    """``late-fusion``: separate image and KAN heads; the logits are averaged."""


@dataclass
class ConcatFusionConfig(ImageEncoderConfig, KANFields):
    """``concat-fusion``: batch-normalised embeddings concatenated, then the linear head."""


@dataclass
class CrossAttentionSingleScaleConfig(ImageEncoderConfig, KANFields):
    """``cross-attention-single-scale``: one scale of the bidirectional cross-attention."""

    fusion_heads: Tuple[int, ...] = (4,)

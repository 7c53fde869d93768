"""The assembled variants: MMCAF-Net and the ablation baselines, with one input contract.

Every model is called as ``model(image, clinical)`` with image ``[B, 1, D, H, W]`` and clinical
``[B, F]`` and returns a :class:`ModelOutput`. An input a model does not use may be None (and is
ignored). Bad shapes raise ValueError naming the expected shape.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .configs import BaseConfig, ImageEncoderConfig, KANFields, MMCAFNetConfig
from .fusion import ConcatFusion, MultiScaleCrossAttentionFusion, SingleScaleCrossAttentionFusion
from .image_encoder import ImageEncoder
from .kan import KANLayer
from .output import ModelOutput
from .tabular import TabularMLP


def build_image_encoder(config: ImageEncoderConfig) -> ImageEncoder:
    return ImageEncoder(
        embed_dim=config.embed_dim,
        stem_channels=config.stem_channels,
        stage_channels=tuple(config.stage_channels),
        stage_blocks=tuple(config.stage_blocks),
        cardinality=config.cardinality,
        se_reduction=config.se_reduction,
        final_survival_prob=config.final_survival_prob,
        input_replicas=config.input_replicas,
        level_dropout=config.level_dropout,
        cab_reduction=config.cab_reduction,
        sab_kernel=config.sab_kernel,
        dcfb_expansion=config.dcfb_expansion,
        dcfb_kernels=tuple(config.dcfb_kernels),
        bfpu_conv=config.bfpu_conv,
        bfpu_gate=config.bfpu_gate,
        readout_dropout=config.readout_dropout,
    )


def build_kan(config: KANFields, num_clinical: int, embed_dim: int) -> KANLayer:
    return KANLayer(num_clinical, embed_dim, config.kan_intervals, config.kan_order, tuple(config.kan_range))


class MultimodalClassifier(nn.Module):
    """Common base: input checks, named parts for freezing, frozen parts kept in eval mode."""

    uses_image = True
    uses_clinical = True

    def __init__(self, name: str, config: BaseConfig) -> None:
        super().__init__()
        self.name = name
        self.config = config
        self.num_classes = int(config.num_classes)
        self.num_clinical = int(config.num_clinical)
        self._frozen_statistics: set = set()

    # -- parts -------------------------------------------------------------------------------
    def parts(self) -> Dict[str, nn.Module]:
        """Part name -> module, for :func:`MMCAFNetLib.models.freeze`."""
        found: Dict[str, nn.Module] = {}
        encoder = getattr(self, "image_encoder", None)
        if encoder is not None:
            found.update(
                backbone=encoder.backbone, pyramid=encoder.pyramid, readout=encoder.readout, image_encoder=encoder
            )
        for name in ("tabular_encoder", "fusion", "classifier"):
            module = getattr(self, name, None)
            if module is not None:
                found[name] = module
        return found

    def train(self, mode: bool = True) -> MultimodalClassifier:
        """Like nn.Module.train, but parts frozen with their statistics stay in eval mode."""
        super().train(mode)
        parts = self.parts()
        for name in self._frozen_statistics:
            parts[name].eval()
        return self

    # -- inputs ------------------------------------------------------------------------------
    @property
    def minimum_window(self) -> Tuple[int, int, int]:
        """Smallest (D, H, W) window: the image encoder's total stride."""
        encoder = getattr(self, "image_encoder", None)
        return tuple(encoder.stride) if encoder is not None else (1, 1, 1)

    def _check_inputs(self, image: Optional[torch.Tensor], clinical: Optional[torch.Tensor]) -> None:
        batch = None
        if self.uses_image:
            d, h, w = self.minimum_window
            expected = f"[B, 1, D, H, W] with D >= {d}, H >= {h}, W >= {w} (float)"
            if not isinstance(image, torch.Tensor):
                raise ValueError(f"{self.name}: image must be a tensor of shape {expected}, got {type(image).__name__}")
            shape = tuple(image.shape)
            if image.dim() != 5 or shape[1] != 1:
                raise ValueError(f"{self.name}: image must have shape {expected}, got {list(shape)}")
            if shape[2] < d or shape[3] < h or shape[4] < w:
                raise ValueError(
                    f"{self.name}: image window {list(shape[2:])} is smaller than the network's total stride; "
                    f"expected shape {expected}"
                )
            if not image.is_floating_point():
                raise ValueError(f"{self.name}: image must be a float tensor of shape {expected}, got {image.dtype}")
            batch = shape[0]
        if self.uses_clinical:
            expected = f"[B, {self.num_clinical}] (float)"
            if not isinstance(clinical, torch.Tensor):
                raise ValueError(
                    f"{self.name}: clinical must be a tensor of shape {expected}, got {type(clinical).__name__}"
                )
            shape = tuple(clinical.shape)
            if clinical.dim() != 2 or shape[1] != self.num_clinical:
                raise ValueError(f"{self.name}: clinical must have shape {expected}, got {list(shape)}")
            if not clinical.is_floating_point():
                raise ValueError(f"{self.name}: clinical must be a float tensor of shape {expected}, got {clinical.dtype}")
            if batch is not None and shape[0] != batch:
                raise ValueError(
                    f"{self.name}: image batch {batch} and clinical batch {shape[0]} differ; "
                    f"expected clinical shape [{batch}, {self.num_clinical}]"
                )

    def forward(self, image: Optional[torch.Tensor] = None, clinical: Optional[torch.Tensor] = None) -> ModelOutput:
        self._check_inputs(image, clinical)
        return self._forward(image, clinical)

    def _forward(self, image: Optional[torch.Tensor], clinical: Optional[torch.Tensor]) -> ModelOutput:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_classes={self.num_classes}, num_clinical={self.num_clinical}"


class MMCAFNet(MultimodalClassifier):
    """MMCAF-Net: image encoder + KAN clinical encoder + multi-scale cross-attention fusion."""

    def __init__(self, name: str, config: MMCAFNetConfig) -> None:
        super().__init__(name, config)
        self.image_encoder = build_image_encoder(config)
        self.tabular_encoder = build_kan(config, config.num_clinical, config.embed_dim)
        self.fusion = MultiScaleCrossAttentionFusion(config.embed_dim, tuple(config.fusion_heads), config.fusion_dropout)
        self.classifier = nn.Linear(self.fusion.out_dim, config.num_classes)

    def _forward(self, image: torch.Tensor, clinical: torch.Tensor) -> ModelOutput:
        embedding, features, attention = self.image_encoder(image)
        fused = self.fusion(embedding, self.tabular_encoder(clinical))
        return ModelOutput(self.classifier(fused), attention, features)


class ImageOnlyNet(MultimodalClassifier):
    """Ablation: the image encoder alone with a linear head."""

    uses_clinical = False

    def __init__(self, name: str, config: ImageEncoderConfig) -> None:
        super().__init__(name, config)
        self.image_encoder = build_image_encoder(config)
        self.classifier = nn.Linear(config.embed_dim, config.num_classes)

    def _forward(self, image: torch.Tensor, clinical: Optional[torch.Tensor]) -> ModelOutput:
        embedding, features, attention = self.image_encoder(image)
        return ModelOutput(self.classifier(embedding), attention, features)


class TabularNet(MultimodalClassifier):
    """Ablation: a clinical encoder (KAN or MLP) alone with a linear head."""

    uses_image = False

    def __init__(self, name: str, config: BaseConfig, encoder: nn.Module) -> None:
        super().__init__(name, config)
        self.tabular_encoder = encoder
        self.classifier = nn.Linear(config.embed_dim, config.num_classes)

    def _forward(self, image: Optional[torch.Tensor], clinical: torch.Tensor) -> ModelOutput:
        return ModelOutput(self.classifier(self.tabular_encoder(clinical)), [], None)


class LateFusionNet(MultimodalClassifier):
    """Ablation: an image head and a clinical (KAN) head whose logits are averaged."""

    def __init__(self, name: str, config: ImageEncoderConfig) -> None:
        super().__init__(name, config)
        self.image_encoder = build_image_encoder(config)
        self.tabular_encoder = build_kan(config, config.num_clinical, config.embed_dim)
        self.image_head = nn.Linear(config.embed_dim, config.num_classes)
        self.tabular_head = nn.Linear(config.embed_dim, config.num_classes)

    def parts(self) -> Dict[str, nn.Module]:
        found = super().parts()
        found["fusion"] = nn.ModuleList([self.image_head, self.tabular_head])
        return found

    def _forward(self, image: torch.Tensor, clinical: torch.Tensor) -> ModelOutput:
        embedding, features, attention = self.image_encoder(image)
        logits = (self.image_head(embedding) + self.tabular_head(self.tabular_encoder(clinical))) / 2
        return ModelOutput(logits, attention, features)


class FusionNet(MultimodalClassifier):
    """Image encoder + KAN + a given fusion module + linear classifier (the fusion ablations)."""

    def __init__(self, name: str, config: ImageEncoderConfig, fusion: nn.Module) -> None:
        super().__init__(name, config)
        self.image_encoder = build_image_encoder(config)
        self.tabular_encoder = build_kan(config, config.num_clinical, config.embed_dim)
        self.fusion = fusion
        self.classifier = nn.Linear(fusion.out_dim, config.num_classes)

    def _forward(self, image: torch.Tensor, clinical: torch.Tensor) -> ModelOutput:
        embedding, features, attention = self.image_encoder(image)
        fused = self.fusion(embedding, self.tabular_encoder(clinical))
        return ModelOutput(self.classifier(fused), attention, features)


def concat_fusion_net(name: str, config: ImageEncoderConfig) -> FusionNet:
    return FusionNet(name, config, ConcatFusion(config.embed_dim))


def single_scale_net(name: str, config: ImageEncoderConfig) -> FusionNet:
    heads = tuple(config.fusion_heads)  # type: ignore[attr-defined]
    if len(heads) != 1:
        raise ValueError(f"{name}: fusion_heads must hold one head count, got {heads}")
    return FusionNet(name, config, SingleScaleCrossAttentionFusion(config.embed_dim, heads[0]))


def tabular_kan_net(name: str, config: BaseConfig) -> TabularNet:
    return TabularNet(name, config, build_kan(config, config.num_clinical, config.embed_dim))  # type: ignore[arg-type]


def tabular_mlp_net(name: str, config: BaseConfig) -> TabularNet:
    return TabularNet(name, config, TabularMLP(config.num_clinical, config.embed_dim, config.mlp_dropout))  # type: ignore[attr-defined]


__all__: List[str] = [
    "FusionNet",
    "ImageOnlyNet",
    "LateFusionNet",
    "MMCAFNet",
    "MultimodalClassifier",
    "TabularNet",
]

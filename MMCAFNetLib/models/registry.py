"""The model registry: names -> (config dataclass, builder, one-line description)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, NamedTuple, Type

from . import configs
from .networks import (
    ImageOnlyNet,
    LateFusionNet,
    MMCAFNet,
    MultimodalClassifier,
    concat_fusion_net,
    single_scale_net,
    tabular_kan_net,
    tabular_mlp_net,
)


class ModelSpec(NamedTuple):
    config_class: Type[configs.BaseConfig]
    build: Callable[[str, Any], MultimodalClassifier]
    description: str


_REGISTRY: Dict[str, ModelSpec] = {
    "mmcafnet": ModelSpec(
        configs.MMCAFNetConfig, MMCAFNet, "MMCAF-Net as the reference (PENet + E3D-MSCA pyramid, KAN, MSCA fusion)"
    ),
    "mmcafnet-lite": ModelSpec(
        configs.MMCAFNetLiteConfig, MMCAFNet, "same topology, narrow and separable: for CPU reading rooms"
    ),
    "image-only": ModelSpec(configs.ImageOnlyConfig, ImageOnlyNet, "ablation: image encoder alone"),
    "tabular-kan": ModelSpec(configs.TabularKANConfig, tabular_kan_net, "ablation: KAN clinical encoder alone"),
    "tabular-mlp": ModelSpec(configs.TabularMLPConfig, tabular_mlp_net, "ablation: MLP clinical encoder alone"),
    "late-fusion": ModelSpec(configs.LateFusionConfig, LateFusionNet, "ablation: image and KAN heads, logits averaged"),
    "concat-fusion": ModelSpec(
        configs.ConcatFusionConfig, concat_fusion_net, "ablation: image and KAN embeddings concatenated"
    ),
    "cross-attention-single-scale": ModelSpec(
        configs.CrossAttentionSingleScaleConfig, single_scale_net, "ablation: one scale of bidirectional cross-attention"
    ),
}


def available_models() -> List[str]:
    """Registered model names, MMCAF-Net first."""
    return list(_REGISTRY)


def _spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(_REGISTRY)}") from None


def describe_model(name: str) -> str:
    return _spec(name).description


def model_config(name: str, num_classes: int = 1, num_clinical: int = 7, **overrides: Any) -> configs.BaseConfig:
    """The variant's config with overrides applied (lists, as stored in checkpoints, become tuples)."""
    spec = _spec(name)
    valid = {f.name for f in dataclasses.fields(spec.config_class)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; valid options: {sorted(valid)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return spec.config_class(num_classes=num_classes, num_clinical=num_clinical, **values)


def create_model(name: str, num_classes: int = 1, num_clinical: int = 7, **overrides: Any) -> MultimodalClassifier:
    """Build a registered variant.

    ``num_classes=1`` gives the binary head (one logit, use a sigmoid); more gives a softmax head.
    ``overrides`` are fields of the variant's config dataclass (see ``model_config``). The model
    keeps ``.name`` and ``.config``; ``model.config.to_dict()`` rebuilds it via
    ``create_model(model.name, **model.config.to_dict())``.
    """
    config = model_config(name, num_classes, num_clinical, **overrides)
    return _spec(name).build(name, config)

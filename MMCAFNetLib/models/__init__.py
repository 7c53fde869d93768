"""MMCAF-Net and its ablation baselines: building blocks, registry, freezing, reference weights.

``create_model(name, num_classes=1, num_clinical=7, **overrides)`` builds a variant;
``model(image [B,1,D,H,W], clinical [B,F])`` returns a :class:`ModelOutput` with ``.logits``,
``.attention`` (SAB maps, finest first) and ``.features`` (last pyramid map, for Grad-CAM).
"""

from __future__ import annotations

from .configs import (
    BaseConfig,
    ConcatFusionConfig,
    CrossAttentionSingleScaleConfig,
    ImageEncoderConfig,
    ImageOnlyConfig,
    LateFusionConfig,
    MMCAFNetConfig,
    MMCAFNetLiteConfig,
    TabularKANConfig,
    TabularMLPConfig,
)
from .freezing import PART_NAMES, freeze, trainable_parameters, unfreeze
from .networks import MultimodalClassifier
from .output import ModelOutput
from .reference import ReferenceConversion, convert_reference_state_dict, from_reference_state_dict
from .registry import available_models, create_model, describe_model, model_config

__all__ = [
    "PART_NAMES",
    "BaseConfig",
    "ConcatFusionConfig",
    "CrossAttentionSingleScaleConfig",
    "ImageEncoderConfig",
    "ImageOnlyConfig",
    "LateFusionConfig",
    "MMCAFNetConfig",
    "MMCAFNetLiteConfig",
    "ModelOutput",
    "MultimodalClassifier",
    "ReferenceConversion",
    "TabularKANConfig",
    "TabularMLPConfig",
    "available_models",
    "convert_reference_state_dict",
    "create_model",
    "describe_model",
    "freeze",
    "from_reference_state_dict",
    "model_config",
    "trainable_parameters",
    "unfreeze",
]

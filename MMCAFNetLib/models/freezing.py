"""Freezing by part name, for the paper's staged training protocol.

Stage 1 trains the backbone image-only; stage 2 trains the pyramid and readout on the frozen
backbone (``freeze(model, "backbone")``); stage 3 trains the clinical encoder, fusion and
classifier with the whole image encoder frozen (``freeze(model, "image_encoder")``).
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Union

from torch import nn

#: Part names a model may have (each model lists its own with ``model.parts()``).
PART_NAMES = ("backbone", "pyramid", "readout", "image_encoder", "tabular_encoder", "fusion", "classifier")

Parts = Union[str, Iterable[str]]


def _resolve(model: nn.Module, parts: Optional[Parts]) -> List[str]:
    if not hasattr(model, "parts"):
        raise ValueError(f"{type(model).__name__} has no named parts; build it with create_model")
    available = model.parts()
    if parts is None:
        return list(available)
    names = [parts] if isinstance(parts, str) else list(parts)
    unknown = [p for p in names if p not in available]
    if unknown:
        raise ValueError(f"{model.name}: unknown part(s) {unknown}; this model has {list(available)}")
    return names


def freeze(model: nn.Module, parts: Parts, freeze_statistics: bool = True) -> nn.Module:
    """Stop gradients into the named parts.

    With ``freeze_statistics`` (default) the parts also stay in eval mode through later
    ``model.train()`` calls, so their BatchNorm running statistics and dropout are fixed too: a
    frozen feature extractor then gives the same features in training as at test time.
    """
    available = model.parts()
    for name in _resolve(model, parts):
        module = available[name]
        for param in module.parameters():
            param.requires_grad_(False)
        if freeze_statistics:
            model._frozen_statistics.add(name)
            module.eval()
    return model


def unfreeze(model: nn.Module, parts: Optional[Parts] = None) -> nn.Module:
    """Make the named parts (all when None) trainable again and let them follow ``model.train()``."""
    available = model.parts()
    for name in _resolve(model, parts):
        for param in available[name].parameters():
            param.requires_grad_(True)
    # a part nested in (or holding) an unfrozen one must follow train() again as well
    released = set(_resolve(model, parts))
    for name in list(model._frozen_statistics):
        frozen = available[name]
        if any(_overlaps(frozen, available[r]) for r in released):
            model._frozen_statistics.discard(name)
    model.train(model.training)
    return model


def _overlaps(a: nn.Module, b: nn.Module) -> bool:
    ids = {id(m) for m in a.modules()}
    return any(id(m) in ids for m in b.modules())


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""Losses: binary focal loss (the paper's), binary cross-entropy, and multi-class cross-entropy or
focal loss, each with optional label smoothing. Logits in, a scalar mean over the batch out."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class BinaryFocalLoss(nn.Module):
    """FL = -alpha_t (1 - p_t)^gamma log p_t on one logit per case (Lin et al. 2017).

    gamma = 0 and alpha = None is plain binary cross-entropy. Label smoothing moves the targets to
    eps/2 and 1 - eps/2 before the loss.
    """

    def __init__(self, gamma: float = 2.0, alpha: Optional[float] = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma = float(gamma)
        self.alpha = alpha
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.reshape(-1).float()
        t = target.reshape(-1).float()
        if self.label_smoothing:
            t = t * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * t + (1 - p) * (1 - t)
        loss = ce * (1 - p_t).clamp(min=0).pow(self.gamma) if self.gamma else ce
        if self.alpha is not None:
            loss = loss * (self.alpha * t + (1 - self.alpha) * (1 - t))
        return loss.mean()


class MultiClassFocalLoss(nn.Module):
    """Softmax focal loss; gamma = 0 is cross-entropy (with optional label smoothing)."""

    def __init__(self, gamma: float = 2.0, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.long().reshape(-1)
        ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
        if not self.gamma:
            return ce.mean()
        p_t = torch.softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        return ((1 - p_t).clamp(min=0).pow(self.gamma) * ce).mean()


def build_loss(kind: str, num_outputs: int, gamma: float = 2.0, alpha: Optional[float] = None,
               label_smoothing: float = 0.0) -> nn.Module:
    """``focal`` / ``bce`` for one logit, ``focal`` / ``ce`` for several."""
    if num_outputs == 1:
        if kind == "focal":
            return BinaryFocalLoss(gamma, alpha, label_smoothing)
        if kind in ("bce", "ce"):
            return BinaryFocalLoss(0.0, alpha, label_smoothing)
    else:
        if kind == "focal":
            return MultiClassFocalLoss(gamma, label_smoothing)
        if kind in ("ce", "bce"):
            return MultiClassFocalLoss(0.0, label_smoothing)
    raise ValueError(f"unknown loss {kind!r}; choose focal, bce or ce")

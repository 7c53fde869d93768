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


def attention_background_loss(attention: list[torch.Tensor]) -> torch.Tensor:
    """Lesion-free windows: binary cross-entropy of every map cell against 0 (mean over levels)."""
    losses = [-(1.0 - level.float().clamp(1e-6, 1 - 1e-6)).log().mean() for level in attention]
    return torch.stack(losses).mean()


def attention_box_loss(attention: list[torch.Tensor], box_mask: torch.Tensor, target: str = "share") -> torch.Tensor:
    """Weak box supervision of the spatial-attention maps: class-balanced binary cross-entropy
    between each level's map ``[B, 1, d, h, w]`` (values in 0..1) and the share of each map cell
    that lies inside the lesion box (``box_mask`` ``[B, 1, D, H, W]`` on the window's voxels,
    average-pooled to the level's grid).

    Inside and outside count equally (each is a weighted mean over its cells), so a lesion of a
    few voxels in a large window is not drowned by the background; windows whose mask is empty
    add nothing. The mean over levels and windows is returned (0 when no window has a box).
    """
    if not attention:
        raise ValueError("attention supervision needs a model with spatial-attention maps (model.attention is empty)")
    mask = box_mask.float()
    losses = []
    for level in attention:
        m = level.float().clamp(1e-6, 1 - 1e-6)
        if m.dim() == 4:
            m = m.unsqueeze(1)
        pool = F.adaptive_avg_pool3d if target == "share" else F.adaptive_max_pool3d
        cells = pool(mask, tuple(m.shape[-3:])).clamp(0.0, 1.0)
        inside = cells.sum(dim=(1, 2, 3, 4))
        outside = (1.0 - cells).sum(dim=(1, 2, 3, 4))
        pos = -(cells * m.log()).sum(dim=(1, 2, 3, 4)) / inside.clamp(min=1e-6)
        neg = -((1.0 - cells) * (1.0 - m).log()).sum(dim=(1, 2, 3, 4)) / outside.clamp(min=1e-6)
        per_window = 0.5 * (pos + neg)
        losses.append(torch.where(inside > 1e-6, per_window, torch.zeros_like(per_window)))
    stacked = torch.stack(losses)  # [levels, B]
    has_box = (mask.flatten(1).amax(dim=1) > 0).float()
    return (stacked * has_box).sum() / (has_box.sum() * len(attention)).clamp(min=1.0)


def attention_peak_loss(attention: list[torch.Tensor], box_mask: torch.Tensor,
                        background: Optional[list[torch.Tensor]] = None, levels: str = "all",
                        scan_levels: Optional[str] = None) -> torch.Tensor:
    """The heatmap a reader sees is judged by its peak, so train the peak: on the mean of the
    levels' maps (``heatmap.combine_attention_levels``), binary cross-entropy of
    the highest cell touching the lesion box against 1, of the highest cell outside it against 0
    and, for lesion-free windows (``background``, maps of the same levels), of their highest cell
    against 0.

    The cell-mean losses above let a few hot cells outside the lesion cost next to nothing, yet a
    whole-volume scan's peak is exactly such a cell in some other window. Windows without a box
    add no lesion terms. Returns the mean of the terms present.

    ``levels`` names the pyramid levels of the map (``heatmap.ATTENTION_LEVELS``). With
    ``scan_levels`` (the levels a whole-volume scan shows) different from them, the lesion terms
    are also taken on that map, and the lesion-free windows' term only on it: a scan is the only
    place where lesion-free windows are shown.
    """
    from MMCAFNetLib.heatmap import combine_attention_levels

    maps = [levels] if scan_levels in (None, levels) else [levels, scan_levels]
    terms = []
    for use in maps:
        combined = combine_attention_levels(attention, use).clamp(1e-6, 1 - 1e-6)  # [B, d, h, w]
        share = F.adaptive_avg_pool3d(box_mask.float(), tuple(combined.shape[-3:]))[:, 0]
        touches = share > 0
        has_box = touches.flatten(1).any(dim=1)
        flat, inside = combined.flatten(1), touches.flatten(1)
        peak_in = torch.where(inside, flat, torch.zeros_like(flat)).amax(dim=1)
        peak_out = torch.where(inside, torch.zeros_like(flat), flat).amax(dim=1)
        terms.append(-peak_in[has_box].log() - (1.0 - peak_out[has_box]).log())  # no log(0) of box-less windows
    if background:
        shown = levels if scan_levels is None else scan_levels
        peak_bg = combine_attention_levels(background, shown).clamp(1e-6, 1 - 1e-6).flatten(1).amax(dim=1)
        terms.append(-(1.0 - peak_bg).log())
    values = torch.cat(terms)
    return values.mean() if values.numel() else combined.sum() * 0.0

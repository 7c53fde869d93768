"""Fusion of the image and clinical embeddings: the paper's bidirectional multi-scale
cross-attention (MSCA) with BSF merges, and the ablation baselines (single-scale cross-attention,
concatenation)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of ``query`` tokens over ``context`` tokens, residual to the query,
    no output projection and no norm (as the reference).

    With one token per modality (the reference's setting) the softmax has a single key and is
    identically 1, so the output is ``v_proj(context) + query``; the query/key projections are
    kept so that a many-token input attends for real and so that reference weights load.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, n, dim = query.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, t.shape[1], self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(query)), split(self.k_proj(context)), split(self.v_proj(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(batch, n, dim) + query


class BSF(nn.Module):
    """Bidirectional selective fusion of ``x`` (dim) and ``y`` (other_dim):
    x' = fc_x(x), y' = fc_y(y), a = softmax(x' * y') over features,
    out = (x' + x' a) merged with (y' + y' a), by sum (dim) or concatenation (2 dim)."""

    def __init__(self, dim: int, other_dim: int, merge: str = "sum") -> None:
        super().__init__()
        if merge not in ("sum", "concat"):
            raise ValueError(f"BSF merge must be 'sum' or 'concat', got {merge!r}")
        self.merge = merge
        self.fc_x = nn.Linear(dim, dim)
        self.fc_y = nn.Linear(other_dim, dim)
        self.out_dim = dim if merge == "sum" else 2 * dim

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = self.fc_x(x), self.fc_y(y)
        gain = 1.0 + torch.softmax(x * y, dim=-1)
        x, y = x * gain, y * gain
        return x + y if self.merge == "sum" else torch.cat([x, y], dim=-1)


class MultiScaleCrossAttentionFusion(nn.Module):
    """The paper's MSCA fusion over scales of width E, E/2, E/4 (24, 12, 6).

    Both embeddings are batch-normalised and become one token each. At scale s the same
    attention runs both ways (image attends to clinical, clinical to image) and the two outputs
    are averaged into out_s. The input of scale s+1 is, per modality, a shared
    Linear+ReLU+dropout projection of the normalised embedding plus a modality-specific linear
    carry of that modality's scale-s output. Finally out_{s} and the merged coarser result are
    fused by BSF from the coarsest up: sums inside, concatenation at the top (2E = 48 features,
    the consistent reading of the paper's figure).
    """

    def __init__(self, embed_dim: int = 24, heads: Sequence[int] = (4, 2, 2), dropout: float = 0.5) -> None:
        super().__init__()
        widths = [embed_dim // 2**i for i in range(len(heads))]
        if any(w * 2**i != embed_dim for i, w in enumerate(widths)):
            raise ValueError(f"embed_dim {embed_dim} must be divisible by {2 ** (len(heads) - 1)}")
        self.norm_image = nn.BatchNorm1d(embed_dim)
        self.norm_tabular = nn.BatchNorm1d(embed_dim)
        self.down = nn.ModuleList(nn.Linear(embed_dim, w) for w in widths[1:])
        self.dropout = nn.Dropout(dropout)
        self.attention = nn.ModuleList(CrossAttention(w, h) for w, h in zip(widths, heads))
        self.carry_image = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.carry_tabular = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        # merge[i] fuses scale i with the merged result of the coarser scales
        self.merge = nn.ModuleList(
            BSF(w, widths[i + 1], "concat" if i == 0 else "sum") for i, w in enumerate(widths[:-1])
        )
        self.out_dim = self.merge[0].out_dim

    def forward(self, image: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        image = self.norm_image(image).unsqueeze(1)
        tabular = self.norm_tabular(tabular).unsqueeze(1)
        batch = image.shape[0]
        q_image, q_tabular = image, tabular
        outputs = []
        for s, attention in enumerate(self.attention):
            # both directions in one call: image queries clinical, clinical queries image
            both = attention(torch.cat([q_image, q_tabular]), torch.cat([q_tabular, q_image]))
            a_image, a_tabular = both[:batch], both[batch:]
            outputs.append(((a_image + a_tabular) / 2).squeeze(1))
            if s + 1 < len(self.attention):  # the next scale's queries
                down = self.down[s]
                q_image = self.dropout(F.relu(down(image))) + self.carry_image[s](a_image)
                q_tabular = self.dropout(F.relu(down(tabular))) + self.carry_tabular[s](a_tabular)
        merged = outputs[-1]
        for s in reversed(range(len(self.merge))):
            merged = self.merge[s](outputs[s], merged)
        return merged


class SingleScaleCrossAttentionFusion(nn.Module):
    """Ablation: one scale of the bidirectional cross-attention, outputs averaged (E features)."""

    def __init__(self, embed_dim: int = 24, heads: int = 4) -> None:
        super().__init__()
        self.norm_image = nn.BatchNorm1d(embed_dim)
        self.norm_tabular = nn.BatchNorm1d(embed_dim)
        self.attention = CrossAttention(embed_dim, heads)
        self.out_dim = embed_dim

    def forward(self, image: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        image = self.norm_image(image).unsqueeze(1)
        tabular = self.norm_tabular(tabular).unsqueeze(1)
        both = self.attention(torch.cat([image, tabular]), torch.cat([tabular, image]))
        batch = image.shape[0]
        return ((both[:batch] + both[batch:]) / 2).squeeze(1)


class ConcatFusion(nn.Module):
    """Ablation: batch-normalised embeddings concatenated (2E features)."""

    def __init__(self, embed_dim: int = 24) -> None:
        super().__init__()
        self.norm_image = nn.BatchNorm1d(embed_dim)
        self.norm_tabular = nn.BatchNorm1d(embed_dim)
        self.out_dim = 2 * embed_dim

    def forward(self, image: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.norm_image(image), self.norm_tabular(tabular)], dim=-1)

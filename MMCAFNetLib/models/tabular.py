"""The ablation's tabular encoder: a two-layer MLP over the clinical vector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TabularMLP(nn.Module):
    """The ablation's tabular encoder: Linear -> ReLU -> dropout -> Linear."""

    def __init__(self, in_features: int, out_features: int = 24, dropout: float = 0.2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, out_features)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))

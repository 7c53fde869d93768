"""A Kolmogorov-Arnold network layer with cubic B-spline edge functions (no pykan dependency).

Each edge i -> j carries phi_ij(x) = scale_base_ij * SiLU(x) + scale_spline_ij * sum_n coef_ijn B_n(x),
where B_n are the B-splines of the given order on a uniform grid of ``intervals`` intervals over
``grid_range``, extended by ``order`` knots on each side (so ``intervals + order`` splines); the
output is y_j = sum_i mask_ij * phi_ij(x_i). Parameter names and shapes follow pykan's KANLayer,
so the reference checkpoint's ``kan.*`` entries load directly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def uniform_knots(intervals: int = 5, order: int = 3, grid_range: Sequence[float] = (-1.0, 1.0)) -> torch.Tensor:
    """The extended uniform knot vector: ``intervals + 2 * order + 1`` knots."""
    low, high = float(grid_range[0]), float(grid_range[1])
    step = (high - low) / intervals
    # The same float32 arithmetic as ``low + step * torch.arange(...)``, in numpy: torch's factory
    # functions run PyTorch's Python reference implementations on the ``meta`` device (the checkpoint
    # check builds the network there), whose first use imports torch._dynamo (~1.4 s per process).
    offsets = np.arange(-order, intervals + order + 1, dtype=np.float32)
    return torch.tensor(np.float32(low) + np.float32(step) * offsets, dtype=torch.float32)


def b_spline_basis(x: torch.Tensor, knots: torch.Tensor, order: int) -> torch.Tensor:
    """All B-splines of ``order`` on per-feature knots, at ``x``, by the Cox-de Boor recursion.

    ``x`` is ``[B, F]``, ``knots`` ``[F, K]``; returns ``[B, F, K - 1 - order]``. Outside the knot
    span every basis function is 0.
    """
    x = x.unsqueeze(-1)
    t = knots.unsqueeze(0)
    bases = ((x >= t[..., :-1]) & (x < t[..., 1:])).to(x.dtype)
    for p in range(1, order + 1):
        left = (x - t[..., : -(p + 1)]) / (t[..., p:-1] - t[..., : -(p + 1)])
        right = (t[..., p + 1 :] - x) / (t[..., p + 1 :] - t[..., 1:-p])
        bases = left * bases[..., :-1] + right * bases[..., 1:]
    return bases


class KANLayer(nn.Module):
    """One KAN layer ``in_features -> out_features`` (the paper's tabular encoder: 7 -> 24)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        intervals: int = 5,
        order: int = 3,
        grid_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        if intervals < 1 or order < 0:
            raise ValueError(f"KAN needs intervals >= 1 and order >= 0, got {intervals} and {order}")
        self.in_features, self.out_features, self.order = in_features, out_features, order
        knots = uniform_knots(intervals, order, grid_range)
        self.register_buffer("grid", knots.expand(in_features, -1).clone())
        self.register_buffer("mask", torch.empty(in_features, out_features).fill_(1.0))
        num_bases = intervals + order
        # pykan-like start: small random splines, random base scales, unit spline scales / sqrt(fan-in).
        # In-place arithmetic only: out-of-place ops with Python scalars take the slow reference path on
        # the ``meta`` device (see uniform_knots).
        self.coef = nn.Parameter(torch.empty(in_features, out_features, num_bases).uniform_().sub_(0.5).mul_(0.5 / intervals))
        self.scale_base = nn.Parameter(torch.empty(in_features, out_features).uniform_().mul_(2).sub_(1).div_(in_features**0.5))
        self.scale_spline = nn.Parameter(torch.empty(in_features, out_features).fill_(1.0).div_(in_features**0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bases = b_spline_basis(x, self.grid, self.order)  # [B, in, n]
        base_weight = self.scale_base * self.mask
        spline_weight = self.coef * (self.scale_spline * self.mask).unsqueeze(-1)
        return F.silu(x) @ base_weight + torch.einsum("bin,ion->bo", bases, spline_weight)


"""The KAN layer against a direct evaluation of its formula (Cox-de Boor written here, scalar)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from MMCAFNetLib.models import create_model
from MMCAFNetLib.models.kan import KANLayer


def bspline(i: int, p: int, x: float, knots: list[float]) -> float:
    """N_{i,p}(x) by the textbook recursion, half-open support [t_i, t_{i+p+1})."""
    if p == 0:
        return 1.0 if knots[i] <= x < knots[i + 1] else 0.0
    left = (x - knots[i]) / (knots[i + p] - knots[i]) * bspline(i, p - 1, x, knots)
    right = (knots[i + p + 1] - x) / (knots[i + p + 1] - knots[i + 1]) * bspline(i + 1, p - 1, x, knots)
    return left + right


def silu(x: float) -> float:
    return x / (1.0 + math.exp(-x))


def direct_kan(x: np.ndarray, layer: KANLayer, intervals: int, order: int, low: float, high: float) -> np.ndarray:
    """y_j = sum_i mask_ij (scale_base_ij silu(x_i) + scale_spline_ij sum_n coef_ijn N_n(x_i))."""
    step = (high - low) / intervals
    knots = [low + step * k for k in range(-order, intervals + order + 1)]
    coef = layer.coef.detach().double().numpy()
    base = layer.scale_base.detach().double().numpy()
    spline = layer.scale_spline.detach().double().numpy()
    mask = layer.mask.double().numpy()
    n_in, n_out, n_basis = coef.shape
    assert n_basis == intervals + order
    out = np.zeros((x.shape[0], n_out))
    for b in range(x.shape[0]):
        for i in range(n_in):
            xi = float(x[b, i])
            bases = np.array([bspline(n, order, xi, knots) for n in range(n_basis)])
            for j in range(n_out):
                phi = base[i, j] * silu(xi) + spline[i, j] * float(bases @ coef[i, j])
                out[b, j] += mask[i, j] * phi
    return out


@pytest.mark.parametrize(("intervals", "order", "low", "high"), [(5, 3, -1.0, 1.0), (4, 2, -2.0, 3.0)])
def test_kan_equals_direct_b_spline_formula(intervals, order, low, high):
    torch.manual_seed(0)
    layer = KANLayer(7, 24, intervals, order, (low, high))
    with torch.no_grad():  # random, non-trivial parameters everywhere (and a pruned edge)
        layer.coef.normal_()
        layer.scale_base.normal_()
        layer.scale_spline.normal_()
        layer.mask[2, 5] = 0.0
    span = high - low
    # inside the grid, in the extended knots, and beyond them (only the SiLU part is left there)
    x = torch.empty(16, 7).uniform_(low - 0.8 * span, high + 0.8 * span)
    x[0, 0] = low  # exactly on knots
    x[1, 1] = high
    expected = direct_kan(x.double().numpy(), layer, intervals, order, low, high)
    with torch.no_grad():
        got = layer(x).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_splines_form_a_partition_of_unity_inside_the_grid():
    from MMCAFNetLib.models.kan import b_spline_basis

    layer = KANLayer(3, 2)
    x = torch.linspace(-1, 0.999, 50).repeat(3, 1).T
    total = b_spline_basis(x, layer.grid, 3).sum(dim=-1)
    torch.testing.assert_close(total, torch.ones_like(total))


def test_mmcafnet_kan_has_the_reference_shapes():
    """7 inputs, 24 outputs, 5 intervals + 2 x 3 extension knots = 12, 5 + 3 = 8 splines."""
    with torch.device("meta"):
        kan = create_model("tabular-kan").tabular_encoder
    assert tuple(kan.grid.shape) == (7, 12)
    assert tuple(kan.coef.shape) == (7, 24, 8)
    assert tuple(kan.mask.shape) == tuple(kan.scale_base.shape) == tuple(kan.scale_spline.shape) == (7, 24)
    trainable = sum(p.numel() for p in kan.parameters() if p.requires_grad)
    assert trainable == 7 * 24 * 8 + 2 * 7 * 24  # grid and mask are fixed buffers


def test_kan_gradients_reach_coefficients_and_scales():
    torch.manual_seed(1)
    layer = KANLayer(7, 24)
    layer(torch.empty(5, 7).uniform_(-1, 1)).square().sum().backward()
    for name in ("coef", "scale_base", "scale_spline"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name

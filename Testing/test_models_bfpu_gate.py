"""The BFPU's optional bounded gate: the reference's linear gate lets the output scale like the
square of its input; the sigmoid gate keeps it within the sum of the four mixed maps."""

from __future__ import annotations

import pytest
import torch

from MMCAFNetLib.models import create_model
from MMCAFNetLib.models.pyramid import BFPU, resize


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_sigmoid_gate_bounds_the_mix_and_linear_gate_does_not(scale):
    torch.manual_seed(0)
    x, y = torch.randn(2, 8, 3, 4, 4) * scale, torch.randn(2, 4, 6, 8, 8) * scale
    linear, bounded = BFPU(8, "dense", "linear").eval(), BFPU(8, "dense", "sigmoid").eval()
    bounded.load_state_dict(linear.state_dict())  # same weights, only the gate differs
    with torch.no_grad():
        y_adj = linear.adjust(resize(y, x.shape[2:]))
        limit = 2 * (x.abs() + y_adj.abs())  # |x| + |x*att| + |y| + |y*att| with att in (0, 1)
        out_bounded, out_linear = bounded(x, y), linear(x, y)
    assert torch.all(out_bounded.abs() <= limit + 1e-4)
    if scale > 1:
        assert out_linear.abs().max() > 10 * limit.max(), "the linear gate grows with the input squared"


def test_gate_is_a_config_option_and_defaults_to_the_reference():
    assert create_model("mmcafnet-lite").config.bfpu_gate == "linear"
    model = create_model("mmcafnet-lite", bfpu_gate="sigmoid")
    assert all(b.bounded for b in model.image_encoder.pyramid.bfpu)
    with pytest.raises(ValueError, match="bfpu_gate"):
        create_model("mmcafnet-lite", bfpu_gate="tanh")

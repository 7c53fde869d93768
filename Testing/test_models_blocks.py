"""Blocks against direct, unoptimised evaluations of the reference's description."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from MMCAFNetLib.models.attention import CAB, DCFB, SAB
from MMCAFNetLib.models.fusion import MultiScaleCrossAttentionFusion
from MMCAFNetLib.models.pyramid import BFPU


def randomise_norms(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()


def test_cab_and_sab_equal_their_definitions():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 3, 5, 4)
    cab, sab = CAB(32), SAB()
    mlp = lambda v: cab.fc2(torch.relu(cab.fc1(v)))  # noqa: E731
    avg = F.adaptive_avg_pool3d(x, 1)
    mx = F.adaptive_max_pool3d(x, 1)
    expected = x * torch.sigmoid(mlp(avg) + mlp(mx))
    torch.testing.assert_close(cab(x), expected)

    attended, attention = sab(x)
    descriptor = torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True).values], 1)
    expected_map = torch.sigmoid(F.conv3d(descriptor, sab.conv.weight, padding=3))
    torch.testing.assert_close(attention, expected_map)
    torch.testing.assert_close(attended, x * expected_map)


def test_dcfb_equals_its_definition_with_explicit_shuffle():
    torch.manual_seed(0)
    channels = 8
    block = DCFB(channels).eval()
    randomise_norms(block)
    x = torch.randn(2, channels, 4, 6, 5)
    with torch.no_grad():
        hidden = F.relu6(block.expand(x))
        total = sum(F.relu6(branch(hidden)) for branch in block.branches)
        # shuffle with C groups over 2C channels: output channel j*C + i takes input channel 2i + j
        order = [2 * i + j for j in range(2) for i in range(channels)]
        expected = x + block.project(total[:, order])
        torch.testing.assert_close(block(x), expected)


def test_bfpu_equals_its_definition():
    torch.manual_seed(0)
    bfpu = BFPU(16)
    x, y = torch.randn(2, 16, 2, 6, 6), torch.randn(2, 8, 3, 12, 12)
    y2 = bfpu.adjust(F.interpolate(y, size=(2, 6, 6), mode="trilinear", align_corners=True))
    att = torch.sigmoid(bfpu.query(x) * bfpu.key(y2))
    gx = bfpu.gate_deep(torch.cat([x, x * att], 1))
    gy = bfpu.gate_shallow(torch.cat([y2, y2 * att], 1))
    expected = x * gx[:, :1] + x * att * gx[:, 1:] + y2 * gy[:, :1] + y2 * att * gy[:, 1:]
    torch.testing.assert_close(bfpu(x, y), expected)


def test_msca_fusion_equals_its_definition():
    """Per direction and per scale, with the attention written out (heads, softmax, residual)."""
    torch.manual_seed(0)
    fusion = MultiScaleCrossAttentionFusion(24, (4, 2, 2)).eval()
    randomise_norms(fusion)
    img, tab = torch.randn(3, 24), torch.randn(3, 24)

    def attend(module, heads, query, context):
        q, k, v = module.q_proj(query), module.k_proj(context), module.v_proj(context)
        b, n, d = q.shape
        split = lambda t: t.view(b, -1, heads, d // heads).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        weights = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)
        return (weights @ v).permute(0, 2, 1, 3).reshape(b, n, d) + query

    def bsf(module, x, y, concat):
        x, y = module.fc_x(x), module.fc_y(y)
        a = torch.softmax(x * y, dim=-1)
        x, y = x + x * a, y + y * a
        return torch.cat([x, y], -1) if concat else x + y

    with torch.no_grad():
        i0 = fusion.norm_image(img).unsqueeze(1)
        t0 = fusion.norm_tabular(tab).unsqueeze(1)
        heads = (4, 2, 2)
        oi1, ot1 = attend(fusion.attention[0], 4, i0, t0), attend(fusion.attention[0], 4, t0, i0)
        i1 = torch.relu(fusion.down[0](i0)) + fusion.carry_image[0](oi1)
        t1 = torch.relu(fusion.down[0](t0)) + fusion.carry_tabular[0](ot1)
        oi2, ot2 = attend(fusion.attention[1], heads[1], i1, t1), attend(fusion.attention[1], heads[1], t1, i1)
        i2 = torch.relu(fusion.down[1](i0)) + fusion.carry_image[1](oi2)
        t2 = torch.relu(fusion.down[1](t0)) + fusion.carry_tabular[1](ot2)
        oi3, ot3 = attend(fusion.attention[2], heads[2], i2, t2), attend(fusion.attention[2], heads[2], t2, i2)
        out1, out2, out3 = ((a + b).squeeze(1) / 2 for a, b in ((oi1, ot1), (oi2, ot2), (oi3, ot3)))
        f1 = bsf(fusion.merge[1], out2, out3, concat=False)
        expected = bsf(fusion.merge[0], out1, f1, concat=True)
        got = fusion(img, tab)
    assert got.shape == (3, 48)
    torch.testing.assert_close(got, expected)

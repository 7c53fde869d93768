"""Converting a state dict saved by the authors' reference code onto ``mmcafnet``.

Uses the reference's own list of names and shapes (official_state_dict.tsv in the shared folder:
$MMCAFNET_SHARED, or ``shared/`` beside the repository); skipped when it is absent.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
import torch

from MMCAFNetLib.models import convert_reference_state_dict, create_model, from_reference_state_dict
from MMCAFNetLib.models.reference import read_reference_shapes


def _shared() -> Path:
    env = os.environ.get("MMCAFNET_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


TSV = _shared() / "reference" / "official_state_dict.tsv"
pytestmark = pytest.mark.skipif(not TSV.is_file(), reason=f"reference name list not found: {TSV}")

UNUSED = re.compile(r"asp_pool|decoders|encoder\.out_conv|fused_cls|^img_cls|^tab_cls")


@pytest.fixture(scope="module")
def shapes():
    return read_reference_shapes(TSV)


def random_reference_state_dict(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7, dtype=torch.long)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=generator) + 0.5
        elif name.endswith(".grid"):  # the KAN knots must stay increasing
            state[name] = torch.linspace(-2.2, 2.2, shape[-1]).expand(shape).clone()
        else:
            state[name] = torch.randn(shape, generator=generator) * 0.05
    return state


def test_reference_table_minus_unused_parts_is_our_model(shapes):
    """Sizes agree: the reference's parameters minus its unused parts = mmcafnet's state dict."""
    with torch.device("meta"):
        model = create_model("mmcafnet")
    ours = model.state_dict()
    used = {k: v for k, v in shapes.items() if not UNUSED.search(k)}
    assert len(used) == len(ours)
    numel = sum(int(torch.Size(s).numel()) for s in used.values())
    assert numel == sum(v.numel() for v in ours.values())


def test_random_reference_state_dict_converts_and_loads_strictly(shapes, caplog):
    reference = random_reference_state_dict(shapes)
    with caplog.at_level(logging.INFO, logger="MMCAFNetLib.models.reference"):
        converted = from_reference_state_dict({"model_state": {"module." + k: v for k, v in reference.items()}})
    assert "dropped" in caplog.text and "ASPP" in caplog.text

    torch.manual_seed(0)
    model = create_model("mmcafnet")
    model.load_state_dict(converted, strict=True)
    state = model.state_dict()
    # the values travel unchanged to the right places
    pairs = {
        "image_encoder.encoder.in_conv.0.weight": "image_encoder.backbone.stem.conv.weight",
        "image_encoder.encoder.encoders.2.penet_blocks.5.se_block.excite.2.bias": (
            "image_encoder.backbone.stages.2.blocks.5.se.fc2.bias"
        ),
        "image_encoder.scale3.0.running_var": "image_encoder.pyramid.levels.2.norm.running_var",
        "image_encoder.dcfb1.msdc.dwconvs.2.0.weight": "image_encoder.pyramid.msca.0.dcfb.branches.2.conv.weight",
        "image_encoder.ucb2.pwc.0.weight": "image_encoder.pyramid.ucb.1.pwconv.weight",
        "image_encoder.bfpu2.gamma1.weight": "image_encoder.pyramid.bfpu.1.gate_deep.weight",
        "kan.scale_sp": "tabular_encoder.scale_spline",
        "multiscale_fusion.SF1.fc1y.weight": "fusion.merge.1.fc_y.weight",
        "multiscale_fusion.sample_tab2.bias": "fusion.carry_tabular.1.bias",
        "fin_cls.weight": "classifier.weight",
    }
    for ref_name, our_name in pairs.items():
        assert torch.equal(state[our_name], reference[ref_name]), our_name

    model.eval()
    with torch.inference_mode():
        output = model(torch.randn(2, 1, 8, 32, 32), torch.randn(2, 7))
    assert output.logits.shape == (2, 1) and torch.isfinite(output.logits).all()


def test_conversion_reports_every_dropped_entry(shapes):
    reference = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    conversion = convert_reference_state_dict(reference)
    assert set(conversion.dropped) == {k for k in shapes if UNUSED.search(k)}
    assert any("ASPP" in why for why in conversion.dropped.values())
    assert any("decoder" in why for why in conversion.dropped.values())
    assert not set(conversion.dropped) & set(conversion.state_dict)
    assert "dropped" in conversion.summary()


def test_shape_mismatch_names_the_entry(shapes):
    reference = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    reference["fin_cls.weight"] = torch.empty(4, 48, device="meta")  # a multi-class head
    with pytest.raises(ValueError, match=r"fin_cls\.weight has shape \[4, 48\].*classifier\.weight needs \[1, 48\]"):
        convert_reference_state_dict(reference)


def test_missing_entry_is_an_error(shapes):
    reference = {k: torch.empty(s, device="meta") for k, s in shapes.items() if "bfpu1.key_conv" not in k}
    with pytest.raises(ValueError, match=r"lacks 2 entries.*bfpu\.0\.key"):
        convert_reference_state_dict(reference)


def test_unknown_entries_are_dropped_with_a_warning(shapes):
    reference = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    reference["projection_head.weight"] = torch.empty(3, 3, device="meta")
    with pytest.warns(UserWarning, match="projection_head"):
        conversion = convert_reference_state_dict(reference)
    assert "projection_head.weight" in conversion.dropped


def test_not_a_state_dict_is_rejected():
    with pytest.raises(ValueError, match="state dict"):
        convert_reference_state_dict([1, 2, 3])

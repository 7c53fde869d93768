"""The optimised inference paths give the plain paths' results.

fp32 paths (folded BatchNorm, channels_last_3d): logits and attention maps within 1e-4 relative;
bf16 autocast: probabilities within 0.01. Models carry random weights and random BatchNorm
statistics, so folding has real work to do.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from MMCAFNetLib import optimize as opt
from MMCAFNetLib.models import create_model
from MMCAFNetLib.models.layers import ConvNorm3d
from MMCAFNetLib.models.pyramid import UCB

WINDOW = (8, 32, 32)


def random_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name)
    gen = torch.Generator().manual_seed(seed + 100)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.2)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
            with torch.no_grad():
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return model.eval()


def inputs(batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, *WINDOW, generator=gen) - 0.3, torch.randn(batch, 7, generator=gen)


def max_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def lite_pair():
    plain = random_model("mmcafnet-lite")
    optimised = opt.optimize_for_inference(copy.deepcopy(plain), "cpu", precision="fp32")
    return plain, optimised


def test_folding_removes_the_batchnorms_after_convolutions(lite_pair):
    plain, optimised = lite_pair
    before = sum(isinstance(m, nn.BatchNorm3d) for m in plain.modules())
    after = sum(isinstance(m, nn.BatchNorm3d) for m in optimised.modules())
    blocks = [m for m in optimised.modules() if isinstance(m, (ConvNorm3d, UCB))]
    batch_blocks = [m for m in plain.modules() if isinstance(m, (ConvNorm3d, UCB)) and isinstance(m.norm, nn.BatchNorm3d)]
    assert batch_blocks, "the model should have conv + BatchNorm blocks to fold"
    assert after == before - len(batch_blocks)
    assert all(not isinstance(m.norm, nn.BatchNorm3d) for m in blocks)
    assert not any(p.requires_grad for p in optimised.parameters())
    assert not optimised.training


@pytest.mark.parametrize("name", ["mmcafnet-lite", "mmcafnet"])
def test_folded_fp32_matches_plain(name):
    plain = random_model(name)
    optimised = opt.optimize_for_inference(copy.deepcopy(plain), "cpu", channels_last=False, precision="fp32")
    image, clinical = inputs()
    with torch.no_grad():
        expected = plain(image, clinical)
    with torch.inference_mode():
        got = optimised(opt.prepare_image(optimised, image), clinical)
    assert max_relative(got.logits, expected.logits) < 1e-4
    assert len(got.attention) == len(expected.attention) == 3
    for a, b in zip(got.attention, expected.attention):
        assert max_relative(a, b) < 1e-4
    assert max_relative(got.features, expected.features) < 1e-4


def test_channels_last_fp32_matches_plain(lite_pair):
    plain, _ = lite_pair
    optimised = opt.optimize_for_inference(copy.deepcopy(plain), "cpu", channels_last=True, precision="fp32")
    image, clinical = inputs()
    prepared = opt.prepare_image(optimised, image)
    assert prepared.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        expected = plain(image, clinical)
    with torch.inference_mode():
        got = optimised(prepared, clinical)
    assert max_relative(got.logits, expected.logits) < 1e-4
    for a, b in zip(got.attention, expected.attention):
        assert max_relative(a, b) < 1e-4


def _check_bf16(expected, got) -> None:
    p_expected = torch.sigmoid(expected.logits.float())
    p_got = torch.sigmoid(got.logits.float())
    # the check means something only if the probabilities are not all saturated
    assert bool(((p_expected > 0.02) & (p_expected < 0.98)).any())
    assert float((p_got - p_expected).abs().max()) < 0.01
    for a, b in zip(got.attention, expected.attention):
        assert float((a.float() - b).abs().max()) < 0.02


def test_bf16_autocast_probabilities_within_one_percent(lite_pair):
    plain, optimised = lite_pair
    image, clinical = inputs(batch=4, seed=3)
    with torch.no_grad():
        expected = plain(image, clinical)
    try:
        with torch.inference_mode(), opt.autocast("cpu", dtype=torch.bfloat16):
            got = optimised(image, clinical)
    except RuntimeError as exc:  # a torch build without CPU bf16 kernels
        pytest.skip(f"bf16 autocast is not supported by this torch on this CPU: {exc}")
    _check_bf16(expected, got)


def test_bf16_image_encoder_probabilities_within_one_percent(lite_pair):
    """The CPU bf16 path of optimize_for_inference (encoder in bf16, fp32 stem and head)."""
    plain, _ = lite_pair
    model = opt.optimize_for_inference(copy.deepcopy(plain), "cpu", precision="bf16")
    assert model.image_encoder.pyramid.bfpu[0].key.pointwise.weight.dtype == torch.bfloat16
    assert model.image_encoder.backbone.stem.conv.weight.dtype == torch.float32
    assert model.classifier.weight.dtype == torch.float32
    image, clinical = inputs(batch=4, seed=3)
    with torch.no_grad():
        expected = plain(image, clinical)
    try:
        with torch.inference_mode(), opt.inference_context(model, "cpu"):
            got = model(image, clinical)
    except RuntimeError as exc:
        pytest.skip(f"bf16 convolutions are not supported by this torch on this CPU: {exc}")
    assert got.logits.dtype == torch.float32 and all(a.dtype == torch.float32 for a in got.attention)
    _check_bf16(expected, got)


def test_inference_context_sets_and_restores_threads(monkeypatch, lite_pair):
    before = torch.get_num_threads()
    wanted = before + 1
    monkeypatch.setenv(opt.THREADS_ENV, str(wanted))
    model = opt.optimize_for_inference(copy.deepcopy(lite_pair[0]), "cpu", precision="fp32")
    assert model.mmcafnet_threads == wanted
    with opt.inference_context(model, "cpu"):
        assert torch.get_num_threads() == wanted
    assert torch.get_num_threads() == before
    monkeypatch.delenv(opt.THREADS_ENV)
    monkeypatch.setattr(opt, "usable_cpus", lambda: 2)
    assert opt.inference_threads() == min(before, 2), "a small machine uses every core"
    monkeypatch.setattr(opt, "usable_cpus", lambda: 16)
    assert opt.inference_threads() == min(before, 15), "a larger one leaves a core to the GUI"
    monkeypatch.setenv(opt.THREADS_ENV, "lots")
    with pytest.raises(ValueError, match=opt.THREADS_ENV):
        opt.inference_threads()


def test_fold_refuses_a_training_model():
    model = create_model("mmcafnet-lite")
    with pytest.raises(ValueError, match="eval mode"):
        opt.fold_batchnorm(model.train())


def test_folded_conv_equals_conv_then_batchnorm_with_bias_and_groups():
    gen = torch.Generator().manual_seed(5)
    conv = nn.Conv3d(8, 8, 3, padding=1, groups=4, bias=True)
    bn = nn.BatchNorm3d(8).eval()
    bn.running_mean.copy_(torch.randn(8, generator=gen))
    bn.running_var.copy_(torch.rand(8, generator=gen) + 0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(8, generator=gen))
        bn.bias.copy_(torch.randn(8, generator=gen))
    fused = opt._fold_conv_bn(conv, bn)
    x = torch.randn(2, 8, 5, 6, 7, generator=gen)
    with torch.no_grad():
        assert max_relative(fused(x), bn(conv(x))) < 1e-5


def test_autocast_choice_follows_the_hardware_and_the_override(monkeypatch):
    monkeypatch.delenv(opt.CPU_BF16_ENV, raising=False)
    expected = torch.bfloat16 if opt.cpu_has_fast_bf16() else None
    assert opt.autocast_dtype("cpu") == expected
    monkeypatch.setenv(opt.CPU_BF16_ENV, "0")
    assert opt.autocast_dtype("cpu") is None
    assert isinstance(opt.autocast("cpu"), type(__import__("contextlib").nullcontext()))
    monkeypatch.setenv(opt.CPU_BF16_ENV, "1")
    assert opt.autocast_dtype("cpu") == torch.bfloat16
    with opt.autocast("cpu"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_capabilities_agree_with_proc_cpuinfo():
    flags = opt.cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this system")
    caps = opt.cpu_capabilities()
    for name in ("avx2", "avx512f", "avx512_bf16"):
        assert caps[name] == (name in flags), name
    assert caps["amx_bf16"] == ("amx_tile" in flags and "amx_bf16" in flags) or caps["amx_bf16"] == ("amx_tile" in flags)


def test_predictor_default_path_matches_the_plain_model(tmp_path, monkeypatch):
    """Predictor.load optimises the model; in fp32 its classification equals the plain model's."""
    import numpy as np
    import pandas as pd

    from MMCAFNetLib import checkpoint as ckpt
    from MMCAFNetLib.ehr import default_schema
    from MMCAFNetLib.inference import Predictor
    from MMCAFNetLib.preset import Preset
    from MMCAFNetLib.volume import Volume, make_ijk_to_ras

    rows = [
        {"sex": "M", "age": 63, "weight": 72, "t_stage": "2", "n_stage": "1", "m_stage": "0", "smoking": "yes"},
        {"sex": "F", "age": 50, "weight": 58, "t_stage": "1", "n_stage": "0", "m_stage": "1", "smoking": "no"},
    ]
    schema = default_schema().fit(pd.DataFrame(rows))
    plain = random_model("mmcafnet-lite")
    preset = Preset(name="small", spacing=(2.0, 2.0, 2.0), window=WINDOW, hu_range=(-1000.0, 400.0), mean=0.3)
    path = tmp_path / "lite.pt"
    ckpt.save_checkpoint(
        {"format_version": ckpt.FORMAT_VERSION, "model_name": "mmcafnet-lite", "model_config": plain.config.to_dict(),
         "class_names": ["A", "G"], "task": "AG", "state_dict": plain.state_dict(), "schema": schema.to_dict(),
         "preset": preset.to_dict(), "threshold": 0.5, "provenance": {}, "metrics": {}, "demo": True},
        path,
    )
    monkeypatch.setenv(opt.CPU_BF16_ENV, "0")  # compare the fp32 paths exactly
    predictor = Predictor.load(path, device="cpu")
    assert not any(isinstance(getattr(m, "norm", None), nn.BatchNorm3d) for m in predictor.model.modules()
                   if isinstance(m, (ConvNorm3d, UCB)))
    rng = np.random.default_rng(0)
    array = (rng.normal(-300, 300, size=(20, 48, 48))).astype(np.float32)
    volume = Volume(array, make_ijk_to_ras((2.0, 2.0, 2.0)), {"modality": "CT"})
    point = volume.ijk_to_ras_points(np.array([[24.0, 24.0, 10.0]]))[0]
    optimised = predictor.classify(volume, rows[0], lesion=point, heatmap="attention")
    predictor.model = plain  # the same weights without any optimisation
    reference = predictor.classify(volume, rows[0], lesion=point, heatmap="attention")
    np.testing.assert_allclose(optimised.probabilities, reference.probabilities, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(optimised.heatmap.array, reference.heatmap.array, rtol=1e-4, atol=1e-4)

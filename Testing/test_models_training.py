"""Gradients and freezing by part name (the paper's staged protocol)."""

from __future__ import annotations

import pytest
import torch

from MMCAFNetLib.models import create_model, freeze, trainable_parameters, unfreeze

TINY = dict(stem_channels=16, stage_channels=(64, 128, 256), stage_blocks=(1, 1, 1), input_replicas=1)
# With one token per modality the attention softmax is identically 1: its query/key projections
# cannot influence the output, so their gradient is zero up to rounding (documented in fusion.py).
INERT = ("q_proj", "k_proj")


def backward(model, seed=0):
    torch.manual_seed(seed)
    model.train()
    output = model(torch.randn(2, 1, 8, 32, 32), torch.randn(2, model.num_clinical))
    (output.logits.square().sum() + output.features.mean()).backward()


@pytest.mark.parametrize("name", ["mmcafnet", "late-fusion"])
def test_gradients_reach_every_trainable_parameter(name):
    torch.manual_seed(0)
    # survival 1: no block is skipped in this one step, so every block must receive a gradient
    model = create_model(name, num_classes=4, final_survival_prob=1.0, **TINY)
    backward(model)
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        if param_name.rsplit(".", 2)[-2] in INERT:
            assert param.grad.abs().max() < 1e-6, param_name
        else:
            assert param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", ["tabular-kan", "tabular-mlp"])
def test_gradients_reach_tabular_models(name):
    model = create_model(name, num_classes=4)
    model.train()
    model(None, torch.randn(4, 7)).logits.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_staged_protocol_freezing():
    torch.manual_seed(0)
    model = create_model("mmcafnet", final_survival_prob=1.0, **TINY)
    parts = model.parts()
    assert {"backbone", "pyramid", "image_encoder", "tabular_encoder", "fusion", "classifier"} <= set(parts)

    # stage 2: pyramid and readout on a frozen backbone
    freeze(model, "backbone")
    backward(model)
    assert all(p.grad is None for p in parts["backbone"].parameters())
    assert all(p.grad is not None for p in parts["pyramid"].parameters())
    model.zero_grad(set_to_none=True)

    # stage 3: the whole image encoder frozen, statistics included
    freeze(model, ["image_encoder"])
    norm = parts["pyramid"].levels[0].norm
    before = norm.running_mean.clone()
    backward(model, seed=1)
    assert not parts["image_encoder"].training and model.training
    assert torch.equal(norm.running_mean, before)  # BatchNorm statistics did not move
    assert all(p.grad is None for p in parts["image_encoder"].parameters())
    for part in ("tabular_encoder", "fusion", "classifier"):
        assert all(p.grad is not None for p in parts[part].parameters()), part
    model.zero_grad(set_to_none=True)

    unfreeze(model)
    model.train()
    assert parts["image_encoder"].training
    assert trainable_parameters(model) == sum(p.numel() for p in model.parameters())


def test_stage_three_trains_about_six_thousand_parameters():
    """The reference's last stage trains about 6.6 k parameters (KAN, fusion, classifier)."""
    with torch.device("meta"):
        model = create_model("mmcafnet")
    freeze(model, "image_encoder")
    assert 6400 <= trainable_parameters(model) <= 6800


def test_freezing_without_statistics_keeps_train_mode():
    model = create_model("mmcafnet", **TINY)
    freeze(model, "backbone", freeze_statistics=False)
    model.train()
    assert model.image_encoder.backbone.training
    assert not any(p.requires_grad for p in model.image_encoder.backbone.parameters())


def test_unknown_part_is_rejected():
    model = create_model("tabular-mlp")
    with pytest.raises(ValueError, match=r"unknown part.*backbone.*this model has"):
        freeze(model, "backbone")

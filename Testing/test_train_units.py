"""Small pieces of training checked by hand: focal loss, the learning-rate schedule, the sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from MMCAFNetLib.train.config import TrainConfig
from MMCAFNetLib.train.loop import lr_factor, warmup_steps
from MMCAFNetLib.train.losses import BinaryFocalLoss, MultiClassFocalLoss
from MMCAFNetLib.train.sampling import EpochSampler


def test_binary_focal_loss_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0])
    target = torch.tensor([1, 0, 0])
    # p = sigmoid(logit); p_t = p for positives, 1 - p for negatives; FL = -(1 - p_t)^2 log p_t
    p = [0.5, 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))]
    p_t = [p[0], 1 - p[1], 1 - p[2]]
    expected = sum(-((1 - q) ** 2) * math.log(q) for q in p_t) / 3
    assert float(BinaryFocalLoss(gamma=2.0)(logits, target)) == pytest.approx(expected, rel=1e-6)
    # gamma 0 is binary cross-entropy
    bce = sum(-math.log(q) for q in p_t) / 3
    assert float(BinaryFocalLoss(gamma=0.0)(logits, target)) == pytest.approx(bce, rel=1e-6)


def test_multiclass_focal_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    q = math.exp(2) / (math.exp(2) + 3)  # softmax probability of the true class 0
    assert float(MultiClassFocalLoss(gamma=2.0)(logits, torch.tensor([0]))) == pytest.approx(
        -((1 - q) ** 2) * math.log(q), rel=1e-6)
    assert float(MultiClassFocalLoss(gamma=0.0)(logits, torch.tensor([0]))) == pytest.approx(-math.log(q), rel=1e-6)


def test_schedule_warms_up_then_follows_the_cosine():
    total, warm = 100, 10
    assert lr_factor(0, total, warm, 0.0) == pytest.approx(0.1)  # (step + 1) / warm-up
    assert lr_factor(9, total, warm, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, total, warm, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, total, warm, 0.0) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(100, total, warm, 0.01) == pytest.approx(0.01)
    # the paper's 10,000 warm-up iterations are capped at a tenth of a short run
    assert warmup_steps(TrainConfig(warmup_iters=10000), 500) == 50
    assert warmup_steps(TrainConfig(warmup_iters=0, warmup_fraction=0.05), 400) == 20


def test_sampler_shards_one_global_order_and_balances_classes():
    labels = [0] * 9 + [1] * 3
    single = EpochSampler(labels, seed=4, balanced=True)
    single.set_epoch(2)
    order = [i for i, _, _ in single]
    shards = []
    for rank in range(2):
        s = EpochSampler(labels, seed=4, balanced=True, num_replicas=2, rank=rank)
        s.set_epoch(2)
        shards.append(list(s))
    # rank r takes positions r, r + 2, ...: interleaving the shards gives the single-process order
    merged = [None] * len(order)
    for rank, shard in enumerate(shards):
        assert all(position % 2 == rank for _, position, _ in shard)
        for index, position, epoch in shard:
            assert epoch == 2
            merged[position] = index
    assert merged == order
    # a new epoch gives a new order; the same epoch the same order
    assert [i for i, _, _ in single] == order
    single.set_epoch(3)
    assert [i for i, _, _ in single] != order
    # balanced: over many epochs each class is drawn about half of the time (3 of 12 are class 1)
    drawn = []
    for epoch in range(200):
        single.set_epoch(epoch)
        drawn += [labels[i] for i, _, _ in single]
    assert sum(drawn) / len(drawn) == pytest.approx(0.5, abs=0.03)
    plain = EpochSampler(labels, seed=4)
    assert sorted(i for i, _, _ in plain) == list(range(12))  # a permutation without balancing


def test_fold_split_and_summary_across_folds():
    import pandas as pd

    from MMCAFNetLib.train.data import available_folds, split_cohort
    from MMCAFNetLib.train.loop import summarise_folds

    df = pd.DataFrame({
        "patient_id": [f"P{i}" for i in range(10)],
        "label": ["A", "G"] * 5,
        "split": ["train", "train", "val", "val", "train", "train", "test", "test", "train", "train"],
        "fold": [0, 0, 1, 1, 2, 2, -1, -1, 0, 1],
    })
    assert available_folds(df) == [0, 1, 2]
    train, val = split_cohort(df, TrainConfig(fold=1))
    assert sorted(val["patient_id"]) == ["P2", "P3", "P9"]  # fold 1, whatever the split column says
    assert sorted(train["patient_id"]) == ["P0", "P1", "P4", "P5", "P8"]  # never the test patients
    train, val = split_cohort(df, TrainConfig())  # no fold: the split column
    assert sorted(val["patient_id"]) == ["P2", "P3"]
    with pytest.raises(ValueError, match="fold 7"):
        split_cohort(df, TrainConfig(fold=7))
    with pytest.raises(ValueError, match="lack class"):
        split_cohort(df[df["patient_id"] != "P3"], TrainConfig())  # no G left in validation
    runs = [{"fold": k, "best_metrics": {"auroc": a, "accuracy": 0.5}} for k, a in enumerate([0.6, 0.8, 0.7])]
    summary = summarise_folds(runs)
    assert summary["folds"] == [0, 1, 2]
    assert summary["validation"]["auroc"]["mean"] == pytest.approx(0.7)
    assert summary["validation"]["auroc"]["std"] == pytest.approx(0.1)  # sample standard deviation
    assert summary["validation"]["accuracy"]["std"] == 0.0


def test_record_dropout_presents_the_unknown_record_to_a_share_of_training_items():
    from MMCAFNetLib.preset import Preset
    from MMCAFNetLib.train.data import LesionWindowDataset, PatientWindows
    from MMCAFNetLib.volume import Volume

    preset = Preset(name="t", spacing=(1.0, 1.0, 1.0), window=(4, 8, 8), hu_range=(-1000.0, 400.0), mean=0.3)
    rng = np.random.default_rng(0)
    patients = [PatientWindows(Volume(rng.normal(-500, 200, (8, 16, 16)).astype(np.float32), np.eye(4), {}),
                               [(4, 8, 8)], np.full(3, float(p + 1), np.float32), p % 2, f"P{p}", 10.0)
                for p in range(20)]
    unknown = np.array([0.5, -0.5, 0.0], np.float32)

    def dataset(train, share):
        return LesionWindowDataset(patients, preset, train, seed=3, windows_per_patient=5, record_dropout=share,
                                   unknown_clinical=unknown)

    def dropped(ds, epoch=0):
        ds.set_epoch(epoch)
        return [bool(np.array_equal(ds[i]["clinical"].numpy(), unknown)) for i in range(len(ds))]

    half = dataset(True, 0.5)
    first = dropped(half)
    assert 30 < sum(first) < 70  # 100 items, each dropped with probability 0.5
    assert dropped(half) == first  # a pure function of (seed, epoch, draw, index)
    assert dropped(half, epoch=1) != first
    half.set_epoch(0)
    for i in range(len(half)):  # an item not dropped keeps its own record
        assert first[i] or half[i]["clinical"][0] == patients[half.items[i][0]].clinical[0]
    assert all(dropped(dataset(True, 1.0))) and not any(dropped(dataset(True, 0.0)))
    assert not any(dropped(dataset(False, 1.0)))  # evaluation items are never dropped
    # switched off, the augmentation draws are those of a run that never had the setting
    plain = LesionWindowDataset(patients, preset, True, seed=3, windows_per_patient=5)
    off = dataset(True, 0.0)
    for i in (0, 7, 42):
        np.testing.assert_array_equal(plain[i]["image"].numpy(), off[i]["image"].numpy())
    with pytest.raises(ValueError, match="unknown_clinical"):
        LesionWindowDataset(patients, preset, True, record_dropout=0.2)

    with pytest.raises(ValueError, match="record_dropout"):
        TrainConfig(record_dropout=1.5).validate()


def test_zoom_and_mirroring_reach_the_training_windows_only():
    from MMCAFNetLib.preset import Preset
    from MMCAFNetLib.train.data import LesionWindowDataset, PatientWindows
    from MMCAFNetLib.volume import Volume

    preset = Preset(name="t", spacing=(1.0, 1.0, 1.0), window=(4, 8, 8), hu_range=(-1000.0, 400.0), mean=0.3)
    rng = np.random.default_rng(0)
    patients = [PatientWindows(Volume(rng.normal(-500, 200, (8, 16, 16)).astype(np.float32), np.eye(4), {}),
                               [(4, 8, 8)], np.zeros(3, np.float32), p % 2, f"P{p}", 10.0) for p in range(4)]

    def images(train, **extra):
        ds = LesionWindowDataset(patients, preset, train, seed=3, windows_per_patient=3, **extra)
        return [ds[i]["image"].numpy() for i in range(len(ds))]

    plain = images(True)
    extras = images(True, scale_range=0.2, mirror_all_axes=True)
    assert sum(not np.array_equal(a, b) for a, b in zip(plain, extras)) >= len(plain) - 1
    assert all(np.array_equal(a, b) for a, b in zip(images(False), images(False, scale_range=0.2, mirror_all_axes=True)))
    with pytest.raises(ValueError, match="scale_range"):
        TrainConfig(scale_range=1.0).validate()


def _poison_freed_memory() -> None:
    """Leave NaN in freed heap blocks, where a kernel reading memory it never wrote would find it."""
    for size in (1 << 10, 1 << 14, 1 << 16, 1 << 18, 1 << 20):
        a, b = torch.full((size,), float("nan")), torch.full((size,), float("nan"), dtype=torch.bfloat16)
        del a, b


def test_cpu_training_steps_run_in_fp32_even_where_bf16_is_forced(monkeypatch):
    """oneDNN's bf16 Conv3d weight gradient on CPU (torch 2.13, AVX512-BF16/AMX) reads memory it never
    wrote when the kernel overhangs a small map (e.g. 3x3x3 over 2x4x4, the deepest pyramid level of
    a small window): its weight gradients held NaN or garbage left by earlier work, which made the
    training tests fail at random after other tests. Training therefore never autocasts on CPU."""
    from MMCAFNetLib.optimize import CPU_BF16_ENV
    from MMCAFNetLib.train.loop import autocast_context

    monkeypatch.setenv(CPU_BF16_ENV, "1")
    cpu = torch.device("cpu")
    with autocast_context(cpu, True):
        assert not torch.is_autocast_enabled("cpu")
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(64, 2, 3, padding=1)  # the shape of a tiny BFPU gate
    x = torch.randn(4, 64, 2, 4, 4)
    for _ in range(3):
        conv.zero_grad(set_to_none=True)
        _poison_freed_memory()
        with autocast_context(cpu, True):
            y = conv(x)
        y.float().sum().backward()
        assert torch.isfinite(conv.weight.grad).all()

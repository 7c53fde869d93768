"""Explanations that point at the lesion: the localisation measures, the box supervision of the
attention maps, the seen-patient record, the model's default heatmap, Grad-CAM++, the preview's
focus and the reference's stochastic-depth rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from MMCAFNetLib.evaluate.localisation import localisation_record, mass_in_box, point_in_box, summarise
from MMCAFNetLib.volume import Volume


def _grid(shape=(10, 20, 30), spacing=(2.0, 1.0, 1.5), origin=(-10.0, 5.0, 3.0)) -> np.ndarray:
    """IJK -> RAS with spacing (i, j, k) and an offset origin."""
    m = np.eye(4)
    m[0, 0], m[1, 1], m[2, 2] = spacing[2], spacing[1], spacing[0]
    m[:3, 3] = origin
    return m


# ----------------------------------------------------------------------------- localisation measures
def test_point_in_box_with_margin():
    lo, hi = np.array([0.0, 0.0, 0.0]), np.array([10.0, 10.0, 10.0])
    assert point_in_box([5, 5, 5], lo, hi) and point_in_box([10, 0, 0], lo, hi)
    assert not point_in_box([14, 5, 5], lo, hi) and point_in_box([14, 5, 5], lo, hi, margin_mm=5)
    assert not point_in_box([15.5, 5, 5], lo, hi, margin_mm=5)
    assert point_in_box([5, 5, 5], hi, lo)  # corners in any order
    assert not point_in_box(None, lo, hi)


def test_mass_in_box_and_pointing_on_a_known_map():
    affine = _grid()
    arr = np.zeros((10, 20, 30), dtype=np.float32)
    arr[4:6, 8:12, 10:14] = 1.0  # the "lesion" block
    arr[0, 0, 0] = 0.5  # a little mass elsewhere
    heat = Volume(arr, affine)
    # the block's voxel centres in RAS: i 10..13, j 8..11, k 4..5
    lo = heat.ijk_to_ras_points([[10, 8, 4]])[0]
    hi = heat.ijk_to_ras_points([[13, 11, 5]])[0]
    expected = arr[4:6, 8:12, 10:14].sum() / arr.sum()
    assert mass_in_box(heat, lo, hi) == pytest.approx(expected)
    rec = localisation_record(heat, lo, hi, margin_mm=0.0)
    assert rec["hit"] and rec["distance_mm"] == 0.0
    # a box far from the peak: a miss, with the distance from the peak to the box
    far_lo, far_hi = lo + np.array([100.0, 0, 0]), hi + np.array([100.0, 0, 0])
    miss = localisation_record(heat, far_lo, far_hi, margin_mm=5.0)
    assert not miss["hit"] and miss["distance_mm"] > 90 and miss["mass_in_box"] == 0.0
    # an all-zero map points nowhere
    empty = localisation_record(Volume(np.zeros_like(arr), affine), lo, hi, margin_mm=5.0)
    assert not empty["hit"] and np.isnan(empty["mass_in_box"])


def test_top_k_pointing_finds_a_lesion_that_is_not_the_brightest_place():
    """Two bright places 30 mm apart, the lesion on the dimmer one: the peak misses, the top 3
    find it; places closer than the separation count once; an empty map has no candidates."""
    from MMCAFNetLib.heatmap import candidate_peaks

    affine = _grid(shape=(10, 40, 40), spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    arr = np.zeros((10, 40, 40), dtype=np.float32)
    arr[5, 5:8, 5:8] = 1.0  # the brightest place, a vessel
    arr[5, 5, 12] = 0.9  # 6 mm from it: the same place, not a second candidate
    arr[5, 5:8, 35:38] = 0.6  # the lesion, 30 mm away
    heat = Volume(arr, affine)
    lo, hi = heat.ijk_to_ras_points([[35, 5, 5]])[0], heat.ijk_to_ras_points([[37, 7, 5]])[0]
    rec = localisation_record(heat, lo, hi, margin_mm=5.0)
    assert not rec["hit"] and rec["top_k_hit"]
    assert not localisation_record(heat, lo, hi, margin_mm=5.0, top_k=1)["top_k_hit"]
    from MMCAFNetLib.heatmap import peak_ras

    before = arr.copy()
    found = candidate_peaks(heat, count=3, separation_mm=20.0)
    assert len(found) == 2  # the two places; nothing else above 0
    assert np.allclose(found[0][0], peak_ras(heat)) and found[0][1] == 1.0
    assert np.linalg.norm(found[1][0] - heat.ijk_to_ras_points([[36, 6, 5]])[0]) < 2.0
    assert abs(found[1][1] - 0.6) < 1e-6
    assert np.array_equal(arr, before)  # the places set aside while searching are restored
    read_only = arr.copy()
    read_only.flags.writeable = False
    assert [v for _, v in candidate_peaks(Volume(read_only, affine))] == [v for _, v in found]
    in_block = candidate_peaks(heat, block=(np.array([4, 3, 2]), np.array([7, 10, 40])))  # all that is non-zero
    assert [v for _, v in in_block] == [v for _, v in found]
    assert all(np.allclose(a, b) for (a, _), (b, _) in zip(in_block, found))
    assert candidate_peaks(Volume(np.zeros_like(arr), affine)) == []
    with pytest.raises(ValueError, match="at least 1"):
        candidate_peaks(heat, count=0)


def test_summary_splits_small_lesions_and_bootstraps():
    def patient(size, hit, mass):
        rec = {"hit": hit, "mass_in_box": mass, "distance_mm": 0.0 if hit else 20.0, "margin_mm": 5.0}
        return {"patient_id": "p", "lesion_size_mm": size, "runs": {"attention": {"lesion": rec}}}

    rows = [patient(8, True, 0.5)] * 4 + [patient(30, False, 0.1)] * 6
    s = summarise(rows, ["attention"], ["lesion"], small_lesion_mm=10, num_resamples=300)
    block = s["methods"]["attention"]["lesion"]
    assert block["pointing_game"] == pytest.approx(0.4) and block["mass_in_box"] == pytest.approx(0.26)
    assert block["small"]["pointing_game"] == 1.0 and block["small"]["num_patients"] == 4
    assert block["large"]["pointing_game"] == 0.0 and block["large"]["num_patients"] == 6
    lo, hi = block["ci95"]["pointing_game"]
    assert 0.0 <= lo < 0.4 < hi <= 1.0


# ----------------------------------------------------------------------------- box supervision
def test_attention_box_loss_prefers_maps_on_the_box_and_ignores_empty_masks():
    from MMCAFNetLib.train.losses import attention_box_loss

    mask = torch.zeros(2, 1, 8, 32, 32)
    mask[0, :, 2:6, 10:18, 12:20] = 1.0  # window 0 has a lesion, window 1 none
    on_box = torch.nn.functional.adaptive_avg_pool3d(mask, (4, 8, 8)).clamp(0.02, 0.98)
    off_box = 1.0 - on_box
    good = attention_box_loss([on_box], mask)
    bad = attention_box_loss([off_box], mask)
    assert float(good) < float(bad)
    # only window 1 (no box) differs: the loss does not change
    changed = on_box.clone()
    changed[1] = 0.9
    assert float(attention_box_loss([changed], mask)) == pytest.approx(float(good))
    assert float(attention_box_loss([on_box], torch.zeros_like(mask))) == 0.0
    # a gradient step on a flat map raises it inside the box and lowers it outside
    flat = torch.full((1, 1, 4, 8, 8), 0.5, requires_grad=True)
    attention_box_loss([flat], mask[:1]).backward()
    share = torch.nn.functional.adaptive_avg_pool3d(mask[:1], (4, 8, 8))
    assert (flat.grad[share > 0.99] < 0).all() and (flat.grad[share == 0] > 0).all()


def test_touch_target_asks_full_strength_of_every_cell_the_box_touches():
    """A lesion smaller than a map cell: the share target asks that cell for a fraction, the touch
    target for 1; on a box aligned with the cells the two are the same loss."""
    from MMCAFNetLib.train.losses import attention_box_loss

    aligned = torch.zeros(1, 1, 8, 32, 32)
    aligned[0, :, 2:6, 8:16, 8:16] = 1.0  # whole cells of a (4, 8, 8) grid
    maps = (0.1 + 0.8 * torch.rand(1, 1, 4, 8, 8, generator=torch.Generator().manual_seed(1)))
    assert float(attention_box_loss([maps], aligned, "touch")) == pytest.approx(float(attention_box_loss([maps], aligned)))
    small = torch.zeros(1, 1, 8, 32, 32)
    small[0, :, 2, 9:11, 9:11] = 1.0  # 4 voxels of one 2 x 4 x 4 cell
    on_cell = torch.full((1, 1, 4, 8, 8), 0.05)
    on_cell[0, 0, 1, 2, 2] = 0.95
    half = on_cell.clone()
    half[0, 0, 1, 2, 2] = 0.2
    touch_gain = float(attention_box_loss([half], small, "touch")) - float(attention_box_loss([on_cell], small, "touch"))
    share_gain = float(attention_box_loss([half], small)) - float(attention_box_loss([on_cell], small))
    assert touch_gain > 0.5 and touch_gain > share_gain
    flat = torch.full((1, 1, 4, 8, 8), 0.5, requires_grad=True)
    attention_box_loss([flat], small, "touch").backward()
    assert float(flat.grad[0, 0, 1, 2, 2]) < 0 and (flat.grad[0, 0, 0] > 0).all()


def test_attention_peak_loss_punishes_one_hot_cell_that_the_mean_overlooks():
    """One hot cell outside the lesion decides a whole-volume scan's peak; the peak terms see it,
    the cell-mean losses hardly do."""
    from MMCAFNetLib.train.losses import attention_background_loss, attention_box_loss, attention_peak_loss

    mask = torch.zeros(1, 1, 8, 32, 32)
    mask[0, :, 2:6, 8:16, 8:16] = 1.0
    share = torch.nn.functional.adaptive_avg_pool3d(mask, (4, 8, 8))
    on_box = torch.where(share > 0, torch.tensor(0.9), torch.tensor(0.05))
    stray = on_box.clone()
    stray[0, 0, 1, 6, 6] = 0.95  # one cell far from the box, hotter than the lesion
    box_rise = float(attention_box_loss([stray], mask)) / float(attention_box_loss([on_box], mask))
    peak_rise = float(attention_peak_loss([stray], mask)) / float(attention_peak_loss([on_box], mask))
    assert box_rise < 1.1 and peak_rise > 3.0
    quiet = torch.full((1, 1, 4, 8, 8), 0.05)
    hot = quiet.clone()
    hot[0, 0, 2, 3, 3] = 0.95
    assert float(attention_background_loss([hot])) < 2 * float(attention_background_loss([quiet]))
    assert float(attention_peak_loss([on_box], mask, [hot])) > 2 * float(attention_peak_loss([on_box], mask, [quiet]))
    # windows without a box add nothing; without any term the loss is 0 and still differentiable
    flat = torch.full((1, 1, 4, 8, 8), 0.5, requires_grad=True)
    empty = attention_peak_loss([flat], torch.zeros_like(mask))
    empty.backward()
    assert float(empty.detach()) == 0.0 and flat.grad is not None
    # a gradient step raises the highest cell touching the box and lowers the highest one outside
    ramp = (0.2 + 0.6 * torch.rand(1, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    attention_peak_loss([ramp], mask).backward()
    inside = (share > 0)
    top_in = torch.where(inside, ramp.detach(), torch.tensor(-1.0)).argmax()
    top_out = torch.where(inside, torch.tensor(-1.0), ramp.detach()).argmax()
    assert float(ramp.grad.flatten()[top_in]) < 0 < float(ramp.grad.flatten()[top_out])


def test_training_items_carry_the_box_mask_through_the_augmentation():
    from MMCAFNetLib.preset import Preset
    from MMCAFNetLib.train.data import LesionWindowDataset, PatientWindows

    preset = Preset(name="t", spacing=(4.0, 4.0, 4.0), window=(8, 32, 32), hu_range=(-1000.0, 400.0), mean=0.3)
    crop = np.full((16, 48, 48), -1000.0, dtype=np.float32)
    mask = np.zeros_like(crop)
    crop[6:10, 20:26, 22:30] = 40.0  # a bright "lesion" exactly where the box is
    mask[6:10, 20:26, 22:30] = 1.0
    pw = PatientWindows(Volume(crop, np.eye(4)), [(8, 23, 26)], np.zeros(7, np.float32), 1, "p1", 10.0, mask)
    ds = LesionWindowDataset([pw], preset, train=True, seed=5, windows_per_patient=6, jitter_slices=1,
                             rotate_degrees=15, flip=True)
    for draw in range(6):
        item = ds[(draw, draw, 0)]
        image, box = item["image"][0].numpy(), item["box_mask"][0].numpy()
        assert box.shape == image.shape and box.max() > 0.5
        bright = image > image.min() + 0.5 * (image.max() - image.min())
        # the lesion's voxels and the mask coincide after shift, rotation and flip
        overlap = (bright & (box > 0.5)).sum() / max(bright.sum(), 1)
        assert overlap > 0.7, overlap
    # without the mask (supervision off) items have no box and the image draws are unchanged
    plain = LesionWindowDataset([PatientWindows(pw.crop, pw.centers, pw.clinical, 1, "p1", 10.0)], preset,
                                train=True, seed=5, windows_per_patient=6, jitter_slices=1)
    item = plain[(2, 2, 0)]
    assert "box_mask" not in item
    np.testing.assert_array_equal(item["image"].numpy(), ds[(2, 2, 0)]["image"].numpy())


def test_each_training_window_brings_its_lesion_free_windows():
    """``negatives_per_window`` lesion-free windows ride along with each training item; the first
    draw is the one a single negative gets, so adding more leaves the earlier draws alone."""
    from MMCAFNetLib.preset import Preset
    from MMCAFNetLib.train.data import LesionWindowDataset, PatientWindows, collate

    preset = Preset(name="t", spacing=(4.0, 4.0, 4.0), window=(4, 16, 16), hu_range=(-1000.0, 400.0), mean=0.3)
    crop = np.full((8, 24, 24), -1000.0, dtype=np.float32)
    mask = np.zeros_like(crop)
    mask[3:5, 10:14, 10:14] = 1.0
    pool = np.stack([np.full((4, 16, 16), float(v), np.float32) for v in range(5)])  # told apart by value
    pw = PatientWindows(Volume(crop, np.eye(4)), [(4, 12, 12)], np.zeros(3, np.float32), 0, "p", 8.0, mask, pool)

    def dataset(n: int) -> LesionWindowDataset:
        return LesionWindowDataset([pw], preset, train=True, seed=2, windows_per_patient=4, jitter_slices=0,
                                   augment=False, negatives_per_window=n)

    one, three = dataset(1), dataset(3)
    items = [three[(0, d, 0)] for d in range(4)]
    assert all(item["negative"].shape == (3, 1, 4, 16, 16) for item in items)
    for d, item in enumerate(items):
        np.testing.assert_array_equal(item["negative"][0].numpy(), one[(0, d, 0)]["negative"][0].numpy())
        assert {float(w.flatten()[0]) for w in item["negative"]} <= set(range(5))
    batch = collate(items)
    assert batch["negative"].shape == (4, 3, 1, 4, 16, 16) and batch["image"].shape == (4, 1, 4, 16, 16)


def test_peak_terms_on_the_shown_maps_see_a_hot_cell_of_the_finest_level():
    """A whole-volume scan that shows the finest level alone is decided by that level's hottest
    lesion-free cell; averaged with a quiet coarse level it counts for half. attention_peak_maps
    "shown" trains the map a scan shows."""
    from MMCAFNetLib.train.losses import attention_peak_loss

    mask = torch.zeros(1, 1, 8, 32, 32)
    mask[0, :, 2:6, 8:16, 8:16] = 1.0
    share = torch.nn.functional.adaptive_avg_pool3d(mask, (4, 8, 8))
    lesion = [torch.where(share > 0, torch.tensor(0.9), torch.tensor(0.05)), torch.full((1, 1, 2, 4, 4), 0.5)]
    fine = torch.full((1, 1, 4, 8, 8), 0.05)
    fine[0, 0, 2, 3, 3] = 0.99
    background = [fine, torch.full((1, 1, 2, 4, 4), 0.05)]
    on_mean = float(attention_peak_loss(lesion, mask, background))
    on_scan = float(attention_peak_loss(lesion, mask, background, scan_levels="finest"))
    assert on_scan > 1.5 * on_mean
    same = float(attention_peak_loss(lesion, mask, background, levels="all", scan_levels="all"))
    assert same == pytest.approx(on_mean)


def test_hard_negative_mining_ranks_the_windows_the_model_lights_up():
    """The mined ranking is the peak of each lesion-free window's combined attention map, and the
    dataset then draws only from each patient's hottest windows."""
    from train_support import TINY_MODEL

    from MMCAFNetLib.heatmap import combine_attention_levels
    from MMCAFNetLib.models import create_model
    from MMCAFNetLib.preset import Preset
    from MMCAFNetLib.train.data import LesionWindowDataset, PatientWindows
    from MMCAFNetLib.train.mining import is_mining_epoch, score_lesion_free_windows

    assert [e for e in range(7) if is_mining_epoch(e, 4, 2)] == [2, 4, 6]
    assert not any(is_mining_epoch(e, 0, 1) for e in range(5))
    torch.manual_seed(0)
    model = create_model("mmcafnet-lite", num_classes=1, num_clinical=3, **TINY_MODEL)
    preset = Preset(name="t", spacing=(4.0, 4.0, 4.0), window=(8, 32, 32), hu_range=(-1000.0, 400.0), mean=0.3)
    rng = np.random.default_rng(0)
    pool = rng.normal(0.0, 1.0, size=(5, 8, 32, 32)).astype(np.float32)
    crop = Volume(np.full((16, 40, 40), -1000.0, np.float32), np.eye(4))
    patients = [PatientWindows(crop, [(8, 20, 20)], np.zeros(3, np.float32), 0, "p", 8.0, np.zeros((16, 40, 40), np.float32), pool),
                PatientWindows(crop, [(8, 20, 20)], np.zeros(3, np.float32), 1, "q", 8.0)]
    model.train()
    scores = score_lesion_free_windows(model, patients, torch.device("cpu"), lambda m, x, c: m(x, c), batch_size=2)
    assert model.training  # the training mode is given back
    assert scores[1].shape == (0,) and scores[0].shape == (5,)
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(pool)[:, None], torch.zeros(5, 3))
    expected = combine_attention_levels(list(out.attention)).flatten(1).amax(dim=1).numpy()
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5, atol=1e-6)
    finest = score_lesion_free_windows(model, patients, torch.device("cpu"), lambda m, x, c: m(x, c), batch_size=2,
                                       levels="finest")  # the map a whole-volume scan shows
    np.testing.assert_allclose(finest[0], out.attention[0].flatten(1).amax(dim=1).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(finest[0], scores[0])
    ds = LesionWindowDataset(patients, preset, train=True, seed=1, windows_per_patient=8, jitter_slices=0,
                             augment=False)
    ds.set_hard_negatives([np.array([0.1, 0.9, 0.3, 0.9, 0.2]), np.zeros(0)], keep=2)
    np.testing.assert_array_equal(ds.hard_negatives[0], [1, 3])
    drawn = {int(np.flatnonzero([np.array_equal(ds[(i, i, 0)]["negative"][0, 0].numpy(), w) for w in pool])[0])
             for i in range(8)}
    assert drawn <= {1, 3} and len(drawn) == 2
    with pytest.raises(ValueError, match="2 patients"):
        ds.set_hard_negatives([np.zeros(5)], keep=2)


def test_mining_shards_score_only_their_patients_and_merge_in_order():
    """Under DDP each rank scores every world_size-th patient; the merged shares are the scores a
    single process computes, in patient order, and a patient no rank scored is an error."""
    from train_support import TINY_MODEL

    from MMCAFNetLib.models import create_model
    from MMCAFNetLib.train.data import PatientWindows
    from MMCAFNetLib.train.mining import merge_shards, score_lesion_free_windows, score_shard

    torch.manual_seed(0)
    model = create_model("mmcafnet-lite", num_classes=1, num_clinical=3, **TINY_MODEL).eval()
    rng = np.random.default_rng(1)
    crop = Volume(np.full((16, 40, 40), -1000.0, np.float32), np.eye(4))
    patients = [PatientWindows(crop, [(8, 20, 20)], np.full(3, i, np.float32), i % 2, f"p{i}", 8.0,
                               np.zeros((16, 40, 40), np.float32),
                               rng.normal(0.0, 1.0, size=(3, 8, 32, 32)).astype(np.float32)) for i in range(5)]
    seen: list[int] = []

    def forward(m, x, c):
        seen.append(int(c[0, 0]))  # the patient's clinical values carry its index
        return m(x, c)

    full = score_lesion_free_windows(model, patients, torch.device("cpu"), forward, batch_size=2)
    seen.clear()
    shares = [score_shard(model, patients, range(r, 5, 2), torch.device("cpu"), forward, batch_size=2) for r in (0, 1)]
    assert sorted(shares[0]) == [0, 2, 4] and sorted(shares[1]) == [1, 3] and sorted(set(seen)) == [0, 1, 2, 3, 4]
    merged = merge_shards(shares[::-1], 5)  # gathered in any order
    for a, b in zip(merged, full):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match=r"\[1, 3\]"):
        merge_shards(shares[:1], 5)


def test_mined_training_resumes_exactly(tmp_path_factory, tmp_path):
    """The mined ranking in force is part of the training state: a run stopped between two mining
    rounds and resumed ends with the weights of an uninterrupted one."""
    pytest.importorskip("MMCAFNetLib.synthetic", reason="the synthetic cohort writer is not available")
    from train_support import TINY_MODEL, TINY_PRESET, tiny_cohort

    from MMCAFNetLib.checkpoint import load_checkpoint
    from MMCAFNetLib.train.config import resolve_config
    from MMCAFNetLib.train.loop import train

    cohort = tiny_cohort(tmp_path_factory)

    def config(**extra):
        return resolve_config("default", None, None, {
            "model": "mmcafnet-lite", "model_overrides": dict(TINY_MODEL), "preset": dict(TINY_PRESET),
            "epochs": 4, "batch_size": 4, "progress": False, "seed": 5, "num_threads": 1,
            "attention_supervision": 1.0, "attention_negatives": 4, "attention_peak": 1.0,
            "attention_hard_negatives": 2, "attention_mining_every": 2, **extra})

    train(config(), cohort, tmp_path / "straight")
    train(config(stop_after_epochs=3), cohort, tmp_path / "resumed")
    stopped = load_checkpoint(tmp_path / "resumed" / "last.pt")["training_state"]
    assert stopped["negative_scores"] is not None and len(stopped["negative_scores"]) == 8  # mined before epoch 3
    train(config(), cohort, tmp_path / "resumed", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6, rtol=1e-5), key


def test_lesion_free_windows_avoid_the_lesion_and_contain_body():
    from MMCAFNetLib.preset import Preset
    from MMCAFNetLib.train.data import lesion_free_windows

    preset = Preset(name="t", spacing=(4.0, 4.0, 4.0), window=(4, 16, 16), hu_range=(-1000.0, 400.0), mean=0.3)
    arr = np.full((12, 64, 64), -1000.0, dtype=np.float32)
    arr[:, 8:56, 8:56] = -850.0  # "lung" inside air
    arr[5:7, 30:34, 30:34] = 40.0  # the lesion
    prepared = Volume(arr, np.eye(4))
    found = lesion_free_windows(prepared, preset, (5, 30, 30), (6, 33, 33), 5, seed=1, patient_id="p")
    assert found is not None and found.shape == (5, 4, 16, 16)
    lesion_value = float(preset.normalise(np.float32(40.0)))
    assert not np.isclose(found, lesion_value).any()  # no lesion voxel in any of them
    again = lesion_free_windows(prepared, preset, (5, 30, 30), (6, 33, 33), 5, seed=1, patient_id="p")
    np.testing.assert_array_equal(found, again)  # reproducible
    assert lesion_free_windows(prepared, preset, (5, 30, 30), (6, 33, 33), 0, seed=1, patient_id="p") is None


def test_lesion_free_windows_come_from_the_windows_a_scan_evaluates():
    """Negatives are the windows that compete with the lesion's in a whole-volume scan (those
    reaching the lungs), not the abdomen or shoulders that the scan never evaluates."""
    from MMCAFNetLib.preset import Preset
    from MMCAFNetLib.train.data import lesion_free_windows

    preset = Preset(name="t", spacing=(4.0, 4.0, 4.0), window=(4, 16, 16), hu_range=(-1000.0, 400.0), mean=0.3)
    arr = np.full((40, 64, 64), -1000.0, dtype=np.float32)
    arr[:, 6:58, 6:58] = 40.0  # the chest wall
    arr[:12, 12:52, 12:52] = -850.0  # lungs in the first 12 slices
    arr[20:, 6:58, 6:58] = 60.0  # the "abdomen", more than the lung mask's margin below the lungs
    arr[5:7, 30:34, 30:34] = 30.0  # the lesion
    prepared = Volume(arr, np.eye(4) * np.r_[4.0, 4.0, 4.0, 1.0])
    found = lesion_free_windows(prepared, preset, (5, 30, 30), (6, 33, 33), 400, seed=1, patient_id="p")
    assert found is not None and len(found) >= 20  # every window a scan keeps, bar the lesion's
    abdomen, lesion = (float(preset.normalise(np.float32(v))) for v in (60.0, 30.0))
    assert not np.isclose(found, abdomen).any() and not np.isclose(found, lesion).any()
    lung = float(preset.normalise(np.float32(-850.0)))
    assert np.mean([np.isclose(w, lung).any() for w in found]) > 0.5


# ----------------------------------------------------------------------------- stochastic depth
def test_reference_stochastic_depth_drops_the_whole_batch_without_rescaling():
    from MMCAFNetLib.models.backbone import PENetBottleneck, set_stochastic_depth_rule

    torch.manual_seed(0)
    block = PENetBottleneck(16, 16, cardinality=4, survival_prob=0.5, se_reduction=4)
    x = torch.randn(6, 16, 2, 4, 4)
    block.eval()
    with torch.no_grad():
        kept = block(x.clone())  # branch kept, unscaled
        block.survival_prob = 1e-9
        dropped = block(x.clone())  # eval ignores survival entirely
        block.survival_prob = 0.5
    assert torch.allclose(kept, dropped)
    skip_only = torch.nn.functional.leaky_relu(x)
    assert set_stochastic_depth_rule(block, "batch") == 1
    block.train()
    outcomes = set()
    with torch.no_grad():
        for _ in range(20):
            y = block(x.clone())
            per_sample = [bool(torch.allclose(y[i], skip_only[i])) for i in range(len(x))]
            assert len(set(per_sample)) == 1  # the whole batch together
            outcomes.add(per_sample[0])
            if not per_sample[0]:
                block.eval()
                ref = block(x.clone())
                block.train()
                assert torch.allclose(y, ref, atol=1e-5)  # kept as is: no 1 / survival factor
    assert outcomes == {True, False}
    set_stochastic_depth_rule(block, "sample")
    with torch.no_grad():
        y = block(x.clone())
    # per sample: some samples dropped and others kept in one batch, kept ones rescaled by 2
    assert block.drop_rule == "sample" and y.shape == x.shape
    with pytest.raises(ValueError, match="sample"):
        set_stochastic_depth_rule(block, "layer")


def test_paper_recipe_uses_the_reference_rule_and_no_box_supervision():
    from MMCAFNetLib.train.config import resolve_config

    paper = resolve_config("paper", 1)
    default = resolve_config("default")
    assert paper.stochastic_depth == "batch" and paper.attention_supervision == 0.0
    assert default.stochastic_depth == "sample"
    with pytest.raises(ValueError, match="attention_supervision"):
        resolve_config("default", overrides={"attention_supervision": -1.0})


# ----------------------------------------------------------------------------- seen patients
def test_seen_patients_are_found_by_id_and_series():
    import pandas as pd

    from MMCAFNetLib.evaluate.seen import check_seen, seen_patients_record

    train = pd.DataFrame({"patient_id": ["A1", "A2"], "series_uid": ["1.2.1", "1.2.2"]})
    val = pd.DataFrame({"patient_id": ["G1"], "series_uid": ["1.2.3"]})
    record = seen_patients_record(train, val)
    assert "A1" not in str(record) and "1.2.1" not in str(record)  # hashes only
    test = pd.DataFrame({"patient_id": ["A1", "G1", "A2", "G9"], "series_uid": ["1.2.1", "1.2.3", "9.9", "1.2.9"]})
    found = check_seen({"seen_patients": record}, test)
    assert found["recorded"] and found["seen"] == ["A1", "G1"]
    assert (found["seen_train"], found["seen_val"]) == (1, 1)
    assert found["id_only"] == ["A2"]  # same ID, another series (another phantom cohort reuses IDs)
    legacy = check_seen({}, test)
    assert not legacy["recorded"] and legacy["seen"] == []


# ----------------------------------------------------------------------------- heatmap methods
def test_gradcam_plus_plus_follows_positive_evidence():
    from MMCAFNetLib.heatmap import gradcam_from_gradients, gradcam_plus_plus_from_gradients

    feats = torch.zeros(1, 2, 2, 4, 4)
    feats[0, 0, 1, 2, 3] = 3.0  # channel 0: a spot
    feats[0, 1] = 1.0  # channel 1: everywhere
    grads = torch.zeros_like(feats)
    grads[0, 0] = 0.5  # the score rises with channel 0
    grads[0, 1] = -0.1  # and falls with channel 1
    pp = gradcam_plus_plus_from_gradients(feats, grads)[0]
    assert pp.argmax() == np.ravel_multi_index((1, 2, 3), (2, 4, 4)) and pp.min() == 0
    cam = gradcam_from_gradients(feats, grads)[0]
    assert cam.argmax() == pp.argmax()


def test_default_heatmap_comes_from_the_checkpoint(tmp_path):
    from MMCAFNetLib.inference.predictor import LEGACY_HEATMAP, InputError, Predictor

    predictor = Predictor.__new__(Predictor)
    predictor.payload = {"heatmap": "attention"}
    assert predictor.default_heatmap == "attention" and predictor.resolve_heatmap("model") == "attention"
    assert predictor.resolve_heatmap("gradcam++") == "gradcam++" and predictor.resolve_heatmap("none") is None
    predictor.payload = {}
    assert predictor.resolve_heatmap("model") == LEGACY_HEATMAP
    with pytest.raises(InputError, match="model"):
        predictor.resolve_heatmap("cam")


def _demo_checkpoint_with(tmp_path: Path, **changes) -> Path:
    """The bundled checkpoint with some payload entries replaced (None removes one), saved anew."""
    from MMCAFNetLib.checkpoint import load_checkpoint
    from MMCAFNetLib.resources import demo_checkpoint_path

    payload = load_checkpoint(demo_checkpoint_path())
    for key, value in changes.items():
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    path = tmp_path / f"model-{len(list(tmp_path.iterdir()))}.pt"
    torch.save(payload, path)
    return path


def test_scan_overlap_and_attention_levels_come_from_the_checkpoint(tmp_path, one_torch_thread):
    """A whole-volume scan tiles the CT with the checkpoint's overlap and maps it with the
    checkpoint's scan levels; a lesion-guided run uses its own levels; checkpoints from before
    these entries keep the old behaviour (overlap 0.25, all levels); damaged entries are refused."""
    from MMCAFNetLib import memory_guard as mg
    from MMCAFNetLib import windows as win
    from MMCAFNetLib.checkpoint import CheckpointError
    from MMCAFNetLib.inference import Predictor
    from MMCAFNetLib.synthetic import make_case

    old = Predictor.load(_demo_checkpoint_with(tmp_path, heatmap_options=None, scan_overlap=None), device="cpu")
    assert (old.scan_overlap, old.attention_levels, old.scan_attention_levels) == (0.25, "all", "all")
    new = Predictor.load(_demo_checkpoint_with(
        tmp_path, heatmap_options={"attention_levels": "all", "scan_attention_levels": "finest"}, scan_overlap=0.5),
        device="cpu")
    assert (new.scan_overlap, new.scan_attention_levels) == (0.5, "finest")
    assert new.info["scan_overlap"] == 0.5 and new.info["scan_attention_levels"] == "finest"

    case = make_case("A", 9301, 96)
    prepared = win.prepare_volume(case.volume, new.preset)
    scans = {}
    for predictor in (old, new):
        result = predictor.classify(case.volume, case.record, lesion=None, heatmap="attention")
        tiled = win.sliding_window_centers(prepared, predictor.preset, overlap=predictor.scan_overlap)
        assert result.model["scan"]["windows_tiled"] == len(tiled)
        assert result.model["scan"]["overlap"] == predictor.scan_overlap
        scans[predictor.scan_overlap] = result
    assert scans[0.5].model["scan"]["windows_evaluated"] > 2 * scans[0.25].model["scan"]["windows_evaluated"]
    assert (mg.estimate_whole_volume_scan(new, case.volume, 1).num_windows
            > 2 * mg.estimate_whole_volume_scan(old, case.volume, 1).num_windows)

    # The per-window maps: the finest level alone for a scan, the mean of the levels with a lesion.
    window = win.cut_window(prepared, [n // 2 for n in prepared.shape], new.preset)
    image = torch.from_numpy(window.array[None, None].astype(np.float32))
    clinical = torch.from_numpy(new._encode_record(case.record)[0])
    with torch.inference_mode():
        levels = list(new._forward(image, clinical).attention)
    _, finest = new._run_batch(image, clinical, "attention", "finest")
    _, mean = new._run_batch(image, clinical, "attention", "all")
    np.testing.assert_allclose(finest[0], levels[0][0, 0].numpy(), atol=1e-6)
    from MMCAFNetLib.heatmap import combine_attention_levels

    np.testing.assert_allclose(mean[0], combine_attention_levels(levels)[0].numpy(), atol=1e-6)
    assert not np.allclose(finest[0], mean[0])
    lesion = np.stack(case.lesion_box_ras)
    seen_levels = []
    original = new._run_batch

    def spy(image, clinical, heatmap, levels="all"):
        seen_levels.append(levels)
        return original(image, clinical, heatmap, levels)

    new._run_batch = spy
    new.classify(case.volume, case.record, lesion=lesion, heatmap="attention")
    new.classify(case.volume, case.record, lesion=None, heatmap="attention")
    assert seen_levels[0] == "all" and seen_levels[-1] == "finest"

    for bad in ({"scan_overlap": 0.9}, {"scan_overlap": "half"}, {"scan_overlap": True},
                {"heatmap_options": {"scan_attention_levels": "coarse"}}):
        with pytest.raises(CheckpointError, match=r"scan_overlap|attention levels"):
            Predictor.load(_demo_checkpoint_with(tmp_path, **bad), device="cpu")


def test_training_writes_the_scan_settings_and_refuses_bad_ones():
    from MMCAFNetLib.train.config import TrainConfig

    for bad, name in (({"scan_overlap": 0.8}, "scan_overlap"), ({"scan_heatmap_levels": "coarse"}, "scan_heatmap_levels"),
                      ({"heatmap_levels": "middle"}, "heatmap_levels"), ({"attention_peak_maps": "some"}, "attention_peak_maps")):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**bad).validate()


def test_box_supervised_attention_maps_are_combined_unweighted():
    """A box-supervised model's attention maps are lesion probabilities: windows are compared by
    their own values (a lesion-free window with a confident class must not outshine the lesion);
    gradient maps, and the attention of models trained without boxes, stay weighted by probability."""
    from MMCAFNetLib.inference.predictor import Predictor

    predictor = Predictor.__new__(Predictor)
    predictor.window_weighting, predictor.attention_is_lesion_map = "auto", True
    assert not predictor._weights_windows("attention")
    assert predictor._weights_windows("gradcam++") and predictor._weights_windows("gradcam")
    predictor.attention_is_lesion_map = False
    assert predictor._weights_windows("attention")
    predictor.window_weighting = "none"
    assert not predictor._weights_windows("gradcam")


def test_catalog_heatmap_field_matches_the_bundled_checkpoint():
    from MMCAFNetLib import model_catalog
    from MMCAFNetLib.checkpoint import load_checkpoint
    from MMCAFNetLib.inference.predictor import HEATMAP_METHODS

    assert model_catalog.HEATMAP_METHODS == HEATMAP_METHODS
    entries = {e.id: e for e in model_catalog.load_catalog()}
    demo = entries["mmcafnet-lite-demo"]
    payload = load_checkpoint(model_catalog.model_path(demo))
    assert demo.heatmap in HEATMAP_METHODS and demo.heatmap == payload.get("heatmap")
    with pytest.raises(model_catalog.CatalogError, match="heatmap"):
        model_catalog.parse_entry({**demo.to_dict(), "heatmap": "saliency"})


# ----------------------------------------------------------------------------- preview
def test_preview_slices_pass_through_the_lesion_else_the_peak(tmp_path):
    from MMCAFNetLib.preview import preview_focus, render_preview

    affine = _grid()
    ct = Volume(np.full((10, 20, 30), -800.0, dtype=np.float32), affine)
    heat_arr = np.zeros((10, 20, 30), dtype=np.float32)
    heat_arr[2, 3, 4] = 1.0
    heat = Volume(heat_arr, affine)
    peak = heat.ijk_to_ras_points([[4, 3, 2]])[0]
    box = (heat.ijk_to_ras_points([[20, 10, 6]])[0], heat.ijk_to_ras_points([[24, 14, 8]])[0])
    focus, source = preview_focus(ct, heat, box)
    np.testing.assert_allclose(focus, (box[0] + box[1]) / 2)
    assert source == "lesion"
    focus, source = preview_focus(ct, heat, None)
    np.testing.assert_allclose(focus, peak)
    assert source == "heatmap peak"
    assert preview_focus(ct, heat, box, focus_ras=[1.0, 2.0, 3.0])[1] == "given point"
    out = render_preview(ct, tmp_path / "p.png", heatmap=heat, lesion_box_ras=box, title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Candidate places: drawn on a view only when near its slice, at their own position.
    from MMCAFNetLib.preview import CANDIDATE_NEAR_MM, _ras_index, candidates_in_view

    near, far = heat.ijk_to_ras_points([[22, 12, 7]])[0], heat.ijk_to_ras_points([[5, 4, 1]])[0]
    focus = np.round(_ras_index(ct, (box[0] + box[1]) / 2)).astype(int)
    for normal in range(3):
        shown = candidates_in_view(ct, [near, far], focus, normal)
        assert [rank for rank, _ in shown][:1] == [1]  # the place inside the lesion is on every view
        np.testing.assert_allclose(shown[0][1], _ras_index(ct, near))
        distance = abs(_ras_index(ct, far)[normal] - focus[normal]) * np.abs(np.diag(affine)[:3])[normal]
        assert (2 in [rank for rank, _ in shown]) == (distance <= CANDIDATE_NEAR_MM)
    with_places = render_preview(ct, tmp_path / "q.png", heatmap=heat, lesion_box_ras=box, title="t",
                                 candidates_ras=[near, far])
    assert with_places.read_bytes() != out.read_bytes()


# ----------------------------------------------------------------------------- end to end
def test_supervised_training_and_localisation_report(tmp_path_factory, tmp_path):
    """A tiny run with box supervision and the reference's stochastic depth trains; evaluate then
    measures where its heatmaps point and writes it into the report and metrics.json."""
    import json

    pytest.importorskip("MMCAFNetLib.synthetic", reason="the synthetic cohort writer is not available")
    from train_support import TINY_MODEL, TINY_PRESET, tiny_cohort

    from MMCAFNetLib.checkpoint import load_checkpoint
    from MMCAFNetLib.cli import main as cli_main
    from MMCAFNetLib.train.config import resolve_config
    from MMCAFNetLib.train.loop import train

    cohort = tiny_cohort(tmp_path_factory)
    config = resolve_config("default", None, None, {
        "model": "mmcafnet-lite", "model_overrides": {**TINY_MODEL, "final_survival_prob": 0.5},
        "preset": dict(TINY_PRESET), "epochs": 1, "batch_size": 4, "progress": False, "seed": 3, "num_threads": 1,
        "attention_supervision": 1.0, "attention_negatives": 2, "attention_negatives_per_window": 2,
        "attention_box_target": "touch", "attention_peak": 1.0, "stochastic_depth": "batch", "heatmap": "gradcam",
    })
    summary = train(config, cohort, tmp_path / "run")
    assert summary["epochs_completed"] == 1
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["heatmap"] == "gradcam" and best["train_config"]["attention_supervision"] == 1.0
    out = tmp_path / "report"
    code = cli_main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--cohort", str(cohort),
                     "--split", "val", "--out", str(out), "--bootstrap", "50", "--no-progress", "--allow-seen",
                     "--localisation", "model,attention", "--device", "cpu"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    loc = metrics["localisation"]
    assert loc["default_method"] == "gradcam" and set(loc["methods"]) == {"gradcam", "attention", "window-centre"}
    n = metrics["num_patients"]
    for method in ("gradcam", "attention"):
        for kind, margin in (("lesion", 5.0), ("whole", 10.0)):
            block = loc["methods"][method][kind]
            assert block["num_patients"] == n and block["margin_mm"] == margin
            assert 0.0 <= block["pointing_game"] <= 1.0
            assert block["small"]["num_patients"] + block["large"]["num_patients"] == n
    # the per-patient records agree with the summary
    hits = [p["runs"]["attention"]["lesion"]["hit"] for p in metrics["localisation_patients"]]
    assert loc["methods"]["attention"]["lesion"]["pointing_game"] == pytest.approx(np.mean(hits))
    assert metrics["whole_volume"]["num_patients"] == n
    report = (out / "report.md").read_text()
    assert "## Localisation" in report and "| gradcam | whole volume" in report and "seen by the model" in report


def test_shuffled_label_cohort_keeps_class_counts_and_the_test_rows():
    """The negative control's cohort: labels permuted among training and validation rows only."""
    import importlib.util

    import pandas as pd

    tool = Path(__file__).resolve().parents[1] / "MMCAFNet" / "Testing" / "Python" / "shuffle_labels.py"
    spec = importlib.util.spec_from_file_location("shuffle_labels", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = pd.DataFrame([{"patient_id": f"P{i:03d}", "label": "AG"[i % 3 == 0],
                            "split": ["train", "val", "test"][i % 5 % 3], "series_path": f"s{i}"} for i in range(60)])
    shuffled, summary = module.shuffle_labels(source, seed=3)
    pool = source["split"] != "test"
    assert summary["rows_shuffled"] == int(pool.sum())
    assert (shuffled.loc[~pool, "label"] == source.loc[~pool, "label"]).all()
    assert sorted(shuffled.loc[pool, "label"]) == sorted(source.loc[pool, "label"])
    assert (shuffled.loc[pool, "label"] != source.loc[pool, "label"]).any()
    assert (shuffled["patient_id"] == source["patient_id"]).all() and (shuffled["series_path"] == source["series_path"]).all()


def test_evaluate_refuses_a_scan_overlap_out_of_range(tmp_path):
    from MMCAFNetLib.cli import main as cli_main

    with pytest.raises(SystemExit, match="scan-overlap"):
        cli_main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--cohort", str(tmp_path / "none.csv"),
                  "--out", str(tmp_path / "out"), "--scan-overlap", "0.8"])
    assert not (tmp_path / "out").exists()

"""Whole-volume scans evaluate only windows that reach the lungs (MMCAFNetLib.lung_mask).

On synthetic chest CTs, extended with an abdomen below the chest and air around the patient (so that
some windows hold no lung): the windows holding the lesion are kept, windows outside the body or
away from the lungs are dropped, and the kept windows' probabilities and the case's classification
are those of the scan over every body window.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MMCAFNetLib import lung_mask as lm
from MMCAFNetLib import windows as win
from MMCAFNetLib.inference import Predictor
from MMCAFNetLib.preset import Preset
from MMCAFNetLib.synthetic import make_case
from MMCAFNetLib.volume import Volume, make_ijk_to_ras

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASES = (("A", 9201), ("G", 9202))
ABDOMEN_SLICES_MM = 120.0
AIR_MARGIN_MM = 180.0


@pytest.fixture(scope="module")
def demo_predictor():
    from MMCAFNetLib.resources import demo_checkpoint_path

    try:
        path = demo_checkpoint_path()
    except FileNotFoundError as exc:
        pytest.skip(f"the demo model is not bundled: {exc}")
    return Predictor.load(path, device="cpu")


def with_abdomen_and_air(volume: Volume) -> Volume:
    """The chest CT with solid 'abdomen' slices (the body outline of the lowest slice, filled with
    40 HU) below it and air around the patient in-plane: what a scan of a larger field shows."""
    arr = volume.array.astype(np.int16)
    spacing = volume.spacing  # I, J, K
    k_low = 0 if volume.ijk_to_ras[2, 2] > 0 else arr.shape[0] - 1  # the most inferior slice
    outline = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray((arr[k_low] > -500).astype(np.uint8))))
    abdomen = np.where(outline > 0, np.int16(40), np.int16(-1000))
    n_abd = round(float(ABDOMEN_SLICES_MM / spacing[2]))
    block = np.broadcast_to(abdomen, (n_abd, *abdomen.shape))
    stacked = np.concatenate([block, arr] if k_low == 0 else [arr, block], axis=0)
    pad = round(float(AIR_MARGIN_MM / spacing[0]))
    padded = np.pad(stacked, ((0, 0), (pad, pad), (pad, pad)), constant_values=-1000)
    affine = volume.ijk_to_ras.copy()
    shift = np.array([-pad, -pad, -n_abd if k_low == 0 else 0], dtype=float)
    affine[:3, 3] = volume.ijk_to_ras[:3, :3] @ shift + volume.ijk_to_ras[:3, 3]
    return Volume(padded, affine, dict(volume.meta))


def window_holds(center, preset: Preset, kji) -> bool:
    start = np.asarray(center) - np.asarray(preset.window) // 2
    return bool(np.all(kji >= start) and np.all(kji < start + np.asarray(preset.window)))


@pytest.mark.slow
@pytest.mark.parametrize("label,seed", CASES)
def test_scan_keeps_the_lesion_windows_and_the_classification(demo_predictor, label, seed):
    case = make_case(label, seed, 128)
    ct = with_abdomen_and_air(case.volume)
    preset = demo_predictor.preset
    prepared = win.prepare_volume(ct, preset)
    every = win.sliding_window_centers(prepared, preset, overlap=demo_predictor.scan_overlap)  # as the scan tiles
    selection = lm.select_scan_windows(prepared, preset, every)
    assert selection.method == "lung mask" and selection.lung_ml > 500  # two real lungs, not gas
    assert selection.dropped and selection.kept  # the abdomen and the air are dropped, the chest kept
    lesion_kji = np.rint(prepared.ras_to_ijk_points(case.lesion_center_ras)[0][::-1])
    cores = lm.window_cores(every, prepared.shape)
    own = [c for c, (lo, hi) in cores.items() if np.all(lesion_kji >= lo) and np.all(lesion_kji < hi)]
    assert len(own) == 1 and own[0] in selection.kept  # the window holding the lesion best centred
    assert window_holds(own[0], preset, lesion_kji)
    extent = lm.select_scan_windows(prepared, preset, every, reach="extent")
    assert set(selection.kept) <= set(extent.kept)  # the core rule only drops more

    # Dropped windows' cores lie outside the body, or in body tissue away from the lungs.
    _, _, grown, strides = lm.body_and_lung_masks(prepared)
    for c in selection.dropped:
        lo, hi = cores[c]
        assert not grown[tuple(slice(-(-int(a) // s), -(-int(b) // s)) for a, b, s in zip(lo, hi, strides))].any()

    demo_predictor.scan_lungs_only = False
    try:
        every_body = demo_predictor.classify(ct, case.record, lesion=None, heatmap=None)
    finally:
        demo_predictor.scan_lungs_only = True
    lungs_only = demo_predictor.classify(ct, case.record, lesion=None, heatmap=None)
    assert lungs_only.model["scan"]["selection"] == "lung mask"
    assert lungs_only.model["scan"]["windows_evaluated"] == len(selection.kept) < len(every_body.windows)
    by_centre = {tuple(np.round(w.center_ras, 3)): w.probabilities for w in every_body.windows}
    for w in lungs_only.windows:  # each kept window: the same probabilities as in the full scan
        np.testing.assert_allclose(w.probabilities, by_centre[tuple(np.round(w.center_ras, 3))], atol=2e-3)
    best = max(every_body.windows, key=lambda w: w.probabilities[1])
    if tuple(np.round(best.center_ras, 3)) in {tuple(np.round(w.center_ras, 3)) for w in lungs_only.windows}:
        np.testing.assert_allclose(lungs_only.probabilities, every_body.probabilities, atol=2e-3)
    assert lungs_only.predicted_class == every_body.predicted_class


@pytest.mark.parametrize("shape", [(78, 108, 108), (150, 360, 360), (5, 40, 300), (30, 47, 48)])
def test_window_cores_tile_the_volume_inside_their_windows(shape):
    preset = Preset(name="toy", spacing=None, window=(8, 48, 48), hu_range=(-1000.0, 400.0), mean=0.3)
    prepared = Volume(np.zeros(shape, np.int16), np.eye(4), {})
    every = win.sliding_window_centers(prepared, preset)
    cores = lm.window_cores(every, shape)
    covered = np.zeros(shape, np.int32)
    for c, (lo, hi) in cores.items():
        covered[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += 1
        start = np.asarray(c) - np.asarray(preset.window) // 2
        stop = start + np.asarray(preset.window)
        assert np.all(lo >= np.maximum(start, 0)) and np.all(hi <= np.minimum(stop, shape)), c  # inside the window
        assert np.all(hi > lo), c
    assert np.all(covered == 1)  # every voxel in exactly one core


def test_a_window_only_grazing_the_lungs_is_dropped_and_its_neighbour_kept():
    """Lungs that reach only the first few slices of the last slab of windows: those windows hold
    lung along their edge only, where the neighbours hold it better centred."""
    preset = toy_preset()
    ct = chest_and_abdomen()
    prepared = win.prepare_volume(ct, preset)
    every = win.sliding_window_centers(prepared, preset)
    core = lm.select_scan_windows(prepared, preset, every)
    extent = lm.select_scan_windows(prepared, preset, every, reach="extent")
    assert set(core.kept) < set(extent.kept)
    cores = lm.window_cores(every, prepared.shape)
    _, _, grown, strides = lm.body_and_lung_masks(prepared)
    for c in set(extent.kept) - set(core.kept):  # dropped: lung in the window, none in its core
        lo, hi = cores[c]
        assert not grown[tuple(slice(-(-int(a) // s), -(-int(b) // s)) for a, b, s in zip(lo, hi, strides))].any()
    lung_kji = np.argwhere(grown) * np.asarray(strides)
    for voxel in lung_kji[:: max(1, len(lung_kji) // 200)]:  # every lung voxel stays in a kept core
        owner = [c for c, (lo, hi) in cores.items() if np.all(voxel >= lo) and np.all(voxel < hi)]
        assert len(owner) == 1 and owner[0] in core.kept


def toy_preset() -> Preset:
    return Preset(name="toy", spacing=(4.0, 4.0, 4.0), window=(8, 16, 16), hu_range=(-1000.0, 400.0), mean=0.3)


def chest_and_abdomen(lungs: bool = True) -> Volume:
    """A body cylinder 200 mm across in a 400 mm field; lungs in its upper half only (when ``lungs``)."""
    k, j, i = 60, 100, 100
    jj, ii = np.meshgrid(np.arange(j) - j / 2, np.arange(i) - i / 2, indexing="ij")
    body = (jj / 25.0) ** 2 + (ii / 25.0) ** 2 < 1
    lung = ((jj / 15.0) ** 2 + ((np.abs(ii) - 11) / 8.0) ** 2) < 1
    arr = np.full((k, j, i), -1000, dtype=np.int16)
    arr[:, body] = 40
    if lungs:
        arr[k // 2 :, lung] = -850
    return Volume(arr, make_ijk_to_ras((4.0, 4.0, 4.0), (-200.0, -200.0, 0.0)), {"modality": "CT"})


def test_windows_in_air_or_far_from_the_lungs_are_dropped():
    preset = toy_preset()
    ct = chest_and_abdomen()
    prepared = win.prepare_volume(ct, preset)
    every = win.sliding_window_centers(prepared, preset)
    sel = lm.select_scan_windows(prepared, preset, every)
    assert sel.method == "lung mask" and not sel.warnings
    lungs_from = ct.shape[0] // 2 - int(np.ceil(lm.MARGIN_MM / 4.0))  # lungs start here, grown by the margin
    for c in every:
        start = np.asarray(c) - np.asarray(preset.window) // 2
        stop = start + np.asarray(preset.window)
        reaches_lung_slices = stop[0] > lungs_from
        in_plane_mm = [(s * 4.0 - 200.0, e * 4.0 - 200.0) for s, e in zip(start[1:], stop[1:])]
        near_body = all(lo < 100.0 + lm.MARGIN_MM and hi > -100.0 - lm.MARGIN_MM for lo, hi in in_plane_mm)
        if not reaches_lung_slices or not near_body:
            assert c in sel.dropped, c
    assert sel.kept and any(c for c in sel.kept)
    assert len(sel.dropped) >= len(every) // 2


def test_a_ct_without_lungs_falls_back_to_body_windows_with_a_warning():
    preset = toy_preset()
    ct = chest_and_abdomen(lungs=False)
    prepared = win.prepare_volume(ct, preset)
    every = win.sliding_window_centers(prepared, preset)
    sel = lm.select_scan_windows(prepared, preset, every)
    assert sel.method == "body" and sel.warnings and "no lungs" in sel.warnings[0]
    air_only = [c for c in every if not (win.cut_window(prepared, c, preset).array > win.air_value(preset) + 0.05).any()]
    assert set(air_only) <= set(sel.dropped) and sel.kept

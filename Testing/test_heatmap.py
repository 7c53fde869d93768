"""Heatmap assembly: per-window maps onto the CT grid in physical space, and the labelmap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MMCAFNetLib import heatmap as hm
from MMCAFNetLib.volume import LPS_TO_RAS, Volume, make_ijk_to_ras, read_volume, write_volume


def rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    a, b = [x for x in range(3) if x != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def oblique_directions() -> np.ndarray:
    return rotation(2, 20.0) @ rotation(0, 12.0)


def lps_flipped_directions() -> np.ndarray:
    """A grid stored the way DICOM writes it: I along -R (patient left), J along -A (posterior)."""
    return LPS_TO_RAS[:3, :3] @ np.eye(3)


GRIDS = {
    "axis-aligned": np.eye(3),
    "oblique": oblique_directions(),
    "lps-flipped": lps_flipped_directions(),
}


def peak_ras_of(array: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    k, j, i = np.unravel_index(int(np.argmax(array)), array.shape)
    return (ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_one_hot_window_lands_on_its_voxel(grid: str) -> None:
    """A window whose map is one at a single voxel peaks at that voxel's RAS point on the CT grid."""
    directions = GRIDS[grid]
    ct = Volume.from_geometry(np.zeros((40, 64, 64), np.float32), (0.8, 0.8, 1.5), (-25.0, 10.0, -30.0), directions)
    # A coarser window grid, axis-aligned with the CT, placed somewhere inside it.
    window_affine = make_ijk_to_ras((1.6, 1.6, 3.0), tuple(ct.ijk_to_ras_points([[10, 12, 5]])[0]), directions)
    window = np.zeros((8, 16, 16), np.float32)
    window[3, 9, 5] = 1.0
    out = hm.resample_to_grid(window, window_affine, ct.ijk_to_ras, ct.shape)
    expected = (window_affine @ np.array([5, 9, 3, 1.0]))[:3]
    got = peak_ras_of(out, ct.ijk_to_ras)
    assert np.linalg.norm(got - expected) <= 0.5 * np.linalg.norm(ct.spacing) + 1e-6
    assert out.max() > 0.3
    # Zero far from the window.
    assert out[-1, -1, -1] == 0.0 and out[0, 0, 0] == 0.0


@pytest.mark.parametrize("grid", ["oblique", "lps-flipped"])
def test_window_in_a_rotated_frame_is_resampled_in_physical_space(grid: str) -> None:
    """The window grid and the CT grid differ by a rotation (the general, non-separable path)."""
    directions = GRIDS[grid]
    origin = -directions @ np.array([23.5, 23.5, 14.5])  # the CT centred on RAS 0
    ct = Volume.from_geometry(np.zeros((30, 48, 48), np.float32), (1.0, 1.0, 1.0), tuple(origin), directions)
    window_affine = make_ijk_to_ras((2.0, 2.0, 2.0), (-10.0, -10.0, -8.0))  # axis-aligned RAS window
    window = np.zeros((8, 10, 10), np.float32)
    window[4, 5, 6] = 1.0
    out = hm.resample_to_grid(window, window_affine, ct.ijk_to_ras, ct.shape)
    expected = (window_affine @ np.array([6, 5, 4, 1.0]))[:3]
    assert np.linalg.norm(peak_ras_of(out, ct.ijk_to_ras) - expected) <= 1.0
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_canvas_combines_overlapping_windows_by_max_and_normalises() -> None:
    ref = make_ijk_to_ras((1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    canvas = hm.WindowCanvas((10, 20, 20), ref)
    a = np.full((4, 8, 8), 0.2, np.float32)
    b = np.full((4, 8, 8), 0.6, np.float32)
    shift = np.eye(4)
    shift[:3, 3] = [4, 4, 2]  # (i, j, k) whole-voxel offset
    canvas.add(a, ref)
    canvas.add(b, ref @ shift)
    # Overlap (k 2..3, j 4..7, i 4..7) keeps the larger value.
    assert canvas.values[3, 5, 5] == pytest.approx(0.6)
    assert canvas.values[0, 0, 0] == pytest.approx(0.2)
    norm = canvas.normalised()
    assert norm[0, 0, 0] == pytest.approx(0.0)  # minimum over evaluated voxels
    assert norm[3, 5, 5] == pytest.approx(1.0)
    assert norm[9, 19, 19] == 0.0 and not canvas.evaluated[9, 19, 19]  # never evaluated
    # A window hanging over the edge (negative start) is clipped, not wrapped.
    shift[:3, 3] = [-3, -3, -1]
    canvas.add(np.full((4, 8, 8), 0.9, np.float32), ref @ shift)
    assert canvas.values[0, 0, 0] == pytest.approx(0.9)
    assert canvas.values[3, 5, 5] == pytest.approx(0.6)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_heatmap_and_labelmap_have_the_input_geometry(grid: str, tmp_path) -> None:
    ct = Volume.from_geometry(
        np.full((24, 40, 36), -800, np.int16), (0.9, 0.7, 2.0), (12.0, -40.0, 100.0), GRIDS[grid], meta={"modality": "CT"}
    )
    prepared_affine = make_ijk_to_ras((1.4, 1.4, 3.0), tuple(ct.origin), GRIDS[grid])
    canvas = hm.WindowCanvas((16, 20, 18), prepared_affine)
    small = np.random.default_rng(0).random((2, 5, 5)).astype(np.float32)
    canvas.add(hm.upsample_map(small, (6, 10, 10)), prepared_affine)
    heat = hm.heatmap_volume(canvas, ct)
    labels = hm.labelmap_volume(heat, 4, 0.5)
    for vol, dtype in ((heat, np.float32), (labels, np.uint8)):
        assert vol.shape == ct.shape
        assert vol.array.dtype == dtype
        np.testing.assert_allclose(vol.spacing, ct.spacing, atol=1e-9)
        np.testing.assert_allclose(vol.origin, ct.origin, atol=1e-9)
        np.testing.assert_allclose(vol.directions, ct.directions, atol=1e-9)
        path = tmp_path / f"{grid}-{dtype.__name__}.nrrd"
        write_volume(vol, path)
        back = read_volume(path)
        assert back.shape == ct.shape
        np.testing.assert_allclose(back.ijk_to_ras, ct.ijk_to_ras, atol=1e-4)
    assert heat.array.min() >= 0.0 and heat.array.max() == pytest.approx(1.0, abs=1e-5)
    assert set(np.unique(labels.array)) <= {0, 4}
    np.testing.assert_array_equal(labels.array == 4, (heat.array >= 0.5) & (heat.array > 0))
    # The heatmap is zero outside the evaluated window (the far corner of the CT).
    assert heat.array[-1, -1, -1] == 0.0


def test_labelmap_refuses_a_label_that_does_not_fit_uint8() -> None:
    heat = Volume(np.ones((2, 2, 2), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="uint8"):
        hm.labelmap_volume(heat, 300, 0.5)


def test_attention_levels_are_averaged_on_the_finest_grid() -> None:
    fine = torch.zeros(2, 1, 4, 8, 8)
    fine[:, :, 1, 2, 3] = 1.0
    coarse = torch.full((2, 1, 2, 4, 4), 0.5)
    out = hm.combine_attention_levels([fine, coarse])
    assert out.shape == (2, 4, 8, 8)
    # A constant coarse level adds a constant; the fine level's peak survives at its place.
    assert tuple(np.unravel_index(int(out[0].argmax()), out[0].shape)) == (1, 2, 3)
    assert float(out[0, 0, 0, 0]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="attention"):
        hm.combine_attention_levels([])


def test_the_finest_attention_level_alone_is_the_finest_map() -> None:
    fine = torch.rand(2, 1, 4, 8, 8)
    coarse = torch.rand(2, 1, 2, 4, 4)
    out = hm.combine_attention_levels([fine, coarse], "finest")
    assert torch.equal(out, fine[:, 0])
    assert not torch.allclose(hm.combine_attention_levels([fine, coarse], "all"), out)
    with pytest.raises(ValueError, match="finest"):
        hm.combine_attention_levels([fine, coarse], "coarsest")


def test_gradcam_highlights_the_channel_that_raises_the_score() -> None:
    features = torch.zeros(1, 2, 2, 4, 4)
    features[0, 0, 1, 1, 1] = 3.0  # channel 0 active at one place
    features[0, 1, 0, 2, 2] = 3.0  # channel 1 active elsewhere
    gradients = torch.zeros_like(features)
    gradients[0, 0] = 1.0  # only channel 0 raises the class score
    gradients[0, 1] = -1.0
    cam = hm.gradcam_from_gradients(features, gradients)
    assert cam.shape == (1, 2, 4, 4)
    assert tuple(np.unravel_index(int(cam[0].argmax()), cam[0].shape)) == (1, 1, 1)
    assert float(cam[0, 0, 2, 2]) == 0.0  # negative evidence is clipped


def test_peak_ras_and_empty_map() -> None:
    vol = Volume.from_geometry(np.zeros((5, 6, 7), np.float32), (2.0, 2.0, 2.0), (1.0, 2.0, 3.0))
    assert hm.peak_ras(vol) is None
    vol.array[2, 3, 4] = 1.0
    np.testing.assert_allclose(hm.peak_ras(vol), [1.0 + 8.0, 2.0 + 6.0, 3.0 + 4.0])
    # a plateau (a coarse map upsampled: constant along the slices) peaks at its middle, not its edge
    vol.array[:] = 0.2
    vol.array[:, 1, 5] = 0.9
    np.testing.assert_allclose(hm.peak_ras(vol), [1.0 + 10.0, 2.0 + 2.0, 3.0 + 4.0])
    vol.array[0, 1, 5] = 0.9 * (1 + 1e-3)  # a real maximum still wins
    np.testing.assert_allclose(hm.peak_ras(vol), [1.0 + 10.0, 2.0 + 2.0, 3.0])


def _peak_by_the_rule(arr: np.ndarray):
    """The plateau rule on the whole array at once (what the slice-by-slice search must equal)."""
    top = float(arr.max())
    if top <= 0:
        return None
    plateau = np.argwhere(arr >= top * (1.0 - 1e-6))
    centre = plateau.mean(axis=0)
    return tuple(int(v) for v in plateau[int(np.argmin(((plateau - centre) ** 2).sum(axis=1)))])


@pytest.mark.parametrize("seed", range(6))
def test_peak_and_candidates_follow_their_rule(seed: int) -> None:
    """peak_ras visits only the slices that can hold the maximum and finds what the rule applied to
    the whole array finds, on maps with ties across slices. candidate_peaks, on a grid as coarse as
    its blocks (one voxel each), gives the peak, then the highest voxels at least as high as their
    26 neighbours, each outside the boxes around the places before (a map without ties)."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(3, 12)), int(rng.integers(4, 20)), int(rng.integers(4, 20)))
    arr = (rng.integers(0, 6, size=shape) / 5.0).astype(np.float32)  # few levels: many ties
    vol = Volume.from_geometry(arr, (3.0, 3.5, 4.0), (3.0, -4.0, 5.0))  # >= 3 mm: one voxel per block
    k, j, i = _peak_by_the_rule(arr)
    np.testing.assert_allclose(hm.peak_ras(vol), vol.ijk_to_ras_points([[i, j, k]])[0])

    arr = rng.random(shape).astype(np.float32)  # the candidates' order needs no ties
    vol = Volume(arr, vol.ijk_to_ras)
    k, j, i = _peak_by_the_rule(arr)
    padded = np.pad(arr, 1, constant_values=-1.0)
    neighbours = np.max([padded[1 + dk:1 + dk + shape[0], 1 + dj:1 + dj + shape[1], 1 + di:1 + di + shape[2]]
                         for dk in (-1, 0, 1) for dj in (-1, 0, 1) for di in (-1, 0, 1)
                         if (dk, dj, di) != (0, 0, 0)], axis=0)
    half = np.ceil(7.0 / np.array([4.0, 3.5, 3.0])).astype(int)  # separation 7 mm along k, j, i
    expected = [np.array((k, j, i))]
    tops = np.argwhere((arr >= neighbours) & (arr >= hm.CANDIDATE_MIN_RELATIVE * arr.max()))
    for kji in tops[np.argsort(-arr[tuple(tops.T)], kind="stable")]:
        if len(expected) < 4 and not any(np.all(np.abs(kji - e) <= half) for e in expected):
            expected.append(kji)
    found = hm.candidate_peaks(vol, count=4, separation_mm=7.0)
    assert len(found) == len(expected)
    for (ras, value), kji in zip(found, expected):
        assert value == pytest.approx(float(arr[tuple(kji)]))
        np.testing.assert_allclose(ras, vol.ijk_to_ras_points([kji[::-1]])[0])
    np.testing.assert_array_equal(vol.array, arr)  # the map is left as it was


def test_candidates_are_peaks_not_the_slopes_of_a_brighter_one() -> None:
    """One smooth blob is one place, however wide; a second, dimmer blob 40 mm away is the second."""
    k, j, i = np.indices((20, 80, 80)).astype(np.float32)
    one = np.exp(-(((k - 10) / 4) ** 2 + ((j - 40) / 12) ** 2 + ((i - 20) / 12) ** 2))
    vol = Volume.from_geometry(one.astype(np.float32), (1.0, 1.0, 2.0))  # spacing i, j, k
    found = hm.candidate_peaks(vol, count=3, separation_mm=20.0)
    assert len(found) == 1 and found[0][1] == pytest.approx(1.0)
    two = one + 0.5 * np.exp(-(((k - 10) / 4) ** 2 + ((j - 40) / 6) ** 2 + ((i - 60) / 6) ** 2))
    found = hm.candidate_peaks(Volume(two.astype(np.float32), vol.ijk_to_ras), count=3, separation_mm=20.0)
    assert len(found) == 2
    np.testing.assert_allclose(found[1][0], vol.ijk_to_ras_points([[60, 40, 10]])[0], atol=1.01)
    assert found[1][1] == pytest.approx(float(two[10, 40, 60]), abs=1e-6)
    faint = one + 0.15 * np.exp(-(((k - 10) / 4) ** 2 + ((j - 40) / 6) ** 2 + ((i - 60) / 6) ** 2))
    assert len(hm.candidate_peaks(Volume(faint.astype(np.float32), vol.ijk_to_ras))) == 1  # under a fifth


def test_full_size_ct_grid_is_filled() -> None:
    """Heatmap back onto a 512 x 512 x 300 CT grid from a preprocessed-grid canvas (its speed is
    bench W3's business, not a timed test's)."""
    ct_affine = make_ijk_to_ras((0.7, 0.7, 1.25), (-180.0, -180.0, -200.0))
    prep_affine = make_ijk_to_ras((1.0, 1.0, 2.5), (-180.0, -180.0, -200.0))
    canvas = np.full((150, 358, 358), 0.5, np.float32)
    out = hm.resample_to_grid(canvas, prep_affine, ct_affine, (300, 512, 512))
    assert out.shape == (300, 512, 512)
    assert float(out[150, 256, 256]) == pytest.approx(0.5)
    # A lesion-sized region fills only the CT voxels it covers (the rest stays exactly 0).
    small = np.zeros_like(canvas)
    small[60:72, 150:250, 150:250] = 1.0
    out = hm.resample_to_grid(small, prep_affine, ct_affine, (300, 512, 512))
    nz = np.argwhere(out > 0)
    assert len(nz) and (nz.min(0) > 0).all() and (nz.max(0) < np.array(out.shape) - 1).all()
    assert float(out.max()) == pytest.approx(1.0)


def test_grids_with_permuted_axes_take_the_separable_path_and_agree_with_the_general_one() -> None:
    """A sagittal acquisition against the canonical (axial) preprocessed grid: same result as the
    general trilinear path, and the same peak place."""
    rng = np.random.default_rng(2)
    src = np.zeros((12, 20, 16), np.float32)
    src[3:9, 5:15, 4:12] = rng.random((6, 10, 8)).astype(np.float32)
    src_affine = make_ijk_to_ras((2.0, 2.0, 3.0), (-15.0, -20.0, -18.0), -np.eye(3) * np.array([1, 1, -1]))
    # Destination: i along S, j along A, k along -R (columns permuted), finer spacing.
    directions = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    dst_affine = make_ijk_to_ras((1.0, 1.5, 1.2), (0.0, -60.0, -25.0), directions)
    shape = (40, 34, 50)
    fast = hm.resample_to_grid(src, src_affine, dst_affine, shape)
    m = np.linalg.solve(src_affine, dst_affine)
    slow = hm._general(src, m, shape)
    assert fast.max() > 0.1
    np.testing.assert_allclose(fast, slow, atol=1e-4)

"""Windows: preset grids, orientation, padding, geometry, lesion coverage, sampling, augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from MMCAFNetLib.preset import DEFAULT, PAPER, Preset
from MMCAFNetLib.synthetic import make_case
from MMCAFNetLib.volume import Volume
from MMCAFNetLib.windows import (
    AIR_HU,
    air_value,
    augment,
    box_ras_to_kji,
    canonical_orientation,
    cut_window,
    prepare_volume,
    ras_to_kji,
    sliding_window_centers,
    window_centers_for_box,
)

SMALL = Preset(name="small", spacing=(5.0, 4.0, 4.0), window=(6, 24, 24), hu_range=(-1000.0, 400.0), mean=0.3)


@pytest.fixture(scope="module")
def case():
    return make_case("G", seed=11, size=64, small_lesion_share=0.0)


@pytest.fixture(scope="module")
def prepared(case):
    return prepare_volume(case.volume, SMALL)


def test_prepare_spacing_preset_resamples_in_physical_space(case, prepared):
    v = case.volume
    before = v.array.copy()
    np.testing.assert_allclose(prepared.spacing, SMALL.spacing[::-1], atol=1e-6)
    assert prepared.array.dtype == np.float32
    np.testing.assert_array_equal(v.array, before)  # input untouched
    # the covered extent is the same to within one new voxel on every axis
    ext_in = np.array(v.shape[::-1]) * v.spacing
    ext_out = np.array(prepared.shape[::-1]) * prepared.spacing
    assert np.all(np.abs(ext_in - ext_out) <= prepared.spacing)
    # the outer corner of voxel (0, 0, 0) stays in place
    corner_in = v.ijk_to_ras_points([[-0.5, -0.5, -0.5]])[0]
    corner_out = prepared.ijk_to_ras_points([[-0.5, -0.5, -0.5]])[0]
    np.testing.assert_allclose(corner_in, corner_out, atol=1e-6)


def test_prepare_interpolates_in_physical_space():
    """Linear interpolation reproduces a linear ramp exactly: each prepared voxel holds the ramp's
    value at its own RAS position, so the grid geometry is right, not just the shape."""
    m = np.array([[-0.7, 0.0, 0.0, 120.0], [0.0, -0.8, 0.0, 90.0], [0.0, 0.0, 2.0, -300.0], [0, 0, 0, 1.0]])
    shape = (20, 30, 40)
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ras = np.stack([i, j, k, np.ones_like(i)], -1).astype(float) @ m.T
    ramp = lambda p: 2.0 * p[..., 0] - 1.5 * p[..., 1] + 3.0 * p[..., 2]  # noqa: E731
    v = Volume(ramp(ras).astype(np.float32), m)
    p = prepare_volume(v, SMALL)
    k2, j2, i2 = np.meshgrid(*(np.arange(n) for n in p.shape), indexing="ij")
    ras2 = np.stack([i2, j2, k2, np.ones_like(i2)], -1).astype(float) @ p.ijk_to_ras.T
    inside = np.all((v.ras_to_ijk_points(ras2[..., :3].reshape(-1, 3)) >= 0)
                    & (v.ras_to_ijk_points(ras2[..., :3].reshape(-1, 3)) <= np.array(shape[::-1]) - 1), axis=1)
    assert inside.sum() > 100
    np.testing.assert_allclose(p.array.reshape(-1)[inside], ramp(ras2).reshape(-1)[inside], atol=0.05)


def test_prepare_paper_preset_keeps_slices_and_resizes_the_slice(case):
    p = prepare_volume(case.volume, PAPER)
    assert p.shape == (case.volume.shape[0], 192, 192)
    np.testing.assert_allclose(p.spacing[2], case.volume.spacing[2])
    np.testing.assert_allclose(p.spacing[:2] * 192, case.volume.spacing[:2] * 64, rtol=1e-9)  # same field of view


def _flip_i(v: Volume) -> Volume:
    m = v.ijk_to_ras.copy()
    m[:3, 3] = m[:3, 3] + m[:3, 0] * (v.shape[2] - 1)
    m[:3, 0] = -m[:3, 0]
    return Volume(np.ascontiguousarray(v.array[:, :, ::-1]), m, dict(v.meta))


def _swap_ij(v: Volume) -> Volume:
    m = v.ijk_to_ras.copy()
    m[:3, [0, 1]] = m[:3, [1, 0]]
    return Volume(np.ascontiguousarray(v.array.transpose(0, 2, 1)), m, dict(v.meta))


def test_orientation_does_not_change_the_prepared_volume(case, prepared):
    for other in (_flip_i(case.volume), _swap_ij(_flip_i(case.volume))):
        assert not np.array_equal(other.array, case.volume.array)
        canon = canonical_orientation(other)
        np.testing.assert_array_equal(canon.array, case.volume.array)
        np.testing.assert_allclose(canon.ijk_to_ras, case.volume.ijk_to_ras, atol=1e-9)
        again = prepare_volume(other, SMALL)
        np.testing.assert_allclose(again.array, prepared.array, atol=1e-3)


def test_cut_window_shape_normalisation_and_padding(prepared):
    centre = tuple(s // 2 for s in prepared.shape)
    w = cut_window(prepared, centre, SMALL)
    assert w.array.shape == SMALL.window and w.array.dtype == np.float32
    assert w.array.min() >= -SMALL.mean - 1e-6 and w.array.max() <= 1 - SMALL.mean + 1e-6
    start = np.array(w.start_kji)
    d, h, wd = SMALL.window
    expected = SMALL.normalise(prepared.array[start[0] : start[0] + d, start[1] : start[1] + h, start[2] : start[2] + wd])
    np.testing.assert_allclose(w.array, expected, atol=1e-6)
    # at the corner of the volume: outside is air, inside is the volume
    corner = cut_window(prepared, (0, 0, 0), SMALL)
    assert corner.start_kji == (-(d // 2), -(h // 2), -(wd // 2))
    air = air_value(SMALL)
    assert np.all(corner.array[: d // 2] == np.float32(air))
    assert np.all(corner.array[:, : h // 2] == np.float32(air))
    inside = SMALL.normalise(prepared.array[: d - d // 2, : h - h // 2, : wd - wd // 2])
    np.testing.assert_allclose(corner.array[d // 2 :, h // 2 :, wd // 2 :], inside, atol=1e-6)
    # entirely outside: all air
    far = cut_window(prepared, (-100, -100, -100), SMALL)
    assert np.all(far.array == np.float32(air))
    with pytest.raises(ValueError, match="three finite"):
        cut_window(prepared, (1, 2), SMALL)


def test_window_geometry_maps_the_centre_to_the_requested_point(prepared):
    rng = np.random.default_rng(0)
    lo = prepared.ijk_to_ras_points([[0, 0, 0]])[0]
    hi = prepared.ijk_to_ras_points([np.array(prepared.shape[::-1]) - 1])[0]
    for _ in range(20):
        point = rng.uniform(np.minimum(lo, hi), np.maximum(lo, hi))
        w = cut_window(prepared, ras_to_kji(prepared, point), SMALL)
        # within half a voxel on each axis
        assert np.all(np.abs(np.array(w.center_ras) - point) <= prepared.spacing[[0, 1, 2]] / 2 + 1e-6)
        # the window grid and the prepared grid agree voxel for voxel
        a = w.ijk_to_ras @ np.array([3, 5, 2, 1.0])
        b = prepared.ijk_to_ras @ np.array([w.start_kji[2] + 3, w.start_kji[1] + 5, w.start_kji[0] + 2, 1.0])
        np.testing.assert_allclose(a, b, atol=1e-9)
        box_lo, box_hi = w.box_ras()
        assert np.all(np.array(box_lo) <= point) and np.all(point <= np.array(box_hi))


def _covered(center, size):
    start = np.array(center) - np.array(size) // 2
    return start, start + np.array(size) - 1


def test_windows_for_a_box_cover_the_whole_lesion(prepared):
    rng = np.random.default_rng(1)
    for _ in range(40):
        lo = rng.integers(0, 20, size=3)
        hi = lo + rng.integers(0, 40, size=3)
        centers = window_centers_for_box(prepared, lo, hi, SMALL)
        covered = np.zeros(tuple(hi - lo + 1), dtype=bool)
        for c in centers:
            s, e = _covered(c, SMALL.window)
            assert np.all(e >= lo) and np.all(s <= hi)  # every window touches the lesion
            a, b = np.maximum(s, lo) - lo, np.minimum(e, hi) - lo
            covered[a[0] : b[0] + 1, a[1] : b[1] + 1, a[2] : b[2] + 1] = True
        assert covered.all()
        per_axis_needed = np.ceil((hi - lo + 1) / np.array(SMALL.window))
        assert len(centers) == int(np.prod(per_axis_needed))
    with pytest.raises(ValueError, match="below box min"):
        window_centers_for_box(prepared, (5, 5, 5), (4, 5, 5), SMALL)


def test_small_lesion_gets_one_centred_window(prepared):
    (c,) = window_centers_for_box(prepared, (10, 10, 10), (11, 12, 13), SMALL)
    s, e = _covered(c, SMALL.window)
    # the lesion sits in the middle: margins on both sides differ by at most one voxel
    assert np.all(np.abs((np.array((10, 10, 10)) - s) - (e - np.array((11, 12, 13)))) <= 1)


def test_sliding_windows_tile_the_volume(prepared):
    centers = sliding_window_centers(prepared, SMALL, overlap=0.25)
    covered = np.zeros(prepared.shape, dtype=bool)
    for c in centers:
        s, e = _covered(c, SMALL.window)
        s, e = np.maximum(s, 0), np.minimum(e, np.array(prepared.shape) - 1)
        covered[s[0] : e[0] + 1, s[1] : e[1] + 1, s[2] : e[2] + 1] = True
    assert covered.all()
    fewer = sliding_window_centers(prepared, SMALL, overlap=0.0)
    assert len(fewer) < len(centers)
    with pytest.raises(ValueError):
        sliding_window_centers(prepared, SMALL, overlap=1.0)


def test_augment_keeps_shape_flips_and_rotates_with_air():
    rng = np.random.default_rng(3)
    air = air_value(DEFAULT)
    x = np.full((4, 32, 40), air, dtype=np.float32)
    x[:, 12:20, 4:10] = 0.5  # a bright block on the image's left
    flipped = augment(x, np.random.default_rng(0), DEFAULT, rotate_degrees=0, flip_probability=1.0)
    np.testing.assert_array_equal(flipped, x[:, :, ::-1])
    same = augment(x, np.random.default_rng(0), DEFAULT, rotate_degrees=0, flip_probability=0.0)
    np.testing.assert_array_equal(same, x)
    for _ in range(10):
        y = augment(x, rng, DEFAULT)
        assert y.shape == x.shape and y.dtype == np.float32
        assert np.isclose(y[:, 0, 0], air).all()  # corners stay air, rotation filled with air
        assert y.max() <= 0.5 + 1e-5 and y.min() >= air - 1e-5
    # deterministic for a given generator state
    np.testing.assert_array_equal(augment(x, np.random.default_rng(9), DEFAULT), augment(x, np.random.default_rng(9), DEFAULT))
    # a rotation keeps the mass of a centred disc
    yy, xx = np.mgrid[:32, :40]
    disc = np.where((yy - 15.5) ** 2 + (xx - 19.5) ** 2 < 36, 0.5, air).astype(np.float32)[None].repeat(2, 0)
    r = augment(disc, np.random.default_rng(5), DEFAULT, flip_probability=0.0)
    assert abs((r > 0).sum() - (disc > 0).sum()) <= 0.1 * (disc > 0).sum()
    with pytest.raises(ValueError, match=r"\[D, H, W\]"):
        augment(x[0], rng, DEFAULT)


def test_augment_zoom_scales_a_ball_and_mirroring_keeps_voxels():
    air = air_value(DEFAULT)
    zz, yy, xx = np.mgrid[:24, :40, :40]
    ball = np.where((zz - 11.5) ** 2 + (yy - 19.5) ** 2 + (xx - 19.5) ** 2 < 64, 0.5, air).astype(np.float32)
    for seed in range(6):
        factor = np.random.default_rng(seed).uniform(0.7, 1.3)  # the only draw with rotation and flip off
        z = augment(ball, np.random.default_rng(seed), DEFAULT, rotate_degrees=0, flip_probability=0.0,
                    scale_range=0.3)
        assert z.shape == ball.shape and np.isclose(z[0, 0, 0], air)
        # factor > 1 samples a larger region: the ball's volume shrinks by factor ** 3
        ratio = (z > (0.5 + air) / 2).sum() / (ball > 0).sum()
        assert ratio == pytest.approx(factor ** -3, rel=0.15), (seed, factor)
    x = np.random.default_rng(1).normal(size=(4, 6, 8)).astype(np.float32)
    seen = set()
    for seed in range(40):
        m = augment(x, np.random.default_rng(seed), DEFAULT, rotate_degrees=0, flip_probability=0.0,
                    mirror_all_axes=True)
        matches = [axes for axes in ((), (0,), (1,), (0, 1)) if np.array_equal(m, np.flip(x, axes) if axes else x)]
        assert len(matches) == 1  # an exact mirror: no interpolation
        seen.add(matches[0])
    assert len(seen) == 4  # head-foot and front-back, each on and off
    # the extras switched off draw nothing: a run without them keeps its draws
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    augment(x, rng_a, DEFAULT)
    augment(x, rng_b, DEFAULT, scale_range=0.0, mirror_all_axes=False)
    assert rng_a.random() == rng_b.random()
    with pytest.raises(ValueError, match="scale_range"):
        augment(x, np.random.default_rng(0), DEFAULT, scale_range=1.0)


def test_air_padding_value_is_preset_normalised_air():
    assert air_value(DEFAULT) == pytest.approx(float(DEFAULT.normalise(np.float32(AIR_HU))))
    assert air_value(PAPER) == pytest.approx((-1000 + 1124) / 1000 - PAPER.mean)


def test_lesion_box_in_the_prepared_grid(case, prepared):
    lo, hi = box_ras_to_kji(prepared, *case.lesion_box_ras)
    centre = ras_to_kji(prepared, case.lesion_center_ras)
    assert np.all(np.array(lo) <= centre) and np.all(np.array(centre) <= np.array(hi))
    # the tightest range of voxel centres that encloses the box: nothing of the lesion is cut
    (a, b) = case.lesion_box_ras
    corners = np.array([[x, y, z] for x in (a[0], b[0]) for y in (a[1], b[1]) for z in (a[2], b[2])])
    kji = prepared.ras_to_ijk_points(corners)[:, ::-1]
    assert np.all(np.array(lo) <= kji.min(axis=0) + 1e-6) and np.all(kji.max(axis=0) - 1e-6 <= np.array(hi))
    assert np.all(kji.min(axis=0) < np.array(lo) + 1) and np.all(np.array(hi) - 1 < kji.max(axis=0))



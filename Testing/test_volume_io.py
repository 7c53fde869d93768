"""NRRD / NIfTI / MetaImage round trips, bad images, resampling in physical space, CT plausibility."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import SimpleITK as sitk

from MMCAFNetLib.volume import (
    Volume,
    VolumeError,
    check_ct,
    read_volume,
    resample_to_grid,
    resample_to_spacing,
    write_volume,
)

SUFFIXES = [".nrrd", ".nii", ".nii.gz", ".mha"]


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


GEOMETRIES = {
    "identity": np.eye(3),
    "oblique": rotation(0.2, -0.35, 0.5),
    "lps_flip": np.diag([-1.0, -1.0, 1.0]),  # the axes of an LPS-ordered array seen in RAS
    "negative_k": np.diag([1.0, 1.0, -1.0]) @ rotation(0.0, 0.0, 0.1),  # left-handed grid
}


def random_volume(directions: np.ndarray, dtype=np.int16, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1500, size=(7, 9, 11)).astype(dtype)
    return Volume.from_geometry(array, (0.7, 0.85, 2.5), (12.5, -30.25, 101.0), directions, {"modality": "CT"})


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_write_then_read_keeps_geometry_and_values(tmp_path, suffix, geometry):
    volume = random_volume(GEOMETRIES[geometry])
    path = tmp_path / f"ct{suffix}"
    write_volume(volume, path)
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.array.dtype == volume.array.dtype
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-5)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-4)
    np.testing.assert_allclose(back.directions, volume.directions, atol=1e-5)
    assert back.meta["source"] == str(path)
    assert back.meta["warnings"] == []
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind


def test_the_ras_voxel_position_agrees_with_simpleitk_in_lps(tmp_path):
    """A voxel's physical point from ITK (LPS) is the library's RAS point with L and P negated."""
    volume = random_volume(GEOMETRIES["oblique"])
    write_volume(volume, tmp_path / "ct.nrrd")
    image = sitk.ReadImage(str(tmp_path / "ct.nrrd"))
    ijk = (3, 5, 2)
    lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
    ras = volume.ijk_to_ras_points(np.array([ijk]))[0]
    np.testing.assert_allclose(ras, lps * np.array([-1, -1, 1]), atol=1e-4)


def test_float_and_label_dtypes_round_trip(tmp_path):
    heat = random_volume(np.eye(3)).with_array(np.linspace(0, 1, 7 * 9 * 11, dtype=np.float32).reshape(7, 9, 11))
    labels = heat.with_array((heat.array > 0.5).astype(np.uint8) * 3)
    write_volume(heat, tmp_path / "heat.nrrd")
    write_volume(labels, tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(read_volume(tmp_path / "heat.nrrd").array, heat.array)
    back = read_volume(tmp_path / "labels.nii.gz")
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, labels.array)


def test_sheared_grid_round_trips_in_nrrd_and_is_refused_by_nifti(tmp_path):
    directions = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.2], [0.0, 0.0, 1.0]])
    directions /= np.linalg.norm(directions, axis=0)
    volume = random_volume(directions)
    write_volume(volume, tmp_path / "tilt.nrrd")
    np.testing.assert_allclose(read_volume(tmp_path / "tilt.nrrd").ijk_to_ras, volume.ijk_to_ras, atol=1e-5)
    with pytest.raises(VolumeError, match="sheared"):
        write_volume(volume, tmp_path / "tilt.nii.gz")
    assert not (tmp_path / "tilt.nii.gz").exists()


def test_write_refuses_unknown_formats_and_missing_folders(tmp_path):
    volume = random_volume(np.eye(3))
    with pytest.raises(VolumeError, match=r"\.mha"):
        write_volume(volume, tmp_path / "ct.mhd")
    with pytest.raises(VolumeError):
        write_volume(volume, tmp_path / "ct.png")
    with pytest.raises(FileNotFoundError):
        write_volume(volume, tmp_path / "missing" / "ct.nrrd")


def test_overwriting_replaces_the_file(tmp_path):
    path = tmp_path / "ct.mha"
    write_volume(random_volume(np.eye(3), seed=1), path)
    second = random_volume(np.eye(3), seed=2)
    write_volume(second, path)
    np.testing.assert_array_equal(read_volume(path).array, second.array)


def test_metaimage_header_with_raw_file_reads(tmp_path):
    volume = random_volume(GEOMETRIES["oblique"])
    sitk.WriteImage(sitk.ReadImage(str(_written(volume, tmp_path / "ct.nrrd"))), str(tmp_path / "ct.mhd"))
    back = read_volume(tmp_path / "ct.mhd")
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.ijk_to_ras, volume.ijk_to_ras, atol=1e-5)


def _written(volume: Volume, path):
    write_volume(volume, path)
    return path


# ---------------------------------------------------------------------------------------------
# images that are not one 3D scalar volume


def test_2d_image_is_refused(tmp_path):
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(tmp_path / "slice.nrrd"))
    with pytest.raises(VolumeError, match="2D"):
        read_volume(tmp_path / "slice.nrrd")


def test_4d_image_is_refused_but_a_single_time_point_loads(tmp_path):
    sitk.WriteImage(sitk.Image([8, 8, 4, 3], sitk.sitkInt16), str(tmp_path / "series.nii.gz"))
    with pytest.raises(VolumeError, match="4D"):
        read_volume(tmp_path / "series.nii.gz")
    sitk.WriteImage(sitk.Image([8, 8, 4, 1], sitk.sitkInt16), str(tmp_path / "one.nrrd"))
    assert read_volume(tmp_path / "one.nrrd").shape == (4, 8, 8)


def test_colour_image_is_refused(tmp_path):
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.nrrd"))
    with pytest.raises(VolumeError, match="components"):
        read_volume(tmp_path / "rgb.nrrd")


def test_truncated_image_file_gives_a_clear_error(tmp_path):
    path = _written(random_volume(np.eye(3)), tmp_path / "ct.nrrd")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="cannot read"):
        read_volume(path)


# ---------------------------------------------------------------------------------------------
# resampling


def cube_volume(directions: np.ndarray, spacing=(0.8, 0.9, 2.5)) -> Volume:
    labels = np.zeros((20, 40, 36), dtype=np.uint8)
    labels[6:13, 11:27, 9:22] = 1
    return Volume.from_geometry(labels, spacing, (-20.0, 35.0, -110.0), directions)


def centroid_ras(volume: Volume, threshold: float = 0.5) -> np.ndarray:
    kji = np.argwhere(volume.array > threshold).astype(np.float64)
    return volume.ijk_to_ras_points(kji[:, ::-1]).mean(axis=0)


def weighted_centroid_ras(volume: Volume) -> np.ndarray:
    kji = np.indices(volume.shape).reshape(3, -1).T
    weights = np.clip(volume.array.reshape(-1).astype(np.float64), 0, None)
    return (volume.ijk_to_ras_points(kji[:, ::-1]) * weights[:, None]).sum(axis=0) / weights.sum()


def shift_in_voxels(a_ras: np.ndarray, b_ras: np.ndarray, grid: Volume) -> np.ndarray:
    """|a - b| along each axis of ``grid``, in voxels of that grid."""
    return np.abs(np.linalg.solve(grid.ijk_to_ras[:3, :3], a_ras - b_ras))


@pytest.mark.parametrize("geometry", ["identity", "oblique", "negative_k"])
@pytest.mark.parametrize("interpolator", ["nearest", "linear"])
def test_resampling_a_labelled_cube_keeps_its_physical_centroid(geometry, interpolator):
    volume = cube_volume(GEOMETRIES[geometry])
    target_spacing = (1.3, 0.6, 1.1)
    resampled = resample_to_spacing(volume, target_spacing, interpolator=interpolator, default=0)
    assert resampled.array.dtype == (np.uint8 if interpolator == "nearest" else np.float32)
    np.testing.assert_allclose(resampled.spacing, target_spacing)
    np.testing.assert_allclose(resampled.directions, volume.directions, atol=1e-9)
    # the labelled region moves by less than one voxel along every axis (half a voxel of quantisation)
    assert np.all(shift_in_voxels(centroid_ras(resampled), centroid_ras(volume), resampled) < 1.0)
    if interpolator == "linear":  # the intensity-weighted centroid barely moves at all
        assert np.all(shift_in_voxels(weighted_centroid_ras(resampled), weighted_centroid_ras(volume), resampled) < 0.1)
    extent_before = np.array(volume.shape[::-1]) * volume.spacing
    extent_after = np.array(resampled.shape[::-1]) * resampled.spacing
    assert np.all(np.abs(extent_after - extent_before) <= resampled.spacing / 2 + 1e-9)


def test_resample_to_grid_interpolates_a_linear_field_exactly():
    """A linear function of RAS position is reproduced by linear interpolation on any inner grid."""
    source_geometry = Volume.from_geometry(np.zeros((16, 18, 20), np.float32), (1.0, 1.2, 2.0), (5.0, -3.0, 8.0), GEOMETRIES["oblique"])
    kji = np.indices(source_geometry.shape).reshape(3, -1).T
    ras = source_geometry.ijk_to_ras_points(kji[:, ::-1])
    field = lambda p: 3.0 * p[:, 0] - 2.0 * p[:, 1] + 0.5 * p[:, 2] + 7.0  # noqa: E731
    source = source_geometry.with_array(field(ras).reshape(source_geometry.shape).astype(np.float32))
    centre = source.ijk_to_ras_points(np.array([[9.5, 8.5, 7.5]]))[0]
    target_dirs = rotation(0.4, 0.1, -0.3)
    target = Volume.from_geometry(np.zeros((5, 6, 7), np.uint8), (0.9, 0.9, 0.9), centre - target_dirs @ np.array([3, 2.5, 2]) * 0.9, target_dirs)
    out = resample_to_grid(source, target.ijk_to_ras, target.shape, "linear", default=-5000.0)
    assert out.same_geometry(target)
    kji_t = np.indices(target.shape).reshape(3, -1).T
    expected = field(target.ijk_to_ras_points(kji_t[:, ::-1])).reshape(target.shape)
    np.testing.assert_allclose(out.array, expected, atol=1e-2)


def test_resample_outside_the_source_gets_the_default():
    volume = cube_volume(np.eye(3))
    far = volume.ijk_to_ras.copy()
    far[:3, 3] += 1000.0
    assert np.all(resample_to_grid(volume, far, (3, 3, 3), "nearest", default=7).array == 7)
    assert np.all(resample_to_spacing(volume.with_array(volume.array.astype(np.float32)), (0.5, 0.5, 0.5)).array >= -1000)


def test_resample_on_the_same_grid_is_the_identity():
    volume = random_volume(GEOMETRIES["oblique"])
    same = resample_to_grid(volume, volume.ijk_to_ras, volume.shape, "nearest")
    np.testing.assert_array_equal(same.array, volume.array)
    assert same.meta == volume.meta


def test_resample_rejects_bad_arguments():
    volume = random_volume(np.eye(3))
    with pytest.raises(VolumeError, match="interpolator"):
        resample_to_spacing(volume, (1, 1, 1), interpolator="cubic")
    with pytest.raises(VolumeError, match="spacing"):
        resample_to_spacing(volume, (1, 0, 1))
    with pytest.raises(VolumeError, match="shape"):
        resample_to_grid(volume, np.eye(4), (0, 2, 2))


@pytest.mark.slow
def test_resampling_a_full_size_ct_takes_seconds():
    volume = Volume.from_geometry(np.zeros((300, 512, 512), np.int16), (0.7, 0.7, 1.25))
    start = time.perf_counter()
    out = resample_to_spacing(volume, (1.0, 1.0, 1.0))
    seconds = time.perf_counter() - start
    print(f"resample 300x512x512 (0.7x0.7x1.25 mm) to 1 mm, linear: {seconds:.2f} s, shape {out.shape}")
    assert out.shape == (375, 358, 358)
    assert seconds < 30.0


# ---------------------------------------------------------------------------------------------
# plausibility


@pytest.mark.parametrize("suffix", [".nrrd", ".nii", ".nii.gz", ".mha"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])
def test_nan_and_infinite_voxels_are_refused_by_the_reader_of_every_format(tmp_path, suffix, bad):
    """No reader hands NaN or infinity on (1e300 in a float64 file becomes inf in float32)."""
    array = np.full((4, 8, 8), -1000.0, dtype=np.float64)
    array[1, 2, 3] = bad
    array[2] = 40.0
    path = tmp_path / f"bad{suffix}"
    write_volume(Volume.from_geometry(array, (1, 1, 1)), path)
    with pytest.raises(VolumeError, match=r"1 of 256 voxel\(s\) are not numbers") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_nan_voxels_in_memory_are_flagged_by_check_ct():
    array = np.full((4, 8, 8), -1000.0, dtype=np.float32)
    array[1, 2, 3] = np.nan
    array[2] = 40.0
    warnings = check_ct(Volume.from_geometry(array, (1, 1, 1)))
    assert any("1 voxel" in w and "NaN" in w for w in warnings)


def test_all_nan_is_refused():
    with pytest.raises(VolumeError, match="NaN"):
        check_ct(Volume.from_geometry(np.full((3, 4, 4), np.nan, np.float32), (1, 1, 1)))


def test_stored_values_without_rescale_are_flagged_and_a_plain_ct_is_not():
    rng = np.random.default_rng(0)
    ct = Volume.from_geometry(rng.integers(-1024, 1500, (6, 8, 8)).astype(np.int16), (0.7, 0.7, 2.5), meta={"modality": "CT"})
    assert check_ct(ct) == []
    raw = ct.with_array((ct.array + 1024).astype(np.int16))
    assert any("rescale" in w for w in check_ct(raw))


def test_the_dicom_reader_and_the_volume_module_do_not_import_each_other():
    """volume reads DICOM through dicom_series; dicom_series and the Volume type (grid) must not import
    volume back (an import cycle makes import order matter and hides what depends on what)."""
    import ast
    from pathlib import Path

    from MMCAFNetLib import dicom_series, grid

    for module in (dicom_series, grid):
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        assert not {"MMCAFNetLib.volume", "MMCAFNetLib.volume.Volume"} & imported, (module.__name__, imported)
        assert not any(i.startswith("MMCAFNetLib.volume") for i in imported), (module.__name__, imported)
    from MMCAFNetLib import volume

    assert volume.Volume is grid.Volume and volume.VolumeError is grid.VolumeError  # the public names stay

"""heatmap.nrrd / labelmap.nrrd: compact files read back exactly by our loader, SimpleITK and Slicer's MRML."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MMCAFNetLib.inference import read_heatmap
from MMCAFNetLib.inference.heatmap_file import QUANTISATION_ERROR, SCALE, write_heatmap, write_labelmap
from MMCAFNetLib.volume import Volume, lps_from_ras, make_ijk_to_ras, read_volume


def oblique_grid() -> np.ndarray:
    a, b = np.radians(20.0), np.radians(-12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return make_ijk_to_ras((0.7, 0.8, 2.5), (-120.0, 35.5, -80.25), rz @ rx @ np.diag([-1.0, -1.0, 1.0]))


def blob_heatmap(shape=(30, 64, 72), seed: int = 0) -> Volume:
    """A smooth 0..1 map that is non-zero only inside a block away from the grid's edges."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    centre = np.array([14.0, 30.0, 41.0])
    d2 = ((k - centre[0]) / 6) ** 2 + ((j - centre[1]) / 12) ** 2 + ((i - centre[2]) / 10) ** 2
    values = np.exp(-d2).astype(np.float32) * np.float32(rng.uniform(0.8, 1.0))
    values[d2 > 4.0] = 0.0
    values /= values.max()
    return Volume(values, oblique_grid(), {"kind": "heatmap", "method": "attention", "predicted_class": "G"})


def test_heatmap_reads_back_within_the_quantisation_step_on_the_same_lattice(tmp_path):
    heat = blob_heatmap()
    path = tmp_path / "heatmap.nrrd"
    lo, hi = write_heatmap(heat, path)
    nz = np.argwhere(heat.array > QUANTISATION_ERROR)
    np.testing.assert_array_equal(lo, nz.min(axis=0))
    np.testing.assert_array_equal(hi, nz.max(axis=0) + 1)
    assert np.all(hi - lo < np.array(heat.shape))  # cropped, not the whole grid

    block = read_heatmap(path)
    assert block.array.dtype == np.float32 and block.shape == tuple(int(v) for v in hi - lo)
    assert block.meta["block_start_ijk"] == tuple(int(v) for v in lo[::-1])
    assert block.meta["reference_sizes"] == tuple(heat.shape[::-1])
    assert block.meta["method"] == "attention" and block.meta["predicted_class"] == "G"
    # the block's voxel (0, 0, 0) is the CT voxel lo: same spacing and directions, shifted origin
    np.testing.assert_allclose(block.ijk_to_ras[:3, :3], heat.ijk_to_ras[:3, :3], atol=1e-9)
    np.testing.assert_allclose(block.ijk_to_ras_points([[0, 0, 0]])[0],
                               heat.ijk_to_ras_points([lo[::-1]])[0], atol=1e-6)

    full = read_heatmap(path, full_grid=True)
    assert full.shape == heat.shape
    np.testing.assert_allclose(full.ijk_to_ras, heat.ijk_to_ras, atol=1e-6)
    assert float(np.abs(full.array - heat.array).max()) <= QUANTISATION_ERROR + 1e-6
    assert full.array.max() == pytest.approx(1.0) and full.array.min() == 0.0
    # far smaller than float32 on the whole grid
    assert path.stat().st_size < heat.array.nbytes / 20


def test_simpleitk_reads_the_compact_heatmap_geometry_and_values(tmp_path):
    heat = blob_heatmap(seed=3)
    path = tmp_path / "heatmap.nrrd"
    lo, hi = write_heatmap(heat, path)
    image = sitk.ReadImage(str(path))
    assert image.GetPixelID() == sitk.sitkUInt8
    assert image.GetSize() == tuple(int(v) for v in (hi - lo)[::-1])
    expected = lps_from_ras(heat.ijk_to_ras)
    spacing = np.linalg.norm(expected[:3, :3], axis=0)
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-9)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), expected[:3, :3] / spacing, atol=1e-9)
    origin_lps = expected[:3, :3] @ lo[::-1].astype(float) + expected[:3, 3]
    np.testing.assert_allclose(image.GetOrigin(), origin_lps, atol=1e-6)
    stored = sitk.GetArrayFromImage(image)
    block = heat.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    assert float(np.abs(stored * SCALE - block).max()) <= QUANTISATION_ERROR + 1e-6
    assert float(image.GetMetaData("MMCAFNet_heatmap_scale")) == pytest.approx(SCALE)


def test_an_all_zero_heatmap_and_a_plain_float_file_read_back(tmp_path):
    heat = blob_heatmap()
    zero = heat.with_array(np.zeros_like(heat.array))
    write_heatmap(zero, tmp_path / "zero.nrrd")
    back = read_heatmap(tmp_path / "zero.nrrd", full_grid=True)
    assert back.shape == heat.shape and not back.array.any()
    np.testing.assert_allclose(back.ijk_to_ras, heat.ijk_to_ras, atol=1e-6)
    # a float heatmap as older versions wrote it (SimpleITK, whole grid) reads back unchanged
    from MMCAFNetLib.volume import write_volume

    write_volume(heat, tmp_path / "float.nrrd")
    old = read_heatmap(tmp_path / "float.nrrd")
    np.testing.assert_array_equal(old.array, heat.array)
    assert old.meta["format"] == "float"
    with pytest.raises(FileNotFoundError):
        read_heatmap(tmp_path / "missing.nrrd")


def test_labelmap_is_compressed_on_the_whole_grid(tmp_path):
    heat = blob_heatmap()
    labels = heat.with_array(((heat.array >= 0.5) * 4).astype(np.uint8))
    path = tmp_path / "labelmap.nrrd"
    write_labelmap(labels, path)
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, labels.array)
    np.testing.assert_allclose(back.ijk_to_ras, labels.ijk_to_ras, atol=1e-6)
    assert path.stat().st_size < labels.array.nbytes / 10
    assert b"encoding: gzip" in path.read_bytes()[:1000]


@pytest.mark.scene
def test_slicer_loads_the_compact_heatmap_as_a_volume_on_the_ct_lattice(mrml_scene, tmp_path):
    import slicer

    from MMCAFNetLib import scene as mscene

    heat = blob_heatmap(seed=5)
    path = tmp_path / "heatmap.nrrd"
    lo, hi = write_heatmap(heat, path)
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "heatmap")
    reader = slicer.vtkMRMLVolumeArchetypeStorageNode()
    mrml_scene.AddNode(reader)
    reader.SetFileName(str(path))
    assert reader.ReadData(node)
    ours = read_heatmap(path)
    np.testing.assert_allclose(mscene.node_ijk_to_ras(node), ours.ijk_to_ras, atol=1e-5)
    stored = slicer.util.arrayFromVolume(node)
    assert stored.shape == tuple(int(v) for v in hi - lo)
    np.testing.assert_allclose(stored * SCALE, ours.array, atol=1e-6)
    # every voxel lands where it lies on the CT grid: block voxel (i, j, k) = CT voxel lo + (i, j, k)
    ijk = np.array([[3, 5, 2], [0, 0, 0], [int(hi[2] - lo[2]) - 1, 1, 1]], dtype=float)
    np.testing.assert_allclose(ours.ijk_to_ras_points(ijk), heat.ijk_to_ras_points(ijk + lo[::-1]), atol=1e-5)

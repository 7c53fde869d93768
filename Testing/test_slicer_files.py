"""segmentation.seg.nrrd and the colour table beside labelmap.nrrd, loaded by Slicer's own storage nodes
(slicer-core's real MRML scene): the segment's name and colour, and its voxels on the labelmap's grid."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")

from test_scene import make_result, rotation  # noqa: E402

from MMCAFNetLib.inference import OUTPUT_FILES, write_outputs  # noqa: E402
from MMCAFNetLib.inference.slicer_files import COLOR_TABLE_FILE, SEGMENTATION_NRRD  # noqa: E402
from MMCAFNetLib.results import CLASS_LABELS  # noqa: E402
from MMCAFNetLib.scene import node_ijk_to_ras  # noqa: E402
from MMCAFNetLib.volume import Volume, make_ijk_to_ras, read_volume  # noqa: E402

pytestmark = pytest.mark.scene


def oblique_ct(shape=(10, 36, 44)) -> Volume:
    rng = np.random.default_rng(3)
    ijk_to_ras = make_ijk_to_ras((0.7, 0.9, 2.5), (14.0, -31.0, 42.0), rotation(25, 15))
    return Volume(rng.integers(-1000, 400, size=shape).astype(np.int16), ijk_to_ras, {"source": "test"})


def read_segmentation(scene, path):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1, f"Slicer could not read {path}"
    return node


def matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


@pytest.mark.parametrize("letter", ["B", "G"])
def test_segmentation_file_loads_named_coloured_and_on_the_labelmap_grid(mrml_scene, tmp_path, letter) -> None:
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    ct = oblique_ct()
    result = make_result(ct, letter=letter)
    write_outputs(result, ct, tmp_path / "out", preview=False)
    assert set(OUTPUT_FILES) - {"preview.png"} == {p.name for p in (tmp_path / "out").iterdir()}
    labelmap = read_volume(tmp_path / "out" / "labelmap.nrrd")

    node = read_segmentation(mrml_scene, tmp_path / "out" / SEGMENTATION_NRRD)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetNthSegment(0)
    value, label, rgb = CLASS_LABELS[letter]
    assert segment.GetName() == label == result.predicted_label
    assert segmentation.GetNthSegmentID(0) == letter
    table_rgb = next(rgba for v, _, rgba in read_color_table(mrml_scene, tmp_path / "out" / COLOR_TABLE_FILE) if v == value)
    np.testing.assert_allclose(segment.GetColor(), np.array(table_rgb[:3]) / 255.0, atol=1e-6)
    np.testing.assert_allclose(segment.GetColor(), rgb, atol=0.003)

    # The voxels Slicer reads lie on the labelmap's grid: same IJK->RAS, same voxels where it keeps them.
    image = segment.GetRepresentation("Binary labelmap")
    to_world = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(to_world)
    np.testing.assert_allclose(matrix(to_world), labelmap.ijk_to_ras, atol=1e-4)
    i0, i1, j0, j1, k0, k1 = image.GetExtent()
    voxels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
    expected = labelmap.array == value
    np.testing.assert_array_equal(voxels == value, expected[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1])
    assert expected.sum() == (voxels == value).sum() > 0  # nothing outside what Slicer kept

    # Slicer's reference geometry (what a new segment would be painted on) is the labelmap's grid too.
    reference = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.util.updateVolumeFromArray(reference, labelmap.array)
    reference.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(labelmap.ijk_to_ras))
    exported = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    logic = slicer.modules.segmentations.logic()
    assert logic.ExportAllSegmentsToLabelmapNode(node, exported, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    np.testing.assert_allclose(node_ijk_to_ras(exported), labelmap.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(exported) != 0, expected)


def read_color_table(scene, path):
    node = slicer.vtkMRMLColorTableNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLColorTableStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1, f"Slicer could not read {path}"
    entries = []
    for value in range(node.GetNumberOfColors()):
        rgba = [0.0] * 4
        node.GetColor(value, rgba)
        entries.append((value, node.GetColorName(value), tuple(round(255 * c) for c in rgba)))
    return entries


def test_colour_table_names_every_class_label_value(mrml_scene, tmp_path) -> None:
    ct = oblique_ct()
    write_outputs(make_result(ct, letter="E"), ct, tmp_path / "out", preview=False)
    entries = {v: (name, rgba) for v, name, rgba in read_color_table(mrml_scene, tmp_path / "out" / COLOR_TABLE_FILE)}
    for value, label, rgb in CLASS_LABELS.values():
        name, rgba = entries[value]
        assert name.replace("_", " ") == label
        np.testing.assert_allclose(np.array(rgba[:3]) / 255.0, rgb, atol=0.003)


def test_an_empty_region_still_gives_a_named_segment(mrml_scene, tmp_path) -> None:
    ct = oblique_ct()
    result = make_result(ct, letter="A", threshold=1.01)  # nothing reaches the threshold
    assert not result.labelmap.array.any()
    write_outputs(result, ct, tmp_path / "out", preview=False)
    node = read_segmentation(mrml_scene, tmp_path / "out" / SEGMENTATION_NRRD)
    assert node.GetSegmentation().GetNumberOfSegments() == 1
    assert node.GetSegmentation().GetNthSegment(0).GetName() == "Adenocarcinoma"

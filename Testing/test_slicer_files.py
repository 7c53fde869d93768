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


def test_candidates_file_loads_as_locked_numbered_points_at_the_heatmap_places(mrml_scene, tmp_path) -> None:
    """candidates.mrk.json, read by Slicer's own markups JSON storage node, gives the points of
    prediction.json's heatmap_candidates (RAS; the file is LPS), labelled by rank and locked."""
    import json

    from MMCAFNetLib.inference.slicer_files import CANDIDATES_FILE

    ct = oblique_ct(shape=(12, 72, 72))
    result = make_result(ct, letter="A")
    assert len(result.candidates) >= 2
    write_outputs(result, ct, tmp_path / "out", preview=False)
    listed = json.loads((tmp_path / "out" / "prediction.json").read_text())["heatmap_candidates"]
    assert [c["rank"] for c in listed] == list(range(1, len(result.candidates) + 1))

    node = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    mrml_scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "out" / CANDIDATES_FILE))
    assert storage.ReadData(node) == 1, "Slicer could not read candidates.mrk.json"
    assert node.GetNumberOfControlPoints() == len(listed)
    assert node.GetLocked()
    for n, (entry, candidate) in enumerate(zip(listed, result.candidates)):
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(n, position)
        np.testing.assert_allclose(position, candidate.ras, atol=1e-6)
        np.testing.assert_allclose(entry["ras"], candidate.ras, atol=1e-3)
        assert node.GetNthControlPointLabel(n) == str(n + 1)
        assert f"{candidate.value:.2f}" in node.GetNthControlPointDescription(n)
        assert node.GetNthControlPointLocked(n)


def test_results_folder_gives_back_the_candidates_and_refuses_broken_ones(tmp_path) -> None:
    import json

    from MMCAFNetLib.inference.result_folder import ResultFolderError, read_result_folder

    ct = oblique_ct(shape=(12, 72, 72))
    result = make_result(ct, letter="G")
    write_outputs(result, ct, tmp_path / "out", preview=False)
    back = read_result_folder(tmp_path / "out").result
    assert len(back.candidates) == len(result.candidates)
    for got, want in zip(back.candidates, result.candidates):
        np.testing.assert_allclose(got.ras, want.ras, atol=1e-3)
        assert abs(got.value - want.value) < 1e-5
    path = tmp_path / "out" / "prediction.json"
    data = json.loads(path.read_text())
    data["heatmap_candidates"][0]["ras"] = [1.0, 2.0]
    path.write_text(json.dumps(data))
    with pytest.raises(ResultFolderError, match="3 finite RAS coordinates"):
        read_result_folder(tmp_path / "out")

"""MMCAFNetLib.scene on Slicer's real MRML scene (slicer-core): inputs, outputs, re-runs, files."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")

from MMCAFNetLib import scene as mscene  # noqa: E402
from MMCAFNetLib.heatmap import candidate_peaks  # noqa: E402
from MMCAFNetLib.results import CLASS_LABELS, Candidate, Classification  # noqa: E402
from MMCAFNetLib.volume import Volume, make_ijk_to_ras  # noqa: E402

pytestmark = pytest.mark.scene


def rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def add_ct(scene, oblique: bool = False, shape=(12, 40, 48), seed: int = 0, name: str = "CT"):
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 400, size=shape).astype(np.int16)
    directions = rotation(25, 15) if oblique else np.diag([-1.0, -1.0, 1.0])
    ijk_to_ras = make_ijk_to_ras((0.8, 0.9, 2.5), (12.0, -30.0, 40.0), directions)
    node = slicer.util.addVolumeFromArray(array, ijk_to_ras, name)
    return node


def node_hash(node) -> str:
    return hashlib.sha256(np.ascontiguousarray(slicer.util.arrayFromVolume(node)).tobytes()).hexdigest()


def make_result(volume: Volume, letter: str = "B", threshold: float = 0.5, seed: int = 1) -> Classification:
    """A real Classification on the CT's grid: a Gaussian attention blob and its thresholded region."""
    rng = np.random.default_rng(seed)
    names = sorted(CLASS_LABELS)
    logits = rng.normal(size=len(names))
    index = names.index(letter)
    logits[index] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum()
    k, j, i = np.indices(volume.shape)
    centre = np.array(volume.shape) / 2 + rng.uniform(-2, 2, size=3)
    d2 = ((k - centre[0]) / 3) ** 2 + ((j - centre[1]) / 8) ** 2 + ((i - centre[2]) / 8) ** 2
    heat = np.exp(-d2).astype(np.float32)
    heat += 0.6 * np.exp(-(((k - centre[0]) / 2) ** 2 + ((j - 4) / 3) ** 2 + ((i - 5) / 3) ** 2)).astype(np.float32)
    label_value = CLASS_LABELS[letter][0]
    labels = np.where(heat >= threshold, label_value, 0).astype(np.uint8)
    return Classification(
        class_names=names,
        class_labels=[CLASS_LABELS[n][1] for n in names],
        probabilities=probs,
        predicted_index=index,
        threshold=threshold,
        windows=[],
        heatmap=volume.with_array(heat),
        labelmap=volume.with_array(labels),
        label_value=label_value,
        timings={"total": 0.1},
        model={"name": "test", "demo": True},
        candidates=[Candidate(tuple(float(v) for v in ras), value) for ras, value in candidate_peaks(volume.with_array(heat))],
    )


def node_count(scene) -> int:
    return scene.GetNumberOfNodes()


def test_volume_from_node_is_a_read_only_view_with_the_node_geometry(mrml_scene):
    ct = add_ct(mrml_scene, oblique=True)
    volume = mscene.volume_from_node(ct)
    assert np.shares_memory(volume.array, slicer.util.arrayFromVolume(ct))
    assert not volume.array.flags.writeable
    assert np.allclose(volume.ijk_to_ras, mscene.node_ijk_to_ras(ct))
    with pytest.raises(ValueError):
        volume.array[0, 0, 0] = 5


def test_volume_from_node_folds_a_linear_parent_transform(mrml_scene):
    ct = add_ct(mrml_scene)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (5.0, -7.0, 11.0)
    transform.SetMatrixTransformToParent(mscene._numpy_to_matrix(shift))
    ct.SetAndObserveTransformNodeID(transform.GetID())
    world = mscene.volume_from_node(ct)
    assert np.allclose(world.ijk_to_ras, shift @ mscene.node_ijk_to_ras(ct))
    assert np.allclose(mscene.volume_from_node(ct, world=False).ijk_to_ras, mscene.node_ijk_to_ras(ct))


def test_volume_from_node_refuses_labelmaps_and_nothing(mrml_scene):
    label = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.uint8), None, "L", "vtkMRMLLabelMapVolumeNode")
    # a labelmap IS a scalar volume node subclass, so it is accepted as data; None is not
    assert mscene.volume_from_node(label).shape == (4, 5, 6)
    with pytest.raises(mscene.SceneError, match="select a scalar volume"):
        mscene.volume_from_node(None)


def test_lesion_from_markups_point_and_roi(mrml_scene):
    ct = add_ct(mrml_scene)
    fid = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    with pytest.raises(mscene.SceneError, match="no placed point"):
        mscene.lesion_from_node(fid, ct)
    fid.AddControlPoint(3.5, -20.0, 50.0)
    assert np.allclose(mscene.lesion_from_node(fid, ct), (3.5, -20.0, 50.0))

    roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(1.0, 2.0, 3.0)
    roi.SetSize(10.0, 20.0, 30.0)
    box = mscene.lesion_from_node(roi, ct)
    assert box.shape == (2, 3)
    assert np.allclose(box[0], (-4.0, -8.0, -12.0)) and np.allclose(box[1], (6.0, 12.0, 18.0))
    assert mscene.lesion_from_node(None, ct) is None
    table = mrml_scene.AddNewNodeByClass("vtkMRMLTableNode")
    with pytest.raises(mscene.SceneError, match="cannot describe a lesion"):
        mscene.lesion_from_node(table, ct)


def test_lesion_from_segmentation_is_a_mask_on_the_ct_grid(mrml_scene):
    ct = add_ct(mrml_scene, oblique=True)
    painted = np.zeros(slicer.util.arrayFromVolume(ct).shape, np.uint8)
    painted[4:7, 10:18, 20:30] = 1
    label = slicer.util.addVolumeFromArray(painted, mscene.node_ijk_to_ras(ct), "lesion", "vtkMRMLLabelMapVolumeNode")
    seg = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    assert slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(label, seg)
    before = node_count(mrml_scene)
    mask = mscene.lesion_from_node(seg, ct)
    assert node_count(mrml_scene) == before  # the temporary export node is gone
    assert isinstance(mask, Volume)
    assert np.allclose(mask.ijk_to_ras, mscene.node_ijk_to_ras(ct))
    assert np.array_equal(mask.array != 0, painted != 0)
    # a labelmap on the CT grid works directly
    assert np.array_equal(mscene.lesion_from_node(label, ct).array != 0, painted != 0)
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(mscene.SceneError, match="no segments"):
        mscene.lesion_from_node(empty, ct)


@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_outputs_have_the_ct_geometry_and_the_predicted_class(mrml_scene, oblique):
    ct = add_ct(mrml_scene, oblique=oblique)
    ct_hash = node_hash(ct)
    volume = mscene.volume_from_node(ct)
    result = make_result(volume, "E", threshold=0.4)
    out = mscene.write_outputs(ct, result)

    ct_matrix = mscene.node_ijk_to_ras(ct)
    dims = ct.GetImageData().GetDimensions()
    for node in (out.heatmap, out.labelmap):
        assert node.GetImageData().GetDimensions() == dims
        assert np.allclose(mscene.node_ijk_to_ras(node), ct_matrix, atol=1e-6)
    assert np.allclose(slicer.util.arrayFromVolume(out.heatmap), result.heatmap.array)

    labels = slicer.util.arrayFromVolume(out.labelmap)
    assert set(np.unique(labels)) == {0, result.label_value}
    assert np.array_equal(labels != 0, result.heatmap.array >= result.threshold)
    colors = out.labelmap.GetDisplayNode().GetColorNode()
    assert colors.GetColorName(result.label_value) == CLASS_LABELS["E"][1]

    # segmentation: one segment named after the class, on the CT's grid, covering the labelmap
    segmentation = out.segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment_id = segmentation.GetNthSegmentID(0)
    assert segmentation.GetSegment(segment_id).GetName() == result.predicted_label == "Large cell carcinoma"
    assert out.segmentation.GetNodeReference(out.segmentation.GetReferenceImageGeometryReferenceRole()) is ct
    seg_array = slicer.util.arrayFromSegmentBinaryLabelmap(out.segmentation, segment_id, ct)
    assert np.array_equal(seg_array != 0, labels != 0)

    # table: one row per class, probabilities in order
    table = out.table.GetTable()
    assert table.GetNumberOfRows() == len(result.class_names)
    assert [table.GetColumn(c).GetName() for c in range(3)] == ["class", "label", "probability"]
    for row, (name, p) in enumerate(zip(result.class_names, result.probabilities)):
        assert table.GetValue(row, 0).ToString() == name
        assert table.GetValue(row, 1).ToString() == CLASS_LABELS[name][1]
        assert table.GetValue(row, 2).ToDouble() == pytest.approx(float(p))
    assert node_hash(ct) == ct_hash


@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_segmentation_carries_the_ct_as_its_reference_image_geometry(mrml_scene, oblique):
    """Slicer's DICOM SEG export writes the segments on the reference geometry: it must be the CT's grid."""
    ct = add_ct(mrml_scene, oblique=oblique, shape=(9, 31, 37))
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (5.0, -7.0, 11.0)
    transform.SetMatrixTransformToParent(mscene._numpy_to_matrix(shift))
    ct.SetAndObserveTransformNodeID(transform.GetID())
    out = mscene.write_outputs(ct, make_result(mscene.volume_from_node(ct, world=False), "A", threshold=0.3))

    expected = slicer.vtkSegmentationConverter.SerializeImageGeometry(
        mscene._numpy_to_matrix(mscene.node_ijk_to_ras(ct)), ct.GetImageData()
    )
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    assert out.segmentation.GetSegmentation().GetConversionParameter(name) == expected
    assert expected.endswith("0;36;0;30;0;8;")  # the CT's extent, I J K
    assert out.segmentation.GetNodeReference(out.segmentation.GetReferenceImageGeometryReferenceRole()) is ct
    assert out.segmentation.GetTransformNodeID() == ct.GetTransformNodeID() == transform.GetID()
    segment_id = out.segmentation.GetSegmentation().GetNthSegmentID(0)
    on_ct = slicer.util.arrayFromSegmentBinaryLabelmap(out.segmentation, segment_id, ct)
    assert np.array_equal(on_ct != 0, slicer.util.arrayFromVolume(out.labelmap) != 0)


def test_heatmap_display_inferno_window_threshold_and_foreground(mrml_scene):
    ct = add_ct(mrml_scene)
    composite = mrml_scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    result = make_result(mscene.volume_from_node(ct), "A", threshold=0.3)
    out = mscene.write_outputs(ct, result)
    display = out.heatmap.GetDisplayNode()
    assert "Inferno" in display.GetColorNode().GetName()
    inferno = mscene.read_color_file(mscene._resource(mscene.INFERNO_COLOR_FILE))
    assert display.GetColorNode().GetNumberOfColors() == len(inferno)
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(0.0) and display.GetWindowLevelMax() == pytest.approx(1.0)
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.3)
    assert composite.GetForegroundVolumeID() == out.heatmap.GetID()
    assert composite.GetBackgroundVolumeID() == ct.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.4)


def test_rerun_replaces_outputs_and_leaves_the_ct_unchanged(mrml_scene):
    ct = add_ct(mrml_scene)
    other = add_ct(mrml_scene, seed=3, name="other CT")
    ct_hash = node_hash(ct)
    volume = mscene.volume_from_node(ct)
    first = mscene.write_outputs(ct, make_result(volume, "A"))
    other_out = mscene.write_outputs(other, make_result(mscene.volume_from_node(other), "G"))
    count = node_count(mrml_scene)
    second = mscene.write_outputs(ct, make_result(volume, "G", seed=4))
    assert node_count(mrml_scene) == count
    assert len(mscene.find_outputs(ct)) == 5
    assert all(mrml_scene.GetNodeByID(n.GetID()) is None or n not in first.nodes() for n in first.nodes())
    assert all(mrml_scene.IsNodePresent(n) for n in second.nodes() + other_out.nodes())
    assert second.segmentation.GetSegmentation().GetNthSegment(0).GetName() == "Squamous cell carcinoma"
    assert node_hash(ct) == ct_hash
    assert ct.GetAttribute(mscene.ROLE_ATTRIBUTE) is None


def test_failure_while_writing_leaves_the_scene_as_it_was(mrml_scene):
    ct = add_ct(mrml_scene)
    volume = mscene.volume_from_node(ct)
    first = mscene.write_outputs(ct, make_result(volume, "A"))
    ids = sorted(mrml_scene.GetNodes().GetItemAsObject(i).GetID() for i in range(node_count(mrml_scene)))
    broken = make_result(volume, "B")
    broken.heatmap = volume.with_array(np.full(volume.shape, "x", dtype="<U1"))  # not numbers: fails mid-write
    with pytest.raises(ValueError):
        mscene.write_outputs(ct, broken)
    after = sorted(mrml_scene.GetNodes().GetItemAsObject(i).GetID() for i in range(node_count(mrml_scene)))
    assert after == ids
    assert all(mrml_scene.IsNodePresent(n) for n in first.nodes())
    wrong = make_result(volume, "B")
    wrong.labelmap = Volume(np.zeros((3, 3, 3), np.uint8), np.eye(4))
    with pytest.raises(mscene.SceneError, match="input grid"):
        mscene.write_outputs(ct, wrong)
    assert node_count(mrml_scene) == len(ids)


def _world(node, index: int) -> np.ndarray:
    position = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, position)
    return np.array(position)


@pytest.mark.parametrize("frame", ["world", "file"])
def test_candidates_are_locked_numbered_points_on_the_heatmap_places(mrml_scene, frame):
    """The heatmap's highest places become points 1..n under the CT's transform, on the same CT
    voxels whether the result came from the worker (world RAS) or from a result folder (the file's
    RAS, the CT's own frame)."""
    ct = add_ct(mrml_scene, oblique=True, shape=(12, 72, 72))  # room for places 20 mm apart
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (5.0, -7.0, 11.0)
    transform.SetMatrixTransformToParent(mscene._numpy_to_matrix(shift))
    ct.SetAndObserveTransformNodeID(transform.GetID())
    volume = mscene.volume_from_node(ct, world=frame == "world")
    result = make_result(volume, "A")
    assert len(result.candidates) >= 2  # the blob and the dimmer place in the corner
    out = mscene.write_outputs(ct, result)
    node = out.candidates
    assert node.GetAttribute(mscene.ROLE_ATTRIBUTE) == "candidates" and node in mscene.find_outputs(ct)
    assert node.GetTransformNodeID() == transform.GetID()
    assert node.GetNumberOfControlPoints() == len(result.candidates)
    assert node.GetLocked() and node.GetFixedNumberOfControlPoints()
    world_from_file = mscene._to_world(ct) if frame == "file" else np.eye(4)
    for n, candidate in enumerate(result.candidates):
        assert node.GetNthControlPointLabel(n) == str(n + 1)
        assert f"{candidate.value:.2f}" in node.GetNthControlPointDescription(n)
        expected = (world_from_file @ np.append(candidate.ras, 1.0))[:3]
        assert np.allclose(_world(node, n), expected, atol=1e-6)
    top = np.unravel_index(np.argmax(result.heatmap.array), result.heatmap.shape)
    assert np.linalg.norm(_world(node, 0) - (world_from_file @ np.append(
        result.heatmap.ijk_to_ras_points([top[::-1]])[0], 1.0))[:3]) < 5.0  # point 1 is the peak

    no_places = make_result(volume, "A")
    no_places.candidates = []
    assert mscene.write_outputs(ct, no_places).candidates.GetNumberOfControlPoints() == 0


def test_outputs_go_under_the_ct_study(mrml_scene):
    ct = add_ct(mrml_scene)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Lung_Dx-A0001")
    study = sh.CreateStudyItem(patient, "CT chest")
    # Slicer's Qt subject-hierarchy plugins create items for new nodes; slicer-core has none, so add the CT's
    sh.CreateItem(study, ct)
    assert sh.GetItemParent(sh.GetItemByDataNode(ct)) == study
    out = mscene.write_outputs(ct, make_result(mscene.volume_from_node(ct), "A"))
    for node in out.nodes():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study


def test_outputs_survive_nrrd_write_and_read(mrml_scene, tmp_path):
    ct = add_ct(mrml_scene, oblique=True)
    result = make_result(mscene.volume_from_node(ct), "G", threshold=0.45)
    out = mscene.write_outputs(ct, result)
    for node, suffix, cls in (
        (out.heatmap, "heatmap.nrrd", "vtkMRMLScalarVolumeNode"),
        (out.labelmap, "labelmap.nrrd", "vtkMRMLLabelMapVolumeNode"),
    ):
        path = str(tmp_path / suffix)
        writer = slicer.vtkMRMLVolumeArchetypeStorageNode()
        mrml_scene.AddNode(writer)
        writer.SetFileName(path)
        assert writer.WriteData(node)
        fresh = mrml_scene.AddNewNodeByClass(cls, "read back")
        reader = slicer.vtkMRMLVolumeArchetypeStorageNode()  # fresh storage node (see reference notes)
        mrml_scene.AddNode(reader)
        reader.SetFileName(path)
        assert reader.ReadData(fresh)
        assert np.allclose(mscene.node_ijk_to_ras(fresh), mscene.node_ijk_to_ras(ct), atol=1e-4)
        assert np.array_equal(slicer.util.arrayFromVolume(fresh), slicer.util.arrayFromVolume(node))

    seg_path = str(tmp_path / "region.seg.nrrd")
    writer = slicer.vtkMRMLSegmentationStorageNode()
    mrml_scene.AddNode(writer)
    writer.SetFileName(seg_path)
    assert writer.WriteData(out.segmentation)
    fresh = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read back")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    mrml_scene.AddNode(reader)
    reader.SetFileName(seg_path)
    assert reader.ReadData(fresh)
    segment_id = fresh.GetSegmentation().GetNthSegmentID(0)
    assert fresh.GetSegmentation().GetSegment(segment_id).GetName() == "Squamous cell carcinoma"
    read_mask = slicer.util.arrayFromSegmentBinaryLabelmap(fresh, segment_id, ct)
    assert np.array_equal(read_mask != 0, slicer.util.arrayFromVolume(out.labelmap) != 0)


def test_empty_region_keeps_a_named_segment_and_no_heatmap_gives_a_table_only(mrml_scene):
    ct = add_ct(mrml_scene)
    volume = mscene.volume_from_node(ct)
    result = make_result(volume, "A", threshold=1.5)  # nothing reaches the threshold
    out = mscene.write_outputs(ct, result)
    segmentation = out.segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    assert segmentation.GetNthSegment(0).GetName() == "Adenocarcinoma"
    table_only = make_result(volume, "A")
    table_only.heatmap = table_only.labelmap = None
    out = mscene.write_outputs(ct, table_only)
    assert out.heatmap is None and out.segmentation is None
    assert len(mscene.find_outputs(ct)) == 1  # earlier maps were replaced, not left behind


def test_bundled_class_colour_file_matches_class_labels_and_loads_in_slicer(mrml_scene):
    path = mscene._resource(mscene.CLASS_COLOR_FILE)
    assert path is not None, "Resources/ColorTables/MMCAFNetClasses.txt is missing"
    entries = {value: (name, rgba) for value, name, rgba in mscene.read_color_file(path)}
    for value, name, rgb in CLASS_LABELS.values():
        assert entries[value][0] == name
        assert entries[value][1][:3] == tuple(round(c * 255) for c in rgb)
    node = mrml_scene.AddNewNodeByClass("vtkMRMLColorTableNode", "from file")
    storage = slicer.vtkMRMLColorTableStorageNode()
    mrml_scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node), "Slicer cannot read the bundled colour table"
    assert node.GetColorName(CLASS_LABELS["B"][0]).replace("_", " ") == CLASS_LABELS["B"][1]


def test_dicom_header_values_become_a_clinical_record(mrml_scene):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))

    class FileDatabase:
        """slicer.dicomDatabase's instanceValue over a real DICOM file (the Qt database is absent here)."""

        def instanceValue(self, uid, tag):  # Slicer API name
            assert uid == dataset.SOPInstanceUID
            group, element = (int(x, 16) for x in tag.split(","))
            item = dataset.get((group, element))
            return "" if item is None else str(item.value)

    ct = add_ct(mrml_scene)
    assert mscene.record_from_dicom_database(ct, FileDatabase()) == {}
    ct.SetAttribute("DICOM.instanceUIDs", f"{dataset.SOPInstanceUID} 1.2.3")
    record = mscene.record_from_dicom_database(ct, FileDatabase())
    expected = mscene.record_from_dicom_values(
        str(dataset.get("PatientSex", "")), str(dataset.get("PatientAge", "")), str(dataset.get("PatientWeight", ""))
    )
    assert record == expected
    assert mscene.parse_dicom_age("063Y") == 63.0 and mscene.parse_dicom_age("018M") == 1.5
    assert mscene.parse_dicom_age("abc") is None
    assert mscene.record_from_dicom_values("F", "070Y", "61.5") == {"sex": "F", "age": 70.0, "weight": 61.5}
    assert mscene.record_from_dicom_values("O", "", "0") == {}


def test_the_slicer_form_announces_header_values_as_the_command_line_does() -> None:
    from MMCAFNetLib.ehr import describe_values
    from MMCAFNetLib.slicer_setup import Panel

    record = mscene.record_from_dicom_values("M", "061Y", "72.5")
    assert Panel.header_fill_message(record) == f"Filled from the DICOM header: {describe_values(record)}"
    assert describe_values(record) == "sex M, age 61, weight 72.5"
    assert "No usable" in Panel.header_fill_message(mscene.record_from_dicom_values("O", "150Y", "0"))

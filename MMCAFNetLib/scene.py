"""MRML glue: Slicer nodes in, Classification outputs written back into the scene.

Everything here touches MRML and therefore must run on Slicer's main thread; the Predictor never
does (it only sees the plain ``Volume`` and lesion built here). ``slicer`` and ``vtk`` are imported
inside the functions so the library stays importable without Slicer.

Outputs of one CT are found again through a node reference to the CT (``SOURCE_REFERENCE_ROLE``)
plus a role attribute, so a re-run replaces them instead of adding copies. The CT node itself is
never modified: no voxels, no attributes, no references.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from MMCAFNetLib.results import CLASS_LABELS, Classification
from MMCAFNetLib.volume import Volume

#: Attribute naming what an output node is ("table", "heatmap", "labelmap", "segmentation").
ROLE_ATTRIBUTE = "MMCAFNet.OutputRole"
#: Node reference from every output node to the CT it was computed from.
SOURCE_REFERENCE_ROLE = "MMCAFNetSourceVolume"
#: Attribute marking the colour nodes this module creates (shared by all runs; never removed).
COLOR_ATTRIBUTE = "MMCAFNet.ColorTable"
OUTPUT_ROLES = ("table", "heatmap", "labelmap", "segmentation", "candidates")

CLASS_COLOR_FILE = "ColorTables/MMCAFNetClasses.txt"
INFERNO_COLOR_FILE = "ColorTables/MMCAFNetInferno.txt"
SLICER_INFERNO_ID = "vtkMRMLColorTableNodeFileInferno.txt"
FALLBACK_HEAT_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
HEATMAP_OPACITY = 0.4


class SceneError(ValueError):
    """A node cannot be used as asked; the message names the node and what to do."""


@dataclass
class SceneOutputs:
    """The nodes written for one CT; any may be None when the result had nothing for it."""

    table: Any
    heatmap: Any = None
    labelmap: Any = None
    segmentation: Any = None
    candidates: Any = None  # markups points: the heatmap's highest places

    def nodes(self) -> list[Any]:
        return [n for n in (self.table, self.heatmap, self.labelmap, self.segmentation, self.candidates)
                if n is not None]


# ----------------------------------------------------------------------------------------------
# Nodes -> plain data
# ----------------------------------------------------------------------------------------------


def _matrix_to_numpy(vtk_matrix: Any) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _numpy_to_matrix(array: np.ndarray) -> Any:
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def node_ijk_to_ras(volume_node: Any) -> np.ndarray:
    """IJK->RAS of a volume node in its own (local) coordinates."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return _matrix_to_numpy(m)


def _to_world(node: Any) -> np.ndarray:
    """4x4 local->world of a transformable node; refuses non-linear transforms clearly."""
    import vtk

    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise SceneError(
            f"'{node.GetName()}' is under the non-linear transform '{transform.GetName()}'; harden the "
            "transform (Data module: right-click > Harden transform) before classifying"
        )
    m = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(m)
    return _matrix_to_numpy(m)


def volume_from_node(volume_node: Any, world: bool = True) -> Volume:
    """A ``Volume`` viewing the node's voxels (no copy) with its IJK->RAS geometry.

    The array is a read-only view of the node's memory, so the classifier cannot change the CT.
    With ``world`` (default) a linear parent transform is folded into the matrix, matching markups
    positions, which are read in world coordinates.
    """
    import slicer

    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise SceneError("select a scalar volume (the CT) as input; got " + _describe(volume_node))
    if volume_node.GetImageData() is None:
        raise SceneError(f"volume '{volume_node.GetName()}' holds no image data; load the CT again")
    view = slicer.util.arrayFromVolume(volume_node).view()
    view.flags.writeable = False
    if view.ndim != 3:
        raise SceneError(
            f"volume '{volume_node.GetName()}' has {view.ndim}-D voxels (a vector or multi-component "
            "image); select a single-component CT"
        )
    ijk_to_ras = node_ijk_to_ras(volume_node)
    if world:
        ijk_to_ras = _to_world(volume_node) @ ijk_to_ras
    meta: dict[str, Any] = {"source": f"slicer:{volume_node.GetName()}", "node_id": volume_node.GetID(), "warnings": []}
    modality = volume_node.GetAttribute("DICOM.Modality")
    if modality:
        meta["modality"] = modality
    return Volume(view, ijk_to_ras, meta)


def _describe(node: Any) -> str:
    if node is None:
        return "nothing"
    return f"'{node.GetName()}' ({node.GetClassName()})"


def lesion_from_node(lesion_node: Any, reference_node: Any = None) -> Any:
    """A lesion for ``Predictor.classify`` from a markups point, ROI, segmentation or labelmap.

    Returns None (no node: scan the whole volume), a (3,) RAS point, a (2, 3) RAS box (min, max
    corners) or a mask ``Volume`` on the reference CT's grid. Positions are in world RAS. Node kinds
    are recognised by their API (duck typing), so legacy annotation ROIs work too.
    """
    if lesion_node is None:
        return None
    if lesion_node.IsA("vtkMRMLSegmentationNode") or lesion_node.IsA("vtkMRMLLabelMapVolumeNode"):
        if reference_node is None:
            raise SceneError("a segmentation lesion needs the CT as reference grid; select the CT first")
        return _mask_from_node(lesion_node, reference_node)
    if hasattr(lesion_node, "GetRASBounds") and (
        lesion_node.IsA("vtkMRMLMarkupsROINode") or lesion_node.IsA("vtkMRMLAnnotationROINode")
    ):
        bounds = [0.0] * 6
        lesion_node.GetRASBounds(bounds)
        box = np.array([[bounds[0], bounds[2], bounds[4]], [bounds[1], bounds[3], bounds[5]]], dtype=np.float64)
        if not np.all(np.isfinite(box)) or np.any(box[1] < box[0]):
            raise SceneError(f"ROI {_describe(lesion_node)} is empty; place it around the lesion")
        return box
    if hasattr(lesion_node, "GetNumberOfControlPoints"):
        count = lesion_node.GetNumberOfControlPoints()
        defined = [i for i in range(count) if _point_defined(lesion_node, i)]
        if not defined:
            raise SceneError(
                f"markups {_describe(lesion_node)} has no placed point; click on the lesion to place one"
            )
        point = [0.0, 0.0, 0.0]
        lesion_node.GetNthControlPointPositionWorld(defined[0], point)
        return np.array(point, dtype=np.float64)
    raise SceneError(
        f"{_describe(lesion_node)} cannot describe a lesion; use a markups point, an ROI or a segmentation"
    )


def _point_defined(markups: Any, index: int) -> bool:
    if not hasattr(markups, "GetNthControlPointPositionStatus"):
        return True
    import slicer

    return markups.GetNthControlPointPositionStatus(index) == slicer.vtkMRMLMarkupsNode.PositionDefined


def _mask_from_node(node: Any, reference_node: Any) -> Volume:
    """Binary mask on the reference CT's grid (all segments together / all non-zero labels)."""
    import slicer
    import vtk

    scene = reference_node.GetScene()
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        if node.GetImageData() is None:
            raise SceneError(f"labelmap {_describe(node)} holds no voxels")
        same = node.GetImageData().GetDimensions() == reference_node.GetImageData().GetDimensions() and np.allclose(
            node_ijk_to_ras(node), node_ijk_to_ras(reference_node), atol=1e-4
        )
        if not same:
            raise SceneError(
                f"labelmap {_describe(node)} is not on the CT's grid; import it into a segmentation instead"
            )
        mask = np.array(slicer.util.arrayFromVolume(node)) != 0
    else:
        segmentation = node.GetSegmentation()
        ids = vtk.vtkStringArray()
        segmentation.GetSegmentIDs(ids)
        if ids.GetNumberOfValues() == 0:
            raise SceneError(f"segmentation {_describe(node)} has no segments; paint the lesion first")
        colors_before = {n.GetID() for n in _color_nodes(scene)}
        temp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__MMCAFNet_lesion_mask__")
        try:
            logic = slicer.modules.segmentations.logic()
            if not logic.ExportSegmentsToLabelmapNode(node, ids, temp, reference_node):
                raise SceneError(f"segmentation {_describe(node)} could not be exported onto the CT grid")
            mask = np.array(slicer.util.arrayFromVolume(temp)) != 0
        finally:
            _remove_with_dependents(scene, temp)
            for color in _color_nodes(scene):  # the export adds a colour table for the temp labelmap
                if color.GetID() not in colors_before:
                    scene.RemoveNode(color)
    if not mask.any():
        raise SceneError(f"lesion {_describe(node)} is empty on the CT grid; paint the lesion first")
    ijk_to_ras = _to_world(reference_node) @ node_ijk_to_ras(reference_node)
    return Volume(mask.astype(np.uint8), ijk_to_ras, {"source": f"slicer:{node.GetName()}"})


# ----------------------------------------------------------------------------------------------
# DICOM header -> clinical record
# ----------------------------------------------------------------------------------------------

DICOM_SEX, DICOM_AGE, DICOM_WEIGHT = "0010,0040", "0010,1010", "0010,1030"


def parse_dicom_age(text: str) -> Optional[float]:
    """DICOM AS value ('063Y', '006M', '010W', '003D') -> years, or None when unreadable."""
    from MMCAFNetLib.ehr import parse_dicom_age as parse

    years = parse(text)
    return None if years is None else round(years, 2)


def record_from_dicom_values(sex: str, age: str, weight: str, schema: Any = None) -> dict[str, Any]:
    """Clinical fields readable from a CT header, filtered by the same rule as the command line
    (``ehr.values_from_header``): values the schema would refuse, or that mean unknown, are left out."""
    from MMCAFNetLib.ehr import values_from_header

    record, _ = values_from_header(sex, age, weight, schema)
    return record


def record_from_dicom_database(volume_node: Any, database: Any) -> dict[str, Any]:
    """Sex, age and weight of the patient whose DICOM series was loaded into ``volume_node``.

    ``database`` is ``slicer.dicomDatabase`` (anything with ``instanceValue(uid, tag)``); a volume
    that did not come from the DICOM database gives an empty record.
    """
    if database is None or volume_node is None:
        return {}
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        return {}
    uid = uids[0]
    values = [database.instanceValue(uid, tag) or "" for tag in (DICOM_SEX, DICOM_AGE, DICOM_WEIGHT)]
    return record_from_dicom_values(*values)


# ----------------------------------------------------------------------------------------------
# Colour tables
# ----------------------------------------------------------------------------------------------


def read_color_file(path: str | Path) -> list[tuple[int, str, tuple[int, int, int, int]]]:
    """Entries (value, name, RGBA 0..255) of a Slicer colour table text file ("_" in names = space)."""
    entries = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 6:
            raise ValueError(f"{path}:{line_no}: expected 'value name R G B A', got {line!r}")
        value, name, rgba = int(parts[0]), parts[1].replace("_", " "), tuple(int(p) for p in parts[2:])
        entries.append((value, name, rgba))  # type: ignore[arg-type]
    return entries


def _resource(relative: str) -> Optional[Path]:
    try:
        from MMCAFNetLib.resources import resources_dir

        path = resources_dir() / relative
    except FileNotFoundError:
        return None
    return path if path.is_file() else None


def class_color_entries() -> list[tuple[int, str, tuple[int, int, int, int]]]:
    """The class colour table: the bundled file when present, else built from ``CLASS_LABELS``."""
    path = _resource(CLASS_COLOR_FILE)
    if path is not None:
        return read_color_file(path)
    entries = [(0, "Background", (0, 0, 0, 0))]
    for value, name, rgb in sorted(CLASS_LABELS.values()):
        entries.append((value, name, (*(round(c * 255) for c in rgb), 255)))  # type: ignore[arg-type]
    return entries


def _color_node_from_entries(scene: Any, name: str, entries: Sequence[tuple[int, str, tuple]], tag: str) -> Any:
    import slicer

    node = slicer.vtkMRMLColorTableNode()
    node.SetName(name)
    node.SetTypeToUser()
    node.SetAttribute(COLOR_ATTRIBUTE, tag)
    node.SetHideFromEditors(False)
    size = max(v for v, _, _ in entries) + 1
    node.SetNumberOfColors(size)
    node.GetLookupTable().SetRange(0, size - 1)
    node.GetLookupTable().SetNumberOfTableValues(size)
    for v in range(size):
        node.SetColor(v, "(none)", 0.0, 0.0, 0.0, 0.0)
    for value, label, rgba in entries:
        node.SetColor(value, label, *(c / 255.0 for c in rgba))
    scene.AddNode(node)
    return node


def _find_tagged_color(scene: Any, tag: str) -> Any:
    nodes = scene.GetNodesByClass("vtkMRMLColorTableNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(COLOR_ATTRIBUTE) == tag:
            return node
    return None


def class_color_node(scene: Any, extra: Iterable[tuple[int, str]] = ()) -> Any:
    """The scene's class colour table (created once, shared by every run), naming each label."""
    node = _find_tagged_color(scene, "classes")
    if node is None:
        node = _color_node_from_entries(scene, "MMCAFNet classes", class_color_entries(), "classes")
    for value, label in extra:  # custom classes of a user model
        if value >= node.GetNumberOfColors():
            node.SetNumberOfColors(value + 1)
        if node.GetColorName(value) != label:
            node.SetColor(value, label, 0.6, 0.6, 0.6, 1.0)
    return node


def heatmap_color_node(scene: Any) -> Any:
    """Inferno: Slicer's own table when loaded, else the bundled copy, else the PET heat ramp."""
    node = scene.GetNodeByID(SLICER_INFERNO_ID)
    if node is not None:
        return node
    node = _find_tagged_color(scene, "inferno")
    if node is not None:
        return node
    path = _resource(INFERNO_COLOR_FILE)
    if path is not None:
        return _color_node_from_entries(scene, "MMCAFNet Inferno", read_color_file(path), "inferno")
    return scene.GetNodeByID(FALLBACK_HEAT_ID)


# ----------------------------------------------------------------------------------------------
# Writing outputs
# ----------------------------------------------------------------------------------------------


def find_outputs(ct_node: Any) -> list[Any]:
    """Every node an earlier run wrote for this CT (found by role attribute and source reference)."""
    scene = ct_node.GetScene()
    found = []
    nodes = scene.GetNodes()
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(ROLE_ATTRIBUTE) in OUTPUT_ROLES and (
            node.GetNodeReferenceID(SOURCE_REFERENCE_ROLE) == ct_node.GetID()
        ):
            found.append(node)
    return found


def _remove_with_dependents(scene: Any, node: Any) -> None:
    """Remove a node with its own display and storage nodes (shared colour tables stay)."""
    dependents = []
    for getter in ("GetNumberOfDisplayNodes", "GetNumberOfStorageNodes"):
        if hasattr(node, getter):
            nth = "GetNthDisplayNode" if "Display" in getter else "GetNthStorageNode"
            dependents += [getattr(node, nth)(i) for i in range(getattr(node, getter)())]
    scene.RemoveNode(node)
    for dep in dependents:
        if dep is not None and dep.GetScene() is scene:
            scene.RemoveNode(dep)


def _check_grid(ct_node: Any, grid: Volume, what: str) -> None:
    dims = ct_node.GetImageData().GetDimensions()  # (I, J, K)
    if tuple(grid.shape) != (dims[2], dims[1], dims[0]):
        raise SceneError(
            f"the {what} has shape {grid.shape} but the CT '{ct_node.GetName()}' has {dims[::-1]}; "
            "the classifier must return maps on the input grid"
        )


def _new_output(scene: Any, class_name: str, name: str, role: str, ct_node: Any) -> Any:
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.SetNodeReferenceID(SOURCE_REFERENCE_ROLE, ct_node.GetID())
    return node


def _volume_output(scene: Any, class_name: str, name: str, role: str, ct_node: Any, array: np.ndarray) -> Any:
    import slicer

    node = _new_output(scene, class_name, name, role, ct_node)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetIJKToRASMatrix(_numpy_to_matrix(node_ijk_to_ras(ct_node)))
    node.SetAndObserveTransformNodeID(ct_node.GetTransformNodeID())
    node.CreateDefaultDisplayNodes()
    return node


def _write_table(scene: Any, ct_node: Any, result: Classification, base: str) -> Any:
    import vtk

    node = _new_output(scene, "vtkMRMLTableNode", f"{base} MMCAFNet probabilities", "table", ct_node)
    columns = (vtk.vtkStringArray(), vtk.vtkStringArray(), vtk.vtkDoubleArray())
    for column, title in zip(columns, ("class", "label", "probability")):
        column.SetName(title)
    for name, label, p in zip(result.class_names, result.class_labels, np.asarray(result.probabilities)):
        columns[0].InsertNextValue(str(name))
        columns[1].InsertNextValue(str(label))
        columns[2].InsertNextValue(float(p))
    table = vtk.vtkTable()
    for column in columns:
        table.AddColumn(column)
    node.SetAndObserveTable(table)
    node.SetAttribute("MMCAFNet.PredictedClass", result.predicted_class)
    node.SetAttribute("MMCAFNet.Model", str(result.model.get("model_name", result.model.get("name", ""))))
    node.SetAttribute("MMCAFNet.Demo", "1" if result.model.get("demo") else "0")
    return node


def _write_segmentation(scene: Any, ct_node: Any, labelmap_node: Any, result: Classification, base: str) -> Any:
    import slicer

    node = _new_output(scene, "vtkMRMLSegmentationNode", f"{base} MMCAFNet region", "segmentation", ct_node)
    node.CreateDefaultDisplayNodes()
    # Under the CT's transform first: the reference geometry is stored in the segmentation's own
    # coordinates, so set the other way round it would hold the CT's transform twice. Slicer's DICOM
    # SEG export writes the segments on this geometry (the CT's grid).
    node.SetAndObserveTransformNodeID(ct_node.GetTransformNodeID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    segmentation = node.GetSegmentation()
    logic = slicer.modules.segmentations.logic()
    if np.any(slicer.util.arrayFromVolume(labelmap_node)) and not logic.ImportLabelmapToSegmentationNode(
        labelmap_node, node
    ):
        raise SceneError("the labelmap could not be imported into a segmentation")
    label = result.predicted_label
    rgb = next((c for v, _, c in CLASS_LABELS.values() if v == result.label_value), (0.6, 0.6, 0.6))
    if segmentation.GetNumberOfSegments() == 0:  # nothing above threshold: keep a named, empty segment
        segmentation.AddEmptySegment(result.predicted_class, label, rgb)
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        segment.SetName(label)
        segment.SetColor(*rgb)
    return node


def _write_candidates(scene: Any, ct_node: Any, result: Classification, base: str) -> Any:
    """The heatmap's highest places as locked, numbered points, under the CT's transform.

    The result's positions are in the frame of its maps' grid (world RAS from the worker, the file's
    RAS from a result folder); through the grid's voxel indices they land on the same voxels of the
    CT whatever the frame.
    """
    import vtk

    from MMCAFNetLib.inference.slicer_files import CANDIDATE_RGB, candidate_description

    ijk = result.heatmap.ras_to_ijk_points([c.ras for c in result.candidates]) if result.candidates else []
    ct_ijk_to_ras = node_ijk_to_ras(ct_node)
    local = [(ct_ijk_to_ras @ np.append(p, 1.0))[:3] for p in ijk]
    node = _new_output(scene, "vtkMRMLMarkupsFiducialNode", f"{base} MMCAFNet candidates", "candidates", ct_node)
    node.CreateDefaultDisplayNodes()
    node.SetAndObserveTransformNodeID(ct_node.GetTransformNodeID())
    for rank, (candidate, position) in enumerate(zip(result.candidates, local), 1):
        index = node.AddControlPoint(vtk.vtkVector3d(*(float(v) for v in position)), str(rank))
        node.SetNthControlPointDescription(index, candidate_description(rank, candidate.value))
    node.SetLocked(True)
    node.SetFixedNumberOfControlPoints(True)
    display = node.GetDisplayNode()
    if display is not None:
        display.SetColor(*CANDIDATE_RGB)
        display.SetSelectedColor(*CANDIDATE_RGB)
    return node


def write_outputs(ct_node: Any, result: Classification, show: bool = True) -> SceneOutputs:
    """Write a classification into the scene, replacing this CT's earlier outputs.

    All new nodes are built first; only when every one exists are the old outputs removed, so a
    failure at any step leaves the scene exactly as it was.
    """
    if ct_node is None or ct_node.GetScene() is None:
        raise SceneError("the CT node is not in a scene; it may have been deleted while classifying")
    scene = ct_node.GetScene()
    for grid, what in ((result.heatmap, "heatmap"), (result.labelmap, "labelmap")):
        if grid is not None:
            _check_grid(ct_node, grid, what)
    base = ct_node.GetName()
    created: list[Any] = []
    colors_before = {n.GetID() for n in _color_nodes(scene)}
    try:
        outputs = SceneOutputs(table=_write_table(scene, ct_node, result, base))
        created.append(outputs.table)
        if result.heatmap is not None:
            heat = np.clip(np.asarray(result.heatmap.array, dtype=np.float32), 0.0, 1.0)
            outputs.heatmap = _volume_output(
                scene, "vtkMRMLScalarVolumeNode", f"{base} MMCAFNet heatmap", "heatmap", ct_node, heat
            )
            created.append(outputs.heatmap)
            _style_heatmap(outputs.heatmap, result.threshold)
            outputs.candidates = _write_candidates(scene, ct_node, result, base)
            created.append(outputs.candidates)
        if result.labelmap is not None:
            labels = np.asarray(result.labelmap.array)
            dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
            outputs.labelmap = _volume_output(
                scene, "vtkMRMLLabelMapVolumeNode", f"{base} MMCAFNet labelmap", "labelmap", ct_node,
                labels.astype(dtype),
            )
            created.append(outputs.labelmap)
            colors = class_color_node(scene, [(result.label_value, result.predicted_label)])
            outputs.labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
            outputs.segmentation = _write_segmentation(scene, ct_node, outputs.labelmap, result, base)
            created.append(outputs.segmentation)
    except BaseException:
        for node in reversed(created):
            _remove_with_dependents(scene, node)
        for node in _color_nodes(scene):
            if node.GetID() not in colors_before and node.GetAttribute(COLOR_ATTRIBUTE):
                scene.RemoveNode(node)
        raise
    new_ids = {n.GetID() for n in outputs.nodes()}
    for old in find_outputs(ct_node):
        if old.GetID() not in new_ids:
            _remove_with_dependents(scene, old)
    _place_in_hierarchy(ct_node, outputs.nodes())
    if show:
        show_outputs(ct_node, outputs)
    return outputs


def _color_nodes(scene: Any) -> list[Any]:
    nodes = scene.GetNodesByClass("vtkMRMLColorTableNode")
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def _style_heatmap(node: Any, threshold: float) -> None:
    display = node.GetDisplayNode()
    color = heatmap_color_node(node.GetScene())
    if color is not None:
        display.SetAndObserveColorNodeID(color.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.AutoThresholdOff()
    display.SetLowerThreshold(float(threshold))
    display.SetUpperThreshold(1.0)
    display.ApplyThresholdOn()
    display.SetOpacity(HEATMAP_OPACITY)
    node.SetAttribute("MMCAFNet.Threshold", f"{float(threshold):g}")


def _place_in_hierarchy(ct_node: Any, nodes: Sequence[Any]) -> None:
    """Put the outputs under the CT's study (or whatever folder holds the CT)."""
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(ct_node.GetScene())
    if sh is None:
        return
    ct_item = sh.GetItemByDataNode(ct_node)
    if not ct_item:
        return
    study = sh.GetItemAncestorAtLevel(ct_item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy())
    parent = study or sh.GetItemParent(ct_item)
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if not item:
            item = sh.CreateItem(parent, node)
        sh.SetItemParent(item, parent)


def show_outputs(ct_node: Any, outputs: SceneOutputs) -> None:
    """CT as background, heatmap as foreground at 0.4, labelmap hidden (its segmentation shows)."""
    import slicer

    if outputs.heatmap is None or getattr(slicer, "mrmlScene", None) is not ct_node.GetScene():
        return
    slicer.util.setSliceViewerLayers(
        background=ct_node, foreground=outputs.heatmap, foregroundOpacity=HEATMAP_OPACITY
    )


# ----------------------------------------------------------------------------------------------
# Result folders written by the command line
# ----------------------------------------------------------------------------------------------

#: Attribute naming the file a CT node was loaded from by :func:`load_ct` (found again, not reloaded).
SOURCE_PATH_ATTRIBUTE = "MMCAFNet.SourcePath"


def result_fits(ct_node: Any, result: Classification) -> bool:
    """Whether the result's maps lie on this CT node's grid (same size and IJK->RAS)."""
    grid = result.heatmap if result.heatmap is not None else result.labelmap
    if grid is None:
        return True
    if ct_node is None or ct_node.GetImageData() is None:
        return False
    dims = ct_node.GetImageData().GetDimensions()
    return tuple(grid.shape) == (dims[2], dims[1], dims[0]) and bool(
        np.allclose(node_ijk_to_ras(ct_node), grid.ijk_to_ras, atol=1e-3)
    )


def check_result_fits(ct_node: Any, result: Classification, folder: Any) -> None:
    """Refuse a CT the results were not computed on (outputs take the CT's geometry)."""
    if not result_fits(ct_node, result):
        grid = result.heatmap if result.heatmap is not None else result.labelmap
        raise SceneError(
            f"the results in {folder} were computed on another grid ({grid.shape} voxels) than the CT "
            f"'{ct_node.GetName()}'; select the CT they came from, or leave the CT out to load the one "
            "named in prediction.json"
        )


def _loaded_from(node: Any) -> str:
    path = node.GetAttribute(SOURCE_PATH_ATTRIBUTE) or ""
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    if not path and storage is not None and storage.GetFileName():
        path = storage.GetFileName()
    return str(Path(path).resolve()) if path else ""


def load_ct(scene: Any, path: Any, name: Optional[str] = None) -> Any:
    """The CT at ``path`` as a volume node: one already loaded from that file, else read now.

    Read with the library's reader (DICOM series folders, NRRD, NIfTI, MetaImage), so the node has
    the exact grid the command line classified.
    """
    import slicer

    from MMCAFNetLib.volume import read_volume

    resolved = str(Path(path).resolve())
    for node in ct_volume_nodes(scene):
        if _loaded_from(node) == resolved:
            return node
    volume = read_volume(path)
    stem = Path(path).name.split(".")[0] or "CT"
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or stem)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array))
    node.SetIJKToRASMatrix(_numpy_to_matrix(volume.ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    node.SetAttribute(SOURCE_PATH_ATTRIBUTE, resolved)
    return node


# ----------------------------------------------------------------------------------------------
# Whole-scene batch
# ----------------------------------------------------------------------------------------------


def ct_volume_nodes(scene: Any) -> list[Any]:
    """Scalar volumes that can be classified: not labelmaps and not outputs of this module."""
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    found = []
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute(ROLE_ATTRIBUTE):
            continue
        found.append(node)
    return found


def classify_volume_nodes(
    classify: Callable[..., Classification],
    volume_nodes: Iterable[Any],
    record_for: Callable[[Any], dict] = lambda node: {},
    lesion_for: Callable[[Any], Any] = lambda node: None,
    show: bool = False,
    **classify_kwargs: Any,
) -> dict[str, SceneOutputs]:
    """Classify many CT nodes in turn on this thread (console batch work); returns outputs by node ID.

    ``classify`` is ``predictor.classify``; ``record_for`` and ``lesion_for`` give each node's
    clinical record and lesion node (None: whole volume).
    """
    written: dict[str, SceneOutputs] = {}
    for node in volume_nodes:
        volume = volume_from_node(node)
        lesion = lesion_from_node(lesion_for(node), node)
        result = classify(volume, record_for(node), lesion=lesion, **classify_kwargs)
        written[node.GetID()] = write_outputs(node, result, show=show)
    return written

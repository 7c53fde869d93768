"""Lung-PET-CT-Dx bounding boxes: ``Annotation/<ID>/<SOPInstanceUID>.xml`` in LabelImg PASCAL-VOC form.

Each file describes one annotated slice; its name (not its content) is the slice's SOPInstanceUID.
The class of a lesion comes from the patient ID, never from ``<name>``: real files carry 'Q', empty
names or patient IDs there. Faulty files and boxes are skipped with one warning each.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from MMCAFNetLib.dataset.report import IndexReport
from MMCAFNetLib.results import CLASS_LABELS

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class AnnotationError(ValueError):
    """An annotation file that cannot be used (the message names the file and the problem)."""


@dataclass(frozen=True)
class SliceBox:
    """One box on one slice, in that slice's pixel coordinates (x = column, y = row, inclusive)."""

    sop_uid: str
    name: str
    xmin: int
    ymin: int
    xmax: int
    ymax: int
    path: str = ""


def _int(obj: ET.Element, tag: str, path: Path) -> int:
    node = obj.find(tag)
    if node is None or node.text is None or not node.text.strip():
        raise AnnotationError(f"{path}: <bndbox> has no <{tag}>")
    try:
        return round(float(node.text.strip()))
    except ValueError:
        raise AnnotationError(f"{path}: <{tag}> is not a number: {node.text!r}") from None


def parse_annotation_file(path: str | Path) -> list[SliceBox]:
    """All ``<object>`` boxes of one LabelImg VOC file (names as written, unchecked).

    Raises AnnotationError when the file is not well-formed VOC XML or a box is unreadable.
    """
    path = Path(path)
    sop_uid = path.stem.strip()
    if not _UID.match(sop_uid):
        raise AnnotationError(f"{path}: the file name is not a SOPInstanceUID")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: unparsable XML ({exc})") from None
    if root.tag != "annotation":
        raise AnnotationError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    boxes = []
    for obj in root.iter("object"):
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise AnnotationError(f"{path}: <object> without <bndbox>")
        name_node = obj.find("name")
        name = (name_node.text or "").strip() if name_node is not None else ""
        x0, y0, x1, y1 = (_int(bndbox, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        if x1 < x0 or y1 < y0:
            raise AnnotationError(f"{path}: box has max < min ({x0},{y0})-({x1},{y1})")
        boxes.append(SliceBox(sop_uid, name, min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1), str(path)))
    return boxes


def read_patient_annotations(folder: str | Path, patient_short_id: str, report: IndexReport) -> dict[str, list[SliceBox]]:
    """Boxes of one patient's annotation folder by SOPInstanceUID; faulty files/boxes skipped with a warning."""
    folder = Path(folder)
    expected = patient_short_id[:1].upper()
    by_uid: dict[str, list[SliceBox]] = {}
    for path in sorted(folder.glob("*.xml")):
        try:
            boxes = parse_annotation_file(path)
        except AnnotationError as exc:
            report.warn("unparsable annotation", str(exc))
            continue
        if not boxes:
            report.warn("annotation without box", f"{path}: no <object> box")
            continue
        for box in boxes:
            name = box.name.upper()
            if name not in CLASS_LABELS:
                what = "empty" if not name else f"{box.name!r}"
                report.warn("bad annotation label", f"{path}: label {what} is not a class letter (A, B, E, G); box skipped")
                continue
            if name != expected:
                report.warn(
                    "label differs from ID",
                    f"{path}: label {name!r} differs from the patient ID {patient_short_id}; box kept, class {expected} from the ID",
                )
            by_uid.setdefault(box.sop_uid, []).append(box)
    return by_uid


def annotation_folders(annotation_root: str | Path) -> dict[str, Path]:
    """Annotation/<ID>/ folders by normalised short ID ('A0001')."""
    root = Path(annotation_root)
    if not root.is_dir():
        return {}
    return {p.name.strip().rsplit("-", 1)[-1].upper(): p for p in sorted(root.iterdir()) if p.is_dir()}

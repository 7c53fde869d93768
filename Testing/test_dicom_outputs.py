"""DICOM SEG and Parametric Map outputs, read back with pydicom and highdicom.

On a real series (pydicom's CT5N chest CT, with hand-made maps on its grid) and through
`mmcafnet predict` on a series written by the synthetic cohort writer: references to the source
series and instances, geometry against the source headers, the segment, the stored values.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from test_inference_support import write_untrained_checkpoint

from MMCAFNetLib.results import Classification
from MMCAFNetLib.volume import Volume, lps_from_ras, read_volume

hd = pytest.importorskip("highdicom", reason="highdicom (a run-time dependency) is not installed")

from MMCAFNetLib.inference.dicom_outputs import (  # noqa: E402
    HEATMAP_LEVELS,
    build_parametric_map,
    heatmap_transfer_syntax,
    read_source_headers,
    write_dicom_outputs,
)
from MMCAFNetLib.inference.heatmap_file import read_heatmap  # noqa: E402

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
SHA = "0123456789abcdef" * 4


def real_series(name: str = "dicomdirtests/98892001/CT5N") -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's test series {name} is not installed")
    return str(path)


def source_headers(folder: str) -> dict[str, pydicom.Dataset]:
    return {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(os.path.join(folder, n)) for n in os.listdir(folder))}


def classification(ct: Volume, heat: np.ndarray, label_value: int = 4, threshold: float = 0.5) -> Classification:
    labels = np.where(heat >= threshold, label_value, 0).astype(np.uint8)
    return Classification(
        class_names=["A", "G"], class_labels=["Adenocarcinoma", "Squamous cell carcinoma"],
        probabilities=np.array([0.3, 0.7]), predicted_index=1, threshold=threshold, windows=[],
        heatmap=Volume(heat.astype(np.float32), ct.ijk_to_ras, {}), labelmap=Volume(labels, ct.ijk_to_ras, {}),
        label_value=label_value, timings={},
        model={"model_name": "mmcafnet-lite", "model_id": "mmcafnet-lite@0123456789ab", "sha256": SHA,
               "heatmap": "attention"},
    )


def frame_positions(ds) -> np.ndarray:
    return np.array([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                     for f in ds.PerFrameFunctionalGroupsSequence])


def lps_position(ct: Volume, i: float, j: float, k: float) -> np.ndarray:
    return (lps_from_ras(ct.ijk_to_ras) @ np.array([i, j, k, 1.0]))[:3]


def lattice_index(ct: Volume, position_lps: np.ndarray) -> tuple[int, int, int]:
    """(i, j, k) of a point that must lie on the CT's voxel lattice."""
    m = lps_from_ras(ct.ijk_to_ras)
    ijk = np.linalg.solve(m[:3, :3], np.asarray(position_lps) - m[:3, 3])
    np.testing.assert_allclose(ijk, np.rint(ijk), atol=1e-3)
    return tuple(int(v) for v in np.rint(ijk))


def read_both(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hd.seg.segread(folder / "segmentation.dcm"), pydicom.dcmread(folder / "heatmap.dcm")


def check_common_references(obj, source: pydicom.Dataset) -> None:
    for key in ("StudyInstanceUID", "PatientID", "FrameOfReferenceUID"):
        assert getattr(obj, key) == getattr(source, key), key
    assert obj.SeriesInstanceUID != source.SeriesInstanceUID  # a new series in the same study
    assert obj.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID


def test_seg_and_parametric_map_on_a_real_ct_series(tmp_path) -> None:
    folder = real_series()
    ct = read_volume(folder)
    sources = source_headers(folder)
    first = sources[ct.meta["sop_instance_uids"][0]]
    heat = np.zeros(ct.shape, np.float32)
    heat[1:4, 3:9, 5:12] = np.linspace(0.2, 1.0, 7, dtype=np.float32)  # >= 0.5 from column 7 on
    result = classification(ct, heat)

    assert write_dicom_outputs(result, ct, tmp_path) == ["segmentation.dcm", "heatmap.dcm"]
    seg, pm = read_both(tmp_path)

    # SEG: class, model, checkpoint; references; geometry of each frame against its source instance.
    assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
    check_common_references(seg, first)
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Squamous cell carcinoma"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert "mmcafnet-lite" in algorithm.AlgorithmName and SHA in algorithm.AlgorithmParameters
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(
        [float(v) for v in first.PixelSpacing], abs=1e-5)
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(
        [float(v) for v in first.ImageOrientationPatient], abs=1e-6)
    assert seg.NumberOfFrames == 3  # only the slices that hold the region
    referenced = {ref.ReferencedSOPInstanceUID for ref in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(ct.meta["sop_instance_uids"][1:4])
    mask = result.labelmap.array != 0
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = sources[uid]
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(
            [float(v) for v in source.ImagePositionPatient], abs=1e-4)
        k = ct.meta["sop_instance_uids"].index(uid)
        np.testing.assert_array_equal(seg.pixel_array[n] != 0, mask[k])

    # Parametric Map: the non-zero block of the heatmap on the CT's lattice, values back to 0..1.
    assert pm.SOPClassUID == PARAMETRIC_MAP_STORAGE and pm.file_meta.TransferSyntaxUID == JPEGLSLossless
    check_common_references(pm, first)
    assert (pm.NumberOfFrames, pm.Rows, pm.Columns) == (3, 6, 7)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    values = pm.pixel_array * float(mapping.RealWorldValueSlope) + float(mapping.RealWorldValueIntercept)
    ks = []
    for position, frame in zip(frame_positions(pm), values):  # frames in any order, each at its own place
        i, j, k = lattice_index(ct, position)
        assert (i, j) == (5, 3)
        np.testing.assert_allclose(frame, heat[k, 3:9, 5:12], atol=1.0 / HEATMAP_LEVELS)
        ks.append(k)
    assert sorted(ks) == [1, 2, 3]


def test_a_map_non_zero_everywhere_is_compressed_losslessly(tmp_path) -> None:
    """A whole-volume scan's map covers the CT: stored with JPEG-LS lossless, it decodes (pydicom with
    pyjpegls) to exactly the levels heatmap.nrrd stores, and to the same values as an uncompressed copy."""
    from MMCAFNetLib.inference.heatmap_file import quantise

    folder = real_series()
    ct = read_volume(folder)
    sources = [s for _, s in sorted(source_headers(folder).items(),
                                    key=lambda item: ct.meta["sop_instance_uids"].index(item[0]))]
    k, j, i = np.meshgrid(*(np.linspace(0.0, 1.0, n, dtype=np.float32) for n in ct.shape), indexing="ij")
    heat = 0.05 + 0.9 * np.exp(-((k - 0.5) ** 2 + (j - 0.4) ** 2 + (i - 0.6) ** 2) / 0.1)  # smooth, > 0 everywhere
    result = classification(ct, heat.astype(np.float32))
    sizes, decoded = {}, {}
    for syntax in (JPEGLSLossless, ExplicitVRLittleEndian):
        path = tmp_path / f"{syntax.name}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_parametric_map(result, ct, sources, transfer_syntax=syntax).save_as(path)
        pm = pydicom.dcmread(path)
        assert pm.file_meta.TransferSyntaxUID == syntax
        assert (pm.NumberOfFrames, pm.Rows, pm.Columns) == ct.shape  # nothing to crop
        ks = [lattice_index(ct, p)[2] for p in frame_positions(pm)]
        decoded[syntax] = pm.pixel_array[np.argsort(ks)]
        sizes[syntax] = len(pm.PixelData)
    np.testing.assert_array_equal(decoded[JPEGLSLossless], decoded[ExplicitVRLittleEndian])
    np.testing.assert_array_equal(decoded[JPEGLSLossless], quantise(heat))
    assert sizes[JPEGLSLossless] < sizes[ExplicitVRLittleEndian]  # 1/24 on a 512 x 512 x 313 scan (bench W8)


def test_a_highdicom_that_refuses_jpeg_ls_gets_the_map_uncompressed(tmp_path, monkeypatch) -> None:
    """Where highdicom will not write a JPEG-LS map (older versions, or an encoder that fails), the
    map is written uncompressed with the same stored values; where the uncompressed map fails too,
    that error reaches the caller."""
    folder = real_series()
    ct = read_volume(folder)
    sources = [s for _, s in sorted(source_headers(folder).items(),
                                    key=lambda item: ct.meta["sop_instance_uids"].index(item[0]))]
    heat = np.zeros(ct.shape, np.float32)
    heat[1:3, 4:12, 5:13] = np.linspace(0.1, 1.0, 8, dtype=np.float32)[None, :, None]
    result = classification(ct, heat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = build_parametric_map(result, ct, sources, transfer_syntax=ExplicitVRLittleEndian)
    original = hd.pm.ParametricMap
    asked = []

    def refusing(*args, transfer_syntax_uid, **kwargs):
        asked.append(transfer_syntax_uid)
        if transfer_syntax_uid != ExplicitVRLittleEndian:
            raise ValueError(f"Transfer syntax {transfer_syntax_uid} is not supported")
        return original(*args, transfer_syntax_uid=transfer_syntax_uid, **kwargs)

    monkeypatch.setattr(hd.pm, "ParametricMap", refusing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = build_parametric_map(result, ct, sources, transfer_syntax=JPEGLSLossless)
    assert asked == [JPEGLSLossless, ExplicitVRLittleEndian]
    path = tmp_path / "heatmap.dcm"
    pm.save_as(path)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(back.pixel_array, expected.pixel_array)

    def failing(*args, transfer_syntax_uid, **kwargs):
        raise ValueError("no Parametric Map today")

    monkeypatch.setattr(hd.pm, "ParametricMap", failing)
    with pytest.raises(ValueError, match="no Parametric Map today"):
        build_parametric_map(result, ct, sources, transfer_syntax=JPEGLSLossless)


def test_without_a_jpeg_ls_encoder_the_map_is_planned_uncompressed(monkeypatch) -> None:
    import pydicom.pixels.encoders as encoders

    class Unavailable:
        is_available = False

    monkeypatch.setattr(encoders, "JPEGLSLosslessEncoder", Unavailable)
    assert heatmap_transfer_syntax() == ExplicitVRLittleEndian


def test_predict_writes_seg_and_parametric_map_for_a_dicom_series(tmp_path) -> None:
    from MMCAFNetLib.cli import main
    from MMCAFNetLib.inference.predictor import file_sha256
    from MMCAFNetLib.synthetic import write_cohort

    ckpt = write_untrained_checkpoint(tmp_path / "untrained.pt")
    patient = write_cohort(tmp_path / "cohort", patients=1, seed=4, size=96, extra_series=False).patients[0]
    out = tmp_path / "result"
    point = [f"{v:.4f}" for v in patient.lesion_center_ras]
    assert main(["predict", "--checkpoint", str(ckpt), "--input", patient.series_path, "--out", str(out),
                 "--point", *point, "--no-preview"]) == 0
    assert {"segmentation.dcm", "heatmap.dcm"} <= set(os.listdir(out))
    info = json.loads((out / "prediction.json").read_text())
    ct = read_volume(patient.series_path)
    labels, heat = read_volume(out / "labelmap.nrrd"), read_heatmap(out / "heatmap.nrrd", full_grid=True)
    sources = source_headers(patient.series_path)
    seg, pm = read_both(out)

    check_common_references(seg, next(iter(sources.values())))
    assert seg.SegmentSequence[0].SegmentLabel == info["predicted_label"]
    assert file_sha256(ckpt) in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    # highdicom rebuilds the SEG as a volume (slice, row, column): the same voxels as labelmap.nrrd.
    seg_volume = seg.get_volume(combine_segments=True, relabel=True)
    ijk_to_lps = lps_from_ras(ct.ijk_to_ras)
    np.testing.assert_allclose(seg_volume.affine[:3, 1], ijk_to_lps[:3, 1], atol=1e-5)  # down a column: j
    np.testing.assert_allclose(seg_volume.affine[:3, 2], ijk_to_lps[:3, 0], atol=1e-5)  # along a row: i
    seen = []
    for a, plane in enumerate(seg_volume.array):
        i, j, k = lattice_index(ct, (seg_volume.affine @ np.array([a, 0, 0, 1.0]))[:3])
        assert (i, j) == (0, 0)
        np.testing.assert_array_equal(plane != 0, labels.array[k] != 0)
        seen.append(k)
    assert all(not labels.array[k].any() for k in set(range(ct.shape[0])) - set(seen))

    check_common_references(pm, next(iter(sources.values())))
    assert pm.file_meta.TransferSyntaxUID == heatmap_transfer_syntax() == JPEGLSLossless  # pyjpegls: highdicom's
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    stored = 0.0
    frames = pm.pixel_array.reshape(int(pm.NumberOfFrames), pm.Rows, pm.Columns)  # one frame: 2-D
    for position, frame in zip(frame_positions(pm), frames * float(mapping.RealWorldValueSlope)):
        i0, j0, k = lattice_index(ct, position)
        block = heat.array[k, j0: j0 + pm.Rows, i0: i0 + pm.Columns]
        np.testing.assert_allclose(frame, block, atol=1e-6)  # the same levels as heatmap.nrrd
        stored += float(block.sum())
    assert float(heat.array.sum()) == pytest.approx(stored, rel=1e-5)  # nothing outside the stored block

    # --no-dicom skips them; a re-run into the same folder removes the older copies.
    assert main(["predict", "--checkpoint", str(ckpt), "--input", patient.series_path, "--out", str(out),
                 "--point", *point, "--no-preview", "--no-dicom"]) == 0
    assert not {"segmentation.dcm", "heatmap.dcm"} & set(os.listdir(out))


def test_an_empty_region_gives_a_seg_with_one_empty_frame(tmp_path) -> None:
    folder = real_series()
    ct = read_volume(folder)
    heat = np.full(ct.shape, 0.1, np.float32)  # under the threshold everywhere
    write_dicom_outputs(classification(ct, heat), ct, tmp_path)
    seg, pm = read_both(tmp_path)
    assert seg.NumberOfFrames == 1 and not seg.pixel_array.any()
    assert seg.SegmentSequence[0].SegmentLabel == "Squamous cell carcinoma"
    assert (pm.NumberOfFrames, pm.Rows, pm.Columns) == (*ct.shape,)


def test_source_files_gone_gives_a_warning_and_the_other_files(tmp_path) -> None:
    import shutil

    from MMCAFNetLib.inference import write_outputs

    folder = tmp_path / "series"
    shutil.copytree(real_series(), folder)
    ct = read_volume(folder)
    shutil.rmtree(folder)
    heat = np.zeros(ct.shape, np.float32)
    heat[2, 4:8, 4:8] = 0.9
    result = classification(ct, heat)
    written = write_outputs(result, ct, tmp_path / "out", preview=False)
    assert "segmentation.dcm" not in written and "labelmap.nrrd" in written
    assert any("segmentation.dcm and heatmap.dcm were not written" in w and "no longer" in w for w in result.warnings)
    info = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert info["warnings"] == result.warnings


def test_read_source_headers_follow_the_volume_slice_order() -> None:
    folder = real_series()
    ct = read_volume(folder)
    headers = read_source_headers(ct)
    assert [ds.SOPInstanceUID for ds in headers] == ct.meta["sop_instance_uids"]
    assert all("PixelData" not in ds for ds in headers)


def test_a_resampled_oblique_series_gets_frames_on_the_volume_grid(tmp_path) -> None:
    """Uneven slice spacing: the reader resamples onto a regular grid, so frames no longer sit on
    source instances; they carry the volume's own positions and reference the whole source series."""
    from test_volume_dicom import stored_ramp, write_series

    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    orientation = (c, s, 0.0, -s, c, 0.0)  # rotated in-plane
    normal = np.cross(orientation[:3], orientation[3:])
    steps = np.array([0.0, 2.0, 4.0, 6.6, 8.0, 10.0, 12.0])
    positions = np.array([-50.0, -60.0, 70.0]) + steps[:, None] * normal
    write_series(tmp_path / "series", stored_ramp(k=7, rows=14, cols=12), orientation=orientation, positions=positions)
    ct = read_volume(tmp_path / "series")
    assert ct.meta["sop_instance_uids"] is None  # the premise: resampled
    heat = np.zeros(ct.shape, np.float32)
    heat[2:5, 4:9, 3:8] = 0.8
    out = tmp_path / "out"
    out.mkdir()
    write_dicom_outputs(classification(ct, heat), ct, out)
    seg, pm = read_both(out)
    sources = source_headers(str(tmp_path / "series"))
    for obj in (seg, pm):
        check_common_references(obj, next(iter(sources.values())))
        assert {r.ReferencedSOPInstanceUID for r in obj.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(sources)
        shared = obj.SharedFunctionalGroupsSequence[0]
        assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(orientation, abs=1e-6)
        assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx([0.7, 0.8], abs=1e-6)
    ks = []
    for position, frame in zip(frame_positions(seg), seg.pixel_array):
        i, j, k = lattice_index(ct, position)
        assert (i, j) == (0, 0)
        np.testing.assert_array_equal(frame != 0, heat[k] >= 0.5)
        ks.append(k)
    assert sorted(ks) == [2, 3, 4]
    assert {lattice_index(ct, p)[:2] for p in frame_positions(pm)} == {(3, 4)}

"""The Predictor on real torch, real synthetic CTs and a real (untrained) checkpoint file."""

from __future__ import annotations

import os
import pickle
import threading

import numpy as np
import pytest
import torch
from test_inference_support import box_contains, boxes_intersect, write_untrained_checkpoint

from MMCAFNetLib import heatmap as hm
from MMCAFNetLib.checkpoint import FORMAT_VERSION, CheckpointError
from MMCAFNetLib.inference import InputError, Predictor
from MMCAFNetLib.inference.predictor import _windows_module, aggregate_window_probabilities
from MMCAFNetLib.results import CLASS_LABELS, Cancelled
from MMCAFNetLib.synthetic import make_case
from MMCAFNetLib.volume import LPS_TO_RAS, Volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    return write_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "untrained.pt")


@pytest.fixture(scope="module")
def predictor(checkpoint_path):
    return Predictor.load(checkpoint_path, device="cpu")


@pytest.fixture(scope="module")
def case():
    return make_case("A", 11, 96)


def assert_on_input_grid(vol: Volume, ct: Volume) -> None:
    assert vol.shape == ct.shape
    np.testing.assert_allclose(vol.spacing, ct.spacing, atol=1e-9)
    np.testing.assert_allclose(vol.origin, ct.origin, atol=1e-9)
    np.testing.assert_allclose(vol.directions, ct.directions, atol=1e-9)


def outside_all_windows(result, ct: Volume) -> np.ndarray:
    """bool (K, J, I): voxels whose RAS position lies outside every evaluated window's box (with a voxel margin)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in ct.shape], indexing="ij")
    ras = ct.ijk_to_ras_points(np.c_[i.ravel(), j.ravel(), k.ravel()])
    margin = float(ct.spacing.max())
    inside = np.zeros(len(ras), bool)
    for w in result.windows:
        lo, hi = np.asarray(w.box_ras[0]) - margin, np.asarray(w.box_ras[1]) + margin
        inside |= np.all((ras >= lo) & (ras <= hi), axis=1)
    return ~inside.reshape(ct.shape)


# ----------------------------------------------------------------------------------------- loading


def test_load_builds_the_model_once_in_eval_mode(predictor, checkpoint_path) -> None:
    assert not predictor.model.training
    assert predictor.device.type == "cpu"
    assert predictor.class_names == ["A", "G"]
    assert predictor.binary and not predictor.is_demo
    info = predictor.info
    assert info["model_name"] == "mmcafnet-lite" and info["class_labels"] == ["Adenocarcinoma", "Squamous cell carcinoma"]
    assert info["clinical_fields"] == list(predictor.schema.field_names)
    assert len(info["sha256"]) == 64 and info["model_id"].startswith("mmcafnet-lite@")
    assert all(not p.requires_grad for p in predictor.model.parameters())


def test_a_pickled_object_checkpoint_is_refused_without_running_it(tmp_path) -> None:
    marker = tmp_path / "code-ran.txt"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"format_version": 1, "payload": Exploit()}, fh, protocol=2)
    torch_saved = tmp_path / "evil-torch.pt"
    torch.save({"format_version": 1, "payload": Exploit()}, torch_saved)
    for path in (evil, torch_saved):
        with pytest.raises(CheckpointError, match="safely"):
            Predictor.load(path, device="cpu")
    assert not marker.exists(), "loading a checkpoint executed code"


def test_a_newer_checkpoint_format_is_refused_naming_both_versions(checkpoint_path, tmp_path) -> None:
    payload = torch.load(checkpoint_path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    with pytest.raises(CheckpointError) as err:
        Predictor.load(newer, device="cpu")
    assert str(FORMAT_VERSION + 1) in str(err.value) and str(FORMAT_VERSION) in str(err.value)
    assert "Update" in str(err.value)


def test_missing_checkpoint_and_unknown_device(checkpoint_path, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        Predictor.load(tmp_path / "none.pt")
    with pytest.raises(ValueError, match="device"):
        Predictor.load(checkpoint_path, device="tpu")


# ------------------------------------------------------------------------------------ classification


def test_point_guided_run_gives_probabilities_heatmap_and_labelmap_on_the_input_grid(predictor, case) -> None:
    point = np.asarray(case.lesion_center_ras)
    result = predictor.classify(case.volume, case.record, lesion=point, heatmap="attention", threshold=0.5)
    assert result.probabilities.shape == (2,)
    assert result.probabilities.sum() == pytest.approx(1.0)
    p = result.probabilities[1]
    assert result.predicted_class == ("G" if p >= predictor.decision_threshold else "A")
    # Binary: p is the max over windows of the positive class.
    assert p == pytest.approx(max(w.probabilities[1] for w in result.windows))
    assert result.windows and all(box_contains(w.box_ras, point) for w in result.windows)
    assert_on_input_grid(result.heatmap, case.volume)
    assert_on_input_grid(result.labelmap, case.volume)
    heat = result.heatmap.array
    assert heat.dtype == np.float32 and heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    assert result.labelmap.array.dtype == np.uint8
    value = CLASS_LABELS[result.predicted_class][0]
    assert result.label_value == value
    np.testing.assert_array_equal(result.labelmap.array == value, (heat >= 0.5) & (heat > 0))
    assert set(np.unique(result.labelmap.array)) <= {0, value}
    assert np.all(heat[outside_all_windows(result, case.volume)] == 0.0)
    assert {"prepare_s", "inference_s", "heatmap_s", "total_s"} <= set(result.timings)
    assert result.model["model_name"] == "mmcafnet-lite" and result.model["demo"] is False


def test_box_and_mask_guided_runs_evaluate_only_windows_covering_the_lesion(predictor, case) -> None:
    box = np.asarray(case.lesion_box_ras)
    by_box = predictor.classify(case.volume, case.record, lesion=box, heatmap=None)
    assert by_box.heatmap is None and by_box.labelmap is None
    assert by_box.windows and all(boxes_intersect(w.box_ras, box) for w in by_box.windows)
    # Together the windows cover the whole lesion box.
    lo = np.min([w.box_ras[0] for w in by_box.windows], axis=0)
    hi = np.max([w.box_ras[1] for w in by_box.windows], axis=0)
    assert np.all(lo <= box[0] + 1e-6) and np.all(hi >= box[1] - 1e-6)
    # Corners given in any order mean the same box.
    swapped = predictor.classify(case.volume, case.record, lesion=box[::-1], heatmap=None)
    assert [w.center_ras for w in swapped.windows] == [w.center_ras for w in by_box.windows]
    # A mask: its bounding box.
    mask = case.volume.with_array(case.lesion_mask.astype(np.uint8))
    by_mask = predictor.classify(case.volume, case.record, lesion=mask, heatmap=None)
    assert by_mask.windows and all(boxes_intersect(w.box_ras, box) for w in by_mask.windows)


def test_sliding_windows_skip_air_and_aggregate_by_max(predictor, case) -> None:
    progress: list[tuple[int, int]] = []
    result = predictor.classify(case.volume, case.record, lesion=None, heatmap="attention", batch_size=4,
                                progress=lambda d, t: progress.append((d, t)))
    n = len(result.windows)
    assert n > 1
    total = progress[-1][1]
    assert progress[-1] == (n, n) and total == n
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert len(progress) == -(-n // 4)  # one report per batch
    p = np.array([w.probabilities for w in result.windows])
    np.testing.assert_allclose(result.probabilities[1], p[:, 1].max())
    # Every window has body in it: its centre region is not all air.
    win = _windows_module()
    prepared = win.prepare_volume(case.volume, predictor.preset)
    for w in result.windows:
        c = np.round(prepared.ras_to_ijk_points(np.asarray(w.center_ras))[0]).astype(int)[::-1]
        cut = win.cut_window(prepared, tuple(c), predictor.preset)
        assert (cut.array > predictor.preset.normalise(np.float32(-900.0))).any()
    # The whole body was scanned: the lesion lies inside at least one window.
    assert any(box_contains(w.box_ras, case.lesion_center_ras) for w in result.windows)
    assert_on_input_grid(result.heatmap, case.volume)


def test_gradcam_heatmap_needs_no_parameter_gradients(predictor, case) -> None:
    result = predictor.classify(case.volume, case.record, lesion=case.lesion_center_ras, heatmap="gradcam")
    assert_on_input_grid(result.heatmap, case.volume)
    assert result.heatmap.meta["method"] == "gradcam"
    assert result.heatmap.array.min() >= 0.0 and result.heatmap.array.max() <= 1.0
    assert all(p.grad is None for p in predictor.model.parameters())
    # Same probabilities as the attention run: Grad-CAM does not change the forward pass.
    plain = predictor.classify(case.volume, case.record, lesion=case.lesion_center_ras, heatmap=None)
    np.testing.assert_allclose(result.probabilities, plain.probabilities, atol=1e-5)


@pytest.mark.parametrize("frame", ["oblique", "lps-flipped", "permuted"])
def test_heatmap_follows_oblique_and_flipped_inputs(predictor, case, frame) -> None:
    base = case.volume
    array = base.array
    ijk = base.ras_to_ijk_points(np.asarray(case.lesion_center_ras))[0]
    if frame == "permuted":  # stored sagittally: i and k swapped
        array = np.ascontiguousarray(base.array.transpose(2, 1, 0))
        affine = base.ijk_to_ras.copy()
        affine[:3, [0, 2]] = affine[:3, [2, 0]]
        ijk = ijk[::-1]
    elif frame == "oblique":
        t = np.deg2rad(15.0)
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        affine = base.ijk_to_ras.copy()
        affine[:3, :3] = rot @ affine[:3, :3]
        affine[:3, 3] = rot @ affine[:3, 3]
    else:
        affine = LPS_TO_RAS @ base.ijk_to_ras  # the same array, mirrored in R and A
    ct = Volume(array, affine, dict(base.meta))
    # The lesion moves with the frame: map its voxel centre through the new matrix.
    point = ct.ijk_to_ras_points([ijk])[0]
    result = predictor.classify(ct, case.record, lesion=point, heatmap="attention")
    assert_on_input_grid(result.heatmap, ct)
    assert_on_input_grid(result.labelmap, ct)
    assert all(box_contains(w.box_ras, point) for w in result.windows)
    assert np.all(result.heatmap.array[outside_all_windows(result, ct)] == 0.0)


def test_a_one_hot_window_map_lands_on_its_voxel_through_the_real_window_grid(predictor, case) -> None:
    """Windows cut by the pipeline, a map with one hot voxel, back onto the CT grid: the peak is
    at that voxel's RAS position."""
    win = _windows_module()
    prepared = win.prepare_volume(case.volume, predictor.preset)
    c = np.round(prepared.ras_to_ijk_points(np.asarray(case.lesion_center_ras))[0]).astype(int)[::-1]
    window = win.cut_window(prepared, tuple(c), predictor.preset)
    onehot = np.zeros(window.array.shape, np.float32)
    voxel_kji = (3, 20, 9)
    onehot[voxel_kji] = 1.0
    canvas = hm.WindowCanvas(prepared.shape, prepared.ijk_to_ras)
    canvas.add(onehot, window.ijk_to_ras)
    heat = hm.heatmap_volume(canvas, case.volume)
    expected = (np.asarray(window.ijk_to_ras) @ np.array([voxel_kji[2], voxel_kji[1], voxel_kji[0], 1.0]))[:3]
    got = hm.peak_ras(heat)
    # Within one CT voxel diagonal (the CT grid samples the map's peak at its nearest voxel).
    assert np.linalg.norm(got - expected) <= np.linalg.norm(case.volume.spacing)


def test_four_class_model_uses_softmax_and_the_colour_table(tmp_path, case) -> None:
    path = write_untrained_checkpoint(tmp_path / "abeg.pt", class_names=("A", "B", "E", "G"), seed=3)
    pred = Predictor.load(path, device="cpu")
    assert not pred.binary
    result = pred.classify(case.volume, case.record, lesion=case.lesion_center_ras, heatmap="gradcam")
    assert result.probabilities.shape == (4,) and result.probabilities.sum() == pytest.approx(1.0)
    assert result.predicted_index == int(np.argmax(result.probabilities))
    assert result.label_value == CLASS_LABELS[result.predicted_class][0]
    assert set(np.unique(result.labelmap.array)) <= {0, result.label_value}


def test_aggregation_is_the_max_over_windows() -> None:
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    np.testing.assert_allclose(aggregate_window_probabilities(probs, binary=True), [0.3, 0.7])
    multi = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]])
    out = aggregate_window_probabilities(multi, binary=False)
    np.testing.assert_allclose(out, np.array([0.7, 0.1, 0.2, 0.6]) / 1.6)


# ------------------------------------------------------------------------------ cancel and threads


def test_cancel_from_the_progress_callback_raises_and_returns_nothing(predictor, case) -> None:
    cancel = threading.Event()
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        cancel.set()

    result = None
    with pytest.raises(Cancelled):
        result = predictor.classify(case.volume, case.record, lesion=None, heatmap="attention",
                                    progress=progress, cancel=cancel, batch_size=1)
    assert result is None
    assert len(seen) == 1 and seen[0][0] == 1 and seen[0][1] > 1  # stopped after the first batch
    # The predictor is still usable afterwards.
    again = predictor.classify(case.volume, case.record, lesion=case.lesion_center_ras, heatmap=None)
    assert again.probabilities.shape == (2,)


def test_classify_runs_on_a_worker_thread(predictor, case) -> None:
    out: dict[str, object] = {}

    def work() -> None:
        try:
            out["result"] = predictor.classify(case.volume, case.record, lesion=case.lesion_center_ras)
        except BaseException as exc:  # pragma: no cover - reported below
            out["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    assert "error" not in out, out.get("error")
    assert out["result"].heatmap.shape == case.volume.shape


# ------------------------------------------------------------------------------------ bad input


def test_refusals_name_the_problem(predictor, case) -> None:
    vol = case.volume
    air = vol.with_array(np.full(vol.shape, -1000, np.int16))
    with pytest.raises(InputError, match="all air"):
        predictor.classify(air, case.record)
    nan = vol.with_array(vol.array.astype(np.float32))
    nan.array[3, 4, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        predictor.classify(nan, case.record)
    single = Volume(vol.array[:1].copy(), vol.ijk_to_ras)
    with pytest.raises(InputError, match="2D"):
        predictor.classify(single, case.record)
    with pytest.raises(ValueError, match="3D"):
        Volume(vol.array[None], vol.ijk_to_ras)  # a 4D array is not even a Volume
    four_d = Volume(vol.array, vol.ijk_to_ras)
    four_d.array = vol.array[None]
    with pytest.raises(InputError, match="4D"):
        predictor.classify(four_d, case.record)
    two_d = Volume(vol.array, vol.ijk_to_ras)
    two_d.array = vol.array[0]
    with pytest.raises(InputError, match="2D"):
        predictor.classify(two_d, case.record)
    far = vol.ijk_to_ras_points([[-50, -50, -50]])[0]
    with pytest.raises(InputError, match="outside the CT"):
        predictor.classify(vol, case.record, lesion=far)
    with pytest.raises(InputError, match="outside the CT"):
        predictor.classify(vol, case.record, lesion=np.stack([far, far + 1.0]))
    with pytest.raises(InputError, match="empty"):
        predictor.classify(vol, case.record, lesion=vol.with_array(np.zeros(vol.shape, np.uint8)))
    with pytest.raises(InputError, match="point"):
        predictor.classify(vol, case.record, lesion=[1.0, 2.0])
    with pytest.raises(InputError, match="heatmap"):
        predictor.classify(vol, case.record, lesion=case.lesion_center_ras, heatmap="saliency")
    with pytest.raises(InputError, match="threshold"):
        predictor.classify(vol, case.record, lesion=case.lesion_center_ras, threshold=1.5)
    with pytest.raises(ValueError, match="age"):
        predictor.classify(vol, {**case.record, "age": "banana"}, lesion=case.lesion_center_ras)
    with pytest.raises(ValueError, match="did you mean 'age'"):
        predictor.classify(vol, {**case.record, "agee": 61}, lesion=case.lesion_center_ras)
    # a sex other than M or F is unknown (imputed), with a warning, not an error
    other = predictor.classify(vol, {**case.record, "sex": "banana"}, lesion=case.lesion_center_ras, heatmap=None)
    assert any("banana" in w and "unknown" in w for w in other.warnings), other.warnings


def test_non_ct_modality_and_odd_values_give_warnings(predictor, case) -> None:
    vol = case.volume
    mr = Volume(vol.array, vol.ijk_to_ras, {**vol.meta, "modality": "MR"})
    result = predictor.classify(mr, case.record, lesion=case.lesion_center_ras, heatmap=None)
    assert any("MR" in w and "CT" in w for w in result.warnings)
    stored = vol.with_array(vol.array.astype(np.int32) + 1024)  # stored values, rescale not applied
    result = predictor.classify(stored, case.record, lesion=case.lesion_center_ras, heatmap=None)
    assert any("HU" in w for w in result.warnings)
    partial = {k: v for k, v in case.record.items() if k not in ("weight", "smoking")}
    result = predictor.classify(vol, partial, lesion=case.lesion_center_ras, heatmap=None)
    assert any("weight" in w and "smoking" in w for w in result.warnings)


def test_nothing_is_left_behind_in_the_working_folder(predictor, case, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    predictor.classify(case.volume, case.record, lesion=case.lesion_center_ras)
    assert os.listdir(tmp_path) == []

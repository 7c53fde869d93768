"""The job API of MMCAFNetLib.slicer_logic on Slicer's real MRML scene: worker thread, progress,
cancel, refusal of a second job, failures leaving the scene as it was, CUDA OOM fallback, batch.

The classifier is the real Predictor on a real (small, untrained) mmcafnet-lite checkpoint when
MMCAFNetLib.inference can run; until then a small real torch network with Predictor.classify's
signature stands in (see ``classifier_kind``).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")
torch = pytest.importorskip("torch")

from MMCAFNetLib import scene as mscene  # noqa: E402
from MMCAFNetLib import slicer_logic as sl  # noqa: E402
from MMCAFNetLib.results import CLASS_LABELS, Cancelled, Classification  # noqa: E402

pytestmark = pytest.mark.scene


class TorchStandIn:
    """A real torch 3D network (untrained) with ``Predictor.classify``'s signature and behaviour:
    per-slab windows, progress per window, cancel checked between windows, maps on the input grid."""

    def __init__(self, device: str = "cpu", windows: int = 6, delay: float = 0.0, fail_with=None):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool3d(1),
            torch.nn.Flatten(), torch.nn.Linear(4, 4),
        ).eval()
        self.attention = torch.nn.Conv3d(1, 1, 3, padding=1).eval()
        self.device = torch.device(device) if device == "cpu" else device  # "cuda" only as a label here
        self.windows, self.delay, self.fail_with = windows, delay, fail_with
        self.class_names = sorted(CLASS_LABELS)
        self.calls = 0

    def classify(self, volume, record, lesion=None, heatmap="attention", threshold=0.5, progress=None, cancel=None):
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        slabs = np.array_split(np.arange(volume.shape[0]), self.windows)
        best = np.zeros(len(self.class_names))
        heat = np.zeros(volume.shape, np.float32)
        for n, ks in enumerate(slabs):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            time.sleep(self.delay)
            x = torch.from_numpy((np.asarray(volume.array[ks], np.float32) + 1000) / 1400)[None, None]
            with torch.no_grad():
                best = np.maximum(best, torch.softmax(self.net(x), 1)[0].numpy())
                heat[ks] = torch.sigmoid(self.attention(x))[0, 0].numpy()
            if progress is not None:
                progress(n + 1, len(slabs))
        probs = best / best.sum()
        index = int(np.argmax(probs))
        heat = (heat - heat.min()) / max(float(np.ptp(heat)), 1e-6)
        label_value = CLASS_LABELS[self.class_names[index]][0]
        return Classification(
            class_names=self.class_names,
            class_labels=[CLASS_LABELS[c][1] for c in self.class_names],
            probabilities=probs,
            predicted_index=index,
            threshold=threshold,
            windows=[],
            heatmap=None if heatmap is None else volume.with_array(heat),
            labelmap=None if heatmap is None else volume.with_array(np.where(heat >= threshold, label_value, 0).astype(np.uint8)),
            label_value=label_value,
            timings={},
            model={"model_name": "stand-in", "demo": True},
        )


def real_predictor_available() -> bool:
    try:
        from MMCAFNetLib.inference import Predictor  # noqa: F401
        from MMCAFNetLib.synthetic import make_case  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def test_checkpoint(tmp_path_factory):
    """A small real mmcafnet-lite checkpoint (random weights, fitted default schema, small windows)."""
    if not real_predictor_available():
        return None
    import pandas as pd

    from MMCAFNetLib import checkpoint as ck
    from MMCAFNetLib.ehr import default_schema
    from MMCAFNetLib.models import create_model
    from MMCAFNetLib.preset import Preset
    from MMCAFNetLib.synthetic import make_case

    torch.manual_seed(0)
    records = [make_case(letter, seed, size=48).record for seed, letter in enumerate("ABEG")]
    schema = default_schema().fit(pd.DataFrame(records))
    model = create_model("mmcafnet-lite", num_classes=4, num_clinical=schema.num_features)
    preset = Preset(name="test", spacing=(2.5, 2.0, 2.0), window=(8, 32, 32), hu_range=(-1000.0, 400.0), mean=0.3)
    payload = dict(
        format_version=ck.FORMAT_VERSION, model_name="mmcafnet-lite",
        model_config={"num_classes": 4, "num_clinical": schema.num_features}, class_names=list("ABEG"), task="ABEG",
        state_dict=model.state_dict(), schema=schema.to_dict(), preset=preset.to_dict(), threshold=0.5,
        provenance={"seed": 0}, metrics={}, demo=True,
    )
    return ck.save_checkpoint(payload, tmp_path_factory.mktemp("ckpt") / "test.pt")


@pytest.fixture
def classifier_kind(test_checkpoint):
    return "predictor" if test_checkpoint is not None else "stand-in"


def make_logic(test_checkpoint, **stand_in):
    """A logic whose loader gives the real Predictor (when it can run) or the torch stand-in."""
    if test_checkpoint is not None and not stand_in:
        return sl.ClassificationLogic(), sl.ClassificationOptions(model_path=str(test_checkpoint), device="cpu")
    instances = {}

    def loader(path, device):
        instances[device] = TorchStandIn(device=device, **stand_in.get(device, stand_in.get("any", {})))
        return instances[device]

    logic = sl.ClassificationLogic(loader=loader)
    logic.instances = instances
    return logic, sl.ClassificationOptions(model_path="stand-in.pt", device="cpu")


def add_case_ct(scene, seed: int = 0, name: str = "CT"):
    """The synthetic phantom CT when available, else a noisy body-like block."""
    try:
        from MMCAFNetLib.synthetic import make_case

        case = make_case("A", seed, size=48)
        node = slicer.util.addVolumeFromArray(np.ascontiguousarray(case.volume.array), case.volume.ijk_to_ras, name)
        return node, case.record, np.asarray(case.lesion_center_ras, dtype=float)
    except ImportError:
        rng = np.random.default_rng(seed)
        array = rng.normal(-200, 300, size=(16, 48, 48)).astype(np.int16)
        node = slicer.util.addVolumeFromArray(array, np.diag([-1.5, -1.5, 2.5, 1.0]), name)
        return node, {"sex": "M", "age": 63}, None


def count(scene) -> int:
    return scene.GetNumberOfNodes()


def drive(job, timeout: float = 120.0) -> list[float]:
    """What the widget's QTimer does: poll from the main thread, watching progress."""
    seen = []
    end = time.monotonic() + timeout
    while not job.poll():
        seen.append(job.progress)
        assert time.monotonic() < end, "the job did not finish in time"
        time.sleep(0.01)
    seen.append(job.progress)
    return seen


def test_job_runs_on_a_worker_thread_and_reaches_100_percent(mrml_scene, test_checkpoint, classifier_kind):
    logic, options = make_logic(test_checkpoint)
    ct, record, centre = add_case_ct(mrml_scene)
    fid = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    if centre is not None:
        fid.AddControlPoint(*centre)
    before = count(mrml_scene)
    main = threading.current_thread()
    job = logic.start(ct, record, fid if centre is not None else None, options)
    assert job._thread is not main and job.running
    seen = drive(job)
    assert job.error is None, job.error
    assert seen[-1] == 1.0 and job.percent == 100
    assert all(b >= a for a, b in zip(seen, seen[1:])), "progress went backwards"
    assert job.done and not logic.busy
    assert job.outputs is not None and count(mrml_scene) > before
    table = job.outputs.table.GetTable()
    assert table.GetNumberOfRows() == len(job.result.class_names)
    assert np.isclose(sum(table.GetValue(r, 2).ToDouble() for r in range(table.GetNumberOfRows())), 1.0)
    assert "%" in sl.result_summary(job.result) and "DEMO" in sl.result_summary(job.result)


def test_cancel_leaves_the_scene_unchanged(mrml_scene, test_checkpoint):
    logic, options = make_logic(test_checkpoint) if test_checkpoint else make_logic(None, any={"delay": 0.05})
    ct, record, _ = add_case_ct(mrml_scene)
    before = count(mrml_scene)
    job = logic.start(ct, record, None, options)
    job.cancel()
    drive(job)
    assert job.cancelled and job.result is None and job.outputs is None and job.error is None
    assert count(mrml_scene) == before
    assert mscene.find_outputs(ct) == []
    assert job.finish() is None  # finishing a cancelled job is quiet


def test_a_second_concurrent_job_is_refused(mrml_scene):
    logic, options = make_logic(None, any={"delay": 0.2, "windows": 20})
    ct, record, _ = add_case_ct(mrml_scene)
    first = logic.start(ct, record, None, options)
    with pytest.raises(sl.JobBusyError, match="already running"):
        logic.start(ct, record, None, options)
    first.cancel()
    drive(first)
    second = logic.start(ct, record, None, options)  # allowed once the first is over
    second.cancel()
    drive(second)


def test_a_failing_classification_leaves_the_scene_as_it_was(mrml_scene):
    logic, options = make_logic(None, any={"fail_with": ValueError("the CT has no body tissue")})
    ct, record, _ = add_case_ct(mrml_scene)
    before = count(mrml_scene)
    job = logic.start(ct, record, None, options)
    with pytest.raises(ValueError, match="no body tissue"):
        job.finish(timeout=30)
    assert job.done and count(mrml_scene) == before and not logic.busy


def test_ct_deleted_while_classifying_is_reported_not_written(mrml_scene):
    logic, options = make_logic(None, any={"delay": 0.05})
    ct, record, _ = add_case_ct(mrml_scene)
    job = logic.start(ct, record, None, options)
    mrml_scene.RemoveNode(ct)
    before = count(mrml_scene)
    job.wait(30)
    assert job.poll()
    assert isinstance(job.error, mscene.SceneError) and count(mrml_scene) == before


def test_cuda_out_of_memory_falls_back_to_cpu_with_a_message(mrml_scene):
    # No GPU here: the stand-in labelled "cuda" raises torch's real OutOfMemoryError type.
    logic, options = make_logic(None, cuda={"fail_with": torch.cuda.OutOfMemoryError("CUDA out of memory.")}, cpu={})
    options.device = "cuda"
    ct, record, _ = add_case_ct(mrml_scene)
    job = logic.start(ct, record, None, options)
    outputs = job.finish(timeout=60)
    assert outputs is not None and job.result is not None
    assert any("CPU" in m for m in job.messages)
    assert logic.instances["cuda"].calls == 1 and logic.instances["cpu"].calls == 1
    # a CPU failure that is not an OOM is not retried
    logic, options = make_logic(None, any={"fail_with": RuntimeError("shape mismatch")})
    with pytest.raises(RuntimeError, match="shape mismatch"):
        logic.start(ct, record, None, options).finish(timeout=30)


def test_predictor_is_loaded_once_and_reruns_replace_outputs(mrml_scene, test_checkpoint):
    loads = []
    if test_checkpoint is not None:
        def loader(path, device):
            loads.append((path, device))
            return sl.default_loader(path, device)

        logic = sl.ClassificationLogic(loader=loader)
        options = sl.ClassificationOptions(model_path=str(test_checkpoint), device="cpu", heatmap="attention")
    else:
        def loader(path, device):
            loads.append((path, device))
            return TorchStandIn(device)

        logic = sl.ClassificationLogic(loader=loader)
        options = sl.ClassificationOptions(model_path="stand-in.pt", device="cpu")
    ct, record, centre = add_case_ct(mrml_scene)
    logic.classify(ct, record, centre, options)
    n = count(mrml_scene)
    _, outputs = logic.classify(ct, record, centre, options)
    assert count(mrml_scene) == n and len(loads) == 1
    assert np.allclose(mscene.node_ijk_to_ras(outputs.heatmap), mscene.node_ijk_to_ras(ct))


def test_batch_over_volume_nodes(mrml_scene):
    logic, options = make_logic(None)
    cts = [add_case_ct(mrml_scene, seed=s, name=f"CT {s}")[0] for s in range(3)]
    written = logic.classify_volume_nodes(cts, options=options)
    assert set(written) == {ct.GetID() for ct in cts}
    for ct in cts:
        assert isinstance(written[ct.GetID()], mscene.SceneOutputs)
        assert len(mscene.find_outputs(ct)) == 4
    assert set(mscene.ct_volume_nodes(mrml_scene)) == set(cts)  # outputs are not offered as inputs


def test_options_and_records_are_checked():
    with pytest.raises(ValueError, match="device"):
        sl.ClassificationOptions(device="tpu")
    with pytest.raises(ValueError, match="threshold"):
        sl.ClassificationOptions(threshold=1.5)
    assert sl.clean_record({"sex": "unknown", "age": 63, "weight": "", "smoking": float("nan")}) == {
        "sex": None, "age": 63, "weight": None, "smoking": None,
    }


def test_form_fields_follow_the_schema_and_allow_unknown():
    ehr = pytest.importorskip("MMCAFNetLib.ehr")
    schema = ehr.default_schema()
    fields = sl.form_fields(schema)
    assert [f.name for f in fields] == schema.field_names
    for f, spec in zip(fields, schema.fields):
        assert f.choices[0][0] == sl.UNKNOWN
        if spec.kind == "continuous":
            assert (f.minimum, f.maximum) == tuple(spec.plausible_range)
        else:
            assert [v for v, _ in f.choices[1:]] == list(spec.values)
            # every offered value is accepted by the schema itself
            for value, _ in f.choices[1:]:
                schema.validate_record({f.name: value})

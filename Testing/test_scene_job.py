"""The job API of MMCAFNetLib.slicer_logic on Slicer's real MRML scene, with the classification in
the real worker process: progress, cancel (asked, then forced), refusal of a second job, failures
and a killed worker leaving the scene as it was, CUDA OOM fallback, one model load, batch.

The worker runs the real Predictor on a small real mmcafnet-lite checkpoint, or, where a test needs
a behaviour no real model shows on this machine (a GPU out of memory, a worker killed mid-job, a
classification deaf to Cancel), the torch stand-in of Testing/worker_standins.py.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")
torch = pytest.importorskip("torch")

from worker_standins import LOADER, TESTING_DIR, write_config  # noqa: E402

from MMCAFNetLib import scene as mscene  # noqa: E402
from MMCAFNetLib import slicer_logic as sl  # noqa: E402
from MMCAFNetLib.worker_client import WorkerError, WorkerProcess  # noqa: E402

pytestmark = pytest.mark.scene

@pytest.fixture(scope="module")
def test_checkpoint(tmp_path_factory):
    """A small real mmcafnet-lite checkpoint (random weights, fitted default schema, small windows)."""
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


def add_case_ct(scene, seed: int = 0, name: str = "CT"):
    """A synthetic phantom CT in the scene, with its record and lesion centre."""
    from MMCAFNetLib.synthetic import make_case

    case = make_case("A", seed, size=48)
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(case.volume.array), case.volume.ijk_to_ras, name)
    return node, case.record, np.asarray(case.lesion_center_ras, dtype=float)


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


def standin_logic(tmp_path, name: str = "standin", **behaviour):
    """A logic whose worker builds the torch stand-in; its "checkpoint" says how it behaves."""
    pythonpath = os.pathsep.join(p for p in (TESTING_DIR, os.environ.get("PYTHONPATH", "")) if p)
    worker = WorkerProcess(loader=LOADER, env={"PYTHONPATH": pythonpath})
    model = write_config(tmp_path / f"{name}.json", **behaviour)
    return sl.ClassificationLogic(worker), sl.ClassificationOptions(model_path=model, device="cpu")


def loads(options) -> list[str]:
    """The devices the stand-in worker loaded this model for, in order."""
    path = os.path.splitext(options.model_path)[0] + ".loads"
    return open(path, encoding="utf-8").read().split() if os.path.exists(path) else []


@pytest.fixture
def logics():
    """Every logic a test makes is closed afterwards, so no worker outlives its test."""
    made = []
    yield made
    for logic in made:
        logic.worker.close()


def test_job_runs_in_a_worker_process_and_reaches_100_percent(mrml_scene, test_checkpoint, logics):
    logic = sl.ClassificationLogic()
    logics.append(logic)
    options = sl.ClassificationOptions(model_path=str(test_checkpoint), device="cpu")
    ct, record, centre = add_case_ct(mrml_scene)
    fid = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    fid.AddControlPoint(*centre)
    before = count(mrml_scene)
    job = logic.start(ct, record, fid, options)
    assert logic.worker.alive and logic.worker.pid != os.getpid()
    folder = logic.worker.job_folder(job.id)
    assert folder.is_dir() and job.running
    seen = drive(job)
    assert job.error is None, job.error
    assert seen[-1] == 1.0 and job.percent == 100 and job.status == "Done"
    assert all(b >= a for a, b in zip(seen, seen[1:])), "progress went backwards"
    assert job.done and not logic.busy
    assert not folder.exists(), "the job's temporary files were left behind"
    assert job.outputs is not None and count(mrml_scene) > before
    table = job.outputs.table.GetTable()
    assert table.GetNumberOfRows() == len(job.result.class_names)
    assert np.isclose(sum(table.GetValue(r, 2).ToDouble() for r in range(table.GetNumberOfRows())), 1.0)
    assert "%" in sl.result_summary(job.result) and "DEMO" in sl.result_summary(job.result)
    session = logic.worker.session
    logic.worker.close()
    assert not logic.worker.alive and not session.exists(), "the worker's session folder outlived it"


def test_cancel_stops_the_job_leaves_the_scene_unchanged_and_keeps_the_worker(mrml_scene, tmp_path, logics):
    logic, options = standin_logic(tmp_path, windows=40, delay=0.1)
    logics.append(logic)
    ct, record, _ = add_case_ct(mrml_scene)
    before = count(mrml_scene)
    job = logic.start(ct, record, None, options)
    end = time.monotonic() + 60
    while job.progress == 0:  # cancel while it is really classifying
        job.poll()
        assert time.monotonic() < end
        time.sleep(0.02)
    pid = logic.worker.pid
    job.cancel()
    drive(job, timeout=sl.STOP_GRACE_S - 0.5)  # the worker stopped by itself, before the grace ran out
    assert job.cancelled and job.result is None and job.outputs is None and job.error is None
    assert count(mrml_scene) == before and mscene.find_outputs(ct) == []
    assert job.finish() is None  # finishing a cancelled job is quiet
    assert logic.worker.alive and logic.worker.pid == pid, "a cancel the worker obeyed must not cost the worker"
    options.model_path = write_config(tmp_path / "quick.json", windows=2)
    assert logic.classify(ct, record, None, options)[1] is not None


def test_a_worker_deaf_to_cancel_is_killed_and_the_next_job_gets_a_fresh_one(mrml_scene, tmp_path, logics):
    logic, options = standin_logic(tmp_path, ignore_cancel=True)
    logics.append(logic)
    ct, record, _ = add_case_ct(mrml_scene)
    before = count(mrml_scene)
    job = logic.start(ct, record, None, options)
    end = time.monotonic() + 60
    while not loads(options):  # the stand-in is loaded and stuck in C
        assert time.monotonic() < end
        time.sleep(0.05)
    job.cancel()
    started = time.monotonic()
    drive(job, timeout=sl.STOP_GRACE_S + 10)
    assert time.monotonic() - started >= sl.STOP_GRACE_S - 0.2
    assert job.cancelled and job.error is None and count(mrml_scene) == before
    assert not logic.worker.alive and logic.worker.session is None
    options.model_path = write_config(tmp_path / "quick.json", windows=2)
    assert logic.classify(ct, record, None, options)[1] is not None
    assert logic.worker.starts == 2


def test_a_second_concurrent_job_is_refused(mrml_scene, tmp_path, logics):
    logic, options = standin_logic(tmp_path, windows=20, delay=0.2)
    logics.append(logic)
    ct, record, _ = add_case_ct(mrml_scene)
    first = logic.start(ct, record, None, options)
    with pytest.raises(sl.JobBusyError, match="already running"):
        logic.start(ct, record, None, options)
    first.cancel()
    drive(first)
    second = logic.start(ct, record, None, options)  # allowed once the first is over
    second.cancel()
    drive(second)


def test_a_failing_classification_leaves_the_scene_as_it_was(mrml_scene, tmp_path, logics):
    logic, options = standin_logic(tmp_path, fail_on={"cpu": "the CT has no body tissue"})
    logics.append(logic)
    ct, record, _ = add_case_ct(mrml_scene)
    before = count(mrml_scene)
    job = logic.start(ct, record, None, options)
    with pytest.raises(ValueError, match="no body tissue"):
        job.finish(timeout=60)
    assert job.done and count(mrml_scene) == before and not logic.busy
    assert logic.worker.alive  # a refused input is no reason to restart


def test_a_worker_killed_mid_job_gives_a_clear_message_and_the_next_apply_works(mrml_scene, tmp_path, logics):
    logic, options = standin_logic(tmp_path, windows=6, die_at=2)
    logics.append(logic)
    ct, record, _ = add_case_ct(mrml_scene)
    before = count(mrml_scene)
    job = logic.start(ct, record, None, options)
    with pytest.raises(WorkerError, match=r"worker stopped while classifying: it was killed .*SIGKILL.*memory") as info:
        job.finish(timeout=60)
    assert "next Apply starts a fresh one" in str(info.value)
    assert count(mrml_scene) == before and not logic.busy
    options.model_path = write_config(tmp_path / "healthy.json", windows=2)
    _, outputs = logic.classify(ct, record, None, options)
    assert outputs is not None and logic.worker.starts == 2


def test_a_worker_that_cannot_start_says_why(mrml_scene, tmp_path, logics):
    ct, record, _ = add_case_ct(mrml_scene)
    logic = sl.ClassificationLogic(WorkerProcess(python=str(tmp_path / "no-python")))
    logics.append(logic)
    with pytest.raises(WorkerError, match=r"could not be started with .*no-python"):
        logic.start(ct, record, None, sl.ClassificationOptions(device="cpu"))
    assert not logic.busy
    # a Python that starts but cannot import what the worker needs: its own error is shown
    logic = sl.ClassificationLogic(WorkerProcess(loader="no_such_module_here:load"))
    logics.append(logic)
    with pytest.raises(WorkerError, match="No module named 'no_such_module_here'"):
        logic.start(ct, record, None, sl.ClassificationOptions(device="cpu")).finish(timeout=60)


def test_ct_deleted_while_classifying_is_reported_not_written(mrml_scene, tmp_path, logics):
    logic, options = standin_logic(tmp_path, delay=0.05)
    logics.append(logic)
    ct, record, _ = add_case_ct(mrml_scene)
    job = logic.start(ct, record, None, options)
    mrml_scene.RemoveNode(ct)
    before = count(mrml_scene)
    assert job.wait(60)
    assert job.poll()
    assert isinstance(job.error, mscene.SceneError) and count(mrml_scene) == before


def test_cuda_out_of_memory_falls_back_to_cpu_with_a_message(mrml_scene, tmp_path, logics):
    # No GPU here: the stand-in labelled "cuda" raises torch's real OutOfMemoryError type in the worker.
    logic, options = standin_logic(tmp_path, fail_on={"cuda": "oom"})
    logics.append(logic)
    options.device = "cuda"
    ct, record, _ = add_case_ct(mrml_scene)
    job = logic.start(ct, record, None, options)
    outputs = job.finish(timeout=60)
    assert outputs is not None and job.result is not None and job.result.model["device"] == "cpu"
    assert any("CPU" in m for m in job.messages)
    assert loads(options) == ["cuda", "cpu"]
    # a CPU failure that is not an OOM is not retried
    logic, options = standin_logic(tmp_path, name="broken", fail_on={"cpu": "shape mismatch"})
    logics.append(logic)
    with pytest.raises(ValueError, match="shape mismatch"):
        logic.start(ct, record, None, options).finish(timeout=60)
    assert loads(options) == ["cpu"]


def test_the_model_is_loaded_once_reloaded_when_its_file_changes(mrml_scene, tmp_path, logics):
    logic, options = standin_logic(tmp_path, windows=2)
    logics.append(logic)
    ct, record, centre = add_case_ct(mrml_scene)
    logic.classify(ct, record, centre, options)
    n = count(mrml_scene)
    _, outputs = logic.classify(ct, record, centre, options)
    assert count(mrml_scene) == n and loads(options) == ["cpu"]
    assert np.allclose(mscene.node_ijk_to_ras(outputs.heatmap), mscene.node_ijk_to_ras(ct))
    write_config(options.model_path, windows=3)  # a new file under the same name
    os.utime(options.model_path, ns=(time.time_ns(), time.time_ns() + 10**9))
    logic.classify(ct, record, centre, options)
    assert loads(options) == ["cpu", "cpu"]


def test_the_real_predictor_reruns_replace_outputs(mrml_scene, test_checkpoint, logics):
    logic = sl.ClassificationLogic()
    logics.append(logic)
    options = sl.ClassificationOptions(model_path=str(test_checkpoint), device="cpu", heatmap="attention")
    ct, record, centre = add_case_ct(mrml_scene)
    first, _ = logic.classify(ct, record, centre, options)
    n = count(mrml_scene)
    second, outputs = logic.classify(ct, record, centre, options)
    assert count(mrml_scene) == n
    assert np.allclose(first.probabilities, second.probabilities)
    assert np.allclose(mscene.node_ijk_to_ras(outputs.heatmap), mscene.node_ijk_to_ras(ct))


def test_batch_over_volume_nodes(mrml_scene, tmp_path, logics):
    logic, options = standin_logic(tmp_path, windows=2)
    logics.append(logic)
    options.show = False
    cts = [add_case_ct(mrml_scene, seed=s, name=f"CT {s}")[0] for s in range(3)]
    written = logic.classify_volume_nodes(cts, options=options)
    assert set(written) == {ct.GetID() for ct in cts}
    for ct in cts:
        assert isinstance(written[ct.GetID()], mscene.SceneOutputs)
        assert len(mscene.find_outputs(ct)) == 5
    assert set(mscene.ct_volume_nodes(mrml_scene)) == set(cts)  # outputs are not offered as inputs
    assert loads(options) == ["cpu"]


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


def test_warm_up_loads_the_model_before_the_first_apply(mrml_scene, tmp_path, logics):
    logic, options = standin_logic(tmp_path, windows=2)
    logics.append(logic)
    logic.warm_up(options.model_path, "cpu")
    end = time.monotonic() + 60
    while loads(options) != ["cpu"]:
        assert time.monotonic() < end, "warm_up did not load the model"
        time.sleep(0.05)
    ct, record, _ = add_case_ct(mrml_scene)
    job = logic.start(ct, record, None, options)
    drive(job)
    assert job.error is None and job.status == "Done" and loads(options) == ["cpu"]
    assert sorted(p.name for p in (logic.worker.session / "jobs").iterdir()) == [], "job folders were left behind"

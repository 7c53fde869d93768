"""The classification worker process without Slicer: its file format, that it gives the Predictor's
own result, that it leaves no file behind, and that it ends with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from MMCAFNetLib import job_files  # noqa: E402
from MMCAFNetLib.inference import Predictor  # noqa: E402
from MMCAFNetLib.resources import demo_checkpoint_path  # noqa: E402
from MMCAFNetLib.results import Candidate, Classification, WindowResult  # noqa: E402
from MMCAFNetLib.synthetic import make_case  # noqa: E402
from MMCAFNetLib.volume import Volume  # noqa: E402
from MMCAFNetLib.worker import process_alive  # noqa: E402
from MMCAFNetLib.worker_client import WorkerProcess, describe_exit, wait_for, worker_python  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_job(worker: WorkerProcess, volume, record, lesion, options, timeout: float = 120.0):
    """Submit one job and collect its events until it is over; returns (events, folder)."""
    job = worker.submit(volume, record, lesion, options)
    events: list[dict] = []
    end = time.monotonic() + timeout
    while not any(e.get("job") == job and e["event"] in ("done", "error", "cancelled") for e in events):
        assert worker.alive, worker.log_tail()
        assert time.monotonic() < end, "the worker did not finish in time"
        events += worker.read_events()
        time.sleep(0.02)
    return events, worker.job_folder(job)


@pytest.mark.parametrize("lesion", [None, "point", "box", "mask"])
def test_job_files_round_trip_every_lesion_kind(tmp_path, lesion):
    volume = Volume.from_geometry(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), (0.7, 0.8, 2.5), (10, -20, 30))
    volume.meta["modality"] = "CT"
    given = {
        None: None, "point": np.array([1.0, 2.0, 3.0]), "box": np.array([[0, 0, 0], [5, 6, 7.5]]),
        "mask": volume.with_array((volume.array > 50).astype(np.uint8)),
    }[lesion]
    options = {"model_path": "m.pt", "device": "cpu", "heatmap": "gradcam", "threshold": 0.25}
    job_files.write_request(tmp_path, volume, {"age": 63.0, "sex": "M", "weight": float("nan")}, given, options)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".partial") == []
    read, record, back, read_options = job_files.read_request(tmp_path)
    assert np.array_equal(read.array, volume.array) and read.array.dtype == np.int16
    assert np.array_equal(read.ijk_to_ras, volume.ijk_to_ras) and read.meta == {"modality": "CT"}
    assert record == {"age": 63.0, "sex": "M", "weight": None} and read_options == options
    if lesion is None:
        assert back is None
    elif lesion == "mask":
        assert np.array_equal(back.array, given.array) and np.array_equal(back.ijk_to_ras, given.ijk_to_ras)
    else:
        assert np.array_equal(back, given)


def test_job_files_round_trip_a_classification(tmp_path):
    grid = Volume.from_geometry(np.zeros((3, 4, 5), np.float32), (1.0, 1.0, 2.0))
    heat = grid.with_array(np.linspace(0, 1, 60, dtype=np.float32).reshape(3, 4, 5))
    result = Classification(
        class_names=["A", "G"], class_labels=["Adenocarcinoma", "Squamous cell carcinoma"],
        probabilities=np.array([0.3, 0.7]), predicted_index=1, threshold=0.4,
        windows=[WindowResult((1.0, 2.0, 3.0), ((0.0, 0.0, 0.0), (2.0, 4.0, 6.0)), [0.3, 0.7])],
        heatmap=heat, labelmap=heat.with_array((heat.array >= 0.4).astype(np.uint8) * 4), label_value=4,
        timings={"total_s": 0.5}, model={"model_name": "mmcafnet-lite", "demo": True, "decision_threshold": 0.6},
        warnings=["age was outside its plausible range"],
        candidates=[Candidate((4.0, 3.0, 4.0), 1.0), Candidate((0.5, 1.0, 2.0), 0.25)],
    )
    job_files.write_result(tmp_path, result)
    back = job_files.read_result(tmp_path)
    assert back.candidates == result.candidates
    assert back.class_names == result.class_names and back.class_labels == result.class_labels
    assert np.array_equal(back.probabilities, result.probabilities) and back.predicted_index == 1
    assert back.windows == result.windows and back.timings == result.timings and back.model == result.model
    assert back.warnings == result.warnings and back.label_value == 4 and back.threshold == 0.4
    assert np.array_equal(back.heatmap.array, heat.array) and back.heatmap.array.dtype == np.float32
    assert np.array_equal(back.labelmap.array, result.labelmap.array) and back.labelmap.array.dtype == np.uint8
    assert np.array_equal(back.heatmap.ijk_to_ras, heat.ijk_to_ras)
    assert back.decision_text() == result.decision_text()


def test_only_the_maps_non_zero_block_is_written_and_read_back_in_place(tmp_path):
    grid = Volume.from_geometry(np.zeros((20, 30, 40), np.float32), (1.0, 1.0, 2.0))
    heat = np.zeros(grid.shape, np.float32)
    heat[5:9, 10:22, 3:7] = np.random.default_rng(0).uniform(0.01, 1, (4, 12, 4))
    heat[7, 12, 5] = 0.0  # a zero inside the block stays zero
    assert job_files.nonzero_block(heat) == (slice(5, 9), slice(10, 22), slice(3, 7))
    assert job_files.nonzero_block(np.zeros((2, 3, 4))) == (slice(0, 0),) * 3
    result = Classification(
        class_names=["A", "G"], class_labels=["Adenocarcinoma", "Squamous cell carcinoma"],
        probabilities=np.array([0.6, 0.4]), predicted_index=0, threshold=0.5, windows=[],
        heatmap=grid.with_array(heat), labelmap=grid.with_array(np.zeros(grid.shape, np.uint8)), label_value=1,
        timings={},
    )
    job_files.write_result(tmp_path, result)
    assert np.load(tmp_path / "heatmap.npy").shape == (4, 12, 4)
    back = job_files.read_result(tmp_path)
    assert np.array_equal(back.heatmap.array, heat) and back.heatmap.shape == grid.shape
    assert back.labelmap.shape == grid.shape and not back.labelmap.array.any()


def test_a_malformed_job_file_is_refused_clearly(tmp_path):
    (tmp_path / "result.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(job_files.JobFileError, match="does not hold a JSON object"):
        job_files.read_result(tmp_path)


def test_the_worker_gives_the_predictors_own_result_and_keeps_the_model(tmp_path):
    case = make_case("A", seed=7, size=64)
    point = np.asarray(case.lesion_center_ras, dtype=float)
    direct = Predictor.load(demo_checkpoint_path(), device="cpu").classify(
        case.volume, case.record, lesion=point, heatmap="attention"
    )
    worker = WorkerProcess()
    try:
        options = {"model_path": str(demo_checkpoint_path()), "device": "cpu", "heatmap": "attention", "threshold": 0.5}
        events, folder = run_job(worker, case.volume, case.record, point, options)
        result = job_files.read_result(folder)
        assert [e["event"] for e in events if e["event"] == "loading"] == ["loading"]
        progress = [(e["done"], e["total"]) for e in events if e["event"] == "progress"]
        assert progress and progress[-1][0] == progress[-1][1]
        assert np.allclose(result.probabilities, direct.probabilities, atol=1e-6)
        assert result.predicted_class == direct.predicted_class
        assert np.allclose(result.heatmap.array, direct.heatmap.array, atol=1e-5)
        assert np.array_equal(result.labelmap.array, direct.labelmap.array)
        assert np.array_equal(result.heatmap.ijk_to_ras, case.volume.ijk_to_ras)
        pid = worker.pid
        events, _ = run_job(worker, case.volume, case.record, point, options)
        assert "loading" not in [e["event"] for e in events], "the second job reloaded the model"
        assert worker.pid == pid
        session = worker.session
    finally:
        worker.close()
    assert not session.exists()
    assert not process_alive(pid) or _zombie(pid)


def _zombie(pid: int) -> bool:
    """A process that ended but was not yet reaped (its parent is gone, or a container's PID 1 does
    not reap): it runs no code any more."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


@pytest.mark.skipif(os.name == "nt", reason="uses POSIX signals to kill the parent")
def test_the_worker_ends_when_its_parent_is_killed(tmp_path):
    # The parent (standing in for Slicer) starts a worker, says its pid, then is killed hard: no
    # atexit, no quit file. The worker must notice and end by itself.
    parent = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from MMCAFNetLib.worker_client import WorkerProcess
        w = WorkerProcess()
        w.ensure_started()
        print(w.pid, w.session, flush=True)
        time.sleep(600)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        pid_text, session = process.stdout.readline().split()
        worker_pid = int(pid_text)
        assert wait_for(lambda: (Path(session) / "events.jsonl").stat().st_size > 0, 60), "the worker never became ready"
        assert process_alive(worker_pid)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        assert wait_for(lambda: not process_alive(worker_pid) or _zombie(worker_pid), 10), "the worker outlived its parent"
        assert wait_for(lambda: not Path(session).exists(), 5), "the worker left its session folder behind"
    finally:
        process.kill()


def test_the_worker_python_outside_slicer_is_this_python(monkeypatch):
    monkeypatch.delenv("MMCAFNET_WORKER_PYTHON", raising=False)
    assert worker_python() == sys.executable
    monkeypatch.setenv("MMCAFNET_WORKER_PYTHON", "/opt/other/python")
    assert worker_python() == "/opt/other/python"


def test_exit_causes_read_as_words():
    assert "killed" in describe_exit(-signal.SIGKILL) and "memory" in describe_exit(-signal.SIGKILL)
    assert "SIGSEGV" in describe_exit(-signal.SIGSEGV)
    assert describe_exit(3) == "it exited with status 3"

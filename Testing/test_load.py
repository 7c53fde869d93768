"""Load: repeated classifications do not leak memory; concurrent and cancelled jobs leave the
Slicer scene consistent (on slicer-core's real MRML scene); the memory guard refuses a
whole-volume scan that cannot fit and says how to make it fit.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from MMCAFNetLib.volume import Volume

TINY_PRESET = {"name": "tiny", "spacing": [4.0, 4.0, 4.0], "window": [8, 32, 32], "hu_range": [-1000.0, 400.0],
               "mean": 0.3}
TINY_MODEL = {"stem_channels": 8, "stage_channels": [16, 32, 64], "stage_blocks": [1, 1, 1], "cardinality": 4,
              "se_reduction": 4, "cab_reduction": 4}
RECORD = {"sex": "F", "age": 58, "weight": 64, "t_stage": "1b", "n_stage": "0", "m_stage": "0", "smoking": "0"}


@pytest.fixture(scope="module")
def lite_checkpoint(tmp_path_factory) -> Path:
    """The lite model (random weights) with few channels and small windows: the test is about memory."""
    pytest.importorskip("MMCAFNetLib.inference", reason="the Predictor has not landed")
    import torch

    from MMCAFNetLib.checkpoint import FORMAT_VERSION, save_checkpoint
    from MMCAFNetLib.ehr import default_schema
    from MMCAFNetLib.models import create_model

    torch.manual_seed(0)
    model = create_model("mmcafnet-lite", num_classes=4, num_clinical=7, **TINY_MODEL)
    schema = default_schema().fit([RECORD, {**RECORD, "sex": "M", "age": 70, "smoking": "1"}])
    return save_checkpoint({
        "format_version": FORMAT_VERSION, "model_name": "mmcafnet-lite", "model_config": {"num_classes": 4,
        "num_clinical": 7, **TINY_MODEL}, "class_names": list("ABEG"), "task": "ABEG", "state_dict": model.state_dict(),
        "schema": schema.to_dict(), "preset": TINY_PRESET, "threshold": 0.5, "provenance": {"seed": 0},
        "metrics": {}, "demo": True,
    }, tmp_path_factory.mktemp("lite") / "lite.pt")


def phantom(size: int = 40) -> Volume:
    k, j, i = np.mgrid[:size, :size, :size]
    c = (size - 1) / 2
    array = np.full((size, size, size), -1000, np.int16)
    array[(i - c) ** 2 + (j - c) ** 2 < (0.4 * size) ** 2] = -750
    array[(i - c - 4) ** 2 + (j - c) ** 2 + (k - c) ** 2 < 12] = 30
    return Volume.from_geometry(array, spacing=(2.0, 2.0, 2.5), origin=(-40.0, -40.0, -50.0))


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------
# memory growth


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to read the resident set size")
def test_fifty_classifications_do_not_grow_memory(lite_checkpoint: Path) -> None:
    import gc

    from MMCAFNetLib.inference import Predictor

    predictor = Predictor.load(lite_checkpoint, device="cpu")
    ct = phantom()
    point = np.array([8.0, 0.0, 0.0]) + ct.origin + np.array([40.0, 40.0, 48.0])
    results = []
    for n in range(50):
        result = predictor.classify(ct, RECORD, lesion=point, heatmap="attention")
        results.append(result.probabilities)
        del result
        if n == 9:  # warm-up over: allocator pools and caches are filled
            gc.collect()
            warm = rss_bytes()
    gc.collect()
    end = rss_bytes()
    assert end <= warm * 1.05, f"RSS grew from {warm / 2**20:.1f} MiB to {end / 2**20:.1f} MiB over 40 calls"
    np.testing.assert_allclose(results[-1], results[10], atol=1e-6)  # and the answers stay the same


# ---------------------------------------------------------------------------------------------
# the memory guard


def test_available_memory_is_detected_and_overridable(monkeypatch) -> None:
    from MMCAFNetLib import memory_guard as mg

    monkeypatch.delenv(mg.AVAILABLE_MEMORY_ENV, raising=False)
    found = mg.available_memory_bytes()
    if Path("/proc/meminfo").exists():
        lines = Path("/proc/meminfo").read_text().splitlines()
        total = int(next(line for line in lines if line.startswith("MemTotal:")).split()[1]) * 1024
        assert found is not None and 0 < found <= total
    monkeypatch.setenv(mg.AVAILABLE_MEMORY_ENV, str(123 * 2**20))
    assert mg.available_memory_bytes() == 123 * 2**20
    monkeypatch.setenv(mg.AVAILABLE_MEMORY_ENV, "lots")
    with pytest.raises(mg.MemoryGuardError, match=mg.AVAILABLE_MEMORY_ENV):
        mg.available_memory_bytes()


def test_the_estimate_grows_with_the_ct_the_batch_and_gradcam(lite_checkpoint: Path) -> None:
    from MMCAFNetLib import memory_guard as mg
    from MMCAFNetLib.inference import Predictor

    predictor = Predictor.load(lite_checkpoint, device="cpu")
    small, large = phantom(32), phantom(64)
    base = mg.estimate_whole_volume_scan(predictor, small, batch_size=1)
    assert base.total > 0 and base.model > 0 and base.batch > 0
    assert mg.estimate_whole_volume_scan(predictor, large, batch_size=1).total > base.total
    assert mg.estimate_whole_volume_scan(predictor, small, batch_size=4).batch > 3 * base.batch
    assert mg.estimate_whole_volume_scan(predictor, small, 1, heatmap="gradcam").batch > base.batch


def test_a_scan_that_does_not_fit_is_refused_with_the_ways_out(lite_checkpoint: Path, monkeypatch) -> None:
    from MMCAFNetLib import memory_guard as mg
    from MMCAFNetLib.inference import Predictor

    predictor = Predictor.load(lite_checkpoint, device="cpu")
    ct = phantom()
    estimate = mg.estimate_whole_volume_scan(predictor, ct, batch_size=2)
    monkeypatch.setenv(mg.AVAILABLE_MEMORY_ENV, str(estimate.total // 4))
    with pytest.raises(ValueError) as info:
        predictor.classify(ct, RECORD, lesion=None, batch_size=2)
    message = str(info.value)
    assert isinstance(info.value, mg.MemoryGuardError)
    for part in ("GiB", "available", "mark the lesion", "smaller batch", mg.AVAILABLE_MEMORY_ENV):
        assert part in message, f"the refusal does not mention {part!r}: {message}"
    # a lesion-guided run evaluates only the lesion's windows and is not refused
    centre = ct.ijk_to_ras_points(np.array([[20.0, 20.0, 20.0]]))[0]
    assert predictor.classify(ct, RECORD, lesion=centre, heatmap=None).windows
    # with enough memory the whole scan runs
    monkeypatch.setenv(mg.AVAILABLE_MEMORY_ENV, str(estimate.total * 4))
    assert len(predictor.classify(ct, RECORD, lesion=None, heatmap=None, batch_size=2).windows) >= 1


# ---------------------------------------------------------------------------------------------
# the Slicer logic on the real scene


def _scene_ct(scene):
    slicer = pytest.importorskip("slicer")
    ct = phantom()
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(ct.array), ct.ijk_to_ras, "CT")
    return node, ct


def _input_hash(node) -> str:
    import slicer

    from MMCAFNetLib.scene import node_ijk_to_ras

    h = hashlib.sha256(np.ascontiguousarray(slicer.util.arrayFromVolume(node)).tobytes())
    h.update(np.round(node_ijk_to_ras(node), 6).tobytes())
    return h.hexdigest()


def _drive(job, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not job.poll():
        assert time.monotonic() < end, "the job did not finish in time"
        time.sleep(0.01)


@pytest.mark.scene
def test_two_jobs_started_at_once_run_one_at_a_time(mrml_scene, lite_checkpoint: Path, request) -> None:
    from MMCAFNetLib import slicer_logic as sl

    logic = sl.ClassificationLogic()
    request.addfinalizer(logic.worker.close)
    options = sl.ClassificationOptions(model_path=str(lite_checkpoint), device="cpu", heatmap="attention")
    node, _ = _scene_ct(mrml_scene)
    logic.warm_up(str(lite_checkpoint), "cpu")  # the worker loads the model, as after the first Apply
    barrier = threading.Barrier(2)
    outcomes: list = []

    def start() -> None:
        barrier.wait()
        try:
            outcomes.append(logic.start(node, RECORD, None, options))
        except sl.JobBusyError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    jobs = [o for o in outcomes if isinstance(o, sl.ClassificationJob)]
    refused = [o for o in outcomes if isinstance(o, sl.JobBusyError)]
    assert len(jobs) == 1 and len(refused) == 1, f"two simultaneous starts gave {outcomes}"
    with pytest.raises(sl.JobBusyError):  # and again from the main thread while it runs
        logic.start(node, RECORD, None, options)
    _drive(jobs[0])
    assert jobs[0].error is None, jobs[0].error
    outputs = len(__import__("MMCAFNetLib.scene", fromlist=["find_outputs"]).find_outputs(node))
    logic.classify(node, RECORD, None, options)  # after it, the next one runs and replaces the outputs
    assert len(__import__("MMCAFNetLib.scene", fromlist=["find_outputs"]).find_outputs(node)) == outputs


@pytest.mark.scene
@pytest.mark.parametrize("moment", ["at-start", "after-first-window", "random", "after-worker-before-poll"])
def test_cancel_at_any_moment_leaves_the_scene_as_it_was(mrml_scene, lite_checkpoint: Path, moment: str, request) -> None:
    from MMCAFNetLib import slicer_logic as sl

    logic = sl.ClassificationLogic()
    request.addfinalizer(logic.worker.close)
    options = sl.ClassificationOptions(model_path=str(lite_checkpoint), device="cpu", heatmap="attention")
    node, _ = _scene_ct(mrml_scene)
    logic.warm_up(str(lite_checkpoint), "cpu")
    nodes_before, hash_before = mrml_scene.GetNumberOfNodes(), _input_hash(node)
    job = logic.start(node, RECORD, None, options)
    if moment == "at-start":
        job.cancel()
    elif moment == "after-first-window":
        end = time.monotonic() + 120
        while job.progress == 0.0 and not job.wait(0.005):
            assert time.monotonic() < end
        job.cancel()
    elif moment == "random":
        time.sleep(np.random.default_rng(3).uniform(0.0, 0.5))
        job.cancel()
    else:
        job.wait(120)
        job.cancel()
    _drive(job)
    assert job.outputs is None and job.error is None  # (a result computed before the cancel is not written)
    assert mrml_scene.GetNumberOfNodes() == nodes_before, "a cancelled job changed the scene"
    assert _input_hash(node) == hash_before, "the input CT was modified"
    assert not logic.busy

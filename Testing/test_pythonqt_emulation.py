"""The job API under the conditions of Slicer's main thread, emulated.

Slicer's PythonQt runs without thread support, so its main thread holds the GIL all the time it
idles in the Qt event loop, and runs Python only in callbacks such as the module's 100 ms poll
timer. Emulated here: the main thread sleeps in C through ``ctypes.PyDLL`` (which, unlike
``ctypes.CDLL``, does not release the GIL) and calls ``job.poll()`` every 100 ms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")
torch = pytest.importorskip("torch")

from MMCAFNetLib import slicer_logic as sl  # noqa: E402
from MMCAFNetLib.inference import Predictor  # noqa: E402
from MMCAFNetLib.resources import demo_checkpoint_path  # noqa: E402
from MMCAFNetLib.synthetic import make_case  # noqa: E402

pytestmark = [pytest.mark.scene, pytest.mark.skipif(os.name == "nt", reason="emulates with libc's usleep")]

POLL_INTERVAL_S = 0.1
_libc = ctypes.PyDLL(ctypes.util.find_library("c") or None)


def idle_in_qt_event_loop() -> None:
    """One 100 ms stretch of the main thread in the Qt event loop: asleep in C, GIL held."""
    _libc.usleep(int(POLL_INTERVAL_S * 1e6))


def emulated_main_loop(until, limit_s: float) -> float:
    """Idle with the GIL held, running Python (``until``) once per poll interval; seconds taken."""
    start = time.perf_counter()
    while not until():
        if time.perf_counter() - start > limit_s:
            break
        idle_in_qt_event_loop()
    return time.perf_counter() - start


def test_the_emulation_starves_a_python_thread():
    """The emulation is faithful: a Python thread gets almost nothing while the main thread idles."""
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)  # the GIL released: the thread runs freely
        free = counter[0]
        counter[0] = 0
        for _ in range(5):  # 0.5 s of emulated event loop
            idle_in_qt_event_loop()
        held = counter[0]
    finally:
        stop.set()
        thread.join()
    assert held < 0.25 * free, f"the thread counted {held} with the GIL held vs {free} free: the emulation leaks the GIL"


@pytest.fixture
def case_in_scene(mrml_scene):
    case = make_case("A", seed=7, size=64)
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(case.volume.array), case.volume.ijk_to_ras, "CT")
    return case, node


def direct_seconds(case) -> float:
    """The same classification through the Predictor in this process, warm (best of 3)."""
    predictor = Predictor.load(demo_checkpoint_path(), device="cpu")
    point = np.asarray(case.lesion_center_ras, dtype=float)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        predictor.classify(case.volume, case.record, lesion=point, heatmap="attention")
        times.append(time.perf_counter() - start)
    return min(times)


def test_a_warm_job_is_not_starved_by_the_main_thread(case_in_scene):
    case, ct = case_in_scene
    direct = direct_seconds(case)
    bound = 2 * direct + 2.0
    logic = sl.ClassificationLogic()
    options = sl.ClassificationOptions(device="cpu", heatmap="attention")
    point = np.asarray(case.lesion_center_ras, dtype=float)
    try:
        logic.classify(ct, case.record, point, options)  # cold: starts the worker, loads the model
        job = logic.start(ct, case.record, point, options)
        warm = emulated_main_loop(job.poll, limit_s=bound + 30)
        assert job.done and job.error is None and job.outputs is not None, job.error
        assert warm <= bound, f"a warm job took {warm:.2f} s under the emulated event loop; direct {direct:.3f} s"
    finally:
        logic.worker.close()


def test_the_same_bound_is_missed_by_a_worker_thread(case_in_scene):
    """What the process avoids: the same Predictor call on a Python thread, under the same main loop."""
    case, _ = case_in_scene
    direct = direct_seconds(case)
    bound = 2 * direct + 2.0
    predictor = Predictor.load(demo_checkpoint_path(), device="cpu")
    point = np.asarray(case.lesion_center_ras, dtype=float)
    finished = threading.Event()
    thread = threading.Thread(
        target=lambda: (predictor.classify(case.volume, case.record, lesion=point, heatmap="attention"), finished.set()), daemon=True
    )
    thread.start()
    took = emulated_main_loop(finished.is_set, limit_s=bound + 0.5)
    thread.join()  # with the GIL free again it ends at once
    assert took > bound, f"a thread finished in {took:.2f} s under the emulation: the emulation does not hold the GIL"

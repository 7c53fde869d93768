"""W7: Apply-to-outputs in Slicer's module, through the job API and its worker process.

For each model, on slicer-core's real MRML scene and the benchmark's phantom CT with a lesion box:
- plain: the Predictor called directly in this process (what the classification itself costs);
- the same plus writing the outputs into the scene (what an in-process Apply would cost at best);
- the job API with a cold worker (a fresh process: start, imports, model load, then the job);
- the job API with a warm worker (the model already loaded: every Apply after the first).
Jobs are polled every 100 ms, as the module's QTimer does, so the figures include that latency.
The worker's own peak memory is read from /proc where it exists.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
from measure import measure_interleaved, peak_rss_mib

POLL_S = 0.1


def _apply(logic: Any, ct: Any, record: dict, box: np.ndarray, options: Any) -> Any:
    job = logic.start(ct, record, box, options)
    while not job.poll():
        time.sleep(POLL_S)
    if job.error is not None:
        raise job.error
    return job


def w7_slicer(cfg: Dict[str, Any], device: str = "cpu") -> List[Dict[str, Any]]:
    try:
        import slicer
    except ImportError:
        return [{"workload": "W7", "case": "Slicer job API", "variant": "-", "skipped": "slicer-core is not installed"}]
    from workloads import _row, bench_preset, clinical_schema, phantom_ct, write_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/, for the scene set-up
    from mrml_support import open_scene

    from MMCAFNetLib import scene as mscene
    from MMCAFNetLib import slicer_logic as sl
    from MMCAFNetLib.inference import Predictor

    volume, box = phantom_ct(cfg["ct_shape"], cfg["ct_spacing"])
    _, record = clinical_schema()
    open_scene()
    ct = slicer.util.addVolumeFromArray(np.ascontiguousarray(volume.array), volume.ijk_to_ras, "CT")
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for name in cfg["models"]:
            path = os.path.join(folder, f"{name}.pt")
            write_checkpoint(name, path, bench_preset(cfg))
            options = sl.ClassificationOptions(model_path=path, device=device, heatmap="attention")
            case = f"{name}: Apply to outputs, {list(volume.shape[::-1])} CT (IJK), lesion box, attention heatmap"
            predictor = Predictor.load(path, device=device)

            def direct(predictor: Any = predictor) -> Any:
                return predictor.classify(volume, record, lesion=box, heatmap="attention")

            def direct_and_scene(predictor: Any = predictor, ct: Any = ct) -> None:
                mscene.write_outputs(ct, direct(predictor), show=True)  # as Apply does; replaces the previous nodes

            cold_logic = sl.ClassificationLogic()
            start = time.perf_counter()
            job = _apply(cold_logic, ct, record, box, options)
            cold = time.perf_counter() - start
            cold_logic.worker.close()

            logic = sl.ClassificationLogic()
            _apply(logic, ct, record, box, options)  # the first Apply: the worker is warm after it
            stats = measure_interleaved(
                {
                    "plain: Predictor in this process": direct,
                    "Predictor + scene outputs in this process": direct_and_scene,
                    "job API, warm worker": lambda logic=logic, ct=ct, options=options: _apply(logic, ct, record, box, options),
                },
                repeats=cfg["repeats_w2"] + 1, warmup=1, device=device,
            )
            worker_peak = peak_rss_mib(logic.worker.pid)
            logic.worker.close()
            plain = stats["plain: Predictor in this process"]["median_s"]
            for variant, s in stats.items():
                extra: Dict[str, Any] = {"model": name, "speedup_vs_plain": plain / s["median_s"]}
                if variant.startswith("job API"):
                    extra["worker_peak_rss_mib"] = worker_peak
                rows.append(_row("W7", case, variant, s, **extra))
            rows.append(_row("W7", case, "job API, cold worker (start, imports, model load)",
                             {"median_s": cold, "min_s": cold, "max_s": cold, "runs": 1, "peak_rss_mib": None},
                             model=name, speedup_vs_plain=plain / cold, windows=len(job.result.windows)))
    return rows

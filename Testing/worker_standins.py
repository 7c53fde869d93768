"""Predictors for the worker process in tests, where a real one cannot show the behaviour asked for
(a GPU running out of memory, a worker killed mid-job, a classification that ignores Cancel).

The worker imports this module by name (``--loader worker_standins:load``; the tests put this folder
on the worker's PYTHONPATH). The "checkpoint" it is given is a JSON file saying how to behave, so
one worker can be told different things by different files.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from MMCAFNetLib.results import CLASS_LABELS, Cancelled, Classification

LOADER = "worker_standins:load"
TESTING_DIR = str(Path(__file__).resolve().parent)


def write_config(path: Path, **behaviour) -> str:
    """A stand-in "checkpoint": windows, delay (s per window), fail_on (device -> "oom" | "error:msg"),
    die_at (window at which the process kills itself), ignore_cancel (sleep in C, deaf to Cancel)."""
    Path(path).write_text(json.dumps(behaviour), encoding="utf-8")
    return str(path)


def load(path: str, device: str) -> TorchStandIn:
    behaviour = json.loads(Path(path).read_text(encoding="utf-8"))
    with open(Path(path).with_suffix(".loads"), "a", encoding="utf-8") as log:  # the test counts loads
        log.write(f"{device}\n")
    return TorchStandIn(device=device, **behaviour)


class TorchStandIn:
    """A real torch 3D network (untrained) with ``Predictor.classify``'s signature and behaviour:
    per-slab windows, progress per window, cancel checked between windows, maps on the input grid."""

    def __init__(self, device: str = "cpu", windows: int = 6, delay: float = 0.0, fail_on: dict | None = None,
                 die_at: int = -1, ignore_cancel: bool = False) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool3d(1),
            torch.nn.Flatten(), torch.nn.Linear(4, 4),
        ).eval()
        self.attention = torch.nn.Conv3d(1, 1, 3, padding=1).eval()
        self.device = device  # "cuda" only as a label here
        self.windows, self.delay, self.die_at, self.ignore_cancel = windows, delay, die_at, ignore_cancel
        self.fail_on = dict(fail_on or {})
        self.class_names = sorted(CLASS_LABELS)

    def classify(self, volume, record, lesion=None, heatmap="attention", threshold=0.5, progress=None, cancel=None):
        failure = self.fail_on.get(self.device)
        if failure == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if failure:
            raise ValueError(failure)
        slabs = np.array_split(np.arange(volume.shape[0]), self.windows)
        best = np.zeros(len(self.class_names))
        heat = np.zeros(volume.shape, np.float32)
        for n, ks in enumerate(slabs):
            if n == self.die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.ignore_cancel:
                ctypes.CDLL(None).sleep(3600)  # stuck in C: only a kill ends it
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
            model={"model_name": "stand-in", "demo": True, "device": self.device},
        )

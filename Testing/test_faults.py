"""Faults: device out-of-memory, a full disk, a corrupt cache entry, a training run killed at random.

- Device out-of-memory (simulated by the Predictor's size guard ``max_batch_bytes``): the batch is
  retried in halves, then on the CPU; the probabilities equal an unconstrained run's.
- A full disk (``RLIMIT_FSIZE`` in a subprocess, SIGXFSZ ignored, so a write fails with EFBIG as
  on a full disk) while writing a checkpoint, a volume, a cohort table, a cache entry or prediction
  outputs: an error says so, the earlier file is byte-for-byte intact, no temporary file is left.
- A corrupt cache entry (truncated, bytes flipped, sidecar garbled) is detected and rebuilt.
- Training killed with SIGKILL at random moments (checkpoint writes included) resumes from the
  last complete checkpoint; every checkpoint on disk loads at every moment; the run completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from MMCAFNetLib.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from MMCAFNetLib.ehr import default_schema
from MMCAFNetLib.volume import Volume

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"stem_channels": 8, "stage_channels": [16, 32, 64], "stage_blocks": [1, 1, 1], "cardinality": 4,
              "se_reduction": 4, "cab_reduction": 4}
TINY_PRESET = {"name": "tiny", "spacing": [4.0, 4.0, 4.0], "window": [8, 32, 32], "hu_range": [-1000.0, 400.0],
               "mean": 0.3}
RECORD = {"sex": "M", "age": 64, "weight": 70, "t_stage": "2", "n_stage": "1", "m_stage": "0", "smoking": "1"}


def tiny_checkpoint(path: Path) -> Path:
    models = pytest.importorskip("MMCAFNetLib.models", reason="the model registry has not landed")
    torch.manual_seed(0)
    model = models.create_model("mmcafnet-lite", num_classes=1, num_clinical=7, **TINY_MODEL)
    rows = [RECORD, {**RECORD, "sex": "F", "age": 50, "weight": 60, "t_stage": "1a", "smoking": "0"}]
    return save_checkpoint({
        "format_version": FORMAT_VERSION, "model_name": "mmcafnet-lite",
        "model_config": {"num_classes": 1, "num_clinical": 7, **TINY_MODEL}, "class_names": ["A", "G"],
        "task": "AG", "state_dict": model.state_dict(), "schema": default_schema().fit(rows).to_dict(),
        "preset": TINY_PRESET, "threshold": 0.5, "provenance": {"seed": 0}, "metrics": {}, "demo": True,
    }, path)


def phantom(size: int = 48) -> Volume:
    """Air around a soft-tissue body with a dense nodule, 2 mm voxels."""
    k, j, i = np.mgrid[:size, :size, :size]
    c = (size - 1) / 2
    array = np.full((size, size, size), -1000.0, np.float32)
    array[(i - c) ** 2 + (j - c) ** 2 < (0.4 * size) ** 2] = -700.0
    array[(i - c - 5) ** 2 + (j - c) ** 2 + (k - c) ** 2 < 16] = 40.0
    return Volume.from_geometry(array, spacing=(2.0, 2.0, 2.0), origin=(-c * 2, -c * 2, -c * 2))


@pytest.fixture(scope="module")
def predictor_path(tmp_path_factory) -> Path:
    pytest.importorskip("MMCAFNetLib.inference", reason="the Predictor has not landed")
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


# ---------------------------------------------------------------------------------------------
# device out-of-memory


def test_out_of_memory_falls_back_to_smaller_batches_then_to_the_cpu(predictor_path: Path) -> None:
    from MMCAFNetLib.inference import Predictor

    ct = phantom()
    box = np.array([[-30.0, -30.0, -30.0], [30.0, 30.0, 30.0]])  # several windows
    predictor = Predictor.load(predictor_path, device="cpu")
    reference = predictor.classify(ct, RECORD, lesion=box, heatmap=None, batch_size=8)
    assert len(reference.windows) >= 2
    window_bytes = int(np.prod(TINY_PRESET["window"])) * 4

    predictor.max_batch_bytes = window_bytes  # batches above 1 window "run out of memory"
    halved = predictor.classify(ct, RECORD, lesion=box, heatmap=None, batch_size=8)
    np.testing.assert_allclose(halved.probabilities, reference.probabilities, atol=1e-5)
    assert any("smaller batches" in w for w in halved.warnings), halved.warnings
    assert not any("CPU" in w for w in halved.warnings)

    predictor.max_batch_bytes = window_bytes // 2  # not even one window "fits on the device"
    on_cpu = predictor.classify(ct, RECORD, lesion=box, heatmap="attention", batch_size=8)
    np.testing.assert_allclose(on_cpu.probabilities, reference.probabilities, atol=1e-5)
    assert any("moved to the CPU" in w for w in on_cpu.warnings), on_cpu.warnings
    assert predictor.device.type == "cpu" and on_cpu.heatmap is not None


def test_other_errors_are_not_mistaken_for_out_of_memory(predictor_path: Path) -> None:
    from MMCAFNetLib import memory_guard
    from MMCAFNetLib.inference import Predictor

    predictor = Predictor.load(predictor_path, device="cpu")
    image = torch.zeros((1, 1, 3, 3, 3))  # wrong window size: the model itself fails
    with pytest.raises(Exception) as info:
        memory_guard.run_batch_with_fallback(predictor, image, torch.zeros((1, 7)), None, [])
    assert not memory_guard.is_out_of_memory(info.value)


# ---------------------------------------------------------------------------------------------
# full disk

_FULL_DISK = r"""
import json, os, resource, signal, sys, traceback
from pathlib import Path
import numpy as np, pandas as pd, torch
from MMCAFNetLib.checkpoint import load_checkpoint, save_checkpoint
from MMCAFNetLib.volume import Volume, read_volume, write_volume
from MMCAFNetLib.dataset import write_cohort

root = Path(sys.argv[1])
ckpt_src = Path(sys.argv[2])
limit = 64 * 1024
small = Volume.from_geometry(np.zeros((4, 8, 8), np.int16) - 1000, (1.0, 1.0, 1.0))
big = Volume.from_geometry(np.random.default_rng(0).normal(size=(64, 64, 64)).astype(np.float32), (1.0, 1.0, 1.0))
payload = load_checkpoint(ckpt_src)

# the earlier files, written while the disk had room
save_checkpoint(payload, root / "model.pt")
write_volume(small, root / "ct.nrrd")
write_cohort(pd.DataFrame({"patient_id": ["A"], "label": ["A"]}), root / "cohort.csv")
earlier = {name: (root / name).read_bytes() for name in ("model.pt", "ct.nrrd", "cohort.csv")}

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
big_payload = dict(payload, state_dict={**payload["state_dict"], "extra": torch.zeros(1 << 18)})
big_table = pd.DataFrame({"patient_id": [f"P{i}" for i in range(20000)], "label": ["A"] * 20000})
attempts = {
    "model.pt": lambda: save_checkpoint(big_payload, root / "model.pt"),
    "ct.nrrd": lambda: write_volume(big, root / "ct.nrrd", compress=False),
    "cohort.csv": lambda: write_cohort(big_table, root / "cohort.csv"),
}
out = {}
for name, attempt in attempts.items():
    try:
        attempt()
        out[name] = {"error": None}
    except BaseException as exc:
        out[name] = {"error": type(exc).__name__, "message": str(exc), "is_value_or_os": isinstance(exc, (OSError, ValueError))}
    out[name]["intact"] = (root / name).read_bytes() == earlier[name]
out["leftovers"] = sorted(p.name for p in root.iterdir() if p.name not in earlier)
print(json.dumps(out))
"""


def test_a_full_disk_leaves_earlier_files_intact_and_says_so(tmp_path: Path, predictor_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(root), str(predictor_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("model.pt", "ct.nrrd", "cohort.csv"):
        entry = report[name]
        assert entry["error"], f"writing {name} past the size limit did not fail"
        assert entry["is_value_or_os"] and entry["message"], entry
        assert entry["intact"], f"the earlier {name} was damaged by the failed write"
    assert report["leftovers"] == [], f"temporary files left behind: {report['leftovers']}"
    load_checkpoint(root / "model.pt")


def test_a_full_disk_while_writing_prediction_outputs_keeps_the_earlier_results(tmp_path: Path,
                                                                                  predictor_path: Path) -> None:
    script = textwrap.dedent(r"""
        import json, resource, signal, sys
        from pathlib import Path
        import numpy as np
        from MMCAFNetLib.inference import Predictor
        from MMCAFNetLib.inference.outputs import write_outputs
        sys.path.insert(0, sys.argv[3])
        from test_faults import RECORD, phantom
        out = Path(sys.argv[1])
        predictor = Predictor.load(sys.argv[2], device="cpu")
        ct = phantom()
        result = predictor.classify(ct, RECORD, lesion=np.array([5.0, 0.0, 0.0]))
        write_outputs(result, ct, out, preview=False)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
        try:
            write_outputs(result, ct, out, preview=False)
            error = None
        except (OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        after = {p.name: p.read_bytes() for p in out.iterdir()}
        siblings = sorted(p.name for p in out.parent.iterdir() if p.name != out.name)
        print(json.dumps({"error": error, "same": before == after, "names": sorted(after), "siblings": siblings}))
    """)
    out = tmp_path / "case" / "result"
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(predictor_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["error"], "writing the outputs past the size limit did not fail"
    assert report["same"], "the earlier results were changed by a failed write"
    assert "prediction.json" in report["names"] and report["siblings"] == []


# ---------------------------------------------------------------------------------------------
# corrupt cache entries


@pytest.mark.parametrize("damage", ["truncate", "flip", "sidecar", "delete-sidecar"])
def test_a_corrupt_cache_entry_is_detected_and_rebuilt(tmp_path: Path, damage: str) -> None:
    cache_module = pytest.importorskip("MMCAFNetLib.cache", reason="the preprocessing cache has not landed")
    from MMCAFNetLib.volume import write_volume

    source = tmp_path / "ct.nrrd"
    write_volume(phantom(32), source)
    cache = cache_module.PreprocessCache(tmp_path / "cache")
    first = np.array(cache.ensure(source, TINY_PRESET).array)
    key = cache.key(source, TINY_PRESET)
    array_path, info_path = tmp_path / "cache" / "arrays" / f"{key}.npy", tmp_path / "cache" / "arrays" / f"{key}.json"
    data = bytearray(array_path.read_bytes())
    if damage == "truncate":
        array_path.write_bytes(bytes(data[: len(data) - 100]))
    elif damage == "flip":
        data[-10] ^= 0xFF
        array_path.write_bytes(bytes(data))
    elif damage == "sidecar":
        info_path.write_text("{ not json")
    else:
        info_path.unlink()
    verify = "full" if damage == "flip" else "size"
    rebuilt = cache.ensure(source, TINY_PRESET, verify=verify)
    assert cache.stats["rebuilt"] == 1, cache.stats
    np.testing.assert_array_equal(np.asarray(rebuilt.array), first)
    assert cache.ensure(source, TINY_PRESET, verify="full") is not None and cache.stats["rebuilt"] == 1


# ---------------------------------------------------------------------------------------------
# training killed at random moments

_TRAIN = r"""
import json, sys
sys.path.insert(0, sys.argv[4])
from test_faults import TINY_MODEL, TINY_PRESET
from MMCAFNetLib.train.config import resolve_config
from MMCAFNetLib.train.loop import train
config = resolve_config("default", None, None, {
    "model": "mmcafnet-lite", "model_overrides": dict(TINY_MODEL), "preset": dict(TINY_PRESET), "epochs": 4,
    "batch_size": 4, "progress": False, "seed": 5, "early_stopping_patience": 100})
summary = train(config, sys.argv[1], sys.argv[2], resume=sys.argv[3] == "resume")
print(json.dumps({"epochs_completed": summary.get("epochs_completed")}))
"""


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory) -> Path:
    synthetic = pytest.importorskip("MMCAFNetLib.synthetic", reason="the synthetic cohort writer has not landed")
    pytest.importorskip("MMCAFNetLib.train.loop", reason="the training loop has not landed")
    from MMCAFNetLib.dataset import index_download, write_cohort

    base = tmp_path_factory.mktemp("kill-cohort")
    written = synthetic.write_cohort(base / "data", patients=8, seed=2, size=48, classes="A,G", extra_series=False)
    result = index_download(written.root, seed=0, test_fraction=0.0, val_fraction=0.25, progress=False)
    return write_cohort(result.cohort, base / "cohort.csv")


def _checkpoints_all_load(run: Path) -> list[str]:
    names = []
    for path in sorted(run.glob("*.pt")):
        load_checkpoint(path)  # raises on a corrupt file
        names.append(path.name)
    return names


@pytest.mark.slow
def test_training_killed_at_random_moments_resumes_and_completes(tiny_cohort: Path, tmp_path: Path) -> None:
    """Kill 1: while a checkpoint's temporary file is being written. Kills 2-3: at random moments
    after a resume. After each kill every checkpoint on disk loads; the last run completes."""
    run = tmp_path / "run"
    rng = random.Random(8)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}

    def start(mode: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _TRAIN, str(tiny_cohort), str(run), mode,
                                 str(Path(__file__).parent)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)

    def kill(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    def writing_checkpoint() -> bool:
        return run.is_dir() and any(p.name.endswith(".tmp") and ".pt." in p.name for p in run.iterdir())

    # 1. fresh run, killed the moment a checkpoint is being written (after at least one is complete)
    proc = start("fresh")
    end, during_write = time.monotonic() + 400, False
    while time.monotonic() < end and proc.poll() is None:
        if (run / "last.pt").exists() and writing_checkpoint():
            kill(proc)
            during_write = True
            break
        time.sleep(0.002)
    if not during_write:  # the write was never caught in the act: kill right after the first checkpoint
        assert proc.poll() is None, "the run ended before it could be interrupted"
        kill(proc)
    epoch_time = None
    assert _checkpoints_all_load(run)
    # 2-3. resumed runs killed at random moments
    for _ in range(2):
        before = {p.name: p.stat().st_mtime_ns for p in run.glob("*.pt")}
        proc = start("resume")
        t0 = time.monotonic()
        while proc.poll() is None and {p.name: p.stat().st_mtime_ns for p in run.glob("*.pt")} == before:
            time.sleep(0.01)
            assert time.monotonic() - t0 < 400
        epoch_time = epoch_time or (time.monotonic() - t0)
        if proc.poll() is not None:
            break
        time.sleep(rng.uniform(0.0, epoch_time))
        if proc.poll() is not None:
            break
        kill(proc)
        _checkpoints_all_load(run)
    proc = start("resume")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["epochs_completed"] == 4
    names = _checkpoints_all_load(run)
    assert "last.pt" in names and "best.pt" in names
    history = json.loads((run / "log.json").read_text())
    epochs = [h.get("epoch") for h in history]
    assert epochs == sorted(set(epochs)) and len(epochs) == 4, f"epochs logged: {epochs}"


# ---------------------------------------------------------------------------------------------
# a full disk through the command line: exit status 1 and one line, in predict and in train
#
# Real where the machine allows: a tmpfs of a few hundred kilobytes (mounting needs root), filled up.
# Elsewhere a file-size limit (RLIMIT_FSIZE, EFBIG) stands in for it.


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A real, tiny file system mounted at ``folder`` (yields True), or yields False where mounting is
    not allowed (not root, no mount command): the caller then limits the file size instead."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = False
    if os.environ.get("MMCAFNET_TEST_NO_MOUNT") != "1" and hasattr(os, "geteuid") and os.geteuid() == 0 \
            and shutil.which("mount"):
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        mounted = proc.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill_disk(folder: Path, leave: int = 4096) -> None:
    """Fill the file system of ``folder`` until writing fails, then free ``leave`` bytes."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while fh.write(b"\0" * 4096):
                pass
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def _limited_files(limit: Optional[int]):
    """preexec_fn: files larger than ``limit`` bytes cannot be written (EFBIG, standing in for ENOSPC)."""
    import resource

    def apply() -> None:
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _run_cli(args: list[str], cwd: Path, limit: Optional[int] = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "MMCAFNetLib.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600, preexec_fn=_limited_files(limit))


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert len(errors) == 1, stderr[-3000:]
    assert "space" in errors[0].lower() or "too large" in errors[0].lower(), errors[0]
    return errors[0]


def test_a_full_disk_in_predict_exits_1_with_one_line_and_keeps_the_earlier_results(tmp_path: Path,
                                                                                    predictor_path: Path) -> None:
    from MMCAFNetLib.volume import write_volume

    write_volume(phantom(), tmp_path / "ct.nrrd")
    disk = tmp_path / "disk"
    with small_disk(disk, "2m") as real:
        out = disk / "out"
        args = ["predict", "--checkpoint", str(predictor_path), "--input", str(tmp_path / "ct.nrrd"), "--out",
                str(out), "--point", "5", "0", "0", "--no-preview"]
        first = _run_cli(args, tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        sizes = [p.stat().st_size for p in out.iterdir()]
        assert len(sizes) > 2 and sum(sizes) > 4096  # the set does not fit in the room fill_disk leaves
        if real:
            fill_disk(disk)  # room for one small file, not for the whole set: a write fails
        # Without a real disk, a file-size limit just under the largest file's size makes that write fail.
        proc = _run_cli([*args, "--threshold", "0.3"], tmp_path, limit=None if real else max(sizes) - 1)
        assert proc.returncode == 1, f"exit status {proc.returncode} (real disk: {real}): {proc.stderr[-3000:]}"
        _one_error_line(proc.stderr)
        after = {p.name: p.read_bytes() for p in out.iterdir()}
        assert after == before, "the earlier results were changed by a failed run"
        assert sorted(p.name for p in disk.iterdir() if p.name != "filler.bin") == ["out"], "temporary files left"


def test_a_full_disk_in_train_exits_1_with_one_line(tiny_cohort: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": "mmcafnet-lite", "model_overrides": TINY_MODEL, "preset": TINY_PRESET,
                                  "epochs": 1, "batch_size": 2, "progress": False}))
    disk = tmp_path / "disk"
    with small_disk(disk, "200k") as real:  # config.json fits, a checkpoint (~190 kB) does not
        out = disk / "run"
        proc = _run_cli(["train", "--cohort", str(tiny_cohort), "--out", str(out), "--config", str(config),
                         "--no-progress", "--cache", str(tmp_path / "cache")], tmp_path,
                        limit=None if real else 150 * 1024)
        assert proc.returncode == 1, f"exit status {proc.returncode} (real disk: {real}): {proc.stderr[-3000:]}"
        _one_error_line(proc.stderr)
        leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")] if out.exists() else []
        assert leftovers == [], f"temporary files left behind: {leftovers}"


# ---------------------------------------------------------------------------------------------
# an epoch ending with a batch of one sample (BatchNorm cannot train on it)


def test_a_single_sample_remainder_batch_is_left_out_not_a_crash(tiny_cohort: Path, tmp_path: Path) -> None:
    """6 training patients, batch size 5: the last batch would hold one sample ([1, 24] into BatchNorm1d)."""
    import pandas as pd

    from MMCAFNetLib.train import loop
    from MMCAFNetLib.train.config import resolve_config

    n_train = int((pd.read_csv(tiny_cohort)["split"] == "train").sum())
    config = resolve_config("default", None, None, {
        "model": "mmcafnet-lite", "model_overrides": dict(TINY_MODEL), "preset": dict(TINY_PRESET), "epochs": 1,
        "batch_size": n_train - 1, "progress": False, "seed": 1})
    summary = loop.train(config, tiny_cohort, tmp_path / "run")
    assert summary.get("epochs_completed") == 1
    load_checkpoint(tmp_path / "run" / "last.pt")
    remainder = loop.single_sample_remainder
    assert remainder(6, 5) and remainder(5, 2) and not remainder(6, 4) and not remainder(7, 1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        remainder(1, 4)

"""Files written by the library: permissions follow the umask, a result folder is published as one set,
leftovers of killed writers are cleaned up, and every JSON file is strict JSON.

- umask: files 0666 and folders 0777 minus the umask, as ``open``/``mkdir`` give (not mkstemp's 0600).
- A case's result folder is replaced as a set: interrupted at any step of publishing (an exception
  thrown from the n-th rename, and real SIGKILLs of a writer in a loop), the folder holds the earlier
  run's whole set or the new whole set; the next run removes what a killed run left beside it.
- Strict JSON: the one writer turns NaN and infinities into null with a note; every JSON file the
  command line writes parses with a strict parser.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from MMCAFNetLib import atomic
from MMCAFNetLib.strict_json import NONFINITE_NOTE_KEY, dumps, loads_strict, write_json
from MMCAFNetLib.volume import Volume, write_volume

HERE = Path(__file__).resolve().parent


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# ---------------------------------------------------------------------------------------------
# permissions


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path: Path, mask: int) -> None:
    from test_faults import tiny_checkpoint

    old = os.umask(mask)
    try:
        atomic.write_text_atomic(tmp_path / "a.txt", "x")
        write_json(tmp_path / "b.json", {"x": 1})
        write_volume(Volume.from_geometry(np.zeros((2, 3, 4), np.int16), (1, 1, 1)), tmp_path / "c.nrrd")
        tiny_checkpoint(tmp_path / "d.pt")
        staged = atomic.make_staging_folder(tmp_path / "result")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.json", "c.nrrd", "d.pt"):
        assert _mode(tmp_path / name) == 0o666 & ~mask, f"{name}: {oct(_mode(tmp_path / name))} with umask {oct(mask)}"
    assert _mode(staged) == 0o777 & ~mask


def test_prediction_outputs_are_readable_by_colleagues(tmp_path: Path, umask_022) -> None:
    result, ct = _classification()
    from MMCAFNetLib.inference.outputs import write_outputs

    write_outputs(result, ct, tmp_path / "case", preview=False)
    assert _mode(tmp_path / "case") == 0o755
    for path in (tmp_path / "case").iterdir():
        assert _mode(path) == 0o644, f"{path.name}: {oct(_mode(path))}"


# ---------------------------------------------------------------------------------------------
# publishing a result folder as one set


_RESULT: dict = {}


def _classification():
    """One real classification of the fault-test phantom (cached for the module)."""
    if not _RESULT:
        from test_faults import RECORD, phantom, tiny_checkpoint

        from MMCAFNetLib.inference import Predictor

        path = tiny_checkpoint(Path(os.environ.get("TMPDIR", "/tmp")) / f"publish-{os.getpid()}.pt")
        predictor = Predictor.load(path, device="cpu")
        ct = phantom()
        _RESULT["ct"] = ct
        _RESULT["result"] = predictor.classify(ct, RECORD, lesion=np.array([5.0, 0.0, 0.0]))
        path.unlink()
    return _RESULT["result"], _RESULT["ct"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _same_set(found: dict[str, bytes], expected: dict[str, bytes]) -> bool:
    """Equal files, prediction.json compared without its creation time."""
    if set(found) != set(expected):
        return False
    for name, data in found.items():
        if name == "prediction.json":
            a, b = json.loads(data), json.loads(expected[name])
            a.pop("created"), b.pop("created")
            if a != b:
                return False
        elif data != expected[name]:
            return False
    return True


class _Interrupted(BaseException):
    pass


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_an_interrupted_publish_leaves_the_old_set_or_the_new_set(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    """Interrupt each rename in turn while publishing over an earlier result: old set or new set, never a mix
    (with Linux's atomic exchange, and with the two-rename fallback of other systems)."""
    from MMCAFNetLib.inference.outputs import write_outputs

    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)

    result, ct = _classification()
    result.threshold = 0.7
    write_outputs(result, ct, tmp_path / "reference", preview=False)
    new_set = _snapshot(tmp_path / "reference")
    real_replace = os.replace
    calls = {"n": 0, "fail_at": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise _Interrupted(f"killed at rename {calls['fail_at']}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    fail_at = 0
    while True:
        fail_at += 1
        out = tmp_path / f"case{fail_at}"
        calls.update(n=0, fail_at=0)
        result.threshold = 0.3
        write_outputs(result, ct, out, preview=False)
        old_set = _snapshot(out)
        assert not _same_set(old_set, new_set)
        (out / "notes.txt").write_text("the user's own file")
        calls.update(n=0, fail_at=fail_at)
        result.threshold = 0.7
        try:
            write_outputs(result, ct, out, preview=False)
            interrupted = False
        except _Interrupted:
            interrupted = True
        atomic.recover_interrupted_publish(out)  # what the next run (another process) does first
        found = {k: v for k, v in _snapshot(out).items() if k != "notes.txt"}
        assert _same_set(found, old_set) or _same_set(found, new_set), (fail_at, sorted(found))
        assert (out / "notes.txt").read_text() == "the user's own file"
        if not interrupted:
            assert fail_at > 1 and _same_set(found, new_set)
            break


_KILL_LOOP = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from test_publish import _classification
from MMCAFNetLib.inference.outputs import write_outputs
result, ct = _classification()
for threshold in (0.3, 0.7):  # this process's own reference sets (floats may differ between processes)
    result.threshold = threshold
    write_outputs(result, ct, f"{sys.argv[1]}-ref{threshold}", preview=False)
write_outputs(result, ct, sys.argv[1], preview=False)
print("ready", flush=True)
n = 0
while True:
    result.threshold = 0.3 if n % 2 else 0.7
    write_outputs(result, ct, sys.argv[1], preview=False)
    n += 1
"""


def test_a_writer_killed_while_publishing_leaves_a_whole_set_and_the_next_run_cleans_up(tmp_path: Path) -> None:
    from MMCAFNetLib.inference.outputs import write_outputs

    result, ct = _classification()
    out = tmp_path / "case"
    rng = np.random.default_rng(3)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _KILL_LOOP, str(out), str(HERE)], stdout=subprocess.PIPE,
                                text=True, env=env)
        assert proc.stdout.readline().strip() == "ready"
        sets = [_snapshot(tmp_path / f"case-ref{t}") for t in (0.3, 0.7)]
        time.sleep(float(rng.uniform(0.2, 1.0)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        atomic.recover_interrupted_publish(out)  # what the next run does first
        found = _snapshot(out)
        assert any(_same_set(found, s) for s in sets), sorted(found)
    result.threshold = 0.7
    write_outputs(result, ct, out, preview=False)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".case."))
    assert left == [], f"leftovers of killed runs were not removed: {left}"


def test_stale_temporary_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".model.pt.{dead}.abc123.tmp").write_bytes(b"half")
    (tmp_path / f".case.{dead}.x1y2.partial").mkdir()
    (tmp_path / f".model.pt.{os.getpid()}.abc123.tmp").write_bytes(b"mine, still being written")
    (tmp_path / ".hidden-user-file").write_text("not ours")
    removed = atomic.remove_stale(tmp_path)
    assert sorted(removed) == sorted([f".model.pt.{dead}.abc123.tmp", f".case.{dead}.x1y2.partial"])
    assert (tmp_path / f".model.pt.{os.getpid()}.abc123.tmp").exists() and (tmp_path / ".hidden-user-file").exists()


# ---------------------------------------------------------------------------------------------
# strict JSON


def test_the_json_writer_writes_null_and_a_note_for_nan_and_infinity(tmp_path: Path) -> None:
    data = {"auroc": float("nan"), "ci": [np.float32(0.5), float("inf")], "nested": {"x": -np.inf}, "n": np.int64(3)}
    write_json(tmp_path / "m.json", data)
    text = (tmp_path / "m.json").read_text()
    parsed = loads_strict(text)
    assert parsed["auroc"] is None and parsed["ci"] == [0.5, None] and parsed["nested"]["x"] is None
    assert parsed["n"] == 3
    assert sorted(parsed[NONFINITE_NOTE_KEY]) == sorted(["auroc: nan", "ci[1]: inf", "nested.x: -inf"])
    assert loads_strict(dumps([float("nan")])) == [None]
    with pytest.raises(ValueError):
        loads_strict('{"a": NaN}')


def _all_json_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))


def _parse_strictly(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        for line in text.splitlines():
            if line.strip():
                loads_strict(line)
    else:
        loads_strict(text)


@pytest.mark.slow
def test_every_json_file_the_command_line_writes_is_strict_json(tmp_path: Path) -> None:
    """synth, index, train (a tiny run), evaluate on a one-patient split (metrics not computable:
    NaN before), predict, demo, info --json: every .json they write parses strictly."""
    from test_faults import TINY_MODEL, TINY_PRESET

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "MMCAFNET_MODELS_DIR": str(tmp_path / "models")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "MMCAFNetLib.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=900)
        assert proc.returncode == 0, f"{args[0]}: {proc.stderr[-3000:]}"
        return proc

    cli("synth", str(tmp_path / "data"), "--patients", "8", "--seed", "1", "--size", "48", "--classes", "A,G",
        "--no-extra-series", "--no-progress")
    cli("index", str(tmp_path / "data"), "--out", str(tmp_path / "cohort.csv"))
    import pandas as pd

    cohort = pd.read_csv(tmp_path / "cohort.csv")
    rank = cohort.groupby("label").cumcount()  # the test split is one A patient: one class, no AUC
    test = (rank == 3) & (cohort["label"] == "A")
    cohort["split"] = np.where(test, "test", np.where(rank == 2, "val", "train"))
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": "mmcafnet-lite", "model_overrides": TINY_MODEL, "preset": TINY_PRESET,
                                  "epochs": 1, "batch_size": 2, "progress": False}))
    cli("train", "--cohort", str(tmp_path / "cohort.csv"), "--out", str(tmp_path / "run"), "--config", str(config),
        "--no-progress")
    checkpoint = next(p for p in (tmp_path / "run").glob("*.pt"))
    evaluated = cli("evaluate", "--checkpoint", str(checkpoint), "--cohort", str(tmp_path / "cohort.csv"), "--split",
                    "test", "--out", str(tmp_path / "report"), "--no-progress")
    loads_strict(evaluated.stdout[evaluated.stdout.index("{"):])
    ct = next((tmp_path / "data").rglob("*.dcm")).parent
    cli("predict", "--checkpoint", str(checkpoint), "--input", str(ct), "--out", str(tmp_path / "pred"),
        "--no-preview")
    cli("demo", "--out", str(tmp_path / "demo"))
    info = cli("info", str(checkpoint), "--json")
    loads_strict(info.stdout)
    files = _all_json_files(tmp_path)
    names = {p.name for p in files}
    assert {"metrics.json", "prediction.json", "log.json", "summary.json"} <= names, names
    for path in files:
        _parse_strictly(path)
    metrics = loads_strict((tmp_path / "report" / "metrics.json").read_text())
    assert metrics.get(NONFINITE_NOTE_KEY), "a one-class split has metrics that cannot be computed"


def test_an_evaluation_of_a_one_class_split_writes_strict_json(tmp_path: Path) -> None:
    """Two patients of one class: AUC and the class-wise rates are undefined (NaN before the strict writer)."""
    from MMCAFNetLib.evaluate.report import evaluate_patients, write_report

    metrics = evaluate_patients(["P1", "P2"], [1, 1], np.array([[0.3, 0.7], [0.6, 0.4]]), ["A", "G"], 0.5)
    assert any(isinstance(v, float) and v != v for v in metrics.values()), "expected undefined metrics"
    write_report(metrics, tmp_path / "report", "tiny", "model")
    parsed = loads_strict((tmp_path / "report" / "metrics.json").read_text())
    assert parsed[NONFINITE_NOTE_KEY] and all(": nan" in n for n in parsed[NONFINITE_NOTE_KEY])


def test_a_single_file_write_removes_what_a_killed_writer_left_for_the_same_file(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".last.pt.{dead}.k3j2.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / f".best.pt.{dead}.k3j2.tmp"
    other.write_bytes(b"another target's leftover")
    atomic.write_bytes_atomic(tmp_path / "last.pt", b"whole")
    assert not stale.exists() and other.exists()
    assert (tmp_path / "last.pt").read_bytes() == b"whole"

"""The benchmark script runs, measures the plain path next to the optimised one, and describes the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent / "benchmarks" / "bench.py"


def test_unknown_workload_is_refused():
    proc = subprocess.run([sys.executable, str(BENCH), "--only", "W9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "W9" in proc.stderr


@pytest.mark.slow
def test_quick_w1_w4_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "W1,W4", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    machine = data["machine"]
    assert machine["torch_threads"] >= 1 and machine["usable_cpus"] >= 1
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if names:
            assert machine["cpu_model"] == names[0]
    rows = data["rows"]
    assert not [r for r in rows if r.get("variant") == "failed"]
    w1 = [r for r in rows if r["workload"] == "W1" and "batch" in r]
    for batch in sorted({r["batch"] for r in w1}):
        variants = {r["variant"] for r in w1 if r["batch"] == batch}
        assert {"plain eager fp32", "optimised (library default)"} <= variants
    probe = [r for r in rows if r["workload"] == "W1" and "probe" in r["case"]]
    assert probe and all(r["gflop_per_s"] > 0 for r in probe)
    for r in w1:
        assert r["median_s"] > 0 and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["gflop_per_s"] == pytest.approx(r["gflops"] / r["median_s"], rel=1e-6)
        if r["peak_rss_mib"] is not None:
            assert r["peak_rss_mib"] > 50  # a process holding torch and a model
    w4 = {r["variant"] for r in rows if r["workload"] == "W4"}
    assert {"read_volume", "heatmap_volume + labelmap"} <= w4
    assert "plain eager fp32" in proc.stdout  # the table is printed


@pytest.mark.slow
@pytest.mark.scene
def test_quick_w7_measures_the_slicer_job_api_next_to_the_direct_predictor(tmp_path):
    pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "W7", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {
        "plain: Predictor in this process", "Predictor + scene outputs in this process",
        "job API, warm worker", "job API, cold worker (start, imports, model load)",
    }
    cold, warm = rows["job API, cold worker (start, imports, model load)"], rows["job API, warm worker"]
    assert warm["median_s"] < cold["median_s"], "a warm worker was as slow as a cold one: the model is not kept"
    assert rows["plain: Predictor in this process"]["speedup_vs_plain"] == pytest.approx(1.0)


@pytest.mark.slow
def test_quick_w8_times_predict_end_to_end_in_windows_time(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "W8", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    window = next(r for v, r in rows.items() if v.startswith("one plain eager fp32 mmcafnet window ("))
    assert "one plain eager fp32 mmcafnet window, 1 thread" in rows
    for variant in ("predict, lesion point", "predict, whole volume (no lesion)"):
        r = rows[variant]
        assert r["windows_time"] == pytest.approx(r["median_s"] / window["median_s"], rel=1e-9)
        assert {"prediction.json", "heatmap.nrrd", "labelmap.nrrd"} <= set(r["files"])
        assert r["output_bytes"] == sum(r["files"].values()) and r["windows"] >= 1
        assert r["peak_rss_mib"] > 50  # the predict process's own peak (a process holding torch)
    assert rows["predict, whole volume (no lesion)"]["windows"] >= rows["predict, lesion point"]["windows"]

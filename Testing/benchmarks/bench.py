"""Speed and memory benchmark of MMCAF-Net: prints a table and writes JSON.

    python Testing/benchmarks/bench.py [--quick] [--only W1,W4] [--json out.json] [--models mmcafnet-lite]

Workloads (see docs/performance.md):
  W1  forward per window, mmcafnet and mmcafnet-lite, batch 1 and 8: plain eager fp32 next to each
      optimisation and the library default, with achieved GFLOP/s next to a dense Conv3d probe
      (the machine's practical ceiling) measured in the same run and precision
  W2  lesion-guided classification of a 512x512x300 CT in memory, attention heatmap on the full
      grid; share of the total spent in the model's forward
  W3  whole-volume scan of the same CT (peak memory)
  W4  reading a 300-slice DICOM series, resampling to the model's spacing, the heatmap back
  W5  training step throughput (windows/s) at batch 4, and the cached data loader's throughput
  W6  W1-W3 and W5 on CUDA with bf16 (batch 1 and 16), where a CUDA device exists
  W7  Slicer's Apply to outputs through the job API and its worker process (cold and warm), next to
      the Predictor called directly and the Predictor plus writing the scene, on slicer-core's scene
  W8  `mmcafnet predict` end to end (a fresh process: imports, DICOM read, classification, files) on a
      synthetic 512x512x313 DICOM series with the bundled model, lesion point and whole volume, in
      windows' time of one plain eager fp32 `mmcafnet` window measured in the same run, and the size
      of the output folder

Each workload runs in its own Python process (so one workload's memory does not inflate the
next one's peak), its variants interleaved round-robin after a warm-up; the figure reported is
the median. ``--quick`` shrinks every size for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ALL = ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8")


def _parse_only(text: Optional[str]) -> List[str]:
    if not text:
        return list(ALL)
    keys = [k.strip().upper() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ALL]
    if unknown:
        raise SystemExit(f"bench.py: unknown workload(s) {unknown}; choose from {','.join(ALL)}")
    return keys


def _worker(key: str, quick: bool, models: Optional[List[str]], out: str) -> int:
    """Run one workload in this process and write its result as JSON to ``out``."""
    sys.path.insert(0, str(HERE))
    import workloads

    cfg = workloads.sizes(quick, models)
    result = workloads.run_workload(key, cfg)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, default=str)
    os.replace(tmp, out)
    return 0


def run_in_subprocess(key: str, quick: bool, models: Optional[List[str]], timeout: Optional[float]) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, f"{key}.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", key, "--worker-out", out]
        if quick:
            cmd.append("--quick")
        if models:
            cmd += ["--models", ",".join(models)]
        start = time.perf_counter()
        try:
            # the worker's stderr (progress, tracebacks) goes straight to ours
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"rows": [{"workload": key, "case": "-", "variant": "failed", "error": f"timed out after {timeout} s"}]}
        if proc.returncode != 0 or not os.path.exists(out):
            return {"rows": [{"workload": key, "case": "-", "variant": "failed",
                              "error": f"worker exited with status {proc.returncode} (traceback above)"}],
                    "wall_s": time.perf_counter() - start}
        with open(out, encoding="utf-8") as fh:
            return json.load(fh)


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-2:
        return f"{seconds * 1e3:.2f} ms"
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.2f} s"


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) + suffix


def format_table(rows: List[Dict[str, Any]], markdown: bool = False) -> str:
    """One line per (workload, case, variant): median, spread, throughput, GFLOP/s, ratio, memory."""
    header = ["W", "case", "variant", "median", "min-max", "windows/s", "GFLOP/s", "vs plain", "fwd share",
              "peak RSS"]
    lines = []
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append([r.get("workload", "?"), r.get("case", "-"), r.get("variant", "-"),
                          "", "", "", "", "", "", (r.get("error") or r.get("skipped") or "").splitlines()[-1][:60]])
            continue
        spread = f"{_fmt_time(r.get('min_s'))}-{_fmt_time(r.get('max_s'))}" if r.get("runs", 1) > 1 else "1 run"
        lines.append([
            r["workload"], r["case"], r["variant"], _fmt_time(r.get("median_s")), spread,
            _fmt(r.get("windows_per_s"), ".2f"), _fmt(r.get("gflop_per_s"), ".1f"),
            _fmt(r.get("speedup_vs_plain"), ".2f", "x"),
            _fmt(None if r.get("forward_share") is None else 100 * r["forward_share"], ".0f", "%"),
            _fmt(None if r.get("peak_rss_mib") is None else r["peak_rss_mib"] / 1024, ".2f", " GiB"),
        ])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
    widths[1] = min(widths[1], 70)
    fmt_line = lambda cells: "  ".join(str(c)[: w].ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt_line(header), fmt_line(["-" * w for w in widths])] + [fmt_line(line) for line in lines])


def format_machine(machine: Dict[str, Any]) -> str:
    cuda = machine.get("cuda")
    return (
        f"CPU: {machine['cpu_model']} ({machine['usable_cpus']} usable of {machine['logical_cpus']} logical CPUs, "
        f"torch threads {machine['torch_threads']}); ISA: {', '.join(machine['isa_flags']) or 'n/a'} "
        f"(torch capability {machine['cpu_capability']}, hardware bf16: {'yes' if machine['fast_bf16'] else 'no'}); "
        f"memory {machine['memory_gib']:.1f} GiB; torch {machine['torch']}, Python {machine['python']}; "
        f"CUDA: {cuda['name'] if cuda else 'none'}; load average at start {machine['load_average']}"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    parser.add_argument("--only", help="comma-separated workloads to run, e.g. W1,W4 (default: all)")
    parser.add_argument("--json", help="write the machine description and every row to this JSON file")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    parser.add_argument("--models", help="comma-separated model names (default: mmcafnet,mmcafnet-lite)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per workload")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    if args.worker:
        return _worker(args.worker, args.quick, models, args.worker_out)

    keys = _parse_only(args.only)
    sys.path.insert(0, str(HERE))
    from measure import describe_machine, load_average

    machine = describe_machine()
    print(format_machine(machine), flush=True)
    rows: List[Dict[str, Any]] = []
    walls: Dict[str, float] = {}
    for key in keys:
        start = time.perf_counter()
        print(f"running {key} ...", file=sys.stderr, flush=True)
        result = run_in_subprocess(key, args.quick, models, args.timeout)
        walls[key] = time.perf_counter() - start
        rows.extend(result["rows"])
    machine["load_average_end"] = load_average()
    table = format_table(rows)
    print(table)
    print(f"wall time per workload (s): {', '.join(f'{k} {v:.0f}' for k, v in walls.items())}; "
          f"load average at end {machine['load_average_end']}")
    if args.json:
        payload = {"machine": machine, "quick": args.quick, "workloads": keys, "wall_s": walls, "rows": rows,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, path)
    if args.markdown:
        Path(args.markdown).write_text(format_machine(machine) + "\n\n" + format_table(rows, markdown=True) + "\n",
                                       encoding="utf-8")
    failed = [r for r in rows if r.get("variant") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

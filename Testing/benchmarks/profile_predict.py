"""Where `mmcafnet predict` spends its time, end to end, phase by phase.

    python Testing/benchmarks/profile_predict.py --input CT [--point R A S] [--checkpoint CKPT]
                                                 [--cprofile FILE.txt] [--json FILE.json]

Runs ``mmcafnet predict`` in this process (a fresh interpreter: the import figure is the command's
own) under cProfile, then prints the cumulative time of each phase: importing the command and
torch, loading the checkpoint, reading the DICOM series, preparing (resampling) the CT, the
forward passes, the heatmap and labelmap, and each output file. With ``--cprofile`` the 40
costliest functions by cumulative time go to a text file. The whole run is timed from before the
first import, so the phases and the total come from the same run.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

#: (phase, module file suffix, function name): cumulative time of that function in the profile.
PHASES = [
    ("load checkpoint + build model", "inference/predictor.py", "load"),
    ("read the CT (DICOM/NRRD)", "MMCAFNetLib/volume.py", "read_volume"),
    ("classify (all of it)", "inference/predictor.py", "_classify"),
    ("  check the CT", "inference/predictor.py", "validate_ct"),
    ("  choose windows (body/lung mask)", "MMCAFNetLib/lung_mask.py", "candidate_window_centers"),
    ("  resample to the model grid", "MMCAFNetLib/windows.py", "prepare_volume"),
    ("  resample lesion region", "inference/predictor.py", "prepare_lesion_region"),
    ("  forward passes", "inference/predictor.py", "_run_batch"),
    ("  heatmap to the CT grid", "MMCAFNetLib/heatmap.py", "heatmap_volume"),
    ("  labelmap", "MMCAFNetLib/heatmap.py", "labelmap_volume"),
    ("write outputs (all of them)", "inference/outputs.py", "write_outputs"),
    ("  write heatmap/labelmap NRRD", "MMCAFNetLib/volume.py", "write_volume"),
    ("  write heatmap (compact NRRD)", "inference/outputs.py", "write_heatmap"),
    ("  write labelmap (compressed NRRD)", "inference/outputs.py", "write_labelmap"),
    ("  preview.png", "MMCAFNetLib/preview.py", "render_preview"),
]


def _cumulative(stats: pstats.Stats, suffix: str, name: str) -> Optional[float]:
    total = None
    for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if func == name and filename.replace(os.sep, "/").endswith(suffix):
            total = (total or 0.0) + ct
    return total


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="CT: DICOM folder or image file")
    parser.add_argument("--point", nargs=3, type=float, metavar=("R", "A", "S"), help="lesion point (RAS mm)")
    parser.add_argument("--checkpoint", help="default: the bundled demo model")
    parser.add_argument("--out", help="output folder (default: a temporary one)")
    parser.add_argument("--cprofile", help="write the 40 costliest functions (cumulative) here")
    parser.add_argument("--json", help="write the phases as JSON here")
    args = parser.parse_args(argv)

    profiler = cProfile.Profile()
    out = args.out or tempfile.mkdtemp(prefix="mmcafnet-profile-")
    cli_args = ["predict", "--input", args.input, "--out", out]
    if args.point:
        cli_args += ["--point", *[str(v) for v in args.point]]
    if args.checkpoint:
        cli_args += ["--checkpoint", args.checkpoint]
    t_import = time.perf_counter()
    profiler.enable()
    from MMCAFNetLib import cli

    t_cli = time.perf_counter()
    status = cli.main(cli_args)
    profiler.disable()
    t_end = time.perf_counter()
    stats = pstats.Stats(profiler)
    modules_torch = "torch" in sys.modules
    rows: List[Dict[str, Any]] = [
        {"phase": "interpreter start to script (not profiled)", "seconds": t_import - T0},
        {"phase": "import MMCAFNetLib.cli", "seconds": t_cli - t_import},
    ]
    torch_import = _cumulative(stats, "torch/__init__.py", "<module>")
    rows.append({"phase": "import torch (inside the command)", "seconds": torch_import})
    for phase, suffix, name in PHASES:
        seconds = _cumulative(stats, suffix, name)
        if seconds is not None:
            rows.append({"phase": phase, "seconds": seconds})
    rows.append({"phase": "total (from interpreter start)", "seconds": t_end - T0 + _startup_estimate()})
    sizes = {name: os.path.getsize(os.path.join(out, name)) for name in sorted(os.listdir(out))} if os.path.isdir(out) else {}
    print(f"mmcafnet predict exit status {status}; torch imported: {modules_torch}; load average {os.getloadavg()}")
    for r in rows:
        s = r["seconds"]
        print(f"{r['phase']:<45} {'-' if s is None else f'{s:8.3f} s'}")
    for name, size in sizes.items():
        print(f"{name:<45} {size / 1e6:8.2f} MB")
    print(f"{'output folder':<45} {sum(sizes.values()) / 1e6:8.2f} MB")
    if args.cprofile:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(40)
        with open(args.cprofile, "w", encoding="utf-8") as fh:
            fh.write(buf.getvalue())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"rows": rows, "files": sizes, "load_average": os.getloadavg(), "status": status}, fh, indent=2)
    return int(status)


def _startup_estimate() -> float:
    """Python's own start before this script's first line (from the process's start time)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            start_ticks = float(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
        age = uptime - start_ticks / ticks  # seconds since the process started
        return max(0.0, age - (time.perf_counter() - T0))
    except (OSError, ValueError, IndexError):
        return 0.0


if __name__ == "__main__":
    sys.exit(main())

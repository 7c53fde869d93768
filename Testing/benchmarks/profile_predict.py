"""Where `mmcafnet predict` spends its time, end to end, phase by phase.

    python Testing/benchmarks/profile_predict.py --input CT [--point R A S] [--checkpoint CKPT]
                                                 [--cprofile FILE.txt] [--json FILE.json]

Runs ``mmcafnet predict`` in this (fresh) interpreter with a wall-clock timer around each phase:
importing the library and torch, loading the checkpoint, reading the CT, checking it, choosing and
resampling the windows, the forward passes, the heatmap and labelmap, and each output file. The
timers wrap the library's functions (no profiler overhead: cProfile slows torch's many small calls
several-fold); ``--cprofile FILE`` adds a cProfile run's 40 costliest functions instead. Files
written on a thread (heatmap, labelmap) overlap the preview, so phases can add up to more than the
total. Phases a version of the library does not have are left out.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

#: (phase, module, attribute path): a wall-clock timer wraps that function for the run.
PHASES = [
    ("load checkpoint + build model", "MMCAFNetLib.inference.predictor", "Predictor.load"),
    ("read the CT (DICOM/NRRD)", "MMCAFNetLib.volume", "read_volume"),
    ("classify (all of it)", "MMCAFNetLib.inference.predictor", "Predictor._classify"),
    ("  check the CT", "MMCAFNetLib.inference.predictor", "validate_ct"),
    ("  resample the CT to the model grid", "MMCAFNetLib.windows", "prepare_volume"),
    ("  resample the lesion's region", "MMCAFNetLib.inference.predictor", "prepare_lesion_region"),
    ("  choose scan windows (lung mask)", "MMCAFNetLib.lung_mask", "select_scan_windows"),
    ("  forward passes", "MMCAFNetLib.inference.predictor", "Predictor._run_batch"),
    ("  heatmap to the CT grid", "MMCAFNetLib.heatmap", "heatmap_volume"),
    ("  labelmap", "MMCAFNetLib.heatmap", "labelmap_volume"),
    ("write outputs (all of them)", "MMCAFNetLib.inference.outputs", "write_outputs"),
    ("  heatmap/labelmap via SimpleITK", "MMCAFNetLib.volume", "write_volume"),
    ("  heatmap.nrrd (compact)", "MMCAFNetLib.inference.outputs", "write_heatmap"),
    ("  labelmap.nrrd", "MMCAFNetLib.inference.outputs", "write_labelmap"),
    ("  preview.png (matplotlib import included)", "MMCAFNetLib.preview", "render_preview"),
    ("  segmentation.dcm + heatmap.dcm (highdicom import included)", "MMCAFNetLib.inference.dicom_outputs",
     "write_dicom_outputs"),
    ("    re-read the source headers", "MMCAFNetLib.inference.dicom_outputs", "read_source_headers"),
    ("    build the SEG", "MMCAFNetLib.inference.dicom_outputs", "build_segmentation"),
    ("    build the Parametric Map (JPEG-LS encoding included)", "MMCAFNetLib.inference.dicom_outputs",
     "build_parametric_map"),
]
#: Modules whose attribute of the same name is the same function (imported by name elsewhere).
ALIASES = {"MMCAFNetLib.inference.outputs.write_outputs": ["MMCAFNetLib.inference"]}


def _install_timers(totals: Dict[str, float]) -> None:
    lock = threading.Lock()
    for phase, module_name, attr in PHASES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owner: Any = module
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, name):
            continue
        raw = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name)
        is_class_method = isinstance(raw, classmethod)
        fn = raw.__func__ if is_class_method else raw

        def timed(*args: Any, __fn: Any = fn, __phase: str = phase, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return __fn(*args, **kwargs)
            finally:
                with lock:
                    totals[__phase] = totals.get(__phase, 0.0) + time.perf_counter() - start

        wrapped = functools.wraps(fn)(timed)
        setattr(owner, name, classmethod(wrapped) if is_class_method else wrapped)
        for alias in ALIASES.get(f"{module_name}.{attr}", []):
            setattr(importlib.import_module(alias), name, wrapped)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="CT: DICOM folder or image file")
    parser.add_argument("--point", nargs=3, type=float, metavar=("R", "A", "S"), help="lesion point (RAS mm)")
    parser.add_argument("--checkpoint", help="default: the bundled demo model")
    parser.add_argument("--out", help="output folder (default: a temporary one)")
    parser.add_argument("--cprofile", help="profile with cProfile instead and write the 40 costliest functions here")
    parser.add_argument("--json", help="write the phases as JSON here")
    args = parser.parse_args(argv)

    out = args.out or tempfile.mkdtemp(prefix="mmcafnet-profile-")
    cli_args = ["predict", "--input", args.input, "--out", out]
    if args.point:
        cli_args += ["--point", *[str(v) for v in args.point]]
    if args.checkpoint:
        cli_args += ["--checkpoint", args.checkpoint]
    totals: Dict[str, float] = {}
    t_import = time.perf_counter()
    from MMCAFNetLib import cli
    from MMCAFNetLib.commands import predict  # noqa: F401  (what `mmcafnet predict` imports first)
    from MMCAFNetLib.inference import Predictor  # noqa: F401  (torch)

    t_imported = time.perf_counter()
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    else:
        _install_timers(totals)
    t_run = time.perf_counter()
    status = cli.main(cli_args)
    t_end = time.perf_counter()
    if profiler is not None:
        import pstats

        profiler.disable()
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(40)
        with open(args.cprofile, "w", encoding="utf-8") as fh:
            fh.write(buf.getvalue())
    start_s = _startup_estimate()
    rows: List[Dict[str, Any]] = [
        {"phase": "interpreter start", "seconds": start_s + (t_import - T0)},
        {"phase": "import the library and torch", "seconds": t_imported - t_import},
        {"phase": "mmcafnet predict after imports", "seconds": t_end - t_run},
    ]
    rows += [{"phase": phase, "seconds": totals[phase]} for phase, _, _ in PHASES if phase in totals]
    rows.append({"phase": "total (process start to files written)", "seconds": start_s + t_end - T0})
    sizes = {name: os.path.getsize(os.path.join(out, name)) for name in sorted(os.listdir(out))} if os.path.isdir(out) else {}
    print(f"mmcafnet predict exit status {status}; load average {tuple(round(v, 2) for v in os.getloadavg())}")
    for r in rows:
        print(f"{r['phase']:<45} {r['seconds']:8.3f} s")
    for name, size in sizes.items():
        print(f"{name:<45} {size / 1e6:8.2f} MB")
    print(f"{'output folder':<45} {sum(sizes.values()) / 1e6:8.2f} MB")
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
        return max(0.0, age - (time.perf_counter() - T0))  # before this script's first line
    except (OSError, ValueError, IndexError):
        return 0.0


if __name__ == "__main__":
    sys.exit(main())

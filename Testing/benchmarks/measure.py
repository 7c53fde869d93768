"""Timing, memory and machine description for the benchmark.

Memory: every workload runs in its own Python process, and each measured call is bracketed by a
reset of the kernel's resident-set high-water mark (writing ``5`` to /proc/self/clear_refs) and a
read of ``VmHWM`` from /proc/self/status. The peak reported is therefore the whole process's
resident memory at its highest during that call (model weights, CT and torch's own buffers
included), which is what the user's machine has to hold. Where /proc is unavailable the peak is
reported as None.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch

MiB = 1024.0 * 1024.0


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _status_kib(key: str, pid: Any = "self") -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> Optional[float]:
    """Current resident set size of this process (MiB)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024.0


def peak_rss_mib(pid: Any = "self") -> Optional[float]:
    """Resident-set high-water mark of this process since the last :func:`reset_peak_rss`, or of
    process ``pid`` over its life (MiB)."""
    kib = _status_kib("VmHWM", pid)
    return None if kib is None else kib / 1024.0


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _sync(device: Optional[str]) -> None:
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_interleaved(
    variants: Dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    device: Optional[str] = None,
) -> Dict[str, Dict[str, Any]]:
    """Median wall time and peak memory of each variant.

    Variants are run round-robin (A B C, A B C, ...) after ``warmup`` calls each, so that a burst
    of load from other processes hits all of them alike and their ratios stay meaningful.
    """
    for _ in range(max(warmup, 0)):
        for fn in variants.values():
            fn()
            _sync(device)
    times: Dict[str, List[float]] = {name: [] for name in variants}
    peaks: Dict[str, List[float]] = {name: [] for name in variants}
    cuda_peaks: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(max(repeats, 1)):
        for name, fn in variants.items():
            reset_peak_rss()
            if device and device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            peak = peak_rss_mib()
            if peak is not None:
                peaks[name].append(peak)
            if device and device.startswith("cuda"):
                cuda_peaks[name].append(torch.cuda.max_memory_allocated() / MiB)
    out: Dict[str, Dict[str, Any]] = {}
    for name in variants:
        ts = times[name]
        out[name] = {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "runs": len(ts),
            "peak_rss_mib": max(peaks[name]) if peaks[name] else None,
        }
        if cuda_peaks[name]:
            out[name]["peak_cuda_mib"] = max(cuda_peaks[name])
    return out


# ---------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) / 1024.0 / 1024.0
    except OSError:
        return None
    return None


def load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def describe_machine() -> Dict[str, Any]:
    """CPU model, cores, threads, ISA flags, memory, torch build and the CUDA device if any."""
    from MMCAFNetLib.optimize import cpu_capabilities, cpu_flags, cpu_has_fast_bf16

    flags = cpu_flags()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    info: Dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "isa_torch": cpu_capabilities(),
        "isa_flags": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fast_bf16": cpu_has_fast_bf16(),
        "memory_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "platform": platform.platform(),
        "cuda": None,
        "load_average": load_average(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = {
            "name": props.name,
            "memory_gib": props.total_memory / 1024**3,
            "capability": f"{props.major}.{props.minor}",
            "bf16": torch.cuda.is_bf16_supported(),
        }
    return info

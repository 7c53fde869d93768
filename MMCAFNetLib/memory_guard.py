"""Memory guard: refuse a whole-volume scan that will not fit, and survive device out-of-memory.

Two protections for the Predictor:

- Before a whole-volume scan (no lesion given), :func:`check_whole_volume_scan` estimates the peak
  memory of the run -- the CT and its float copy, the prepared grid, the heatmap and labelmap on the
  CT's grid, the model's weights and one batch of activations -- and refuses with the estimate and
  the ways out (mark the lesion, use the lite model, use a smaller batch) when it exceeds the
  available memory. Lesion-guided runs evaluate a handful of windows and are not guarded.
- :func:`run_batch_with_fallback` runs one batch and, on a device out-of-memory error, retries the
  batch in halves down to single windows, then moves the model to the CPU, with a warning each time.

The activation estimate is an upper bound: the summed size of every leaf module's output for one
window, measured once per model and window size with forward hooks. Environment overrides:
``MMCAFNET_AVAILABLE_MEMORY`` (bytes; replaces the detected available memory, e.g. to cap a shared
machine) and ``MMCAFNET_MAX_BATCH_BYTES`` (bytes; a batch whose input is larger fails as if the
device ran out of memory: a simulation for testing the fallback on machines without a GPU; the
Predictor attribute ``max_batch_bytes`` does the same per predictor).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

AVAILABLE_MEMORY_ENV = "MMCAFNET_AVAILABLE_MEMORY"
MAX_BATCH_BYTES_ENV = "MMCAFNET_MAX_BATCH_BYTES"
#: Share of the available memory a scan may plan to use (the rest is for the process and the OS).
USABLE_FRACTION = 0.9
GIB = float(1 << 30)


class MemoryGuardError(ValueError):
    """A run would need more memory than is available; the message gives the estimate and the ways out."""


@dataclass
class MemoryEstimate:
    """Peak memory of a whole-volume scan, by part (bytes)."""

    volume: int
    prepared: int
    outputs: int
    model: int
    batch: int
    window_maps: int
    batch_size: int
    num_windows: int

    @property
    def total(self) -> int:
        return self.volume + self.prepared + self.outputs + self.model + self.batch + self.window_maps

    def describe(self) -> str:
        parts = (
            ("CT and its float copy", self.volume),
            ("prepared grid", self.prepared),
            ("heatmap and labelmap", self.outputs),
            ("model weights", self.model),
            (f"activations of a batch of {self.batch_size}", self.batch),
            (f"maps of {self.num_windows} windows", self.window_maps),
        )
        return ", ".join(f"{name} {gib(size)}" for name, size in parts if size)


def gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# available memory


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_headroom() -> Optional[int]:
    """Limit minus usage of this process's cgroup (v2, then v1), or None without a limit."""
    limit, usage = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is None:
        limit = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        usage = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes")
    if limit is None or usage is None or limit >= 1 << 60:
        return None
    return max(0, limit - usage)


def available_memory_bytes() -> Optional[int]:
    """Memory this process can still allocate (bytes), or None when it cannot be found out."""
    override = os.environ.get(AVAILABLE_MEMORY_ENV)
    if override:
        try:
            return int(float(override))
        except ValueError:
            raise MemoryGuardError(f"{AVAILABLE_MEMORY_ENV} must be a number of bytes, got {override!r}") from None
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    if not found and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    headroom = _cgroup_headroom()
    if headroom is not None:
        found.append(headroom)
    return min(found) if found else None


# ---------------------------------------------------------------------------------------------
# reading an image: the declared size against the available memory, before anything is allocated


def check_image_allocation(shape: tuple[int, ...], bytes_per_voxel: int, source: str,
                           available: Optional[int] = None) -> int:
    """Refuse (MemoryGuardError) an image whose header declares more voxels than memory can hold.

    Called by every reader with the sizes its header declares, before the pixels are read or any
    buffer is allocated: a compressed file of a few kilobytes can declare terabytes. Returns the
    bytes the read needs (``bytes_per_voxel`` counts every copy the read makes per voxel).
    """
    voxels = 1
    for n in shape:
        voxels *= max(int(n), 0)
    needed = voxels * int(bytes_per_voxel)
    available = available if available is not None else available_memory_bytes()
    if available is not None and needed > USABLE_FRACTION * available:
        dims = " x ".join(str(int(n)) for n in shape)
        raise MemoryGuardError(
            f"{source}: its header declares {dims} = {voxels:,} voxels, which would need about {gib(needed)} of "
            f"memory to read, but only {gib(available)} is available. The header is damaged or the image is far "
            f"larger than a CT; check the file. ({AVAILABLE_MEMORY_ENV}=<bytes> overrides the detected amount.)"
        )
    return needed


# ---------------------------------------------------------------------------------------------
# estimate


def activation_bytes_per_window(model: Any, window_shape: tuple[int, int, int], num_clinical: int) -> int:
    """Upper bound of one window's activations: the summed outputs of every leaf module (batch of 1).

    Cached on the model per window shape, so the measuring forward pass runs once.
    """
    import torch

    cache = model.__dict__.setdefault("_mmcafnet_activation_bytes", {})
    key = (tuple(int(s) for s in window_shape), int(num_clinical))
    if key in cache:
        return cache[key]
    total = [0]

    def count(_module, _inputs, output) -> None:
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            model(torch.zeros((1, 1, *key[0]), device=device), torch.zeros((1, key[1]), device=device))
    finally:
        for h in handles:
            h.remove()
    cache[key] = total[0]
    return total[0]


#: Input voxels per forward pass on the CPU when no batch size is given: small windows are batched
#: (a batch of 32 windows of 8x48x48 ran 7x faster per window than batches of 2 on 2 cores), large
#: ones run two at a time (12x192x192: no gain from larger batches, docs/performance.md).
CPU_BATCH_VOXELS = 1 << 20
MAX_CPU_BATCH = 32


def default_batch_size(device: Any, window: Optional[Any] = None) -> int:
    """Windows per forward pass: 8 on CUDA; on the CPU as many as fit ``CPU_BATCH_VOXELS`` (2 to 32)."""
    if getattr(device, "type", str(device)) == "cuda":
        return 8
    if window is None:
        return 2
    voxels = max(1, int(np.prod([int(w) for w in window])))
    return int(min(MAX_CPU_BATCH, max(2, CPU_BATCH_VOXELS // voxels)))


def _default_batch_size(device: Any, window: Optional[Any] = None) -> int:
    return default_batch_size(device, window)


def estimate_whole_volume_scan(predictor: Any, volume: Any, batch_size: Optional[int] = None,
                               heatmap: Optional[str] = "attention") -> MemoryEstimate:
    """Peak memory of scanning the whole CT with this predictor (see the module docstring)."""
    from MMCAFNetLib import windows as win

    preset = predictor.preset
    bs = int(batch_size) if batch_size else _default_batch_size(predictor.device, predictor.preset.window)
    voxels = int(np.prod(volume.shape))
    _, prepared_shape = win.prepared_grid(volume, preset)
    prepared_voxels = int(np.prod(prepared_shape))
    window = tuple(int(w) for w in preset.window)
    keep = 1.0 - float(predictor.scan_overlap)  # the share of a window each step moves
    steps = [max(1, int(np.ceil(p / max(1.0, w * keep)))) for p, w in zip(prepared_shape, window)]
    num_windows = int(np.prod(steps))
    on_cpu = getattr(predictor.device, "type", "cpu") == "cpu"
    params = sum(p.numel() * p.element_size() for p in predictor.model.parameters())
    activations = activation_bytes_per_window(predictor.model, window, predictor.schema.num_features)
    if heatmap in ("gradcam", "gradcam++"):
        activations *= 2  # the graph is kept for the backward pass, plus its gradients
    window_bytes = int(np.prod(window)) * 4
    return MemoryEstimate(
        volume=voxels * (volume.array.dtype.itemsize + 4),
        prepared=prepared_voxels * 4 * 2,  # the grid and a resampling buffer
        outputs=voxels * (4 + 1) if heatmap else 0,
        model=params if on_cpu else 0,
        batch=(activations + window_bytes) * bs if on_cpu else 0,
        window_maps=num_windows * window_bytes // 8 if heatmap else 0,
        batch_size=bs,
        num_windows=num_windows,
    )


def check_whole_volume_scan(predictor: Any, volume: Any, batch_size: Optional[int] = None,
                            heatmap: Optional[str] = "attention",
                            available: Optional[int] = None) -> MemoryEstimate:
    """Refuse (MemoryGuardError) a whole-volume scan whose estimated peak exceeds the available memory."""
    estimate = estimate_whole_volume_scan(predictor, volume, batch_size, heatmap)
    available = available if available is not None else available_memory_bytes()
    if available is None or estimate.total <= USABLE_FRACTION * available:
        return estimate
    lite = "" if "lite" in str(getattr(predictor, "info", {}).get("model_name", "")) else (
        "; use the lite model (mmcafnet-lite), about a tenth of the memory per window"
    )
    smaller = (
        f"; use a smaller batch (batch size 1 instead of {estimate.batch_size}, --batch-size 1)"
        if estimate.batch_size > 1 else ""
    )
    raise MemoryGuardError(
        f"scanning the whole CT {tuple(volume.shape)} needs about {gib(estimate.total)} of memory "
        f"({estimate.describe()}), but only {gib(available)} is available. Ways out: mark the lesion "
        "(a point, a box or a segmentation) so only the windows covering it are evaluated" + lite + smaller
        + f"; or free memory. ({AVAILABLE_MEMORY_ENV}=<bytes> overrides the detected amount.)"
    )


# ---------------------------------------------------------------------------------------------
# device out-of-memory fallback


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or the RuntimeError older torch raises for it."""
    return type(exc).__name__ == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def _simulated_limit(predictor: Any) -> Optional[int]:
    if getattr(predictor, "_mmcafnet_cpu_fallback", False):
        return None  # the simulation stands for the accelerator; after falling back it no longer applies
    limit = getattr(predictor, "max_batch_bytes", None)
    if limit is None and os.environ.get(MAX_BATCH_BYTES_ENV):
        limit = int(float(os.environ[MAX_BATCH_BYTES_ENV]))
    return None if limit is None else int(limit)


def _guarded_run(predictor: Any, image: Any, clinical: Any, heatmap: Optional[str], levels: str = "all"):
    import torch

    limit = _simulated_limit(predictor)
    nbytes = image.numel() * image.element_size()
    if limit is not None and nbytes > limit:
        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory (simulated: the batch input takes {nbytes} bytes, the limit is {limit})"
        )
    return predictor._run_batch(image, clinical, heatmap, levels)


def _split_run(predictor: Any, image: Any, clinical: Any, heatmap: Optional[str], notes: list[str],
               levels: str = "all"):
    try:
        return _guarded_run(predictor, image, clinical, heatmap, levels)
    except Exception as exc:
        if not is_out_of_memory(exc) or image.shape[0] == 1:
            raise
    _empty_cache()
    half = image.shape[0] // 2
    if not notes:
        notes.append(f"the device ran out of memory at a batch of {image.shape[0]} windows; retried in smaller batches")
    first = _split_run(predictor, image[:half], clinical[:half], heatmap, notes, levels)
    second = _split_run(predictor, image[half:], clinical[half:], heatmap, notes, levels)
    probs = np.concatenate([first[0], second[0]], axis=0)
    maps = None if first[1] is None else list(first[1]) + list(second[1])
    return probs, maps


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_batch_with_fallback(predictor: Any, image: Any, clinical: Any, heatmap: Optional[str],
                            warnings: Optional[list[str]] = None, levels: str = "all"):
    """``predictor._run_batch`` that survives device out-of-memory: smaller batches, then the CPU.
    ``levels``: the pyramid levels of an attention heatmap (``heatmap.ATTENTION_LEVELS``).

    Each fallback adds one line to ``warnings``. After moving to the CPU the predictor stays there
    (reload the model to use the GPU again).
    """
    import torch

    notes: list[str] = []
    try:
        return _split_run(predictor, image, clinical, heatmap, notes, levels)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        _empty_cache()
        predictor.model.to("cpu")
        predictor.device = torch.device("cpu")
        predictor._mmcafnet_cpu_fallback = True
        notes.append("a single window did not fit in the device's memory: the model moved to the CPU "
                     "(slower; reload the model to use the GPU again)")
        return predictor._run_batch(image, clinical, heatmap, levels)
    finally:
        if warnings is not None:
            warnings.extend(n for n in notes if n not in warnings)

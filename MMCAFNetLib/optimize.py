"""Speed settings for running and training the networks, each kept because the benchmark showed it pays.

``Testing/benchmarks/bench.py`` measures every setting here next to the plain path in the same run
(docs/performance.md holds the numbers). Applied by default for inference
(:func:`optimize_for_inference`, then run under :func:`inference_context`):

- eval mode, gradients off (``torch.inference_mode`` in the caller);
- BatchNorm folded into the convolution before it (DCFB and UCB blocks);
- channels_last_3d memory layout (oneDNN's preferred layout for 3D convolutions);
- bf16 where the hardware multiplies bf16: on CPUs with AVX512-BF16 or AMX the backbone and
  pyramid are stored and run in bf16 (stem, readout, clinical encoder, fusion and head in fp32);
  on CUDA, bf16 autocast. On CPUs without bf16 hardware bf16 is emulated and slower, so fp32.

Environment overrides: ``MMCAFNET_CPU_BF16=0`` turns CPU bf16 off (``1`` forces it on), e.g. to
compare against fp32 results exactly; ``MMCAFNET_THREADS=N`` sets the CPU threads of a forward
(useful on machines whose cores are shared with other work, see :func:`inference_threads`).
For training, :func:`autocast` gives bf16 autocast on the same hardware.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, ContextManager, Dict, Iterator, Optional, Set, Union

import torch
from torch import nn

DeviceLike = Union[str, torch.device, None]

#: environment variable that overrides the bf16 choice on CPU ("0" off, "1" on)
CPU_BF16_ENV = "MMCAFNET_CPU_BF16"
#: environment variable that sets the CPU threads of a forward (default: usable cores - 1)
THREADS_ENV = "MMCAFNET_THREADS"


# ---------------------------------------------------------------------------------------------
# What the machine can do
# ---------------------------------------------------------------------------------------------


def cpu_flags() -> Set[str]:
    """The CPU's ISA flags from /proc/cpuinfo (Linux); empty where that file does not exist."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags") or line.startswith("Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _torch_cpu_check(name: str) -> Optional[bool]:
    check = getattr(torch.cpu, name, None)
    if check is None:
        return None
    try:
        return bool(check())
    except Exception:  # a probe that fails means "unknown", not an error
        return None


def cpu_capabilities() -> Dict[str, bool]:
    """avx2 / avx512f / avx512_bf16 / amx_bf16 as torch sees them (falling back to /proc/cpuinfo)."""
    flags = cpu_flags()
    torch_view = {
        "avx2": _torch_cpu_check("_is_avx2_supported"),
        "avx512f": _torch_cpu_check("_is_avx512_supported"),
        "avx512_bf16": _torch_cpu_check("_is_avx512_bf16_supported"),
        "amx_bf16": _torch_cpu_check("_is_amx_tile_supported"),
    }
    return {name: bool(flags and name in flags) if seen is None else seen for name, seen in torch_view.items()}


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX) and oneDNN can use it."""
    caps = cpu_capabilities()
    if not (caps["avx512_bf16"] or caps["amx_bf16"]):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _device(device: DeviceLike) -> torch.device:
    if device is None:
        return torch.device("cpu")
    return device if isinstance(device, torch.device) else torch.device(device)


def autocast_dtype(device: DeviceLike) -> Optional[torch.dtype]:
    """The reduced precision worth using on ``device``, or None for plain fp32.

    CUDA: bf16 where supported, else fp16. CPU: bf16 only with AVX512-BF16 or AMX (emulated bf16
    is slower than fp32), unless ``MMCAFNET_CPU_BF16`` says otherwise.
    """
    dev = _device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type != "cpu":
        return None
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced == "0":
        return None
    if forced == "1":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast(device: DeviceLike, dtype: Optional[torch.dtype] = None, enabled: bool = True) -> ContextManager[Any]:
    """Autocast context for ``device`` with ``dtype`` (default :func:`autocast_dtype`); a no-op when
    disabled or when fp32 is the better choice."""
    dev = _device(device)
    chosen = dtype if dtype is not None else autocast_dtype(dev)
    if not enabled or chosen is None or chosen == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=chosen)


# ---------------------------------------------------------------------------------------------
# BatchNorm folding
# ---------------------------------------------------------------------------------------------


def _fold_conv_bn(conv: nn.Conv3d, bn: nn.BatchNorm3d) -> nn.Conv3d:
    """A convolution computing ``bn(conv(x))`` with eval-mode statistics, in one pass."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused = nn.Conv3d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=True,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * scale + shift)
    fused.requires_grad_(conv.weight.requires_grad)
    return fused


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm3d that directly follows a convolution into it, in place; returns the count.

    Only blocks known to compute ``norm(conv(x))`` are touched (ConvNorm3d with a BatchNorm, the
    UCB's depthwise convolution + norm); GroupNorm and the BatchNorm on the backbone's levels
    (which follows an activation) are left as they are. The model must be in eval mode: a folded
    model no longer updates statistics, so it is for inference only.
    """
    from MMCAFNetLib.models.layers import ConvNorm3d
    from MMCAFNetLib.models.pyramid import UCB

    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (call model.eval() first); folding is for inference")
    folded = 0
    for module in model.modules():
        if isinstance(module, ConvNorm3d):
            pair = ("conv", "norm")
        elif isinstance(module, UCB):
            pair = ("dwconv", "norm")
        else:
            continue
        conv, norm = getattr(module, pair[0]), getattr(module, pair[1])
        if isinstance(conv, nn.Conv3d) and isinstance(norm, nn.BatchNorm3d):
            setattr(module, pair[0], _fold_conv_bn(conv, norm))
            setattr(module, pair[1], nn.Identity())
            folded += 1
    return folded


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def inference_threads() -> int:
    """CPU threads for a forward: every usable core on small machines, all but one on larger ones;
    ``MMCAFNET_THREADS`` overrides.

    Why: torch's intra-op threads wait for each other at every operation, so a forward that uses
    every core stalls whenever something else (Slicer's GUI and rendering, another job) takes one.
    With more than four cores, leaving one free costs little and keeps the workstation responsive.
    With four or fewer, one core is a large share: on a dedicated 2-core machine, 2 threads were
    1.7x faster than 1. (On a 2-core machine shared with other busy jobs the opposite held, 3x to
    28x in favour of 1 thread: set ``MMCAFNET_THREADS=1`` there.)
    """
    forced = os.environ.get(THREADS_ENV, "").strip()
    if forced:
        try:
            return max(1, int(forced))
        except ValueError:
            raise ValueError(f"{THREADS_ENV} must be a whole number of threads, got {forced!r}") from None
    cores = usable_cpus()
    return max(1, min(torch.get_num_threads(), cores - 1 if cores > 4 else cores))


def _to_dtype(dtype: torch.dtype):
    def cast_inputs(module: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    return cast_inputs


def _outputs_to_float(module: nn.Module, args: tuple, output: Any) -> Any:
    if torch.is_tensor(output):
        return output.float()
    if isinstance(output, (list, tuple)):
        return type(output)(_outputs_to_float(module, args, o) for o in output)
    return output


def run_image_encoder_in(model: nn.Module, dtype: torch.dtype) -> bool:
    """Keep the backbone's and the pyramid's weights and activations in ``dtype`` (bf16), in place.

    The 7x7x7 stem on the one-channel CT stays in fp32 (oneDNN has no fast bf16 kernel for one
    input channel: it was 9x slower than fp32) and a hook hands its output over in ``dtype``; a
    hook on the pyramid returns its map and attention maps in fp32, so the readout, clinical
    encoder, fusion and head run in fp32, callers see fp32 tensors, and Grad-CAM differentiates
    through the fp32 map the readout uses. Unlike autocast, nothing is converted back and forth
    between operations and no weight is re-cast on every call. Returns False when the model has
    no image encoder of this layout.
    """
    encoder = getattr(model, "image_encoder", None)
    backbone = getattr(encoder, "backbone", None)
    pyramid = getattr(encoder, "pyramid", None)
    stem = getattr(backbone, "stem", None)
    if encoder is None or backbone is None or pyramid is None or stem is None:
        return False
    backbone.to(dtype)
    pyramid.to(dtype)
    stem.float()
    stem.register_forward_pre_hook(_to_dtype(torch.float32))
    stem.register_forward_hook(lambda module, args, output: output.to(dtype))
    pyramid.register_forward_hook(_outputs_to_float)
    return True


def optimize_for_inference(
    model: nn.Module,
    device: DeviceLike = None,
    fold_bn: bool = True,
    channels_last: Optional[bool] = None,
    precision: str = "auto",
) -> nn.Module:
    """Make ``model`` ready for fast inference on ``device``, in place, and return it.

    eval mode, gradients off, BatchNorm folded into the preceding convolutions (``fold_bn``),
    parameters on ``device``; channels_last_3d memory layout unless ``channels_last`` is False (it
    paid on CPU in fp32 and bf16). ``precision``: "fp32"; "bf16" (CPU: the image encoder runs in bf16, see
    :func:`run_image_encoder_in`; CUDA: bf16 autocast); "auto" = bf16 where
    :func:`autocast_dtype` says the hardware has it, else fp32. Run the model inside
    :func:`inference_context`, which applies what was chosen here (threads, autocast). Outputs
    equal the plain model's within float rounding (fp32: 1e-4 relative; bf16: probabilities
    within 0.01).
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    dev = _device(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if fold_bn:
        fold_batchnorm(model)
    model.to(dev)
    use_cl = True if channels_last is None else bool(channels_last)
    if use_cl:
        model.to(memory_format=torch.channels_last_3d)
    reduced = autocast_dtype(dev) if precision == "auto" else (None if precision == "fp32" else torch.bfloat16)
    autocast_with: Optional[torch.dtype] = None
    if reduced is not None:
        if dev.type == "cpu" and reduced == torch.bfloat16 and run_image_encoder_in(model, reduced):
            pass
        else:
            autocast_with = reduced
    model.mmcafnet_channels_last = use_cl  # type: ignore[assignment]
    model.mmcafnet_autocast = autocast_with  # type: ignore[assignment]
    threads = inference_threads() if dev.type == "cpu" else None
    model.mmcafnet_threads = threads if threads != torch.get_num_threads() else None  # type: ignore[assignment]
    model.mmcafnet_precision = "fp32" if reduced is None else str(reduced).replace("torch.", "")  # type: ignore[assignment]
    model.mmcafnet_optimized_for = str(dev)  # type: ignore[assignment]
    return model


@contextlib.contextmanager
def inference_context(model: nn.Module, device: DeviceLike = None) -> Iterator[None]:
    """What a forward of ``model`` should run under: the thread count and autocast chosen by
    :func:`optimize_for_inference`. For a model that was not optimised, autocast follows
    :func:`autocast_dtype` and the threads are left alone."""
    dev = _device(device)
    if hasattr(model, "mmcafnet_autocast"):
        dtype = model.mmcafnet_autocast
        context = torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    else:
        context = autocast(dev)
    threads = getattr(model, "mmcafnet_threads", None)
    previous = torch.get_num_threads()
    if threads and threads != previous:
        torch.set_num_threads(threads)
    try:
        with context:
            yield
    finally:
        if threads and threads != previous:
            torch.set_num_threads(previous)


def prepare_image(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The image batch in the memory layout the optimised model was set up for."""
    if getattr(model, "mmcafnet_channels_last", False) and image.dim() == 5:
        return image.contiguous(memory_format=torch.channels_last_3d)
    return image


def inference_settings(device: DeviceLike = None) -> Dict[str, Any]:
    """What :func:`optimize_for_inference` and :func:`autocast` choose on ``device`` (for reports)."""
    dev = _device(device)
    dtype = autocast_dtype(dev)
    return {
        "device": str(dev),
        "autocast_dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "fold_batchnorm": True,
        "channels_last_3d": True,
        "threads": inference_threads() if dev.type == "cpu" else None,
        "cpu": cpu_capabilities() if dev.type == "cpu" else None,
    }

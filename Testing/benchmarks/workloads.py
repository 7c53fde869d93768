"""The benchmark's workloads W1-W8 (W7, the Slicer job API, is in workload_slicer.py); each returns result rows.

Every workload builds its own inputs (random weights, a phantom CT, a DICOM series written with
pydicom): timings do not depend on trained weights, and nothing outside the repository is needed.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from measure import measure_interleaved
from torch import nn

from MMCAFNetLib import optimize as opt
from MMCAFNetLib.volume import Volume

Row = Dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------

FULL = {
    "models": ["mmcafnet", "mmcafnet-lite"],
    "window": (12, 192, 192),
    "batches": (1, 8),
    "ct_shape": (300, 512, 512),  # K, J, I
    "ct_spacing": (0.703125, 0.703125, 1.25),  # I, J, K (mm)
    "model_spacing": (2.5, 1.0, 1.0),  # K, J, I (the default preset)
    "repeats": {"mmcafnet": 2, "mmcafnet-lite": 3},
    "repeats_batch8": {"mmcafnet": 1, "mmcafnet-lite": 2},
    "repeats_w2": 2,
    "train_batch": 4,
    "train_repeats": {"mmcafnet": 1, "mmcafnet-lite": 3},
    "probe": (128, (12, 48, 48)),  # channels, spatial size of the dense 3x3x3 probe
    "cuda_batches": (1, 16),
    "w8_size": 512,  # the synthetic cohort's patient A0001 with seed 7: 512 x 512 x 313 slices at 1 mm
    "w8_seed": 7,
    "w8_repeats": 2,
}

QUICK = {
    "models": ["mmcafnet-lite"],
    "window": (8, 32, 32),
    "batches": (1, 2),
    "ct_shape": (16, 64, 64),
    "ct_spacing": (2.0, 2.0, 3.0),
    "model_spacing": (3.0, 2.0, 2.0),
    "repeats": {"mmcafnet": 1, "mmcafnet-lite": 1},
    "repeats_batch8": {"mmcafnet": 1, "mmcafnet-lite": 1},
    "repeats_w2": 1,
    "train_batch": 2,
    "train_repeats": {"mmcafnet": 1, "mmcafnet-lite": 1},
    "probe": (16, (8, 16, 16)),
    "cuda_batches": (1, 2),
    "w8_size": 64,
    "w8_seed": 7,
    "w8_repeats": 1,
}


def sizes(quick: bool, models: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    cfg = dict(QUICK if quick else FULL)
    if models:
        cfg["models"] = list(models)
    return cfg


# ---------------------------------------------------------------------------------------------
# Shared inputs
# ---------------------------------------------------------------------------------------------


def seeded_model(name: str, seed: int = 0) -> nn.Module:
    """A model with random weights and non-trivial BatchNorm statistics (so folding is exercised)."""
    from MMCAFNetLib.models import create_model

    torch.manual_seed(seed)
    model = create_model(name)
    gen = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def window_inputs(batch: int, window: Sequence[int], seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 1, *window, generator=gen) - 0.3
    clinical = torch.randn(batch, 7, generator=gen)
    return image, clinical


def phantom_ct(shape_kji: Sequence[int], spacing_ijk: Sequence[float]) -> Tuple[Volume, np.ndarray]:
    """A chest-like int16 CT: air, an elliptic body (40 HU), two lungs (-850 HU), a 24 mm nodule.

    Returns the volume and the nodule's RAS box (2, 3).
    """
    from MMCAFNetLib.volume import make_ijk_to_ras

    k, j, i = (int(v) for v in shape_kji)
    si, sj, sk = (float(v) for v in spacing_ijk)
    jj, ii = np.meshgrid(np.arange(j, dtype=np.float32), np.arange(i, dtype=np.float32), indexing="ij")
    u, v = (ii - i / 2) / (i / 2), (jj - j / 2) / (j / 2)
    slice_hu = np.full((j, i), -1000, dtype=np.int16)
    slice_hu[(u / 0.9) ** 2 + (v / 0.7) ** 2 < 1] = 40
    for side in (-0.4, 0.4):
        slice_hu[((u - side) / 0.3) ** 2 + (v / 0.5) ** 2 < 1] = -850
    array = np.broadcast_to(slice_hu, (k, j, i)).copy()
    # the nodule in the right lung (patient right = low I in an LPS-less RAS grid with +I = R)
    centre_kji = np.array([k * 0.5, j * 0.5, i * 0.5 + 0.4 * i / 2])
    radius_mm = 12.0
    r = np.array([radius_mm / sk, radius_mm / sj, radius_mm / si])
    lo = np.maximum(np.floor(centre_kji - r).astype(int), 0)
    hi = np.minimum(np.ceil(centre_kji + r).astype(int) + 1, [k, j, i])
    kk, jj2, ii2 = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    ball = ((kk - centre_kji[0]) / r[0]) ** 2 + ((jj2 - centre_kji[1]) / r[1]) ** 2 + ((ii2 - centre_kji[2]) / r[2]) ** 2 < 1
    array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][ball] = 30
    affine = make_ijk_to_ras(spacing=(si, sj, sk), origin=(-si * i / 2, -sj * j / 2, -sk * k / 2))
    volume = Volume(array, affine, {"modality": "CT", "source": "benchmark phantom"})
    corners_ijk = np.array([(centre_kji - r)[::-1], (centre_kji + r)[::-1]])
    ras = volume.ijk_to_ras_points(corners_ijk)
    return volume, np.array([ras.min(axis=0), ras.max(axis=0)])


def clinical_schema():
    """The default clinical schema fitted on a handful of plausible records."""
    import pandas as pd

    from MMCAFNetLib.ehr import default_schema

    rows = [
        {"sex": "M", "age": 63, "weight": 72, "t_stage": "2", "n_stage": "1", "m_stage": "0", "smoking": "yes"},
        {"sex": "F", "age": 55, "weight": 60, "t_stage": "1", "n_stage": "0", "m_stage": "0", "smoking": "no"},
        {"sex": "M", "age": 71, "weight": 80, "t_stage": "3", "n_stage": "2", "m_stage": "1", "smoking": "yes"},
        {"sex": "F", "age": 48, "weight": 55, "t_stage": "4", "n_stage": "3", "m_stage": "0", "smoking": "no"},
    ]
    schema = default_schema()
    return schema.fit(pd.DataFrame(rows)), rows[0]


def write_checkpoint(name: str, path: str, preset) -> None:
    from MMCAFNetLib import checkpoint as ckpt

    schema, _ = clinical_schema()
    model = seeded_model(name)
    ckpt.save_checkpoint(
        {
            "format_version": ckpt.FORMAT_VERSION,
            "model_name": name,
            "model_config": model.config.to_dict(),
            "class_names": ["A", "G"],
            "task": "AG",
            "state_dict": model.state_dict(),
            "schema": schema.to_dict(),
            "preset": preset.to_dict(),
            "threshold": 0.5,
            "provenance": {"seed": 0, "note": "benchmark: random weights"},
            "metrics": {},
            "demo": True,
        },
        path,
    )


def bench_preset(cfg: Dict[str, Any]):
    from MMCAFNetLib.preset import DEFAULT, Preset

    return Preset(
        name="benchmark",
        spacing=tuple(cfg["model_spacing"]),
        window=tuple(cfg["window"]),
        hu_range=DEFAULT.hu_range,
        mean=DEFAULT.mean,
    )


@contextlib.contextmanager
def cpu_bf16(enabled: Optional[bool]) -> Iterator[None]:
    """Force the library's CPU bf16 choice on/off (None: its own choice) for the duration."""
    old = os.environ.get(opt.CPU_BF16_ENV)
    if enabled is None:
        os.environ.pop(opt.CPU_BF16_ENV, None)
    else:
        os.environ[opt.CPU_BF16_ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(opt.CPU_BF16_ENV, None)
        else:
            os.environ[opt.CPU_BF16_ENV] = old


def _row(workload: str, case: str, variant: str, stats: Dict[str, Any], **extra: Any) -> Row:
    row = {"workload": workload, "case": case, "variant": variant}
    row.update(stats)
    row.update(extra)
    print(f"  {workload} {case} | {variant}: {stats.get('median_s', float('nan')):.4f} s", file=sys.stderr, flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# W1: forward per window
# ---------------------------------------------------------------------------------------------


def conv_probe(cfg: Dict[str, Any], device: str = "cpu", dtypes: Sequence[Optional[torch.dtype]] = (None,)) -> List[Row]:
    """A dense 3x3x3 Conv3d (the machine's practical ceiling for this kind of work)."""
    channels, spatial = cfg["probe"]
    conv = nn.Conv3d(channels, channels, 3, padding=1).to(device).eval()
    x = torch.randn(1, channels, *spatial, device=device)
    flops = 2 * channels * channels * 27 * int(np.prod(spatial))
    rows = []
    all_threads = torch.get_num_threads()
    thread_counts = sorted({all_threads, opt.inference_threads()}) if device == "cpu" else [all_threads]
    for dtype in dtypes:
        precision = "fp32" if dtype is None else str(dtype).replace("torch.", "")
        for threads in thread_counts:
            label = f"{precision}, {threads} thread{'s' if threads > 1 else ''}"

            def run(dtype=dtype, threads=threads) -> None:
                torch.set_num_threads(threads)
                try:
                    with torch.inference_mode(), opt.autocast(device, dtype=dtype, enabled=dtype is not None):
                        conv(x)
                finally:
                    torch.set_num_threads(all_threads)

            stats = measure_interleaved({label: run}, repeats=5, warmup=2, device=device)[label]
            rows.append(
                _row("W1", f"dense Conv3d probe {channels}->{channels} 3x3x3 on {list(spatial)}", label, stats,
                     gflops=flops / 1e9, gflop_per_s=flops / stats["median_s"] / 1e9, precision=precision,
                     threads=threads)
            )
    return rows


def w1_forward(cfg: Dict[str, Any], device: str = "cpu") -> List[Row]:
    from MMCAFNetLib.models.complexity import measure_model

    reduced = opt.autocast_dtype(device)
    probe_dtypes: List[Optional[torch.dtype]] = [None] + ([reduced] if reduced is not None else [])
    rows = conv_probe(cfg, device, probe_dtypes)
    for name in cfg["models"]:
        rows.extend(_w1_model(name, cfg, device, measure_model(name, tuple(cfg["window"])).flops))
    return rows


def _w1_model(name: str, cfg: Dict[str, Any], device: str, flops: int) -> List[Row]:
    base = seeded_model(name).to(device)
    for p in base.parameters():
        p.requires_grad_(False)
    models = {
        "base": base,
        "folded": opt.optimize_for_inference(copy.deepcopy(base), device, channels_last=False, precision="fp32"),
        "channels_last": opt.optimize_for_inference(copy.deepcopy(base), device, channels_last=True, precision="fp32"),
        "default": opt.optimize_for_inference(copy.deepcopy(base), device),
    }
    rows: List[Row] = []
    for batch in cfg["batches"]:
        rows.extend(_w1_batch(name, cfg, device, flops, models, batch))
    return rows


def _w1_batch(name: str, cfg: Dict[str, Any], device: str, flops: int, models: Dict[str, nn.Module],
              batch: int) -> List[Row]:
    window = tuple(cfg["window"])
    fast_bf16 = opt.autocast_dtype(device) is not None
    default_dtype = opt.autocast_dtype(device)
    default_precision = "fp32" if default_dtype is None else str(default_dtype).replace("torch.", "")
    base, folded, cl, default = models["base"], models["folded"], models["channels_last"], models["default"]
    all_threads = torch.get_num_threads()
    image, clinical = window_inputs(batch, window)
    image, clinical = image.to(device), clinical.to(device)
    image_cl = image.contiguous(memory_format=torch.channels_last_3d)

    def plain() -> None:
        with torch.no_grad():
            base(image, clinical)

    def inference_mode() -> None:
        with torch.inference_mode():
            base(image, clinical)

    def fold_bn() -> None:
        with torch.inference_mode():
            folded(image, clinical)

    def channels_last() -> None:
        with torch.inference_mode():
            cl(image_cl, clinical)

    def bf16() -> None:
        with torch.inference_mode(), opt.autocast(device, dtype=torch.bfloat16):
            folded(image, clinical)

    def optimised() -> None:
        with torch.inference_mode(), opt.inference_context(default, device):
            default(opt.prepare_image(default, image), clinical)

    def optimised_all_threads() -> None:
        with torch.inference_mode(), opt.inference_context(default, device):
            threads = torch.get_num_threads()
            torch.set_num_threads(all_threads)
            try:
                default(opt.prepare_image(default, image), clinical)
            finally:
                torch.set_num_threads(threads)

    if batch == cfg["batches"][0]:
        variants: Dict[str, Callable[[], None]] = {
            "plain eager fp32": plain,
            "+ inference_mode": inference_mode,
            "+ folded BN": fold_bn,
            "+ folded BN + channels_last_3d": channels_last,
        }
        if fast_bf16:
            variants["+ folded BN + bf16 autocast"] = bf16
        variants["optimised (library default)"] = optimised
        if device == "cpu" and all_threads > 1 and getattr(default, "mmcafnet_threads", None):
            variants[f"optimised, all {all_threads} threads"] = optimised_all_threads
        repeats = cfg["repeats"].get(name, 2)
    else:
        variants = {"plain eager fp32": plain, "optimised (library default)": optimised}
        repeats = cfg["repeats_batch8"].get(name, 1)
    # the larger batch follows the batch-1 runs on the same models, which warmed them up
    warmup = 1 if batch == cfg["batches"][0] else 0
    stats = measure_interleaved(variants, repeats=repeats, warmup=warmup, device=device)
    plain_s = stats["plain eager fp32"]["median_s"]
    rows: List[Row] = []
    for variant, s in stats.items():
        precision = "bf16" if "bf16" in variant else ("fp32" if "optimised" not in variant else default_precision)
        threads = (getattr(default, "mmcafnet_threads", None) or all_threads) if variant.startswith("optimised (") else all_threads
        rows.append(
            _row("W1", f"{name} batch {batch} window {list(window)}", variant, s,
                 model=name, batch=batch, windows_per_s=batch / s["median_s"],
                 gflops=flops * batch / 1e9, gflop_per_s=flops * batch / s["median_s"] / 1e9,
                 speedup_vs_plain=plain_s / s["median_s"], precision=precision, threads=threads)
        )
    return rows


# ---------------------------------------------------------------------------------------------
# W2 / W3: classification of a CT in memory
# ---------------------------------------------------------------------------------------------


class ForwardTimer:
    """Adds up the wall time spent inside a module's forward (hooks; no change to the module)."""

    def __init__(self, module: nn.Module) -> None:
        self.total = 0.0
        self.calls = 0
        self._start = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.total += time.perf_counter() - self._start
        self.calls += 1

    def reset(self) -> None:
        self.total, self.calls = 0.0, 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _predictors(name: str, cfg: Dict[str, Any], folder: str, device: str, with_plain: bool):
    """(library-default Predictor, plain Predictor or None) for a random-weights checkpoint."""
    from MMCAFNetLib.inference import Predictor

    path = os.path.join(folder, f"{name}.pt")
    write_checkpoint(name, path, bench_preset(cfg))
    default = Predictor.load(path, device=device)
    plain = None
    if with_plain:
        plain = Predictor.load(path, device=device)
        model = seeded_model(name).to(device)  # the same weights, as Predictor.load did before optimising
        for p in model.parameters():
            p.requires_grad_(False)
        plain.model = model
    return default, plain


def w2_lesion(cfg: Dict[str, Any], device: str = "cpu") -> List[Row]:
    ct, box = phantom_ct(cfg["ct_shape"], cfg["ct_spacing"])
    rows: List[Row] = []
    with tempfile.TemporaryDirectory() as folder:
        for name in cfg["models"]:
            rows.extend(_w2_model(name, cfg, device, folder, ct, box))
    return rows


def _w2_model(name: str, cfg: Dict[str, Any], device: str, folder: str, ct: Volume, box: np.ndarray) -> List[Row]:
    _, record = clinical_schema()
    case = f"{name}: {list(ct.shape[::-1])} CT (IJK), lesion box, attention heatmap to the full grid"
    predictors = dict(zip(("default", "plain"), _predictors(name, cfg, folder, device, with_plain=True)))
    timers = {k: ForwardTimer(p.model) for k, p in predictors.items()}
    results: Dict[str, Any] = {}
    forward: Dict[str, List[float]] = {"default": [], "plain": []}

    def run(key: str) -> None:
        timers[key].reset()
        with cpu_bf16(False if key == "plain" else None):
            results[key] = predictors[key].classify(ct, record, lesion=box, heatmap="attention")
        forward[key].append(timers[key].total)

    labels = {"plain": "plain eager fp32", "default": "optimised (library default)"}
    stats = measure_interleaved({labels[k]: (lambda k=k: run(k)) for k in ("plain", "default")},
                                repeats=cfg["repeats_w2"], warmup=1, device=device)
    rows: List[Row] = []
    for key, variant in labels.items():
        s = stats[variant]
        fwd = float(np.median(forward[key][-s["runs"]:]))
        res = results[key]
        rows.append(
            _row("W2", case, variant, s, model=name, windows=len(res.windows), forward_s=fwd,
                 forward_share=fwd / s["median_s"], timings={k: round(float(v), 4) for k, v in res.timings.items()},
                 speedup_vs_plain=stats[labels["plain"]]["median_s"] / s["median_s"],
                 probability=float(res.probabilities[1]))
        )
    for t in timers.values():
        t.remove()
    return rows


def w3_scan(cfg: Dict[str, Any], device: str = "cpu") -> List[Row]:
    ct, _ = phantom_ct(cfg["ct_shape"], cfg["ct_spacing"])
    rows: List[Row] = []
    with tempfile.TemporaryDirectory() as folder:
        for name in cfg["models"]:
            rows.extend(_w3_model(name, cfg, device, folder, ct))
    return rows


def _w3_model(name: str, cfg: Dict[str, Any], device: str, folder: str, ct: Volume) -> List[Row]:
    _, record = clinical_schema()
    predictor, _ = _predictors(name, cfg, folder, device, with_plain=False)
    timer = ForwardTimer(predictor.model)
    # warm-up on the windows of one point (a whole scan is too long to repeat)
    centre = ct.ijk_to_ras_points(np.array([[0.5 * (s - 1) for s in ct.shape[::-1]]]))[0]
    predictor.classify(ct, record, lesion=centre, heatmap=None)
    timer.reset()
    result: Dict[str, Any] = {}

    def scan() -> None:
        result["r"] = predictor.classify(ct, record, lesion=None, heatmap="attention")

    variant = "optimised (library default)"
    s = measure_interleaved({variant: scan}, repeats=1, warmup=0, device=device)[variant]
    res = result["r"]
    timer.remove()
    return [
        _row("W3", f"{name}: whole-volume scan of {list(ct.shape[::-1])} CT (IJK), attention heatmap", variant, s,
             model=name, windows=len(res.windows), windows_per_s=len(res.windows) / s["median_s"],
             forward_s=timer.total, forward_share=timer.total / s["median_s"],
             timings={k: round(float(v), 4) for k, v in res.timings.items()})
    ]


# ---------------------------------------------------------------------------------------------
# W4: DICOM read, resampling, heatmap back
# ---------------------------------------------------------------------------------------------


def write_dicom_series(volume: Volume, folder: str) -> None:
    """The volume as a CT series, one file per slice (int16 stored values, intercept -1024)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study, series = generate_uid(), generate_uid()
    spacing = volume.spacing
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.ijk_to_ras
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    k_count, rows, cols = volume.shape
    for k in range(k_count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(os.path.join(folder, f"{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientID, ds.PatientSex, ds.PatientAge = "CT", "BENCH", "M", "063Y"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]]
        ds.ImageOrientationPatient = [float(v) for v in np.r_[row_dir, col_dir]]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024.0, 1.0
        ds.PixelData = (volume.array[k].astype(np.int32) + 1024).astype("<i2").tobytes()
        pydicom.dcmwrite(ds.filename, ds, enforce_file_format=True)


def w4_io(cfg: Dict[str, Any], device: str = "cpu") -> List[Row]:
    import SimpleITK as sitk

    from MMCAFNetLib import heatmap as hm
    from MMCAFNetLib import windows as win
    from MMCAFNetLib.volume import read_volume, resample_to_grid

    ct, _ = phantom_ct(cfg["ct_shape"], cfg["ct_spacing"])
    preset = bench_preset(cfg)
    rows: List[Row] = []
    n = ct.shape[0]
    with tempfile.TemporaryDirectory() as folder:
        write_dicom_series(ct, folder)
        del ct

        def ours() -> None:
            read_volume(folder)

        def simpleitk() -> None:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
            reader.Execute()

        stats = measure_interleaved({"read_volume": ours, "SimpleITK ImageSeriesReader": simpleitk}, repeats=3, warmup=1)
        for variant, s in stats.items():
            rows.append(_row("W4", f"read a {n}-slice DICOM series ({cfg['ct_shape'][2]}x{cfg['ct_shape'][1]})",
                             variant, s, slices_per_s=n / s["median_s"]))
        volume = read_volume(folder)
    prepared_box: Dict[str, Volume] = {}

    def prepare() -> None:
        prepared_box["v"] = win.prepare_volume(volume, preset)

    stats = measure_interleaved({"prepare_volume (model spacing)": prepare}, repeats=3, warmup=1)
    prepared = prepared_box["v"]
    for variant, s in stats.items():
        rows.append(_row("W4", f"resample CT to {list(preset.spacing)} mm (K,J,I) -> {list(prepared.shape)}",
                         variant, s))
    # heatmap on the prepared grid (one window's worth of attention around the centre) back to the CT grid
    canvas = hm.WindowCanvas(prepared.shape, prepared.ijk_to_ras)
    rng = np.random.default_rng(0)
    d, h, w = preset.window
    small = rng.random((max(d // 4, 1), max(h // 8, 1), max(w // 8, 1))).astype(np.float32)
    start = np.maximum((np.array(prepared.shape) - np.array(preset.window)) // 2, 0)
    shift = np.eye(4)
    shift[:3, 3] = start[::-1]
    canvas.add(hm.upsample_map(small, preset.window), prepared.ijk_to_ras @ shift)
    values = canvas.normalised()

    def ours_back() -> None:
        heat = hm.heatmap_volume(canvas, volume)
        hm.labelmap_volume(heat, 1, 0.5)

    def sitk_back() -> None:
        resample_to_grid(Volume(values, prepared.ijk_to_ras, {}), volume.ijk_to_ras, volume.shape, "linear", 0.0)

    stats = measure_interleaved(
        {"heatmap_volume + labelmap": ours_back, "SimpleITK resample (reference)": sitk_back}, repeats=3, warmup=1
    )
    for variant, s in stats.items():
        rows.append(_row("W4", f"heatmap {list(prepared.shape)} back to the CT grid {list(volume.shape)}", variant, s))
    return rows


# ---------------------------------------------------------------------------------------------
# W5: training step and data loader
# ---------------------------------------------------------------------------------------------


def w5_train(cfg: Dict[str, Any], device: str = "cpu") -> List[Row]:
    rows: List[Row] = []
    for name in cfg["models"]:
        rows.extend(_w5_model(name, cfg, device))
    rows.extend(w5_loader(cfg))
    return rows


def _w5_model(name: str, cfg: Dict[str, Any], device: str) -> List[Row]:
    batch = int(cfg["train_batch"])
    window = tuple(cfg["window"])
    models = {"fp32": seeded_model(name).to(device).train()}
    models["channels_last_3d"] = copy.deepcopy(models["fp32"]).to(memory_format=torch.channels_last_3d)
    if opt.autocast_dtype(device) is not None:
        models["bf16 autocast"] = copy.deepcopy(models["fp32"])
    optimisers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    image, clinical = window_inputs(batch, window)
    image, clinical = image.to(device), clinical.to(device)
    target = (torch.arange(batch, device=device) % 2).float()[:, None]
    loss_fn = nn.BCEWithLogitsLoss()

    def step(key: str) -> None:
        x = image.contiguous(memory_format=torch.channels_last_3d) if key == "channels_last_3d" else image
        dtype = opt.autocast_dtype(device) if key == "bf16 autocast" else None
        with opt.autocast(device, dtype=dtype, enabled=dtype is not None):
            logits = models[key](x, clinical).logits
        loss = loss_fn(logits.float(), target)
        loss.backward()
        optimisers[key].step()
        optimisers[key].zero_grad(set_to_none=True)

    labels = {"fp32": "plain eager fp32", "channels_last_3d": "+ channels_last_3d", "bf16 autocast": "+ bf16 autocast"}
    stats = measure_interleaved({labels[k]: (lambda k=k: step(k)) for k in models},
                                repeats=cfg["train_repeats"].get(name, 2), warmup=1, device=device)
    plain_s = stats["plain eager fp32"]["median_s"]
    return [
        _row("W5", f"{name} training step, batch {batch} window {list(window)}", variant, s, model=name,
             windows_per_s=batch / s["median_s"], speedup_vs_plain=plain_s / s["median_s"])
        for variant, s in stats.items()
    ]


def w5_loader(cfg: Dict[str, Any]) -> List[Row]:
    """The training data loader as ``mmcafnet train`` builds it (``train.data.build_dataset``, CTs from a
    ``PreprocessCache``), augmenting, batched by torch's DataLoader in the main process."""
    import pandas as pd

    from MMCAFNetLib.train.config import TrainConfig
    from MMCAFNetLib.train.data import build_dataset, collate
    from MMCAFNetLib.volume import write_volume

    preset = bench_preset(cfg)
    schema, record = clinical_schema()
    shape = tuple(max(s // 2, 8) for s in cfg["ct_shape"])  # smaller CTs keep the set-up short
    batch = int(cfg["train_batch"])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for p in range(4):
            ct, box = phantom_ct(shape, [v * 2 for v in cfg["ct_spacing"]])
            path = os.path.join(folder, f"P{p}.nrrd")
            write_volume(ct, path)
            rows.append({"patient_id": f"P{p}", "label": "AG"[p % 2], "series_path": path, **record,
                         **dict(zip(("box_ras_min_r", "box_ras_min_a", "box_ras_min_s"), box[0])),
                         **dict(zip(("box_ras_max_r", "box_ras_max_a", "box_ras_max_s"), box[1]))})
        config = TrainConfig(preset=preset.to_dict(), windows_per_patient=16, progress=False,
                             cache_dir=os.path.join(folder, "cache"))
        dataset = build_dataset(pd.DataFrame(rows), config, schema, preset, train=True)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=0,
                                             collate_fn=collate)

        def epoch() -> None:
            for _ in loader:
                pass

        variant = "training dataset over the cache + DataLoader, augmenting, 0 workers"
        s = measure_interleaved({variant: epoch}, repeats=3, warmup=1)[variant]
    return [_row("W5", f"cached data loader, {16 * len(rows)} windows {list(preset.window)}, batch {batch}",
                 variant, s, windows_per_s=16 * len(rows) / s["median_s"])]


# ---------------------------------------------------------------------------------------------
# W6: CUDA
# ---------------------------------------------------------------------------------------------


def w6_cuda(cfg: Dict[str, Any]) -> List[Row]:
    """W1 (batch 1 and 16), W2, W3 and W5 on the first CUDA device with bf16 autocast."""
    if not torch.cuda.is_available():
        return [{"workload": "W6", "case": "CUDA bf16", "variant": "not available here",
                 "skipped": "no CUDA device on this machine"}]
    cuda_cfg = dict(cfg)
    cuda_cfg["batches"] = tuple(cfg["cuda_batches"])
    cuda_cfg["repeats"] = {k: 10 for k in cfg["repeats"]}
    cuda_cfg["repeats_batch8"] = {k: 10 for k in cfg["repeats"]}
    rows: List[Row] = []
    for group in (w1_forward, w2_lesion, w3_scan, w5_train):
        try:
            for row in group(cuda_cfg, device="cuda"):
                row["workload"] = "W6/" + str(row["workload"])
                rows.append(row)
        except Exception as exc:  # report and carry on with the next group
            rows.append({"workload": "W6", "case": group.__name__, "variant": "failed", "error": repr(exc)})
    return rows


# ---------------------------------------------------------------------------------------------
# W8: `mmcafnet predict` end to end, in windows' time
# ---------------------------------------------------------------------------------------------


def _run_predict(series: str, out: str, point: Optional[Sequence[float]]) -> Dict[str, Any]:
    """One `mmcafnet predict` in a fresh interpreter (start, imports, read, classify, write); its
    peak memory from the kernel's accounting of that child (``os.wait4``)."""
    import subprocess

    cmd = [sys.executable, "-m", "MMCAFNetLib.cli", "predict", "--input", series, "--out", out]
    if point is not None:
        cmd += ["--point", *[f"{v:.3f}" for v in point]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"mmcafnet predict exited with {proc.returncode}: {stderr[-2000:]}")
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    with open(os.path.join(out, "prediction.json"), encoding="utf-8") as fh:
        import json

        info = json.load(fh)
    return {"bytes": size, "peak_rss_mib": usage.ru_maxrss / 1024.0, "windows": len(info["windows"]),
            "timings": info["timings"], "files": {f: os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)}}


def w8_predict(cfg: Dict[str, Any]) -> List[Row]:
    """`mmcafnet predict` end to end with the bundled demo model on a synthetic 512 x 512 DICOM series
    (the synthetic cohort writer's), point-guided and whole-volume, next to one plain eager fp32
    `mmcafnet` window [12, 192, 192] measured in the same run: the ratios are predict's time in
    windows' time (imports included)."""
    import shutil

    from MMCAFNetLib.synthetic import write_cohort

    rows: List[Row] = []
    with tempfile.TemporaryDirectory() as folder:
        cohort = write_cohort(os.path.join(folder, "cohort"), patients=1, seed=int(cfg["w8_seed"]),
                              size=int(cfg["w8_size"]), classes="A", extra_series=False)
        patient = cohort.patients[0]
        series = patient.series_path
        shape = f"{cfg['w8_size']}x{cfg['w8_size']}x{patient.num_slices}"
        base = seeded_model("mmcafnet")
        for p in base.parameters():
            p.requires_grad_(False)
        image, clinical = window_inputs(1, tuple(FULL["window"]) if cfg["w8_size"] >= 512 else tuple(cfg["window"]))
        runs: Dict[str, List[Dict[str, Any]]] = {"point": [], "scan": []}
        counter = [0]

        def window() -> None:
            with torch.no_grad():
                base(image, clinical)

        def window_one_thread() -> None:  # context: on shared cores two threads stall each other
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                window()
            finally:
                torch.set_num_threads(threads)

        def predict(kind: str) -> None:
            counter[0] += 1
            out = os.path.join(folder, f"out-{kind}-{counter[0]}")
            runs[kind].append(_run_predict(series, out, patient.lesion_center_ras if kind == "point" else None))
            shutil.rmtree(out, ignore_errors=True)

        labels = {"window": f"one plain eager fp32 mmcafnet window ({torch.get_num_threads()} threads)",
                  "window1": "one plain eager fp32 mmcafnet window, 1 thread", "point": "predict, lesion point",
                  "scan": "predict, whole volume (no lesion)"}
        stats = measure_interleaved(
            {labels["window"]: window, labels["window1"]: window_one_thread,
             labels["point"]: lambda: predict("point"), labels["scan"]: lambda: predict("scan")},
            repeats=int(cfg["w8_repeats"]), warmup=1,
        )
        window_s = stats[labels["window"]]["median_s"]
        window1_s = stats[labels["window1"]]["median_s"]
        for key in ("window", "window1"):
            rows.append(_row("W8", f"reference for W8 ({list(image.shape[2:])})", labels[key], stats[labels[key]],
                             model="mmcafnet"))
        for kind in ("point", "scan"):
            s = dict(stats[labels[kind]])
            last = runs[kind][-1]
            s["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs[kind])
            in_windows = s["median_s"] / window_s
            rows.append(_row(
                "W8", f"mmcafnet predict, bundled demo model, {shape} DICOM series: {in_windows:.2f} windows' time "
                f"({s['median_s'] / window1_s:.2f} of the 1-thread window), output folder {last['bytes'] / 1e6:.1f} MB",
                labels[kind], s, windows_time=in_windows, windows_time_one_thread=s["median_s"] / window1_s,
                output_bytes=last["bytes"], files=last["files"], windows=last["windows"], timings=last["timings"]))
    return rows


WORKLOADS: Dict[str, Callable[..., List[Row]]] = {
    "W1": w1_forward,
    "W2": w2_lesion,
    "W3": w3_scan,
    "W4": w4_io,
    "W5": w5_train,
    "W6": w6_cuda,
    "W8": w8_predict,
}


def _w7(cfg: Dict[str, Any]) -> List[Row]:
    from workload_slicer import w7_slicer

    return w7_slicer(cfg)


WORKLOADS["W7"] = _w7


def run_workload(key: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Run one workload in this process; returns its rows and the process's memory figures."""
    start = time.perf_counter()
    if key == "W6":
        rows = w6_cuda(cfg)
    else:
        rows = WORKLOADS[key](cfg)
    return {"rows": rows, "wall_s": time.perf_counter() - start}

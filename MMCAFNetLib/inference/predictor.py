"""The Predictor: a CT and a clinical record in; class probabilities, a heatmap and a labelmap out.

The model is loaded once (``Predictor.load``) and reused across calls. ``classify`` never touches
MRML and keeps no state between calls except the model, so Slicer can run it on a worker thread.

Windows: with a lesion (RAS point, RAS box, or a mask volume's bounding box) the windows that
cover the lesion's whole extent; without one, sliding windows over the CT (overlapping by the
checkpoint's ``scan_overlap``), of which only those
reaching a body/lung mask made from HU thresholds are evaluated (``lung_mask``), in batches sized
by the window (``memory_guard.default_batch_size``). The case's probabilities are the per-class maximum over windows (the paper's
patient score is the max over its windows); for more than two classes the maxima are renormalised
to sum to one. Binary models give ``[1 - p, p]`` and decide the class with the checkpoint's
validation threshold.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from MMCAFNetLib import checkpoint as ckpt
from MMCAFNetLib import heatmap as hm
from MMCAFNetLib import memory_guard
from MMCAFNetLib.preset import Preset, check_covers_window, get_preset
from MMCAFNetLib.results import CLASS_LABELS, Cancelled, Candidate, Classification, WindowResult
from MMCAFNetLib.volume import Volume, grid_corners_ras, resample_to_grid

ProgressCallback = Callable[[int, int], None]
Lesion = Union[None, Sequence[float], np.ndarray, Volume]

HEATMAP_METHODS = ("attention", "gradcam", "gradcam++")
#: ``heatmap=MODEL_DEFAULT`` asks for the method the checkpoint recommends (its ``heatmap`` entry).
MODEL_DEFAULT = "model"
#: The method for checkpoints that name none (written before the entry existed): Grad-CAM
#: localised the lesion far more often than the untrained-for attention maps on those models.
LEGACY_HEATMAP = "gradcam"
#: Grad-CAM layers: "last" is the last pyramid map (``ModelOutput.features``, the deepest grid);
#: "fine" is the finest pyramid level after its attention block (4 x finer in-plane).
GRADIENT_LAYERS = ("last", "fine")
#: How windows' maps are weighted before they are combined: by the window's probability of the
#: predicted class, or not at all (the map's own values decide). "auto": not at all for the
#: attention maps of a model trained with box supervision (their values are lesion probabilities,
#: comparable between windows), by probability otherwise.
WINDOW_WEIGHTINGS = ("auto", "probability", "none")

#: Window overlap of a whole-volume scan for checkpoints that name none (written before the entry
#: existed); a checkpoint's ``scan_overlap`` replaces it.
LEGACY_SCAN_OVERLAP = 0.25

#: HU above which a voxel counts as body (lung parenchyma is about -850, air -1000).
BODY_HU = -900.0
#: A sliding window with fewer body voxels than this fraction is air only and is skipped.
MIN_BODY_FRACTION = 0.002


class InputError(ValueError):
    """The CT, the lesion or the options cannot be classified; the message says what to change."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU (Apple MPS is not used: 3D ops are incomplete there)."""
    if isinstance(device, torch.device):
        return device
    name = str(device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA device is available; use --device cpu or auto")
    if name.startswith("mps"):
        raise InputError("the MPS device is not supported (incomplete 3D operations); use cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Predictor:
    """A loaded checkpoint, ready to classify CTs. Build with :meth:`load`."""

    def __init__(self, payload: dict[str, Any], model: torch.nn.Module, device: torch.device, source: str = "") -> None:
        from MMCAFNetLib.ehr import ClinicalSchema

        self.payload = {k: v for k, v in payload.items() if k != "state_dict"}
        self.model = model
        self.device = device
        self.source = source
        self.schema = ClinicalSchema.from_dict(payload["schema"])
        self.class_names: list[str] = [str(c) for c in payload["class_names"]]
        self.preset: Preset = get_preset(payload["preset"])
        self.decision_threshold = float(payload.get("threshold", 0.5))
        self.is_demo = bool(payload.get("demo", False))
        self.binary = len(self.class_names) == 2 and _num_outputs(model, payload) == 1
        #: Lesion-guided runs resample only the region their windows cover (same voxels, same
        #: result as preparing the whole CT; False prepares the whole CT, for comparison).
        self.crop_to_lesion = True
        #: Whole-volume scans evaluate only the windows that reach the lungs (``lung_mask``); False
        #: evaluates every window holding body tissue, for comparison.
        self.scan_lungs_only = True
        #: Gradient maps' layer and the windows' weighting: the checkpoint's choice, else the defaults.
        options = dict(payload.get("heatmap_options") or {})
        self.gradient_layer = str(options.get("gradient_layer", "last"))
        self.window_weighting = str(options.get("window_weighting", "auto"))
        #: Which pyramid levels make the attention heatmap (``heatmap.ATTENTION_LEVELS``) of a
        #: lesion-guided run and of a whole-volume scan, and the overlap of neighbouring windows in
        #: a whole-volume scan (a fraction of the window).
        scan = checkpoint_scan_settings(payload)
        self.attention_levels = str(scan["lesion_attention_levels"])
        self.scan_attention_levels = str(scan["attention_levels"])
        self.scan_overlap = scan["overlap"]
        #: Trained with box supervision of its attention maps: they are lesion maps, not just weights.
        trained = payload.get("train_config") if isinstance(payload.get("train_config"), dict) else {}
        self.attention_is_lesion_map = float(trained.get("attention_supervision") or 0.0) > 0.0
        if (self.gradient_layer not in GRADIENT_LAYERS or self.window_weighting not in WINDOW_WEIGHTINGS
                or {self.attention_levels, self.scan_attention_levels} - set(hm.ATTENTION_LEVELS)):
            raise ckpt.CheckpointError(
                f"{source or 'checkpoint'}: unknown heatmap options {options}; this MMCAFNetLib knows gradient layers "
                f"{GRADIENT_LAYERS}, window weightings {WINDOW_WEIGHTINGS} and attention levels "
                f"{hm.ATTENTION_LEVELS}. Update MMCAFNetLib."
            )
        win = _windows_module()
        if not win.is_scan_overlap(self.scan_overlap):
            raise ckpt.CheckpointError(
                f"{source or 'checkpoint'}: its scan_overlap {self.scan_overlap!r} is not a number in "
                f"[0, {win.MAX_SCAN_OVERLAP}]; the file is damaged or was not written by MMCAFNetLib."
            )
        self.scan_overlap = float(self.scan_overlap)
        self._lock = threading.Lock()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "auto") -> Predictor:
        """Read a checkpoint (``weights_only=True``: it cannot run code) and build its model in eval mode."""
        dev = resolve_device(device)
        payload = ckpt.load_checkpoint(path, map_location="cpu")
        from MMCAFNetLib.ehr import ClinicalSchema

        try:
            num_clinical = ClinicalSchema.from_dict(payload["schema"]).num_features
        except Exception as exc:
            raise ckpt.CheckpointError(f"{path}: its clinical schema is not usable ({exc})") from None
        model = ckpt.model_from_checkpoint(payload, str(path), num_clinical=num_clinical)
        from MMCAFNetLib.optimize import optimize_for_inference

        model = optimize_for_inference(model, dev)  # eval, no gradients, BatchNorm folded (docs/performance.md)
        predictor = cls(payload, model, dev, source=str(path))
        predictor.payload["sha256"] = file_sha256(path)
        return predictor

    @property
    def default_heatmap(self) -> str:
        """The heatmap method the checkpoint recommends (chosen by measured localisation), or
        :data:`LEGACY_HEATMAP` for checkpoints that name none."""
        name = self.payload.get("heatmap")
        return str(name) if name in HEATMAP_METHODS else LEGACY_HEATMAP

    def resolve_heatmap(self, heatmap: Optional[str]) -> Optional[str]:
        """``"model"`` -> the checkpoint's method; ``None``/``"none"`` -> no heatmap; else checked as given."""
        if heatmap is None or heatmap == "none":
            return None
        if heatmap == MODEL_DEFAULT:
            return self.default_heatmap
        if heatmap not in HEATMAP_METHODS:
            raise InputError(
                f"unknown heatmap method {heatmap!r}; use {MODEL_DEFAULT!r} (the model's own choice, "
                f"{self.default_heatmap}), one of {HEATMAP_METHODS}, or None"
            )
        return heatmap

    def set_scan_options(self, overlap: Optional[float] = None, levels: Optional[str] = None) -> None:
        """Replace the checkpoint's whole-volume scan settings (``None`` keeps one): the windows'
        overlap (0.25 evaluates about a third of the windows of 0.5) and the attention map's
        pyramid levels."""
        if overlap is not None:
            win = _windows_module()
            if not win.is_scan_overlap(overlap):
                raise InputError(f"the scan overlap must lie in 0..{win.MAX_SCAN_OVERLAP} (a fraction of the window: "
                                 f"0.5 = half, 0.25 about three times faster), got {overlap}")
            self.scan_overlap = float(overlap)
        if levels is not None:
            if levels not in hm.ATTENTION_LEVELS:
                raise InputError(f"the scan's attention levels must be one of {hm.ATTENTION_LEVELS}, got {levels!r}")
            self.scan_attention_levels = str(levels)

    # -- description ----------------------------------------------------------------------------
    @property
    def info(self) -> dict[str, Any]:
        """Plain data describing the model (for the GUI, prediction.json and ``mmcafnet info``)."""
        prov = dict(self.payload.get("provenance") or {})
        sha = self.payload.get("sha256", "")
        return {
            "model_name": self.payload["model_name"],
            "model_id": f"{self.payload['model_name']}@{sha[:12]}" if sha else self.payload["model_name"],
            "checkpoint": self.source,
            "sha256": sha,
            "format_version": self.payload["format_version"],
            "library_version": prov.get("library_version"),
            "task": self.payload.get("task"),
            "class_names": list(self.class_names),
            "class_labels": [class_label(c) for c in self.class_names],
            "decision_threshold": self.decision_threshold,
            "clinical_fields": list(self.schema.field_names),
            "preset": self.preset.to_dict(),
            "provenance": prov,
            "metrics": dict(self.payload.get("metrics") or {}),
            "demo": self.is_demo,
            "device": str(self.device),
            "default_heatmap": self.default_heatmap,
            "attention_levels": self.attention_levels,
            "scan_attention_levels": self.scan_attention_levels,
            "scan_overlap": self.scan_overlap,
        }

    # -- classification -------------------------------------------------------------------------
    def classify(
        self,
        volume: Volume,
        record: Optional[dict[str, Any]] = None,
        lesion: Lesion = None,
        heatmap: Optional[str] = MODEL_DEFAULT,
        threshold: float = 0.5,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[threading.Event] = None,
        batch_size: Optional[int] = None,
    ) -> Classification:
        """Classify one CT. ``threshold`` is the heatmap level from which the labelmap is drawn;
        ``heatmap`` is a method name, ``"model"`` (the checkpoint's recommended method) or None.

        Raises :class:`InputError` (a ValueError) for unusable input and ``results.Cancelled`` when
        ``cancel`` is set (checked between batches); a cancelled call returns nothing.
        """
        with self._lock:
            return self._classify(volume, record, lesion, heatmap, threshold, progress, cancel, batch_size)

    def _classify(self, volume, record, lesion, heatmap, threshold, progress, cancel, batch_size) -> Classification:
        win = _windows_module()

        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        heatmap = self.resolve_heatmap(heatmap)
        if not 0.0 <= float(threshold) <= 1.0:
            raise InputError(f"the heatmap threshold must lie in 0..1, got {threshold}")
        warnings = validate_ct(volume)
        clinical, clinical_warnings = self._encode_record(record)
        warnings += clinical_warnings
        box_ras = lesion_box_ras(volume, lesion)
        check_covers_window(volume, self.preset)  # with or without a lesion: a thumbnail is not a CT
        scan_info: Optional[dict[str, Any]] = None

        t = time.perf_counter()
        if box_ras is None:  # a whole-volume scan: refuse early when it cannot fit in memory
            memory_guard.check_whole_volume_scan(self, volume, batch_size, heatmap)
        if box_ras is not None and self.crop_to_lesion:
            prepared, centers = prepare_lesion_region(volume, self.preset, box_ras)
        elif box_ras is not None:
            prepared = win.prepare_volume(volume, self.preset)
            kji_min, kji_max = win.box_ras_to_kji(prepared, *box_ras)
            centers = list(win.window_centers_for_box(prepared, kji_min, kji_max, self.preset))
        else:
            prepared = win.prepare_volume(volume, self.preset)
            centers, scan_info = self._scan_windows(prepared, warnings)
        timings["prepare_s"] = time.perf_counter() - t
        total = len(centers)
        levels = self.attention_levels if box_ras is not None else self.scan_attention_levels
        bs = int(batch_size) if batch_size else memory_guard.default_batch_size(self.device, self.preset.window)
        if bs < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")

        probs_all: list[np.ndarray] = []
        maps_all: list[np.ndarray] = []
        window_geoms: list[tuple[np.ndarray, tuple[int, int, int]]] = []
        t = time.perf_counter()
        done = 0
        for b0 in range(0, total, bs):
            _check_cancel(cancel)
            cut = [win.cut_window(prepared, c, self.preset) for c in centers[b0 : b0 + bs]]
            image = torch.from_numpy(np.stack([w.array for w in cut]).astype(np.float32, copy=False))[:, None]
            clin = torch.from_numpy(np.repeat(clinical, len(cut), axis=0))
            probs, maps = memory_guard.run_batch_with_fallback(self, image, clin, heatmap, warnings, levels)
            probs_all.append(probs)
            if maps is not None:
                maps_all.extend(maps)
            window_geoms.extend((np.asarray(w.ijk_to_ras, dtype=np.float64), tuple(w.array.shape)) for w in cut)
            done += len(cut)
            if progress is not None:
                progress(done, total)
        _check_cancel(cancel)
        timings["inference_s"] = time.perf_counter() - t

        window_probs = np.concatenate(probs_all, axis=0)  # [N, C]
        case_probs = aggregate_window_probabilities(window_probs, self.binary)
        if self.binary:
            predicted = int(case_probs[1] >= self.decision_threshold)
        else:
            predicted = int(np.argmax(case_probs))
        label_value = class_label_value(self.class_names[predicted], predicted)

        windows = [
            WindowResult(center_ras=tuple(float(v) for v in _window_center_ras(a, s)),  # type: ignore[arg-type]
                         box_ras=_window_box_ras(a, s), probabilities=[float(p) for p in wp])
            for (a, s), wp in zip(window_geoms, window_probs)
        ]

        heat_vol = label_vol = None
        candidates: list[Candidate] = []
        if heatmap is not None:
            t = time.perf_counter()
            canvas_shape, canvas_affine = prepared.shape, prepared.ijk_to_ras
            if box_ras is not None and self.crop_to_lesion:
                # One voxel of zeros around the block, as the whole prepared grid would have there,
                # so the interpolation onto the CT grid fades out at the windows' edges the same way.
                canvas_affine = prepared.ijk_to_ras.copy()
                canvas_affine[:3, 3] -= prepared.ijk_to_ras[:3, :3] @ np.ones(3)
                canvas_shape = tuple(int(n) + 2 for n in prepared.shape)
            canvas = hm.WindowCanvas(canvas_shape, canvas_affine)
            for (aff, shape), small, wp in zip(window_geoms, maps_all, window_probs):
                m = small[predicted] if small.ndim == 4 else small
                weight = float(wp[predicted]) if self._weights_windows(heatmap) else 1.0
                canvas.add(hm.upsample_map(m, shape) * weight, aff)
            _check_cancel(cancel)
            heat_vol = hm.heatmap_volume(canvas, volume)
            heat_vol.meta.update(method=heatmap, predicted_class=self.class_names[predicted])
            block = hm.target_block(canvas, volume)
            label_vol = hm.labelmap_volume(heat_vol, label_value, float(threshold), block)
            candidates = [Candidate(tuple(float(v) for v in ras), value)  # type: ignore[arg-type]
                          for ras, value in hm.candidate_peaks(heat_vol, block=block)]
            timings["heatmap_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t_start

        info = self.info
        return Classification(
            class_names=list(self.class_names),
            class_labels=[class_label(c) for c in self.class_names],
            probabilities=case_probs.astype(np.float64),
            predicted_index=predicted,
            threshold=float(threshold),
            windows=windows,
            heatmap=heat_vol,
            labelmap=label_vol,
            label_value=label_value,
            timings=timings,
            model={
                **{k: info[k] for k in ("model_name", "model_id", "sha256", "library_version", "task",
                                        "decision_threshold", "demo", "device", "checkpoint")},
                "heatmap": heatmap,
                "lesion_box_ras": None if box_ras is None else [[float(v) for v in b] for b in box_ras],
                **({"scan": scan_info} if scan_info is not None else {}),
            },
            warnings=warnings,
            candidates=candidates,
        )

    # -- internals ------------------------------------------------------------------------------
    def _weights_windows(self, heatmap: str) -> bool:
        """Whether each window's map is scaled by the window's probability of the predicted class."""
        if self.window_weighting == "auto":
            return not (heatmap == "attention" and self.attention_is_lesion_map)
        return self.window_weighting == "probability"

    def _scan_windows(self, prepared: Volume, warnings: list[str]) -> tuple[list, dict[str, Any]]:
        """Sliding windows of a whole-volume scan; with ``scan_lungs_only`` only those reaching the
        lungs (``lung_mask``), else those holding body tissue."""
        win = _windows_module()
        every = win.sliding_window_centers(prepared, self.preset, overlap=self.scan_overlap)
        if self.scan_lungs_only:
            from MMCAFNetLib.lung_mask import select_scan_windows

            selection = select_scan_windows(prepared, self.preset, every)
            centers, method = selection.kept, selection.method
            warnings.extend(selection.warnings)
        else:
            centers = [c for c in every if _has_body(win.cut_window(prepared, c, self.preset).array, self.preset)]
            method = "body"
        if not centers:
            raise InputError("no window of the CT contains body tissue (all air); check the image")
        return centers, {"windows_tiled": len(every), "windows_evaluated": len(centers), "selection": method,
                         "overlap": self.scan_overlap}

    def _encode_record(self, record: Optional[dict[str, Any]]) -> tuple[np.ndarray, list[str]]:
        warnings: list[str] = []
        canonical = self.schema.validate_record({} if record is None else record, notes=warnings)
        unknown = [k for k, v in canonical.items() if v is None]
        if unknown:
            warnings.append(
                f"clinical value(s) not given: {', '.join(unknown)}; imputed from the training data"
            )
        return np.asarray(self.schema.encode(canonical), dtype=np.float32).reshape(1, -1), warnings

    def _forward(self, image: torch.Tensor, clinical: torch.Tensor):
        from MMCAFNetLib.optimize import inference_context, prepare_image

        with inference_context(self.model, self.device):  # threads and precision chosen at load
            return self.model(prepare_image(self.model, image), clinical)

    def _probabilities(self, logits: torch.Tensor) -> np.ndarray:
        logits = logits.float()
        if self.binary:
            p = torch.sigmoid(logits[:, 0])
            return torch.stack([1.0 - p, p], dim=1).cpu().numpy()
        return torch.softmax(logits, dim=1).cpu().numpy()

    def _run_batch(self, image: torch.Tensor, clinical: torch.Tensor, heatmap: Optional[str], levels: str = "all"):
        """-> (probabilities [B, C], per-window low-res maps or None).

        Attention maps are ``[d, h, w]`` (of the pyramid ``levels``, ``heatmap.ATTENTION_LEVELS``);
        Grad-CAM maps are ``[C, d, h, w]`` (one per class, the predicted class being known only after
        every window has been seen).
        """
        image = image.to(self.device, non_blocking=True)
        clinical = clinical.to(self.device, non_blocking=True)
        if heatmap not in ("gradcam", "gradcam++"):
            with torch.inference_mode():
                out = self._forward(image, clinical)
                probs = self._probabilities(out.logits)
                if heatmap is None:
                    return probs, None
                maps = hm.combine_attention_levels(list(out.attention), levels).cpu().numpy()
            return probs, list(maps)
        captured: dict[str, torch.Tensor] = {}
        handle = None
        if self.gradient_layer == "fine":
            layer = _finest_pyramid_block(self.model)
            if layer is not None:
                def keep_features(_module, _inputs, output) -> None:  # returns None: the output is unchanged
                    captured["features"] = output[0]

                handle = layer.register_forward_hook(keep_features)
        try:
            with torch.enable_grad():
                image = image.detach().requires_grad_(True)
                out = self._forward(image, clinical)
                feats = captured.get("features", out.features)
                if feats is None:
                    raise InputError("this model exposes no feature map for Grad-CAM; use heatmap='attention'")
                logits = out.logits.float()
                scores = [logits[:, 0]] if self.binary else [logits[:, c] for c in range(logits.shape[1])]
                grads = []
                for i, s in enumerate(scores):
                    (grad,) = torch.autograd.grad(s.sum(), feats, retain_graph=i < len(scores) - 1)
                    grads.append(grad)
        finally:
            if handle is not None:
                handle.remove()
        cam = hm.gradcam_plus_plus_from_gradients if heatmap == "gradcam++" else hm.gradcam_from_gradients
        with torch.no_grad():
            feats = feats.detach()
            if self.binary:
                per_class = [cam(feats, -grads[0]), cam(feats, grads[0])]
            else:
                per_class = [cam(feats, g) for g in grads]
            stacked = torch.stack(per_class, dim=1).cpu().numpy()  # [B, C, d, h, w]
            probs = self._probabilities(logits.detach())
        return probs, list(stacked)


# ---------------------------------------------------------------------------------------------
# Validation and geometry helpers
# ---------------------------------------------------------------------------------------------


def _finest_pyramid_block(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The attention block of the finest pyramid level (its output is (features, attention map))."""
    encoder = getattr(model, "image_encoder", None)
    pyramid = getattr(encoder, "pyramid", None)
    blocks = getattr(pyramid, "msca", None)
    return blocks[0] if blocks is not None and len(blocks) else None


def validate_ct(volume: Volume) -> list[str]:
    """Refuse what cannot be classified (raise InputError); return warnings for what looks odd."""
    from MMCAFNetLib.volume import check_ct

    if not isinstance(volume, Volume):
        raise InputError(f"expected a MMCAFNetLib.volume.Volume, got {type(volume).__name__}")
    arr = volume.array
    if arr.ndim != 3:
        raise InputError(
            f"the image has {arr.ndim} dimensions (shape {arr.shape}); a 3D CT volume is needed "
            "(not a 2D slice, not a 4D series)"
        )
    if min(arr.shape) < 2:
        raise InputError(
            f"the image has shape {arr.shape} (K, J, I): a single 2D slice, not a 3D CT. Load the whole series."
        )
    if arr.dtype.kind == "f":
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if n_bad:
            raise InputError(
                f"the CT has {n_bad} NaN or infinite voxel(s); fill them (e.g. with -1000 HU) and try again"
            )
    warnings = [w for w in check_ct(volume) if "NaN" not in w]
    if float(arr.max()) <= BODY_HU:
        raise InputError(
            f"the CT is all air (highest value {float(arr.max()):g} HU): there is no body to classify. "
            "Check that the right series was loaded and that values are in Hounsfield units."
        )
    return warnings


def aggregate_window_probabilities(window_probs: np.ndarray, binary: bool) -> np.ndarray:
    """Case probabilities from per-window ones ``[N, C]``: the maximum over windows, as the paper.

    Binary: ``p = max_w p_w`` of the positive class, returned as ``[1 - p, p]``. More classes: each
    class's maximum over windows, renormalised to sum to one.
    """
    window_probs = np.asarray(window_probs, dtype=np.float64)
    if binary:
        p = float(window_probs[:, 1].max())
        return np.array([1.0 - p, p])
    best = window_probs.max(axis=0)
    return best / best.sum()


def checkpoint_scan_settings(payload: dict[str, Any]) -> dict[str, Any]:
    """The whole-volume scan settings a checkpoint names, as stored (unchecked), with the defaults
    of checkpoints written before the entries existed: ``overlap``, the scan's ``attention_levels``
    and the ``lesion_attention_levels`` of lesion-guided runs."""
    options = payload.get("heatmap_options") if isinstance(payload.get("heatmap_options"), dict) else {}
    return {"overlap": payload.get("scan_overlap", LEGACY_SCAN_OVERLAP),
            "attention_levels": options.get("scan_attention_levels", "all"),
            "lesion_attention_levels": options.get("attention_levels", "all")}


def _windows_module():
    from MMCAFNetLib import windows

    return windows


def _check_cancel(cancel: Optional[threading.Event]) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("classification cancelled")


def _has_body(window_array: np.ndarray, preset: Preset) -> bool:
    body_level = float(preset.normalise(np.float32(BODY_HU)))
    return float(np.mean(window_array > body_level)) >= MIN_BODY_FRACTION


def lesion_box_ras(volume: Volume, lesion: Lesion) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The lesion as a RAS box (min corner, max corner), or None to scan the whole CT.

    Accepts a RAS point (3,), a RAS box ((3,), (3,)) whose corners may come in any order, or a mask
    Volume (its non-zero voxels' bounding box). Refuses what lies outside the CT.
    """
    if lesion is None:
        return None
    if isinstance(lesion, Volume):
        mask = lesion.array
        nz = np.argwhere(mask != 0)
        if nz.size == 0:
            raise InputError("the lesion mask is empty; draw the lesion or pass a point instead")
        kmin, kmax = nz.min(axis=0), nz.max(axis=0)
        corners_ijk = np.array(
            [[i, j, k] for i in (kmin[2], kmax[2]) for j in (kmin[1], kmax[1]) for k in (kmin[0], kmax[0])], dtype=float
        )
        ras = lesion.ijk_to_ras_points(corners_ijk)
        lo, hi = ras.min(axis=0), ras.max(axis=0)
    else:
        arr = np.asarray(lesion, dtype=np.float64)
        if arr.shape == (3,):
            if not np.all(np.isfinite(arr)):
                raise InputError(f"the lesion point {arr.tolist()} is not finite")
            if not volume.contains_ras(arr):
                raise InputError(
                    f"the lesion point RAS {_fmt(arr)} lies outside the CT (which spans RAS "
                    f"{_fmt(_extent(volume)[0])} to {_fmt(_extent(volume)[1])}); "
                    "check the coordinates and whether they are RAS or LPS"
                )
            return arr.copy(), arr.copy()
        if arr.shape != (2, 3):
            raise InputError(
                f"a lesion must be a RAS point (3 numbers), a RAS box (2 x 3 numbers) or a mask volume; got shape {arr.shape}"
            )
        if not np.all(np.isfinite(arr)):
            raise InputError("the lesion box has non-finite coordinates")
        lo, hi = arr.min(axis=0), arr.max(axis=0)
    ext_lo, ext_hi = _extent(volume)
    if np.any(hi < ext_lo) or np.any(lo > ext_hi):
        raise InputError(
            f"the lesion box RAS {_fmt(lo)} to {_fmt(hi)} lies outside the CT (RAS {_fmt(ext_lo)} to "
            f"{_fmt(ext_hi)}); check the coordinates and whether they are RAS or LPS"
        )
    return lo, hi


def _fmt(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(x):.1f}" for x in v) + ")"


def _extent(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned RAS bounds of the CT's voxel centres."""
    n = np.array(volume.shape[::-1]) - 1
    corners = np.array([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])], dtype=float)
    ras = volume.ijk_to_ras_points(corners)
    return ras.min(axis=0), ras.max(axis=0)


def prepare_lesion_region(
    volume: Volume, preset: Preset, box_ras: tuple[np.ndarray, np.ndarray]
) -> tuple[Volume, list[tuple[int, int, int]]]:
    """The part of the preset's grid that a lesion's windows cover, and their centres in it.

    The grid is the one ``prepare_volume`` would build for the whole CT, cut to the windows'
    union, so each window holds the same voxels as on the whole prepared CT; only that block is
    resampled, from a source crop with a two-voxel margin for the interpolation. On a 512x512x300
    CT this replaces resampling 78 M voxels by resampling a few hundred thousand.
    """
    win = _windows_module()
    oriented = win.canonical_orientation(volume, contiguous=False)  # a view: only the crop is copied
    affine, shape = win.prepared_grid(oriented, preset)
    grid = Volume(np.broadcast_to(np.float32(0.0), shape), affine)  # geometry only, no voxels
    kji_min, kji_max = win.box_ras_to_kji(grid, *box_ras)
    centers = [tuple(int(v) for v in c) for c in win.window_centers_for_box(grid, kji_min, kji_max, preset)]
    size = np.array(preset.window, dtype=np.int64)
    starts = np.rint(np.array(centers, dtype=np.float64)).astype(np.int64) - size // 2
    lo = np.clip(starts.min(axis=0), 0, np.array(shape))
    hi = np.clip((starts + size).max(axis=0), lo + 1, np.array(shape))
    block_affine = affine.copy()
    block_affine[:3, 3] = affine[:3, :3] @ lo[::-1].astype(np.float64) + affine[:3, 3]
    block_shape = tuple(int(v) for v in hi - lo)

    # Source voxels that can contribute to the block (its corners in source IJK, plus a margin).
    n = np.array(block_shape[::-1], dtype=np.float64) - 1
    corners = np.array([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])])
    block_ras = (np.c_[corners, np.ones(8)] @ block_affine.T)[:, :3]
    src_ijk = oriented.ras_to_ijk_points(block_ras)
    src_shape_ijk = np.array(oriented.shape[::-1])
    src_lo = np.clip(np.floor(src_ijk.min(axis=0)).astype(np.int64) - 2, 0, src_shape_ijk - 1)
    src_hi = np.clip(np.ceil(src_ijk.max(axis=0)).astype(np.int64) + 3, src_lo + 1, src_shape_ijk)
    crop_affine = oriented.ijk_to_ras.copy()
    crop_affine[:3, 3] = oriented.ijk_to_ras[:3, :3] @ src_lo.astype(np.float64) + oriented.ijk_to_ras[:3, 3]
    crop = oriented.array[src_lo[2] : src_hi[2], src_lo[1] : src_hi[1], src_lo[0] : src_hi[0]]
    crop = np.nan_to_num(crop.astype(np.float32), nan=win.AIR_HU, posinf=win.AIR_HU, neginf=win.AIR_HU)
    block = resample_to_grid(Volume(crop, crop_affine), block_affine, block_shape, "linear", default=win.AIR_HU)
    prepared = Volume(block.array.astype(np.float32, copy=False), block_affine, {**volume.meta, "preset": preset.name})
    return prepared, [tuple(int(v) for v in np.array(c) - lo) for c in centers]


def _window_box_ras(ijk_to_ras: np.ndarray, shape_kji: tuple[int, int, int]):
    c = grid_corners_ras(ijk_to_ras, shape_kji)
    return tuple(float(v) for v in c.min(axis=0)), tuple(float(v) for v in c.max(axis=0))


def _window_center_ras(ijk_to_ras: np.ndarray, shape_kji: tuple[int, int, int]) -> np.ndarray:
    centre = (np.array(shape_kji[::-1], dtype=float) - 1) / 2.0
    return (ijk_to_ras @ np.r_[centre, 1.0])[:3]


def _num_outputs(model: torch.nn.Module, payload: dict[str, Any]) -> int:
    config = payload.get("model_config") or {}
    if "num_classes" in config:
        return int(config["num_classes"])
    return 1 if len(payload["class_names"]) == 2 else len(payload["class_names"])


def class_label(name: str) -> str:
    """Display name of a class letter (``A`` -> ``Adenocarcinoma``); unknown names as given."""
    entry = CLASS_LABELS.get(str(name))
    return entry[1] if entry else str(name)


def class_label_value(name: str, index: int) -> int:
    """Labelmap value of a class: the colour table's value for a known letter, else index + 1."""
    entry = CLASS_LABELS.get(str(name))
    return int(entry[0]) if entry else int(index) + 1


def load_predictor(path: str | os.PathLike, device: str = "auto") -> Predictor:
    """Shorthand for :meth:`Predictor.load` (the path may be a ``Path`` or a string)."""
    return Predictor.load(Path(path), device=device)

"""From a cohort table to training and evaluation windows, and from a config to a model.

Each patient's CT is prepared once with the run's preset (``windows.prepare_volume``), through the
preprocessed cache when the run has one (``cache_dir``: the folder ``mmcafnet preprocess`` fills,
or that the first run fills), and cropped to the region its lesion windows can reach (plus the
jitter margin); only that crop is kept in memory. Training items draw one lesion window per
patient (``windows_per_patient`` times per epoch) with slice jitter, in-plane shift, left-right
flip and in-plane rotation (and, when configured, zoom and mirroring along the other axes);
evaluation items are every window covering the lesion (``windows.window_centers_for_box``), with
no augmentation, so a patient's score can be aggregated over them.

Augmentation is a pure function of (seed, epoch, draw position): the data pipeline holds no
random state, so a resumed run and a run split over N processes draw the same windows.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from MMCAFNetLib import windows as win
from MMCAFNetLib.cache import PreprocessCache
from MMCAFNetLib.preset import Preset
from MMCAFNetLib.train.config import TrainConfig
from MMCAFNetLib.volume import Volume, read_volume

BOX_RAS = ("box_ras_min_r", "box_ras_min_a", "box_ras_min_s", "box_ras_max_r", "box_ras_max_a", "box_ras_max_s")


# ----------------------------------------------------------------------------- cohort
def load_cohort(cohort) -> Any:
    """A cohort DataFrame as given, or read (and checked) from a CSV path."""
    import pandas as pd

    if isinstance(cohort, pd.DataFrame):
        return cohort.reset_index(drop=True)
    from MMCAFNetLib.dataset import read_cohort

    return read_cohort(Path(cohort))


def split_cohort(df, config: TrainConfig):
    """(train rows, validation rows) for the task: rows of other classes dropped; with
    ``config.fold`` the validation rows are that fold of train+val, else the ``split`` column."""
    classes = config.class_names
    rows = df[df["label"].isin(classes)]
    if config.fold is None:
        train_df, val_df = rows[rows["split"] == "train"], rows[rows["split"] == "val"]
        where = "split column ('train' / 'val')"
    else:
        pool = rows[rows["split"] != "test"]
        folds = sorted(int(f) for f in pool["fold"].unique() if int(f) >= 0)
        if int(config.fold) not in folds:
            raise ValueError(f"fold {config.fold} is not in the cohort; its folds are {folds}")
        train_df, val_df = pool[pool["fold"] != config.fold], pool[pool["fold"] == config.fold]
        where = f"fold {config.fold}"
    for name, part in (("training", train_df), ("validation", val_df)):
        missing = [c for c in classes if c not in set(part["label"])]
        if len(part) == 0 or missing:
            raise ValueError(
                f"the {name} rows ({where}) of the cohort lack class(es) {missing or classes} for task "
                f"{config.task}; re-split the cohort (mmcafnet index --seed) or use more patients"
            )
    return train_df.reset_index(drop=True), val_df.reset_index(drop=True)


def available_folds(df) -> list[int]:
    pool = df[df["split"] != "test"]
    return sorted(int(f) for f in pool["fold"].unique() if int(f) >= 0)


def lesion_size_mm(row) -> float:
    """Largest side of the lesion's RAS bounding box, in mm (used to report small lesions apart)."""
    lo, hi = _box_ras(row)
    return float(np.max(hi - lo))


# ----------------------------------------------------------------------------- windows
def _box_ras(row) -> tuple[np.ndarray, np.ndarray]:
    """The row's lesion box: RAS minimum and maximum corners, in mm."""
    return (np.array([float(row[c]) for c in BOX_RAS[:3]]), np.array([float(row[c]) for c in BOX_RAS[3:]]))


def _crop(volume: Volume, start: np.ndarray, stop: np.ndarray, fill: float) -> Volume:
    """Sub-volume [start, stop) in (k, j, i), padded with ``fill`` where it leaves the grid."""
    shape = np.array(volume.array.shape)
    out = np.full(tuple(int(v) for v in stop - start), fill, dtype=np.float32)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(stop, shape)
    if np.all(src_hi > src_lo):
        dst_lo = src_lo - start
        dst_hi = dst_lo + (src_hi - src_lo)
        out[dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = volume.array[
            src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]
        ]
    shift = np.eye(4)
    shift[:3, 3] = start[::-1]  # (i, j, k) offset of the crop's first voxel
    return Volume(out, volume.ijk_to_ras @ shift, dict(volume.meta))


@dataclasses.dataclass
class PatientWindows:
    """One patient's prepared crop and the window centres (crop indices) covering the lesion."""

    crop: Volume
    centers: list
    clinical: np.ndarray
    label: int
    patient_id: str
    lesion_size_mm: float
    #: 1 inside the lesion box, 0 elsewhere, on the crop's grid (for attention supervision); None when unused
    box_mask: Optional[np.ndarray] = None
    #: lesion-free windows ``[K, D, H, W]`` (normalised, as the network sees them); None when unused
    negatives: Optional[np.ndarray] = None


def prepare_patient(row, preset: Preset, jitter: tuple[int, int, int], clinical: np.ndarray, label: int,
                    cache: Optional[PreprocessCache] = None, with_box_mask: bool = False,
                    negatives: int = 0, seed: int = 0) -> PatientWindows:
    """The patient's lesion crop; the prepared CT comes from ``cache`` (built there on first use)
    or, without a cache, is read and prepared here."""
    uid = row.get("series_uid") if hasattr(row, "get") else None
    uid = uid if isinstance(uid, str) and uid else None
    if cache is not None:
        prepared = cache.ensure(row["series_path"], preset, uid)
    else:
        prepared = win.prepare_volume(read_volume(row["series_path"], series_uid=uid), preset)
    kmin, kmax = win.box_ras_to_kji(prepared, *_box_ras(row))
    centers = [tuple(int(v) for v in c) for c in win.window_centers_for_box(prepared, kmin, kmax, preset)]
    if not centers:
        centers = [tuple((np.array(kmin) + np.array(kmax)) // 2)]
    cs = np.array(centers)
    half = np.array(preset.window) // 2 + 1
    margin = half + np.array(jitter)
    start = cs.min(axis=0) - margin
    stop = cs.max(axis=0) + margin + 1
    crop = _crop(prepared, start, stop, fill=-1000.0)
    local = [tuple(int(v) for v in (np.array(c) - start)) for c in centers]
    mask = None
    if with_box_mask:
        mask = np.zeros(crop.array.shape, dtype=np.float32)
        lo = np.maximum(np.array(kmin) - start, 0)
        hi = np.minimum(np.array(kmax) - start + 1, np.array(mask.shape))
        if np.all(hi > lo):
            mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1.0
    negative_windows = lesion_free_windows(prepared, preset, kmin, kmax, negatives, seed, str(row["patient_id"]))
    return PatientWindows(crop, local, clinical, label, str(row["patient_id"]), lesion_size_mm(row), mask,
                          negative_windows)


def lesion_free_windows(prepared: Volume, preset: Preset, kmin, kmax, count: int, seed: int,
                        patient_id: str) -> Optional[np.ndarray]:
    """``count`` windows of the prepared CT that a whole-volume scan would evaluate (sliding
    positions reaching the lungs, ``lung_mask.select_scan_windows``, with some body in them) and
    that do not touch the lesion box; drawn reproducibly from (seed, patient). Those are the
    windows whose maps compete with the lesion's in a scan, lung and vessels and chest wall, not
    the air and shoulders the scan never looks at. None when ``count`` is 0 or no such window exists."""
    if count <= 0:
        return None
    import hashlib

    from MMCAFNetLib.lung_mask import select_scan_windows

    size = np.array(preset.window)
    lo_box, hi_box = np.array(kmin), np.array(kmax)
    body_level = float(preset.normalise(np.float32(-900.0)))
    candidates = []
    for c in select_scan_windows(prepared, preset, win.sliding_window_centers(prepared, preset)).kept:
        start = np.array(c) - size // 2
        if np.all(start <= hi_box) and np.all(start + size - 1 >= lo_box):
            continue  # overlaps the lesion
        candidates.append(c)
    if not candidates:
        return None
    key = int.from_bytes(hashlib.sha256(patient_id.encode("utf-8")).digest()[:4], "little")
    rng = np.random.default_rng([int(seed), key])
    picked = []
    for i in rng.permutation(len(candidates)):
        array = win.cut_window(prepared, candidates[int(i)], preset).array
        if float(np.mean(array > body_level)) >= 0.002:  # the inference's "not air only" rule
            picked.append(np.asarray(array, dtype=np.float32))
        if len(picked) == count:
            break
    return np.stack(picked) if picked else None


def jitter_margin(preset: Preset, jitter_slices: int, shift_fraction: float = 0.125) -> tuple[int, int, int]:
    """Largest shift of a training window's centre (slices, rows, columns): ``shift_fraction`` of
    the window in-plane (an eighth by default). The training crop keeps this margin around the
    lesion windows."""
    return (int(jitter_slices), int(preset.window[1] * shift_fraction), int(preset.window[2] * shift_fraction))


class LesionWindowDataset(Dataset):
    """Windows around each patient's lesion; see the module docstring.

    Items: ``{"image": [1, D, H, W] float32, "clinical": [F] float32, "label": int, "patient": str,
    "index": int, "lesion_size_mm": float}``. Training items are keyed by the sampler's
    ``(index, draw, epoch)``; evaluation items by a plain index (one per window).
    """

    def __init__(self, patients: list[PatientWindows], preset: Preset, train: bool, seed: int = 0,
                 windows_per_patient: int = 1, jitter_slices: int = 2, rotate_degrees: float = 15.0,
                 flip: bool = True, augment: bool = True, record_dropout: float = 0.0,
                 unknown_clinical: Optional[np.ndarray] = None, scale_range: float = 0.0,
                 mirror_all_axes: bool = False, shift_fraction: float = 0.125, negatives_per_window: int = 1):
        self.patients = patients
        self.preset = preset
        self.train = train
        self.seed = int(seed)
        self.windows_per_patient = int(windows_per_patient)
        self.jitter_slices = int(jitter_slices)
        self.rotate_degrees = float(rotate_degrees)
        self.flip = flip
        self.scale_range = float(scale_range)
        self.mirror_all_axes = bool(mirror_all_axes)
        self.shift_fraction = float(shift_fraction)
        self.negatives_per_window = int(negatives_per_window)
        #: per patient, the indices of the lesion-free windows to draw from (``set_hard_negatives``); None = all
        self.hard_negatives: Optional[list[np.ndarray]] = None
        self.augment = augment and train
        self.record_dropout = float(record_dropout) if train else 0.0
        if self.record_dropout and unknown_clinical is None:
            raise ValueError("record_dropout needs unknown_clinical (the encoding of an all-unknown record)")
        self.unknown_clinical = unknown_clinical
        self.epoch = 0
        if train:
            self.items = [(p, None) for p in range(len(patients)) for _ in range(self.windows_per_patient)]
        else:
            self.items = [(p, c) for p, pw in enumerate(patients) for c in range(len(pw.centers))]
        self.labels = [patients[p].label for p, _ in self.items]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_hard_negatives(self, scores: Optional[list[np.ndarray]], keep: int) -> None:
        """Draw each patient's lesion-free windows from the ``keep`` that ``scores`` (one value per
        window of ``negatives``, higher = harder) rank highest, ties to the earlier window; None
        draws from all again."""
        if scores is None:
            self.hard_negatives = None
            return
        if len(scores) != len(self.patients):
            raise ValueError(f"{len(scores)} score arrays for {len(self.patients)} patients")
        self.hard_negatives = [np.sort(np.argsort(-np.asarray(s, dtype=np.float64), kind="stable")[:max(int(keep), 1)])
                               for s in scores]

    def __len__(self) -> int:
        return len(self.items)

    def _window(self, pw: PatientWindows, center, rng: Optional[np.random.Generator]
                ) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The image window (augmented when ``rng`` is given) and, when the patient has a box mask,
        the mask's window under the same shift and augmentation (else None)."""
        center = np.array(center)
        if rng is not None:
            slices, *inplane = jitter_margin(self.preset, self.jitter_slices, self.shift_fraction)
            shift_inplane = np.array(inplane)
            center = center + np.r_[
                rng.integers(-slices, slices + 1),
                rng.integers(-shift_inplane, shift_inplane + 1),
            ]
        array = np.asarray(win.cut_window(pw.crop, tuple(int(v) for v in center), self.preset).array, dtype=np.float32)
        mask = None
        if pw.box_mask is not None:
            mask = _cut(pw.box_mask, center, self.preset.window)
        if rng is not None:
            mask_rng = copy.deepcopy(rng) if mask is not None else None  # the same draws as the image's
            options = dict(rotate_degrees=int(self.rotate_degrees), flip_probability=0.5 if self.flip else 0.0,
                           scale_range=self.scale_range, mirror_all_axes=self.mirror_all_axes)
            array = win.augment(array, rng, self.preset, **options)
            if mask is not None:
                mask = win.augment(mask, mask_rng, None, fill=0.0, **options)
        return array, mask

    def __getitem__(self, key) -> dict[str, Any]:
        if isinstance(key, (tuple, list)):
            index, draw, epoch = (int(v) for v in key)
        else:
            index, draw, epoch = int(key), int(key), self.epoch
        p, c = self.items[index]
        pw = self.patients[p]
        clinical = pw.clinical
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, draw, index])
            center = pw.centers[int(rng.integers(len(pw.centers)))]
            array, mask = self._window(pw, center, rng if self.augment else None)
            # drawn last, and only when on, so runs without it keep their augmentation draws
            if self.record_dropout and rng.random() < self.record_dropout:
                clinical = self.unknown_clinical
        else:
            array, mask = self._window(pw, pw.centers[c], None)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(array))[None],
            "clinical": torch.from_numpy(clinical),
            "label": pw.label,
            "patient": pw.patient_id,
            "index": index,
            "lesion_size_mm": pw.lesion_size_mm,
        }
        if mask is not None:
            item["box_mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
        if self.train and pw.negatives is not None:
            # a separate generator, so the lesion window's draws stay as they are without negatives
            nrng = np.random.default_rng([self.seed, epoch, draw, index, 1])
            choices = self.hard_negatives[p] if self.hard_negatives is not None else np.arange(len(pw.negatives))
            drawn = []
            for _ in range(self.negatives_per_window):
                negative = pw.negatives[int(choices[int(nrng.integers(len(choices)))])]
                if self.augment:
                    negative = win.augment(negative, nrng, self.preset, rotate_degrees=int(self.rotate_degrees),
                                           flip_probability=0.5 if self.flip else 0.0)
                drawn.append(np.ascontiguousarray(negative, dtype=np.float32))
            item["negative"] = torch.from_numpy(np.stack(drawn))[:, None]  # [n, 1, D, H, W]
        return item


def _cut(array: np.ndarray, center, size) -> np.ndarray:
    """The window of ``size`` (D, H, W) centred on ``center`` as ``windows.cut_window`` places it; 0 outside."""
    size = np.array(size, dtype=np.int64)
    start = np.rint(np.asarray(center, dtype=np.float64)).astype(np.int64) - size // 2
    out = np.zeros(tuple(size), dtype=np.float32)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, np.array(array.shape))
    if np.all(hi > lo):
        out[lo[0] - start[0]:hi[0] - start[0], lo[1] - start[1]:hi[1] - start[1], lo[2] - start[2]:hi[2] - start[2]] = \
            array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return out


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    extra = {key: torch.stack([b[key] for b in batch]) for key in ("box_mask", "negative")
             if all(key in b for b in batch)}
    return {
        **extra,
        "image": torch.stack([b["image"] for b in batch]),
        "clinical": torch.stack([b["clinical"] for b in batch]),
        "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
        "patient": [b["patient"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        "lesion_size_mm": torch.tensor([b["lesion_size_mm"] for b in batch], dtype=torch.float64),
    }


def build_dataset(df, config: TrainConfig, schema, preset: Preset, train: bool,
                  progress: Optional[bool] = None, class_names: Optional[list[str]] = None) -> LesionWindowDataset:
    """Prepare every patient of ``df`` (progress bar on request) and wrap them as a dataset."""
    classes = list(class_names or config.class_names)
    records = df[list(schema.field_names)].to_dict(orient="records")
    clinical = schema.encode(records).astype(np.float32) if len(records) else np.zeros((0, schema.num_features), np.float32)
    jitter = jitter_margin(preset, config.jitter_slices, config.shift_fraction) if train else (0, 0, 0)
    rows = list(df.to_dict(orient="records"))
    show = config.progress if progress is None else progress
    iterator = rows
    if show and rows:
        from tqdm import tqdm

        iterator = tqdm(rows, desc=f"prepare {'train' if train else 'eval'} CTs", leave=False, dynamic_ncols=True)
    cache = PreprocessCache(config.cache_dir) if config.cache_dir else None
    with_mask = bool(train and config.attention_supervision > 0)
    negatives = int(config.attention_negatives) if with_mask else 0
    patients = [
        prepare_patient(row, preset, jitter, clinical[i], classes.index(row["label"]), cache, with_mask,
                        negatives, config.seed)
        for i, row in enumerate(iterator)
    ]
    unknown = schema.encode([{}])[0].astype(np.float32)  # every field "unknown": the fitted imputations
    return LesionWindowDataset(patients, preset, train, config.seed, config.windows_per_patient,
                               config.jitter_slices, config.rotate_degrees, config.flip, config.augment,
                               config.record_dropout, unknown, config.scale_range, config.mirror_all_axes,
                               config.shift_fraction, config.attention_negatives_per_window)


# ----------------------------------------------------------------------------- models
def _image_encoder_settings(model_name: str, num_outputs: int, num_clinical: int, overrides: dict) -> dict:
    """The image-encoder fields of ``model_name``'s configuration (with overrides applied)."""
    from MMCAFNetLib.models import ImageEncoderConfig, model_config

    full = model_config(model_name, num_classes=num_outputs, num_clinical=num_clinical, **overrides)
    if not isinstance(full, ImageEncoderConfig):
        raise ValueError(f"the paper recipe's stages 1 and 2 need a model with an image encoder; {model_name!r} has none")
    names = {f.name for f in dataclasses.fields(ImageEncoderConfig)} - {"num_classes", "num_clinical"}
    return {k: v for k, v in full.to_dict().items() if k in names}


def model_identity(config: TrainConfig, num_clinical: int) -> tuple[str, dict]:
    """(registry name, create_model keyword arguments) of the network this run trains.

    Paper stages 1 and 2 train the image-only counterpart of ``config.model`` (its image encoder
    with a linear head); stage 3 and the default recipe train ``config.model`` itself.
    """
    from MMCAFNetLib.train.recipes import paper_stage_image_only

    overrides = dict(config.model_overrides)
    if config.recipe == "paper" and paper_stage_image_only(config.stage):
        settings = _image_encoder_settings(config.model, config.num_outputs, num_clinical, overrides)
        return "image-only", {**settings, "num_classes": config.num_outputs, "num_clinical": num_clinical}
    return config.model, {**overrides, "num_classes": config.num_outputs, "num_clinical": num_clinical}


def build_model(name: str, kwargs: dict) -> torch.nn.Module:
    from MMCAFNetLib.models import create_model

    return create_model(name, **kwargs)


def load_initial_weights(model: torch.nn.Module, path: str, parts: Optional[list[str]] = None) -> dict[str, Any]:
    """Copy the tensors of checkpoint ``path`` whose names and shapes match ``model`` (restricted to
    the name prefixes ``parts`` when given). Returns what was copied, for the provenance."""
    from MMCAFNetLib.checkpoint import load_checkpoint

    payload = load_checkpoint(path)
    source = payload["state_dict"]
    target = model.state_dict()
    copied = {}
    for k, v in source.items():
        if parts and not any(k.startswith(p + ".") for p in parts):
            continue
        if k in target and tuple(target[k].shape) == tuple(v.shape):
            copied[k] = v
    if not copied:
        raise ValueError(
            f"--init {path}: none of its weights fit model {getattr(model, 'name', type(model).__name__)!r}"
            + (f" in part(s) {parts}" if parts else "")
        )
    model.load_state_dict(copied, strict=False)
    return {"checkpoint": str(path), "model_name": payload["model_name"], "tensors_copied": len(copied),
            "parts": list(parts or [])}

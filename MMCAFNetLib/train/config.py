"""Training configuration: one flat, JSON-serialisable record of every choice a run makes.

Precedence, lowest first: the dataclass defaults, the recipe (``paper`` stage N or ``default``),
the JSON file given with ``--config``, then explicit command-line options. The resolved
configuration is written to the run folder and stored in every checkpoint, so a run can be
repeated exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

TASKS = {"AG": ["A", "G"], "ABEG": ["A", "B", "E", "G"]}


@dataclass
class TrainConfig:
    # what to train
    model: str = "mmcafnet-lite"
    task: str = "AG"
    recipe: str = "default"
    stage: Optional[int] = None  # paper recipe: 1 backbone, 2 pyramid, 3 fusion
    model_overrides: dict = field(default_factory=dict)  # passed to create_model(**overrides)
    freeze: list = field(default_factory=list)  # parts passed to models.freeze
    init: Optional[str] = None  # checkpoint whose matching weights start the run (stages 2 and 3)
    init_parts: list = field(default_factory=list)  # only these name prefixes from --init (empty: all)
    preset: Any = "default"  # preset name or Preset.to_dict()
    # optimisation
    epochs: int = 30
    batch_size: int = 4
    grad_accum: int = 1
    optimizer: str = "adamw"  # "sgd" | "adamw"
    lr: float = 3e-4
    momentum: float = 0.9
    dampening: float = 0.0
    weight_decay: float = 0.05
    warmup_iters: int = 0  # linear warm-up, counted in optimiser steps
    warmup_fraction: float = 0.05  # used when warmup_iters == 0: share of all steps
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    loss: str = "focal"  # "focal" | "bce" | "ce"
    focal_gamma: float = 2.0
    focal_alpha: Optional[float] = None
    label_smoothing: float = 0.0
    balanced_sampling: bool = True  # draw classes equally often (sampling with replacement)
    # data
    windows_per_patient: int = 1  # training windows drawn per patient per epoch
    augment: bool = True
    jitter_slices: int = 2
    rotate_degrees: float = 15.0
    flip: bool = True  # left-right, as the reference
    # largest in-plane shift of a training window's centre from the lesion, as a share of the
    # window: at 0.125 the lesion always sits near the centre, and a map can "localise" it by
    # pointing at the window's centre; a larger shift puts it anywhere, so the map must find it
    shift_fraction: float = 0.125
    # nnU-Net-style extras, off by default: isotropic zoom by a factor in [1 - s, 1 + s], and
    # mirroring front-back and head-foot (lesion appearance does not depend on either)
    scale_range: float = 0.0
    mirror_all_axes: bool = False
    # share of training items whose clinical record is presented as all "unknown" (the schema's
    # imputed values): the model learns to classify from the image when the form is left empty,
    # and its image branch cannot lean on the record alone
    record_dropout: float = 0.0
    # weight of the weak box supervision of the spatial-attention (SAB) maps: each level's map is
    # pushed towards 1 inside the lesion box and 0 outside (train.losses.attention_box_loss), so
    # the model's own attention becomes a lesion map; 0 = off (the paper recipe)
    attention_supervision: float = 0.0
    # with attention supervision: lesion-free windows prepared per patient (sliding-window
    # positions away from the lesion, air and body alike, as a whole-volume scan sees them); each
    # training window brings one along whose attention is pushed to 0 everywhere, so the map stays
    # dark where there is no lesion; 0 = none
    attention_negatives: int = 0
    # with attention_negatives: how many of them each training window brings along
    attention_negatives_per_window: int = 1
    # hard-negative mining (train.mining): every attention_mining_every epochs the current model
    # scores each patient's lesion-free windows and the next epochs draw from the
    # attention_hard_negatives hottest of them; 0 = draw from all (no mining)
    attention_hard_negatives: int = 0
    attention_mining_every: int = 1
    # with attention supervision: weight of the peak terms (train.losses.attention_peak_loss): the
    # combined map's highest cell in the box pushed up, outside it and in lesion-free windows down;
    # the cell means alone leave the few hot cells that decide a whole-volume scan's peak; 0 = off
    attention_peak: float = 0.0
    # with attention supervision: what a map cell is pushed towards: "share" (the share of the cell
    # inside the lesion box) or "touch" (1 for every cell the box touches), so that a lesion
    # smaller than a cell still asks for a full-strength cell
    attention_box_target: str = "share"
    num_workers: int = 0
    cache_dir: Optional[str] = None
    # validation and stopping
    threshold_method: str = "youden"
    aggregate: str = "max"
    early_stopping_patience: int = 10  # epochs without a better validation AUROC; 0 = off
    selection_metric: str = "auroc"
    # k-fold: None uses the cohort's split column; an int K uses fold K as validation
    fold: Optional[int] = None
    # execution
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0  # CPU threads for torch (0 = torch's default); 1 helps on oversubscribed machines
    amp: bool = True  # bf16 autocast on CUDA where supported, fp16 with a scaler otherwise
    channels_last: bool = True  # channels_last_3d on CUDA
    batchnorm: str = "auto"  # "auto" (sync under CUDA DDP) | "train" | "sync" | "frozen"
    # stochastic depth rule while training: "sample" drops each sample's residual branch on its
    # own and rescales the survivors by 1 / survival (unbiased); "batch" drops the branch for the
    # whole batch without rescaling, as the reference code does (the paper recipe)
    stochastic_depth: str = "sample"
    keep_epoch_checkpoints: bool = False  # also keep checkpoints/epoch-NNN.pt
    stop_after_epochs: Optional[int] = None  # stop as if killed (tests resumption)
    progress: bool = True
    demo: bool = False  # the checkpoint is trained on synthetic data
    # the heatmap method the checkpoint recommends (the Predictor's default for it): "attention"
    # or "gradcam"; chosen by the localisation measured with `mmcafnet evaluate --localisation`
    heatmap: str = "attention"
    # which pyramid levels' attention maps make that heatmap: "all" (their mean) or "finest" (the
    # finest level alone, the sharpest), for lesion-guided runs and for whole-volume scans apart
    # (measured: docs/training.md). Training is the same either way (the peak terms of
    # attention_peak are on the mean); it is the Predictor's choice for this checkpoint
    heatmap_levels: str = "all"
    scan_heatmap_levels: str = "all"
    # which maps the peak terms (attention_peak) and the mining rank: "all" (the mean of the levels,
    # whatever the Predictor shows) or "shown" (the maps the Predictor shows: heatmap_levels with a
    # lesion, scan_heatmap_levels for the lesion-free windows and in the lesion windows too)
    attention_peak_maps: str = "all"
    # overlap of neighbouring windows when the Predictor scans a whole CT without a lesion mark:
    # at 0.5 every lesion lies within a quarter window of some window's centre, where the model
    # was trained to find it (shift_fraction); about 3.4x the windows of 0.25
    scan_overlap: float = 0.25

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def peak_levels(self) -> tuple[str, str]:
        """The pyramid levels of the maps the peak terms and the mining use: (lesion-guided map,
        whole-volume map), by ``attention_peak_maps``."""
        if self.attention_peak_maps == "shown":
            return self.heatmap_levels, self.scan_heatmap_levels
        return "all", "all"

    @property
    def class_names(self) -> list[str]:
        return list(TASKS[self.task])

    @property
    def num_outputs(self) -> int:
        """One logit for a binary task (positive = the second class), else one per class."""
        n = len(self.class_names)
        return 1 if n == 2 else n

    def validate(self) -> TrainConfig:
        """Refuse inconsistent settings with a message naming the setting and the allowed values."""
        from MMCAFNetLib.windows import MAX_SCAN_OVERLAP, is_scan_overlap

        checks = [
            (self.task in TASKS, f"task must be one of {sorted(TASKS)}, got {self.task!r}"),
            (self.recipe in ("paper", "default"), f"recipe must be 'paper' or 'default', got {self.recipe!r}"),
            (self.stage in (None, 1, 2, 3), f"stage must be 1, 2 or 3, got {self.stage!r}"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.grad_accum >= 1, "grad_accum must be at least 1"),
            (self.optimizer in ("sgd", "adamw"), f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}"),
            (self.lr > 0, "lr must be positive"),
            (self.loss in ("focal", "bce", "ce"), f"loss must be 'focal', 'bce' or 'ce', got {self.loss!r}"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must lie in [0, 1)"),
            (self.threshold_method in ("youden", "accuracy"), "threshold_method must be 'youden' or 'accuracy'"),
            (self.aggregate in ("max", "mean"), "aggregate must be 'max' or 'mean'"),
            (self.batchnorm in ("auto", "train", "sync", "frozen"), "batchnorm must be auto, train, sync or frozen"),
            (self.windows_per_patient >= 1, "windows_per_patient must be at least 1"),
            (0.0 <= self.record_dropout <= 1.0, "record_dropout must lie in [0, 1]"),
            (self.attention_supervision >= 0.0, "attention_supervision must be >= 0 (0 = off)"),
            (self.attention_negatives >= 0, "attention_negatives must be >= 0 (0 = none)"),
            (self.attention_negatives_per_window >= 1, "attention_negatives_per_window must be >= 1"),
            (self.attention_hard_negatives >= 0, "attention_hard_negatives must be >= 0 (0 = no mining)"),
            (self.attention_mining_every >= 1, "attention_mining_every must be >= 1 (epochs)"),
            (self.attention_peak >= 0.0, "attention_peak must be >= 0 (0 = off)"),
            (self.attention_box_target in ("share", "touch"), "attention_box_target must be 'share' or 'touch'"),
            (0.0 <= self.shift_fraction < 0.5, "shift_fraction must lie in [0, 0.5)"),
            (self.heatmap in ("attention", "gradcam", "gradcam++"), "heatmap must be 'attention', 'gradcam' or 'gradcam++'"),
            (self.heatmap_levels in ("all", "finest"), "heatmap_levels must be 'all' or 'finest'"),
            (self.scan_heatmap_levels in ("all", "finest"), "scan_heatmap_levels must be 'all' or 'finest'"),
            (self.attention_peak_maps in ("all", "shown"), "attention_peak_maps must be 'all' or 'shown'"),
            (is_scan_overlap(self.scan_overlap), f"scan_overlap must lie in [0, {MAX_SCAN_OVERLAP}] (0.5 = half a window)"),
            (self.stochastic_depth in ("sample", "batch"), "stochastic_depth must be 'sample' or 'batch'"),
            (0.0 <= self.scale_range < 1.0, "scale_range must lie in [0, 1) (e.g. 0.1 for a +-10 % zoom)"),
            (self.selection_metric in ("auroc", "loss"), "selection_metric must be 'auroc' or 'loss'"),
        ]
        if self.recipe == "paper" and self.stage in (2, 3) and not self.init:
            checks.append((False, f"paper stage {self.stage} starts from the stage-{self.stage - 1} checkpoint: "
                                  f"pass --init RUN_OF_STAGE_{self.stage - 1}/best.pt"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"training configuration: {message}")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown training setting(s) {unknown}; known settings: {sorted(known)}"
            )
        return cls(**d)

    def updated(self, overrides: dict[str, Any]) -> TrainConfig:
        d = self.to_dict()
        known = set(d)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known settings: {sorted(known)}")
        d.update(overrides)
        return TrainConfig(**d)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON object of settings; keys starting with '_' are comments and ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"training config {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"training config {path} must hold a JSON object of settings")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def resolve_config(
    recipe: Optional[str] = None,
    stage: Optional[int] = None,
    config_file: Optional[str | Path] = None,
    overrides: Optional[dict[str, Any]] = None,
) -> TrainConfig:
    """Defaults < recipe < config file < explicit overrides (None values in overrides are ignored)."""
    from MMCAFNetLib.train.recipes import recipe_settings

    file_settings = read_config_file(config_file) if config_file else {}
    explicit = {k: v for k, v in (overrides or {}).items() if v is not None}
    recipe = explicit.get("recipe", file_settings.get("recipe", recipe or "default"))
    stage = explicit.get("stage", file_settings.get("stage", stage))
    config = TrainConfig().updated(recipe_settings(recipe, stage))
    config = config.updated(file_settings).updated(explicit)
    return config.validate()

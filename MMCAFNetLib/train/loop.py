"""The training loop: one run (one fold) from a cohort table to a run folder of checkpoints and logs.

Run folder layout::

    config.json          the resolved TrainConfig
    log.csv, log.json    one row per epoch (train loss, validation loss/AUROC/metrics, lr, seconds)
    last.pt              resumable: model checkpoint + optimiser, scheduler, sampler, RNG state
    best.pt              model checkpoint with the best validation AUROC (macro for 4 classes)
    checkpoints/epoch-NNN.pt   (only with keep_epoch_checkpoints)
    summary.json         best epoch, its validation metrics, threshold, stop reason

Every file is written atomically (temp file + rename). All checkpoint files load with
``torch.load(weights_only=True)``: RNG states are stored as tensors, everything else as plain data.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from MMCAFNetLib import __version__, atomic
from MMCAFNetLib.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from MMCAFNetLib.evaluate.aggregation import aggregate_by_patient
from MMCAFNetLib.evaluate.metrics import (
    binary_metrics,
    expected_calibration_error,
    multiclass_metrics,
    roc_auc,
    select_threshold,
)
from MMCAFNetLib.plain import to_plain as plain
from MMCAFNetLib.strict_json import dumps as strict_dumps
from MMCAFNetLib.train import distributed as D
from MMCAFNetLib.train.config import TrainConfig
from MMCAFNetLib.train.losses import (
    attention_background_loss,
    attention_box_loss,
    attention_peak_loss,
    build_loss,
)
from MMCAFNetLib.train.mining import is_mining_epoch, score_lesion_free_windows
from MMCAFNetLib.train.sampling import EpochSampler

LAST = "last.pt"
BEST = "best.pt"


# ----------------------------------------------------------------------------- small utilities
def single_sample_remainder(samples: int, batch_size: int) -> bool:
    """True when an epoch would end with a batch of one sample, which BatchNorm cannot train on
    (one value per channel has no variance): that sample is left out of this epoch (the sampler
    shuffles, so another one sits out next epoch). Fewer than two samples cannot train at all."""
    if samples < 2:
        raise ValueError(
            f"training needs at least 2 samples per process, got {samples}: BatchNorm cannot learn from a "
            "batch of one. Add patients to the training split (or use fewer processes)."
        )
    return batch_size > 1 and samples % batch_size == 1


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text_atomic(path, text, newline="")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch generator states as tensors (loadable with weights_only=True)."""
    version, py_state, _ = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": torch.tensor([version, *py_state], dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_cached": torch.tensor([cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"].tolist()
    random.setstate((int(py[0]), tuple(int(v) for v in py[1:]), None))
    pos, has_gauss = state["numpy_pos"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss),
         float(state["numpy_cached"].item()))
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def data_fingerprint(df) -> str:
    """SHA-256 of the rows (identity, label, split, lesion box, clinical values) the run used."""
    cols = [c for c in df.columns if c not in ("series_path",)]
    text = df[sorted(cols)].sort_values("patient_id").to_csv(index=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def lr_factor(step: int, total_steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` (per optimiser step)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """The configured warm-up, capped at a tenth of the run so short runs reach the full rate."""
    w = config.warmup_iters if config.warmup_iters > 0 else round(config.warmup_fraction * total_steps)
    return int(min(w, total_steps // 10)) if config.warmup_iters > 0 else int(w)


# ----------------------------------------------------------------------------- model setup
def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def apply_batchnorm_mode(model: nn.Module, mode: str) -> None:
    """``frozen``: BatchNorm layers use and keep their running statistics (eval mode) while their
    affine parameters still train. Needed for exact 1-process == N-process equivalence on CPU,
    where SyncBatchNorm is unavailable, and useful with tiny per-device batches."""
    if mode != "frozen":
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def resolved_batchnorm(config: TrainConfig, device: torch.device, ctx: D.DistributedContext) -> str:
    if config.batchnorm != "auto":
        return config.batchnorm
    return "sync" if (ctx.enabled and device.type == "cuda") else "train"


def autocast_context(device: torch.device, enabled: bool):
    """bf16 (or fp16) autocast on CUDA; fp32 everywhere else. Not on CPU, even with AVX512-BF16/AMX:
    oneDNN's bf16 Conv3d weight gradient there (torch 2.13) reads memory it never wrote when the
    kernel overhangs a small feature map (3x3x3 over the 2x4x4 deepest pyramid level of a small
    window), so the weight gradients held NaN or garbage left behind by earlier work."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_windows(model: nn.Module, loader, device: torch.device, config: TrainConfig,
                    ctx: D.DistributedContext, progress: bool = False) -> dict[int, tuple[str, int, list[float]]]:
    """Window probabilities {window index: (patient, label, probabilities)} gathered from all ranks."""
    model.eval()
    rows: dict[int, tuple[str, int, list[float]]] = {}
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="validate", leave=False, dynamic_ncols=True)
    for batch in iterator:
        image = batch["image"].to(device, non_blocking=True)
        if config.channels_last and device.type == "cuda":
            image = image.contiguous(memory_format=torch.channels_last_3d)
        clinical = batch["clinical"].to(device, non_blocking=True)
        with autocast_context(device, config.amp):
            logits = model(image, clinical).logits.float()
        probs = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
        probs = probs.cpu().numpy()
        for i, idx in enumerate(batch["index"].tolist()):
            p = probs[i]
            rows[int(idx)] = (str(batch["patient"][i]), int(batch["label"][i]), np.atleast_1d(p).tolist())
    merged: dict[int, tuple[str, int, list[float]]] = {}
    for part in D.gather_objects(rows, ctx):
        merged.update(part)
    return merged


def window_loss(rows: dict[int, tuple[str, int, list[float]]], loss_fn: nn.Module, binary: bool) -> float:
    if not rows:
        return float("nan")
    probs = torch.tensor([r[2] for r in rows.values()], dtype=torch.float64).clamp(1e-7, 1 - 1e-7)
    labels = torch.tensor([r[1] for r in rows.values()])
    logits = torch.logit(probs[:, 0]).unsqueeze(1) if binary else probs.log()
    return float(loss_fn(logits, labels))


def patient_metrics(rows: dict[int, tuple[str, int, list[float]]], binary: bool, aggregate: str,
                    threshold: Optional[float], threshold_method: str) -> dict[str, Any]:
    """Patient-level metrics; for a binary task the threshold is chosen here when ``threshold`` is None."""
    order = sorted(rows)
    ids = [rows[i][0] for i in order]
    labels = [rows[i][1] for i in order]
    probs = np.asarray([rows[i][2] for i in order], dtype=np.float64)
    if binary:
        probs = probs[:, 0]
    patients, p, y = aggregate_by_patient(ids, probs, labels, aggregate)
    out: dict[str, Any] = {"num_patients": len(patients), "num_windows": len(order)}
    if binary:
        if threshold is None:
            threshold = select_threshold(y, p, threshold_method)
        out["auroc"] = roc_auc(y, p)
        out.update(binary_metrics(y, p, threshold))
        out["ece"] = expected_calibration_error(y, p)
    else:
        m = multiclass_metrics(y, p)
        out.update(m)
        out["ece"] = expected_calibration_error(y, p)
        out["threshold"] = 0.5
    return plain(out)


# ----------------------------------------------------------------------------- the run

def training_threads(num_threads: int = 0) -> int:
    """CPU threads for training: the config's ``num_threads``, else ``MMCAFNET_THREADS`` (the one
    thread setting of the library, as for inference), else 0 (torch's default)."""
    from MMCAFNetLib.optimize import THREADS_ENV

    if num_threads > 0:
        return int(num_threads)
    forced = os.environ.get(THREADS_ENV, "").strip()
    if not forced:
        return 0
    try:
        return max(1, int(forced))
    except ValueError:
        raise ValueError(f"{THREADS_ENV} must be a whole number of threads, got {forced!r}") from None

class Trainer:
    """One training run (one fold). ``Trainer(config, cohort_df, out_dir).fit(resume=...)``."""

    def __init__(self, config: TrainConfig, cohort, out_dir: str | Path, command: Optional[str] = None,
                 ctx: Optional[D.DistributedContext] = None, device: Optional[torch.device] = None):
        from MMCAFNetLib.train import data as data_module

        self.config = config
        self.out_dir = Path(out_dir)
        self.command = command if command is not None else " ".join(sys.argv)
        self.ctx = ctx or D.context_from_environment()
        self.device = device or D.device_for(config.device, self.ctx)
        self.binary = config.num_outputs == 1
        self.cohort = cohort
        self.train_df, self.val_df = data_module.split_cohort(cohort, config)
        self.data = data_module
        from MMCAFNetLib.evaluate.seen import seen_patients_record

        #: hashed IDs of the training and validation patients, so evaluation can refuse them
        self.seen_patients = seen_patients_record(self.train_df, self.val_df)

    # -- construction
    def _build(self) -> None:
        from MMCAFNetLib.ehr import default_schema
        from MMCAFNetLib.preset import get_preset

        config = self.config
        threads = training_threads(config.num_threads)
        if threads > 0:
            torch.set_num_threads(threads)
        seed_everything(config.seed)
        self.schema = default_schema().fit(self.train_df)
        self.preset = get_preset(config.preset)
        self.train_set = self.data.build_dataset(self.train_df, config, self.schema, self.preset, train=True)
        self.val_set = self.data.build_dataset(self.val_df, config, self.schema, self.preset, train=False)
        self.model_name, self.model_overrides = self.data.model_identity(config, self.schema.num_features)
        seed_everything(config.seed)  # the initial weights depend on the seed only
        model = self.data.build_model(self.model_name, self.model_overrides)
        if config.init:
            self.init_info = self.data.load_initial_weights(model, config.init, list(config.init_parts) or None)
        else:
            self.init_info = {}
        if config.stochastic_depth != "sample":
            from MMCAFNetLib.models.backbone import set_stochastic_depth_rule

            set_stochastic_depth_rule(model, config.stochastic_depth)
        if config.freeze:
            from MMCAFNetLib.models import freeze

            freeze(model, list(config.freeze))
        self.bn_mode = resolved_batchnorm(config, self.device, self.ctx)
        if self.bn_mode == "sync":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if config.channels_last and self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last_3d)
        self.raw_model = model
        if self.ctx.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("every parameter is frozen; nothing to train (check 'freeze' and '--stage')")
        self.num_trainable = sum(p.numel() for p in params)
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                             dampening=config.dampening, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.loss_fn = build_loss(config.loss, config.num_outputs, config.focal_gamma, config.focal_alpha,
                                  config.label_smoothing)
        self.eval_loss_fn = build_loss(config.loss, config.num_outputs, config.focal_gamma, config.focal_alpha, 0.0)
        self.sampler = EpochSampler(self.train_set.labels, seed=config.seed, shuffle=True,
                                    balanced=config.balanced_sampling, num_replicas=self.ctx.world_size,
                                    rank=self.ctx.rank)
        per_rank_batch = self._per_rank_batch()
        self.train_loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=per_rank_batch, sampler=self.sampler,
            drop_last=single_sample_remainder(len(self.sampler), per_rank_batch),
            num_workers=config.num_workers, collate_fn=self.data.collate,
        )
        val_sampler = EpochSampler([0] * len(self.val_set), shuffle=False, num_replicas=self.ctx.world_size,
                                   rank=self.ctx.rank)
        self.val_loader = torch.utils.data.DataLoader(
            self.val_set, batch_size=per_rank_batch, sampler=val_sampler, num_workers=config.num_workers,
            collate_fn=self.data.collate,
        )
        batches = len(self.train_loader)
        self.steps_per_epoch = max(1, math.ceil(batches / config.grad_accum))
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup = warmup_steps(config, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total_steps, self.warmup, config.min_lr_ratio)
        )
        use_scaler = config.amp and self.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    def _per_rank_batch(self) -> int:
        b = self.config.batch_size
        if b % self.ctx.world_size:
            raise ValueError(
                f"batch_size {b} (the global batch) must be divisible by the number of processes "
                f"{self.ctx.world_size}"
            )
        return b // self.ctx.world_size

    # -- checkpoint payloads
    def model_payload(self, metrics: dict[str, Any], threshold: float, epoch: int) -> dict[str, Any]:
        config = self.config
        state = {k: v.detach().cpu().clone() for k, v in unwrap(self.raw_model).state_dict().items()}
        return {
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "model_config": plain(dict(self.model_overrides)),
            "class_names": config.class_names,
            "task": config.task,
            "state_dict": state,
            "schema": self.schema.to_dict(),
            "preset": self.preset.to_dict(),
            "threshold": float(threshold),
            "provenance": {
                "data_fingerprint": data_fingerprint(self.cohort),
                "train_patients": len(self.train_df),
                "val_patients": len(self.val_df),
                "seed": config.seed,
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "library_version": __version__,
                "torch_version": str(torch.__version__),
                "command": self.command,
                "recipe": config.recipe,
                "stage": config.stage,
                "fold": config.fold,
                "epoch": epoch,
                "world_size": self.ctx.world_size,
                "device": str(self.device),
                "init": self.init_info,
            },
            "metrics": plain(metrics),
            "demo": bool(config.demo),
            "seen_patients": self.seen_patients,
            "heatmap": config.heatmap,
            "heatmap_options": {"attention_levels": config.heatmap_levels,
                                "scan_attention_levels": config.scan_heatmap_levels},
            "scan_overlap": float(config.scan_overlap),
            "train_config": plain(config.to_dict()),
        }

    def training_state(self, epoch: int, step: int) -> dict[str, Any]:
        rngs = D.gather_objects(rng_state(), self.ctx)
        return {
            "epoch": epoch,
            "global_step": step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rngs,
            "best_score": list(self.best_score),
            "best_epoch": self.best_epoch,
            "best_metrics": plain(self.best_metrics),
            "bad_epochs": self.bad_epochs,
            "history": plain(self.history),
            "world_size": self.ctx.world_size,
            "config": plain(self.config.to_dict()),
            "negative_scores": (None if self.negative_scores is None
                                else [torch.from_numpy(np.asarray(v, dtype=np.float32)) for v in self.negative_scores]),
        }

    def _restore(self) -> int:
        payload = load_checkpoint(self.out_dir / LAST)
        state = payload.get("training_state")
        if state is None:
            raise ValueError(f"{self.out_dir / LAST} holds no training state; it cannot be resumed")
        unwrap(self.raw_model).load_state_dict(payload["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        rngs = state["rng"]
        set_rng_state(rngs[self.ctx.rank] if len(rngs) == self.ctx.world_size else rngs[0])
        self.best_score = tuple(state["best_score"])
        self.best_epoch = int(state["best_epoch"])
        self.best_metrics = dict(state["best_metrics"])
        self.bad_epochs = int(state["bad_epochs"])
        self.history = list(state["history"])
        self.global_step = int(state["global_step"])
        if state.get("negative_scores") is not None:  # the mined ranking in force when the run stopped
            self.negative_scores = [v.numpy() for v in state["negative_scores"]]
            self.train_set.set_hard_negatives(self.negative_scores, self.config.attention_hard_negatives)
        return int(state["epoch"])

    # -- logging
    def _write_logs(self) -> None:
        write_text_atomic(self.out_dir / "log.json", strict_dumps(self.history, indent=2) + "\n")
        keys: list[str] = []
        for row in self.history:
            keys += [k for k in row if k not in keys and not isinstance(row[k], (list, dict))]
        from io import StringIO

        buf = StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.history)
        write_text_atomic(self.out_dir / "log.csv", buf.getvalue())

    # -- one epoch
    def _mine_negatives(self, epoch: int) -> None:
        """Hard-negative mining before ``epoch`` (train.mining); the ranks share the scoring and
        all get the same ranking, so all ranks draw alike."""
        config = self.config
        if not is_mining_epoch(epoch, config.attention_hard_negatives, config.attention_mining_every):
            return

        def forward(model, image, clinical):
            with autocast_context(self.device, config.amp):
                return model(image, clinical)

        self.negative_scores = score_lesion_free_windows(self.raw_model, self.train_set.patients, self.device,
                                                         forward, batch_size=max(self._per_rank_batch(), 16),
                                                         levels=config.peak_levels[1], ctx=self.ctx)
        self.train_set.set_hard_negatives(self.negative_scores, config.attention_hard_negatives)

    def _train_epoch(self, epoch: int) -> float:
        config = self.config
        self._mine_negatives(epoch)
        self.model.train()
        apply_batchnorm_mode(self.raw_model, self.bn_mode)
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        iterator = self.train_loader
        bar = None
        if config.progress and self.ctx.is_main:
            from tqdm import tqdm

            bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                       dynamic_ncols=True)
            iterator = bar
        total, count = 0.0, 0
        batches = len(self.train_loader)
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(iterator):
            image = batch["image"].to(self.device, non_blocking=True)
            if config.channels_last and self.device.type == "cuda":
                image = image.contiguous(memory_format=torch.channels_last_3d)
            clinical = batch["clinical"].to(self.device, non_blocking=True)
            target = batch["label"].to(self.device)
            boundary = (i + 1) % config.grad_accum == 0 or (i + 1) == batches
            sync_context = self.model.no_sync() if (self.ctx.enabled and not boundary) else _null_context()
            with sync_context:
                negatives = batch.get("negative")
                batch_size = image.shape[0]
                if negatives is not None:  # lesion-free windows ride along in the same forward pass
                    per_window = negatives.shape[1]
                    image = torch.cat([image, negatives.flatten(0, 1).to(self.device, non_blocking=True)])
                    clinical = torch.cat([clinical, clinical.repeat_interleave(per_window, dim=0)])
                with autocast_context(self.device, config.amp):
                    out = self.model(image, clinical)
                loss = self.loss_fn(out.logits[:batch_size].float(), target)
                if config.attention_supervision > 0:
                    mask = batch["box_mask"].to(self.device, non_blocking=True)
                    maps = list(out.attention)
                    lesion_maps = [m[:batch_size] for m in maps]
                    free_maps = [m[batch_size:] for m in maps] if negatives is not None else None
                    attention_loss = attention_box_loss(lesion_maps, mask, config.attention_box_target)
                    if free_maps is not None:
                        attention_loss = attention_loss + attention_background_loss(free_maps)
                    if config.attention_peak > 0:
                        levels, scan_levels = config.peak_levels
                        attention_loss = attention_loss + config.attention_peak * attention_peak_loss(
                            lesion_maps, mask, free_maps, levels=levels, scan_levels=scan_levels)
                    loss = loss + config.attention_supervision * attention_loss
                self.scaler.scale(loss / config.grad_accum).backward()
            if boundary:
                if config.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in self.raw_model.parameters() if p.requires_grad], config.grad_clip
                    )
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.global_step += 1
            total += float(loss.detach()) * len(target)
            count += len(target)
            if bar is not None:
                bar.set_postfix(loss=f"{total / max(count, 1):.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        if bar is not None:
            bar.close()
        mean_loss = total / max(count, 1)
        return D.all_reduce_mean(mean_loss, self.ctx)

    def _score(self, metrics: dict[str, Any]) -> tuple[float, float]:
        auroc = metrics.get("auroc", float("nan"))
        loss = metrics.get("loss", float("nan"))
        if self.config.selection_metric == "loss" or auroc is None or math.isnan(auroc):
            return (-loss if not math.isnan(loss) else -math.inf, 0.0)
        return (auroc, -loss if not math.isnan(loss) else -math.inf)

    # -- the whole run
    def fit(self, resume: bool = False) -> dict[str, Any]:
        threads = torch.get_num_threads()
        try:
            return self._fit(resume)
        finally:
            torch.set_num_threads(threads)  # num_threads applies to this run only

    def _fit(self, resume: bool) -> dict[str, Any]:
        config = self.config
        self._build()
        self.best_score: tuple[float, ...] = (-math.inf, -math.inf)
        self.best_epoch = -1
        self.best_metrics: dict[str, Any] = {}
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []
        self.global_step = 0
        self.negative_scores: Optional[list[np.ndarray]] = None
        start_epoch = 0
        if resume:
            if not (self.out_dir / LAST).is_file():
                raise FileNotFoundError(f"--resume: no {LAST} in {self.out_dir}; start without --resume")
            start_epoch = self._restore()
        elif (self.out_dir / LAST).is_file():
            raise ValueError(
                f"{self.out_dir} already holds a run ({LAST}); pass --resume to continue it or choose a new --out"
            )
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out_dir / "config.json", strict_dumps(plain(config.to_dict()), indent=2) + "\n")
        stop_reason = "completed"
        for epoch in range(start_epoch, config.epochs):
            if self.bad_epochs and config.early_stopping_patience and self.bad_epochs >= config.early_stopping_patience:
                stop_reason = "early stopping"
                break
            t0 = time.perf_counter()
            train_loss = self._train_epoch(epoch)
            rows = predict_windows(self.model, self.val_loader, self.device, config, self.ctx)
            metrics = patient_metrics(rows, self.binary, config.aggregate, None, config.threshold_method)
            metrics["loss"] = window_loss(rows, self.eval_loss_fn, self.binary)
            score = self._score(metrics)
            improved = score > self.best_score
            if improved:
                self.best_score, self.best_epoch, self.best_metrics = score, epoch + 1, metrics
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
            row = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_loss": metrics["loss"],
                "val_auroc": metrics.get("auroc"),
                "val_accuracy": metrics.get("accuracy"),
                "val_threshold": metrics.get("threshold"),
                "lr": self.optimizer.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - t0, 3),
                "best": improved,
            }
            self.history.append(plain(row))
            payload = self.model_payload(metrics, metrics.get("threshold", 0.5), epoch + 1)
            state = self.training_state(epoch + 1, self.global_step)
            if self.ctx.is_main:
                if improved:
                    save_checkpoint(payload, self.out_dir / BEST)
                if config.keep_epoch_checkpoints:
                    save_checkpoint(payload, self.out_dir / "checkpoints" / f"epoch-{epoch + 1:03d}.pt")
                save_checkpoint({**payload, "training_state": state}, self.out_dir / LAST)
                self._write_logs()
                print(
                    f"epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.4f}, val loss "
                    f"{metrics['loss']:.4f}, val AUROC {metrics.get('auroc', float('nan')):.4f}, "
                    f"{row['seconds']:.0f} s" + (" (best)" if improved else ""),
                    file=sys.stderr,
                    flush=True,
                )
            D.barrier(self.ctx)
            if config.stop_after_epochs is not None and epoch + 1 - start_epoch >= config.stop_after_epochs:
                stop_reason = "stopped on request"
                break
        summary = {
            "stop_reason": stop_reason,
            "epochs_completed": len(self.history),
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "threshold": self.best_metrics.get("threshold", 0.5),
            "trainable_parameters": self.num_trainable,
            "train_patients": len(self.train_df),
            "val_patients": len(self.val_df),
            "train_windows": len(self.train_set),
            "val_windows": len(self.val_set),
            "model": self.model_name,
            "task": config.task,
            "fold": config.fold,
        }
        if self.ctx.is_main:
            write_text_atomic(self.out_dir / "summary.json", strict_dumps(plain(summary), indent=2) + "\n")
        return plain(summary)


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def train(config: TrainConfig, cohort, out_dir: str | Path, resume: bool = False,
          command: Optional[str] = None, all_folds: bool = False) -> dict[str, Any]:
    """Train one run, or with ``all_folds`` every fold of train+val in turn (run folders
    ``fold-K``) followed by a summary across folds (``folds-summary.json``).

    ``cohort`` is a cohort table (DataFrame) or the path of one.
    """
    from MMCAFNetLib.train import data as data_module

    cohort_df = data_module.load_cohort(cohort)
    out_dir = Path(out_dir)
    ctx = D.context_from_environment()
    device = D.device_for(config.device, ctx)
    ctx = D.init_distributed(device)
    try:
        if all_folds:
            folds = data_module.available_folds(cohort_df)
            results = []
            for k in folds:
                fold_config = config.updated({"fold": int(k)})
                fold_dir = out_dir / f"fold-{k}"
                fold_resume = resume and (fold_dir / LAST).is_file()
                if resume and (fold_dir / "summary.json").is_file():
                    summary = json.loads((fold_dir / "summary.json").read_text())
                    if summary.get("stop_reason") != "stopped on request":
                        results.append(summary)
                        continue
                trainer = Trainer(fold_config, cohort_df, fold_dir, command, ctx, device)
                results.append(trainer.fit(resume=fold_resume))
            summary = summarise_folds(results)
            if ctx.is_main:
                write_text_atomic(out_dir / "folds-summary.json", strict_dumps(summary, indent=2) + "\n")
            return summary
        return Trainer(config, cohort_df, out_dir, command, ctx, device).fit(resume=resume)
    finally:
        D.shutdown(ctx)


def summarise_folds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over folds of each numeric best-epoch validation metric.

    Each fold's best epoch and threshold are chosen on its own validation patients, so the summary
    describes model selection, not held-out performance; it says so (``what_this_is``).
    """
    keys = ["auroc", "accuracy", "f1", "sensitivity", "specificity", "ppv", "npv", "ece", "loss", "macro_f1"]
    table: dict[str, Any] = {}
    for k in keys:
        vals = [r["best_metrics"].get(k) for r in results if isinstance(r.get("best_metrics", {}).get(k), (int, float))]
        vals = [v for v in vals if not math.isnan(v)]
        if vals:
            table[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                        "values": vals}
    return {
        "folds": [r.get("fold") for r in results],
        "validation": table,
        "what_this_is": (
            "mean and SD over folds of each fold's best-epoch validation metrics; each fold's epoch and "
            "decision threshold were chosen on that same fold's patients, so these figures are optimistic "
            "(selection, not held-out, estimates). For a held-out estimate evaluate on patients no fold saw "
            "(the test split or a new cohort) with mmcafnet evaluate."
        ),
        "runs": results,
    }

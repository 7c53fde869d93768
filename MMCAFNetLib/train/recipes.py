"""The two documented training recipes.

``paper`` reproduces the reference protocol, one command per stage:
  1. the image encoder trained on images alone (the ``image-only`` counterpart of the model: its
     image encoder with a linear head); only the backbone is carried forward;
  2. pyramid, attention, readout and head trained afresh on the frozen stage-1 backbone, image-only;
  3. the multimodal model (clinical encoder + fusion + classifier) trained with the whole image
     encoder frozen.
Each stage starts from the previous stage's checkpoint (``--init``). Binary focal loss (gamma 2,
no alpha), SGD lr 1e-4 momentum 0.9 dampening 0.9 weight decay 1e-3, cosine schedule with linear
warm-up stepped per iteration (10,000 warm-up iterations as the reference, capped at a tenth of
the run so short runs still reach the full rate), batch 4, 50 epochs, no class balancing.
The one change from the reference: the best checkpoint is chosen by validation AUROC instead of
validation loss, and the threshold is chosen on validation data.

``default`` is the recipe this library recommends: the whole network trained end to end in one
run with AdamW (lr 3e-4, weight decay 0.05: adaptive steps cope with the very different gradient
scales of the KAN, the fusion and the 3D convolutions, which plain SGD at 1e-4 trains very
slowly), cosine decay after a 5 % warm-up, class-balanced sampling (Lung-PET-CT-Dx has about
four adenocarcinomas per squamous carcinoma, and the 4-class task has rare classes), focal loss
(gamma 2: the paper's emphasis on hard cases; sigmoid for the binary task, softmax for four
classes) with label smoothing 0.1 (less over-confident, better calibrated probabilities),
gradient clipping at 1.0, augmentation, 30 epochs with early stopping after 10 epochs without a
better validation AUROC. Freezing most of the network as in
stage 3 leaves about 6.6 k trainable parameters and lets the image encoder never see the clinical
context; end-to-end training lets each modality adapt to the other.
"""

from __future__ import annotations

from typing import Any, Optional

PAPER_COMMON: dict[str, Any] = {
    "recipe": "paper",
    "preset": "paper",
    "epochs": 50,
    "batch_size": 4,
    "optimizer": "sgd",
    "lr": 1e-4,
    "momentum": 0.9,
    "dampening": 0.9,
    "weight_decay": 1e-3,
    "warmup_iters": 10000,
    "min_lr_ratio": 0.0,
    "loss": "focal",
    "focal_gamma": 2.0,
    "focal_alpha": None,
    "label_smoothing": 0.0,
    "balanced_sampling": False,
    "grad_clip": 0.0,
    "early_stopping_patience": 0,
    "seed": 0,
    "jitter_slices": 6,
    "rotate_degrees": 15.0,
    "attention_supervision": 0.0,
    "attention_negatives": 0,
    "attention_peak": 0.0,
    "attention_box_target": "share",
    "stochastic_depth": "batch",
}

#: What each paper stage trains; the parts are names understood by ``models.freeze``.
PAPER_STAGES: dict[int, dict[str, Any]] = {
    1: {"stage": 1, "freeze": [], "init_parts": [], "image_only": True},
    2: {"stage": 2, "freeze": ["backbone"], "init_parts": ["image_encoder.backbone"], "image_only": True},
    3: {"stage": 3, "freeze": ["image_encoder"], "init_parts": ["image_encoder"], "image_only": False},
}

DEFAULT_RECIPE: dict[str, Any] = {
    "recipe": "default",
    "preset": "default",
    "epochs": 30,
    "batch_size": 4,
    "optimizer": "adamw",
    "lr": 3e-4,
    "weight_decay": 0.05,
    "warmup_iters": 0,
    "warmup_fraction": 0.05,
    "min_lr_ratio": 0.01,
    "loss": "focal",
    "focal_gamma": 2.0,
    "label_smoothing": 0.1,
    "balanced_sampling": True,
    "grad_clip": 1.0,
    "early_stopping_patience": 10,
    "freeze": [],
    "stage": None,
}


def recipe_settings(name: str, stage: Optional[int] = None) -> dict[str, Any]:
    """Settings of a recipe (and, for ``paper``, of one stage; default stage 3, the full model)."""
    if name == "default":
        if stage is not None:
            raise ValueError("--stage applies to the paper recipe only; the default recipe trains end to end")
        return dict(DEFAULT_RECIPE)
    if name == "paper":
        stage = 3 if stage is None else int(stage)
        if stage not in PAPER_STAGES:
            raise ValueError(f"the paper recipe has stages 1, 2 and 3, not {stage}")
        settings = dict(PAPER_COMMON)
        stage_settings = dict(PAPER_STAGES[stage])
        stage_settings.pop("image_only")
        settings.update(stage_settings)
        return settings
    raise ValueError(f"unknown recipe {name!r}; choose 'paper' or 'default'")


def paper_stage_image_only(stage: Optional[int]) -> bool:
    """Whether a paper stage trains the image-only counterpart of the model (stages 1 and 2)."""
    return bool(PAPER_STAGES[stage]["image_only"]) if stage in PAPER_STAGES else False

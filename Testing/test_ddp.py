"""Distributed training: 2 gloo processes under torchrun with the same global batch end with the
same weights as 1 process.

Exact equivalence needs every source of per-process randomness or per-process statistics out of
the way: the sampler gives rank r the positions r, r+2, ... of the one global order, augmentation
is a function of (seed, epoch, draw position), DDP averages the gradients of two half-batches
(= the gradient of the whole batch), dropout and stochastic depth are switched off in the model
config, and BatchNorm runs with ``batchnorm: "frozen"`` (running statistics, affine parameters
trained): SyncBatchNorm does not run on CPU, and per-process batch statistics over half-batches
would legitimately differ from those of the full batch. GroupNorm (the backbone) is per-sample
and needs nothing. The optimiser is SGD (see the config below for why not AdamW).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

synthetic = pytest.importorskip("MMCAFNetLib.synthetic", reason="the synthetic cohort writer is not available")

from train_support import TINY_MODEL as BASE_MODEL  # noqa: E402
from train_support import TINY_PRESET, tiny_cohort  # noqa: E402

from MMCAFNetLib.checkpoint import load_checkpoint  # noqa: E402
from MMCAFNetLib.cli import main as cli_main  # noqa: E402

#: The shared tiny network with nothing random inside it.
TINY_MODEL = {
    **BASE_MODEL,
    "final_survival_prob": 1.0,
    "level_dropout": 0.0,
    "readout_dropout": 0.0,
    "fusion_dropout": 0.0,
}


def _train_with_one_and_two_processes(cohort, config: dict, tmp_path) -> tuple[dict, dict]:
    """Train ``config`` in this process and under torchrun with 2 gloo processes; both last.pt."""
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    common = ["train", "--cohort", str(cohort), "--config", str(config_file), "--no-progress"]
    assert cli_main([*common, "--out", str(tmp_path / "one")]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "MMCAFNetLib.cli", *common, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path_factory, tmp_path):
    cohort = tiny_cohort(tmp_path_factory)
    config = {
        "_comment": "tiny deterministic run for the DDP equivalence test",
        "recipe": "default",
        "model": "mmcafnet-lite",
        "model_overrides": TINY_MODEL,
        "preset": TINY_PRESET,
        "epochs": 2,
        "batch_size": 4,
        "batchnorm": "frozen",
        # SGD, not AdamW: Adam divides by sqrt(v), so an element whose gradient is ~0 takes a full
        # +-lr step whose sign follows float rounding noise; SGD keeps rounding differences small
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "device": "cpu",
        "seed": 5,
        "num_threads": 1,
    }
    one, two = _train_with_one_and_two_processes(cohort, config, tmp_path)
    assert two["provenance"]["world_size"] == 2 and one["provenance"]["world_size"] == 1
    assert one["training_state"]["global_step"] == two["training_state"]["global_step"] == 4
    for key, a in one["state_dict"].items():
        b = two["state_dict"][key]
        assert torch.allclose(a.float(), b.float(), atol=2e-5, rtol=1e-4), (key, (a.float() - b.float()).abs().max())
    # and training did move the weights away from the (seeded) initial ones
    from MMCAFNetLib.train import data
    from MMCAFNetLib.train.config import resolve_config
    from MMCAFNetLib.train.loop import seed_everything

    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    resolved = resolve_config(None, None, None, settings)
    seed_everything(resolved.seed)
    name, kwargs = data.model_identity(resolved, 7)
    initial = data.build_model(name, kwargs).state_dict()
    moved = max(float((initial[k].float() - v.float()).abs().max()) for k, v in one["state_dict"].items())
    assert moved > 1e-4
    # the validation metrics were gathered from both ranks: every validation patient is counted once
    assert two["metrics"]["num_patients"] == one["metrics"]["num_patients"]
    assert two["metrics"]["auroc"] == pytest.approx(one["metrics"]["auroc"], abs=1e-6)
    # only rank 0 wrote: one log with one row per epoch
    assert len(json.loads((tmp_path / "two" / "log.json").read_text())) == 2


@pytest.mark.slow
def test_mining_under_two_gloo_processes_matches_one_process(tmp_path_factory, tmp_path):
    """Hard-negative mining under DDP: the ranks share the scoring and gather it; the ranking in
    force and the weights equal a single process's."""
    cohort = tiny_cohort(tmp_path_factory)
    config = {
        "recipe": "default", "model": "mmcafnet-lite", "model_overrides": TINY_MODEL, "preset": TINY_PRESET,
        "epochs": 2, "batch_size": 4, "batchnorm": "frozen", "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
        "device": "cpu", "seed": 5, "num_threads": 1,
        "attention_supervision": 1.0, "attention_negatives": 6, "attention_hard_negatives": 2,
        "attention_mining_every": 1, "attention_peak": 1.0,
    }
    one, two = _train_with_one_and_two_processes(cohort, config, tmp_path)
    scores_one, scores_two = one["training_state"]["negative_scores"], two["training_state"]["negative_scores"]
    assert scores_one is not None and len(scores_one) == len(scores_two) == 8  # every training patient scored
    assert all(len(s) for s in scores_one)
    for a, b in zip(scores_one, scores_two):
        assert torch.allclose(a, b, atol=1e-4), (a, b)
    for key, a in one["state_dict"].items():
        b = two["state_dict"][key]
        assert torch.allclose(a.float(), b.float(), atol=2e-5, rtol=1e-4), (key, (a.float() - b.float()).abs().max())

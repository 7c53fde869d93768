"""Training on a tiny synthetic cohort: the loss falls, a resumed run equals an uninterrupted one,
checkpoints load with weights_only=True, the threshold comes from validation data, and the
evaluate command reports at that threshold."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

synthetic = pytest.importorskip("MMCAFNetLib.synthetic", reason="the synthetic cohort writer is not available")

from train_support import TINY_MODEL, TINY_PRESET, tiny_cohort  # noqa: E402

from MMCAFNetLib.checkpoint import REQUIRED_KEYS, load_checkpoint  # noqa: E402
from MMCAFNetLib.cli import main as cli_main  # noqa: E402
from MMCAFNetLib.evaluate.metrics import binary_metrics, roc_auc, select_threshold  # noqa: E402
from MMCAFNetLib.train.config import resolve_config  # noqa: E402


def tiny_config(**overrides):
    settings = {
        "model": "mmcafnet-lite",
        "model_overrides": dict(TINY_MODEL),
        "preset": dict(TINY_PRESET),
        "epochs": 2,
        "batch_size": 4,
        "progress": False,
        "seed": 11,
        "num_threads": 1,  # a shared CI machine runs a tiny network faster on one thread
    }
    settings.update(overrides)
    return resolve_config("default", None, None, settings)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return tiny_cohort(tmp_path_factory)


def _training_loss(state_dict, config, cohort_path) -> float:
    """Mean loss of a model over every lesion window of the training patients (eval mode, no augmentation)."""
    from MMCAFNetLib.ehr import default_schema
    from MMCAFNetLib.preset import get_preset
    from MMCAFNetLib.train import data
    from MMCAFNetLib.train.losses import build_loss

    df = data.load_cohort(cohort_path)
    train_df, _ = data.split_cohort(df, config)
    schema = default_schema().fit(train_df)
    dataset = data.build_dataset(train_df, config, schema, get_preset(config.preset), train=False)
    name, kwargs = data.model_identity(config, schema.num_features)
    model = data.build_model(name, kwargs)
    model.load_state_dict(state_dict)
    model.eval()
    batch = data.collate([dataset[i] for i in range(len(dataset))])
    loss = build_loss(config.loss, 1, config.focal_gamma, None, 0.0)
    with torch.no_grad():
        return float(loss(model(batch["image"], batch["clinical"]).logits, batch["label"]))


def test_two_epochs_lower_the_training_loss(cohort, tmp_path):
    from MMCAFNetLib.train import data
    from MMCAFNetLib.train.loop import seed_everything, train

    config = tiny_config(lr=2e-3, windows_per_patient=3, label_smoothing=0.0, augment=False)
    summary = train(config, cohort, tmp_path / "run")
    assert summary["epochs_completed"] == 2
    # the initial weights: the run seeds right before building the model
    seed_everything(config.seed)
    name, kwargs = data.model_identity(config, 7)
    initial = data.build_model(name, kwargs).state_dict()
    final = load_checkpoint(tmp_path / "run" / "last.pt")["state_dict"]
    before, after = _training_loss(initial, config, cohort), _training_loss(final, config, cohort)
    assert after < before, (before, after)
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2] and all(math.isfinite(r["train_loss"]) for r in log)
    assert (tmp_path / "run" / "log.csv").read_text().splitlines()[0].startswith("epoch,train_loss")


def test_checkpoint_contents_and_validation_threshold(cohort, tmp_path):
    from MMCAFNetLib.train.loop import train

    config = tiny_config(epochs=1, demo=True)
    train(config, cohort, tmp_path / "run")
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert set(REQUIRED_KEYS) <= set(best)
    assert best["class_names"] == ["A", "G"] and best["task"] == "AG" and best["demo"] is True
    assert best["model_config"]["num_classes"] == 1 and best["schema"]["fields"]
    prov = best["provenance"]
    assert len(prov["data_fingerprint"]) == 64 and prov["seed"] == 11 and prov["library_version"]
    # the last checkpoint carries the resumable state and also loads with weights_only=True
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    state = last["training_state"]
    assert {"optimizer", "scheduler", "sampler", "rng"} <= set(state) and state["epoch"] == 1
    assert isinstance(state["rng"][0]["torch"], torch.Tensor)

    # The threshold is the one select_threshold picks on the VALIDATION patients' scores, which we
    # recompute here independently with the saved weights.
    from MMCAFNetLib.evaluate.aggregation import aggregate_by_patient
    from MMCAFNetLib.evaluate.pipeline import predict_cohort
    from MMCAFNetLib.train import data

    df = data.load_cohort(cohort)
    val = df[df["split"] == "val"].reset_index(drop=True)
    rows = predict_cohort(best, val, torch.device("cpu"), progress=False)
    ids = [rows[i][0] for i in sorted(rows)]
    labels = [rows[i][1] for i in sorted(rows)]
    probs = np.array([rows[i][2][0] for i in sorted(rows)])
    _, p, y = aggregate_by_patient(ids, probs, labels, "max")
    assert best["threshold"] == pytest.approx(select_threshold(y, p, "youden"), abs=1e-5)
    assert best["metrics"]["auroc"] == pytest.approx(roc_auc(y, p), abs=1e-6)

    # the checkpoint records its patients (hashed): evaluating the training split is refused ...
    assert best["seen_patients"]["train"]["series"] and best["heatmap"] == "attention"
    assert best["scan_overlap"] == 0.25 and best["heatmap_options"] == {"attention_levels": "all",
                                                                      "scan_attention_levels": "all"}
    out = tmp_path / "report"
    with pytest.raises(SystemExit, match="seen by the model"):
        cli_main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--cohort", str(cohort),
                  "--split", "train", "--out", str(out), "--bootstrap", "50", "--no-progress"])
    assert not out.exists()
    # ... unless asked for (the only other split here): metrics at the checkpoint's threshold
    code = cli_main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--cohort", str(cohort),
                     "--split", "train", "--out", str(out), "--bootstrap", "50", "--no-progress", "--allow-seen"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seen_patients"]["seen"] == metrics["num_patients"] == metrics["seen_patients"]["seen_train"]
    assert metrics["threshold"] == pytest.approx(best["threshold"])
    ys = np.array([0 if r["label"] == "A" else 1 for r in metrics["patients"]])
    ps = np.array([r["probability"] for r in metrics["patients"]])
    expected = binary_metrics(ys, ps, best["threshold"])
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
    # the same evaluation from a preprocessed cache (filled on first use): same patients, same scores
    # up to the cache's whole-HU storage
    code = cli_main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--cohort", str(cohort),
                     "--split", "train", "--out", str(tmp_path / "report-cached"), "--bootstrap", "50",
                     "--no-progress", "--cache", str(tmp_path / "cache"), "--allow-seen"])
    assert code == 0
    cached = json.loads((tmp_path / "report-cached" / "metrics.json").read_text())
    assert [r["patient_id"] for r in cached["patients"]] == [r["patient_id"] for r in metrics["patients"]]
    np.testing.assert_allclose([r["probability"] for r in cached["patients"]], ps, atol=2e-3)
    assert len(list((tmp_path / "cache" / "arrays").glob("*.npy"))) == len(ps)
    report = (out / "report.md").read_text()
    assert "| Method | AUROC | ACC | F1 | Spec | Sens | PPV | NPV |" in report and "synthetic" in report
    assert (out / "roc.png").stat().st_size > 1000 and (out / "calibration.png").stat().st_size > 1000
    # and the Predictor (Slicer, CLI) loads what training wrote, with the same threshold
    from MMCAFNetLib.inference import Predictor

    predictor = Predictor.load(tmp_path / "run" / "best.pt", device="cpu")
    assert predictor.is_demo and predictor.decision_threshold == pytest.approx(best["threshold"])


def test_resume_after_stop_equals_uninterrupted_run(cohort, tmp_path):
    from MMCAFNetLib.train.loop import train

    train(tiny_config(), cohort, tmp_path / "straight")
    train(tiny_config(stop_after_epochs=1), cohort, tmp_path / "resumed")
    first = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert first["training_state"]["epoch"] == 1
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config(), cohort, tmp_path / "resumed")  # refusing to overwrite a run silently
    assert cli_main(["train", "--cohort", str(cohort), "--out", str(tmp_path / "resumed"), "--resume",
                     "--no-progress"]) == 0
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["training_state"]["epoch"] == b["training_state"]["epoch"] == 2
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6, rtol=1e-5), key
    opt_a, opt_b = a["training_state"]["optimizer"]["state"], b["training_state"]["optimizer"]["state"]
    for k in opt_a:
        assert torch.allclose(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"], atol=1e-6, rtol=1e-5)
    assert a["training_state"]["scheduler"]["last_epoch"] == b["training_state"]["scheduler"]["last_epoch"]
    assert torch.equal(a["training_state"]["rng"][0]["torch"], b["training_state"]["rng"][0]["torch"])
    assert len(json.loads((tmp_path / "resumed" / "log.json").read_text())) == 2


def test_cache_option_reaches_the_run_settings(cohort, tmp_path, capsys):
    assert cli_main(["train", "--cohort", str(cohort), "--out", str(tmp_path / "x"), "--cache", str(tmp_path / "c"),
                     "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["cache_dir"] == str(tmp_path / "c")


def test_bad_settings_are_refused_clearly(cohort, tmp_path):
    with pytest.raises(ValueError, match="unknown training setting"):
        tiny_config(learning_rate=0.1)
    with pytest.raises(ValueError, match="task"):
        tiny_config(task="AB")
    assert cli_main(["train", "--cohort", str(cohort), "--out", str(tmp_path / "x"), "--recipe", "default",
                     "--stage", "2"]) == 2
    assert cli_main(["train", "--cohort", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x")]) == 2


def test_paper_recipe_stages_chain(cohort, tmp_path):
    """Stage 1 image-only, stage 2 on the frozen stage-1 backbone, stage 3 fusion on the frozen encoder."""
    from MMCAFNetLib.train.loop import train

    common = {"model": "mmcafnet-lite", "model_overrides": dict(TINY_MODEL), "preset": dict(TINY_PRESET),
              "epochs": 1, "progress": False, "seed": 2, "num_threads": 1}
    runs = {}
    for stage in (1, 2, 3):
        init = str(runs[stage - 1] / "best.pt") if stage > 1 else None
        config = resolve_config("paper", stage, None, {**common, "init": init})
        runs[stage] = tmp_path / f"stage{stage}"
        summary = train(config, cohort, runs[stage])
        assert summary["epochs_completed"] == 1
    s1, s2, s3 = (load_checkpoint(runs[s] / "best.pt") for s in (1, 2, 3))
    assert s1["model_name"] == s2["model_name"] == "image-only" and s3["model_name"] == "mmcafnet-lite"
    assert s3["model_config"]["stage_channels"] == [16, 32, 64]  # the tiny encoder went all the way through
    backbone = [k for k in s1["state_dict"] if k.startswith("image_encoder.backbone.") and k.endswith("weight")]
    pyramid = [k for k in s2["state_dict"] if k.startswith("image_encoder.pyramid.") and k.endswith("weight")]
    assert backbone and pyramid
    for k in backbone:  # frozen in stage 2, and still in stage 3
        assert torch.equal(s1["state_dict"][k], s2["state_dict"][k]) and torch.equal(s2["state_dict"][k], s3["state_dict"][k])
    for k in pyramid:  # trained in stage 2, frozen in stage 3
        assert torch.equal(s2["state_dict"][k], s3["state_dict"][k])
    assert any(not torch.equal(s1["state_dict"][k], s2["state_dict"][k]) for k in pyramid)
    with pytest.raises(ValueError, match="--init"):
        resolve_config("paper", 3, None, common)


def test_recipes_resolve_as_documented():
    paper3 = resolve_config("paper", 3, None, {"init": "stage2.pt"})
    assert (paper3.optimizer, paper3.lr, paper3.momentum, paper3.dampening, paper3.weight_decay) == (
        "sgd", 1e-4, 0.9, 0.9, 1e-3)
    assert (paper3.loss, paper3.focal_gamma, paper3.batch_size, paper3.epochs) == ("focal", 2.0, 4, 50)
    assert paper3.freeze == ["image_encoder"] and resolve_config("paper", 2, None, {"init": "x"}).freeze == ["backbone"]
    default = resolve_config("default")
    assert default.optimizer == "adamw" and default.balanced_sampling and default.freeze == []

"""``mmcafnet demo``: one synthetic case classified by the bundled demo model, written as files.

The quickest way to see the whole pipeline work: no download, no data, under a minute on a
laptop CPU. The case is a phantom with a known class, so the output can be checked against it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="mmcafnet-demo", metavar="DIR", help="output folder (default: ./mmcafnet-demo)")
    parser.add_argument("--label", help="class of the synthetic case (default: drawn from the model's classes)")
    parser.add_argument("--seed", type=int, default=2025, help="seed of the synthetic case")
    parser.add_argument("--size", type=int, default=128, help="in-plane size of the synthetic CT in pixels")
    parser.add_argument("--whole-volume", action="store_true",
                        help="scan the whole CT with sliding windows instead of using the lesion point")
    parser.add_argument("--heatmap", choices=("model", "attention", "gradcam", "gradcam++", "none"), default="model",
                        help="heatmap method; model (default): the one the checkpoint recommends, chosen by "
                             "measured localisation (mmcafnet info shows it)")
    parser.add_argument("--threshold", type=float, default=0.5, help="heatmap level drawn into the labelmap")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--checkpoint", metavar="CKPT", help="another model instead of the bundled demo model")


def run(args: argparse.Namespace) -> int:
    from MMCAFNetLib.cli import UsageError
    from MMCAFNetLib.inference import Predictor, write_outputs
    from MMCAFNetLib.synthetic import make_case

    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        from MMCAFNetLib.resources import demo_checkpoint_path

        try:
            checkpoint = demo_checkpoint_path()
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"the bundled demo model is missing ({exc}). Reinstall from a full checkout (the file is "
                "Resources/Models/mmcafnet-lite-demo.pt), or run `mmcafnet predict --checkpoint YOUR.pt ...`."
            ) from None
    if args.size < 32:
        raise UsageError(f"--size must be at least 32 pixels, got {args.size}")
    t0 = time.perf_counter()
    predictor = Predictor.load(checkpoint, device=args.device)
    classes = predictor.class_names
    label = args.label or classes[args.seed % len(classes)]
    if label not in classes:
        raise UsageError(f"--label {label!r}: the demo model knows the classes {', '.join(classes)}")
    case = make_case(label, args.seed, args.size)
    lesion = None if args.whole_volume else case.lesion_center_ras
    result = predictor.classify(
        case.volume,
        case.record,
        lesion=lesion,
        heatmap=None if args.heatmap == "none" else args.heatmap,
        threshold=args.threshold,
    )
    out = Path(args.out)
    written = write_outputs(result, case.volume, out, input_path=f"synthetic case {case.patient_id} (seed {args.seed})",
                            case_id=case.patient_id, record=predictor.schema.validate_record(case.record),
                            preview_box_ras=case.lesion_box_ras, write_ct=True)
    probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(result.class_names, result.probabilities))
    print(f"synthetic case {case.patient_id}: true class {label} ({_label(label)}), "
          f"lesion {case.lesion_diameter_mm:.0f} mm at RAS {tuple(round(v, 1) for v in case.lesion_center_ras)}")
    print(f"predicted: {result.decision_text(3)}  [{probs}]"
          f"  -> {'correct' if result.predicted_class == label else 'wrong'}")
    note = "demo model, synthetic data only: not for clinical use" if predictor.is_demo else "not a demo model"
    print(f"model: {predictor.info['model_id']} ({note})")
    print(f"{len(result.windows)} window(s) in {time.perf_counter() - t0:.1f} s; files:")
    for name in sorted(written):
        print(f"  {written[name]}")
    return 0


def _label(letter: str) -> str:
    from MMCAFNetLib.inference import class_label

    return class_label(letter)

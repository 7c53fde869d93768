"""``mmcafnet train``: train a model on a cohort table (single process, or DDP under torchrun)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from MMCAFNetLib.cli import UsageError
from MMCAFNetLib.strict_json import dumps as strict_dumps


def _fold(text: str):
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fold takes a fold number or 'all', not {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Settings are resolved as: built-in defaults < --recipe (and --stage) < --config FILE.json < "
        "the options below. Multi-GPU / multi-node: launch with torchrun, e.g. "
        "`torchrun --nproc-per-node 4 -m MMCAFNetLib.cli train ...`. See docs/training.md."
    )
    parser.add_argument("--cohort", required=True, help="cohort table (CSV written by mmcafnet index)")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, logs)")
    parser.add_argument("--model", help="model name (mmcafnet models lists them); default mmcafnet-lite")
    parser.add_argument("--task", choices=("AG", "ABEG"), help="AG: adenocarcinoma vs squamous (binary, "
                        "positive G); ABEG: four classes. Default AG")
    parser.add_argument("--config", help="JSON file of training settings (see configs/)")
    parser.add_argument("--recipe", choices=("paper", "default"), help="training recipe (default: default)")
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), help="paper recipe stage")
    parser.add_argument("--init", help="checkpoint whose matching weights start the run (previous stage)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    parser.add_argument("--fold", type=_fold, help="k-fold: validate on fold K of train+val, or 'all' folds in turn")
    parser.add_argument("--epochs", type=int, help="passes over the training split (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, help="global batch size (over all processes)")
    parser.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    parser.add_argument("--seed", type=int, help="seed of initial weights, sampling and augmentation (default: the recipe's)")
    parser.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--num-workers", type=int, help="data loader worker processes")
    parser.add_argument("--preset", help="preprocessing preset name (paper, default)")
    parser.add_argument("--cache", metavar="DIR", help="preprocessed cache folder (mmcafnet preprocess); "
                        "CTs missing from it are prepared and added on first use")
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--demo", action="store_true", help="flag the checkpoint as a demo (synthetic data)")
    parser.add_argument("--stop-after-epochs", type=int, help="stop after N epochs as if killed (resume later)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="any other setting, e.g. --set label_smoothing=0.1 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")


def _overrides(args: argparse.Namespace) -> dict:
    out = {
        "model": args.model, "task": args.task, "recipe": args.recipe, "stage": args.stage, "init": args.init,
        "epochs": args.epochs, "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr,
        "seed": args.seed, "device": args.device, "num_workers": args.num_workers, "preset": args.preset,
        "stop_after_epochs": args.stop_after_epochs, "cache_dir": args.cache,
    }
    if isinstance(args.fold, int):
        out["fold"] = args.fold
    if args.no_amp:
        out["amp"] = False
    if args.no_progress:
        out["progress"] = False
    if args.demo:
        out["demo"] = True
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from MMCAFNetLib.train.config import TrainConfig, resolve_config

    out_dir = Path(args.out)
    if args.resume:
        config_path = out_dir / "config.json"
        if args.fold == "all":
            first = sorted(out_dir.glob("fold-*/config.json"))
            config_path = first[0] if first else config_path
        if not config_path.is_file():
            raise UsageError(f"--resume: {out_dir} holds no run (no config.json); start it without --resume")
        stored = json.loads(config_path.read_text(encoding="utf-8"))
        runtime = {k: v for k, v in _overrides(args).items()
                   if k in ("device", "num_workers", "stop_after_epochs", "cache_dir") and v is not None}
        if args.no_progress:
            runtime["progress"] = False
        runtime["stop_after_epochs"] = args.stop_after_epochs
        config = TrainConfig.from_dict(stored).updated(runtime)
        if args.fold == "all":
            config = config.updated({"fold": None})
    else:
        config = resolve_config(args.recipe, args.stage, args.config, _overrides(args))
    if args.print_config:
        print(strict_dumps(config.to_dict(), indent=2))
        return 0
    from MMCAFNetLib.train.loop import train, training_threads

    threads = training_threads(config.num_threads)
    print(f"CPU threads: {threads or _torch_threads()} (set MMCAFNET_THREADS=N to choose; on a machine shared "
          "with other jobs MMCAFNET_THREADS=1 is often several times faster)", file=sys.stderr)
    command = "mmcafnet " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = train(config, args.cohort, out_dir, resume=args.resume, command=command,
                    all_folds=args.fold == "all")
    best = summary.get("best_metrics") or summary.get("validation") or {}
    print(strict_dumps({"out": str(out_dir), "summary": {k: v for k, v in summary.items() if k != "runs"},
                      "best": best if isinstance(best, dict) else {}}, indent=2, default=str)[:4000])
    return 0

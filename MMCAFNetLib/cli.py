"""The ``mmcafnet`` console script: one sub-command per pipeline step.

Each command lives in its own module under ``MMCAFNetLib.commands`` with ``add_arguments(parser)``
and ``run(args) -> int``; modules are imported only when their command runs, so ``--help`` is fast.
Exit status: 0 success, 2 bad input (message on stderr naming the problem), 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

#: command name -> (module under MMCAFNetLib.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "classify a synthetic case with the bundled demo model and write the outputs"),
    "synth": ("synth", "write a synthetic cohort in the exact Lung-PET-CT-Dx layout"),
    "index": ("index", "index a Lung-PET-CT-Dx download into a cohort table"),
    "preprocess": ("preprocess", "build the preprocessed window cache for a cohort"),
    "train": ("train", "train a model (single process or torchrun DDP)"),
    "evaluate": ("evaluate", "evaluate a checkpoint on a cohort split and write a report"),
    "predict": ("predict", "classify CT files and write prediction, heatmap, labelmap, segmentation, preview "
                           "(and DICOM SEG + Parametric Map for a DICOM series)"),
    "info": ("info", "show what a checkpoint holds"),
    "models": ("models", "list the model variants with parameters and GFLOPs per window"),
}


DESCRIPTION = "MMCAF-Net lung-lesion classifier (CT + clinical record): data, training, evaluation and prediction."
EPILOG = """\
Every command has its own options: mmcafnet COMMAND --help.
Quick start: mmcafnet demo (a synthetic case, no data needed), then
             mmcafnet predict --input CT --point R A S --out DIR.
CPU threads: MMCAFNET_THREADS=N (all commands; 1 is often fastest on a shared machine).
Exit status: 0 success, 2 bad input (the message names the problem), 1 anything else.
Research software: not a medical device, not for clinical use."""


class UsageError(ValueError):
    """Bad input from the user: reported on stderr with exit status 2."""


def _load(name: str):
    module_name, _ = COMMANDS[name]
    return importlib.import_module(f"MMCAFNetLib.commands.{module_name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from MMCAFNetLib import __version__

    parser = argparse.ArgumentParser(prog="mmcafnet", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mmcafnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only in (None, name):
            try:
                _load(name).add_arguments(p)
            except ModuleNotFoundError as exc:
                if only == name or not exc.name or not exc.name.startswith("MMCAFNetLib.commands"):
                    raise
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(_load(args.command).run(args) or 0)
    except KeyboardInterrupt:
        print("mmcafnet: interrupted", file=sys.stderr)
        return 1
    except (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError) as exc:
        print(f"mmcafnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # full disk, file too large, permissions: files are written atomically
        print(
            f"mmcafnet {args.command}: error: could not write or read a file ({exc}); files written before "
            "are left as they were",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())

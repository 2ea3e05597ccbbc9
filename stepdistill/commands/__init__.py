r"""The ``stepdistill`` command (also ``python -m stepdistill``): every command-line entry point in one place.

    stepdistill train dmd --config recipes/digits_dmd2_1step.yaml --max_train_steps 200
    stepdistill train-teacher --output_dir runs/digits_assets
    stepdistill pairs --config recipes/digits_dmd_1step.yaml --output runs/pairs/digits.safetensors
    stepdistill eval calc --ref ref.npz --pipeline runs/digits_dmd2_1step/student --class_labels reference
    stepdistill sample hybrid --base digits --student runs/digits_dmd2_4step/student --out_dir outputs/hybrid

Each command is a module of this package with ``main(argv, prog) -> int``; :data:`COMMANDS` lists them (a new
command is one module and one entry). Config-dataclass commands (``train``, ``train-teacher``, ``pairs``,
``sample train-style-lora``) parse ``--config recipe.yaml`` and flags with :mod:`stepdistill.configs`. Under
``accelerate launch`` use ``accelerate launch -m stepdistill train dmd ...`` or the thin scripts in
``training_scripts/``. User errors print one line ``stepdistill <command>: error: ...`` and exit with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: ``name: (module of this package with main(argv, prog), one-line help)``; modules load only when run.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "Distill a teacher into a one- or few-step student: stepdistill train <method> [flags]."),
    "train-teacher": ("teacher", "Train the digits world's feature classifier and class-conditional teacher."),
    "pairs": ("pairs", "Make a DMD1 regression-pairs file (teacher ODE samples) from a DMD recipe."),
    "eval": ("eval", "Reference statistics (ref) and FID / KID / precision-recall / diversity (calc)."),
    "sample": ("sample", "Hybrid sampling, diffusion-target grids, LoRA control transfer, a digits style LoRA."),
}


def build_parser(prog: str = "stepdistill") -> argparse.ArgumentParser:
    """The top-level parser: it only picks the command; the command's own parser reads the rest."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Distill multi-step diffusion models into one- and few-step students.",
        epilog=f"Run '{prog} COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "stepdistill") -> int:
    """Entry point of ``stepdistill``: ``main(["train", "dmd", "--config", "r.yaml"])``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = build_parser(prog).parse_args(argv[:1]).command
    module = importlib.import_module(f"{__name__}.{COMMANDS[command][0]}")
    return module.main(argv[1:], prog=f"{prog} {command}")


__all__ = ["COMMANDS", "build_parser", "main"]

r"""``stepdistill train <method>``: distill a teacher into a one- or few-step student.

    stepdistill train dmd --config recipes/digits_dmd2_1step.yaml
    stepdistill train boot --config recipes/digits_boot_1step.yaml
    stepdistill train echodistill --teacher T --student S --concept_images concept/ --initializer_token slanted
    stepdistill train dmd --teacher digits --student_timesteps 999,749,499,249 --output_dir runs/try
    accelerate launch --multi_gpu --num_processes 2 -m stepdistill train dmd --config recipes/digits_dmd2_4step.yaml

Every field of the method's config dataclass is a flag (``stepdistill train dmd --help`` lists them); the YAML
recipe sets defaults and flags override it. Writes ``<output_dir>/checkpoints``, ``samples/``, ``config.yaml``,
``train_summary.json`` and the exported student ``<output_dir>/student``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ..configs import parse_config
from ..loading import ModelFolderError
from ..trainers import (
    BOOTConfig,
    BOOTTrainer,
    DMDConfig,
    DMDTrainer,
    EchoDistillConfig,
    EchoDistillTrainer,
    MSDConfig,
    MSDTrainer,
    PhasedDMDConfig,
    PhasedDMDTrainer,
)
from ..trainers.base import NonFiniteLossError
from ..trainers.checkpointing import CheckpointMismatchError
from .common import user_errors

#: ``method: (config dataclass, trainer class)``; a new method is one entry here.
METHODS: dict[str, tuple[type, type]] = {
    "dmd": (DMDConfig, DMDTrainer),
    "msd": (MSDConfig, MSDTrainer),
    "phased-dmd": (PhasedDMDConfig, PhasedDMDTrainer),
    "boot": (BOOTConfig, BOOTTrainer),
    "echodistill": (EchoDistillConfig, EchoDistillTrainer),
}
#: Errors reported as one line (exit status 1): bad recipes / flags, missing or unusable model folders.
USER_ERRORS = (ValueError, FileNotFoundError, ModelFolderError)


def train(method: str, argv: Sequence[str], prog: str = "stepdistill train") -> dict[str, Any]:
    """Parse ``argv`` into the method's config, train, and return the trainer's summary.

    Args:
        method: A key of :data:`METHODS`.
        argv: ``--config recipe.yaml`` and / or ``--field value`` flags.
        prog: Command name for usage and error lines.

    Raises:
        SystemExit: status 1 with a one-line message for a bad config, a model folder that cannot be loaded,
            a checkpoint that does not fit, or a non-finite loss; status 2 for an unknown flag.
    """
    config_cls, trainer_cls = METHODS[method]
    with user_errors(f"{prog} {method}", USER_ERRORS):
        config = parse_config(config_cls, argv, prog=f"{prog} {method}")
        trainer = trainer_cls(config)
    with user_errors(f"{prog} {method}", (NonFiniteLossError, CheckpointMismatchError, FileNotFoundError)):
        return trainer.train()


def main(argv: Sequence[str] | None = None, prog: str = "stepdistill train") -> int:
    """Entry point of ``stepdistill train``: ``main(["dmd", "--config", "r.yaml"])``; prints the summary."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in METHODS:
        summary = train(argv[0], argv[1:], prog)
        from accelerate import PartialState

        if PartialState().is_main_process:
            keys = ("global_step", "final_metrics", "eval", "train_seconds", "export")
            print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2, default=str))
        return 0
    parser = argparse.ArgumentParser(
        prog=prog, description="Distill a teacher into a one- or few-step student with one of the METHODS.",
        epilog=f"Run '{prog} METHOD --help' for the method's flags.",
    )
    parser.add_argument("method", choices=sorted(METHODS), metavar="METHOD", help=f"One of {sorted(METHODS)}.")
    parser.parse_args(argv[:1])  # prints the help, or the error that names the methods, and exits
    return 2


__all__ = ["METHODS", "main", "train"]

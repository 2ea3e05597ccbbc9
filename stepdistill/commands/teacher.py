r"""``stepdistill train-teacher``: train the digits world's feature classifier and class-conditional teacher.

    accelerate launch -m stepdistill train-teacher --output_dir stepdistill/assets/digits   # reproduce the assets
    stepdistill train-teacher --only teacher --teacher_max_train_steps 2000 --output_dir runs/digits_world

Writes ``<output_dir>/classifier`` and ``<output_dir>/teacher`` (diffusers / safetensors folders);
``--teacher_kind flow`` trains the rectified-flow teacher into ``<output_dir>/teacher_flow``. The
:class:`~stepdistill.trainers.digits_world.ClassifierConfig` fields are flags with the prefix ``classifier_``,
the :class:`~stepdistill.trainers.digits_world.TeacherConfig` ones with ``teacher_`` (both have ``seed``,
``batch_size``, ``learning_rate``); a ``--config`` recipe uses the same names as keys.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..configs import parse_configs
from .common import user_errors

if TYPE_CHECKING:
    from ..trainers.digits_world import ClassifierConfig, TeacherConfig

NETWORKS = ("classifier", "teacher")


@dataclass
class DigitsWorldArguments:
    """What to train, where to write it, and how to run."""

    output_dir: str = field(default="runs/digits_world", metadata={"help": "Writes classifier/ and teacher/ here."})
    only: str | None = field(default=None, metadata={"help": f"Train one network: {' | '.join(NETWORKS)}."})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16."})
    report_to: str | None = field(default=None, metadata={"help": "Tracker for accelerate.log (e.g. tensorboard)."})

    def __post_init__(self) -> None:
        if self.only is not None and self.only not in NETWORKS:
            raise ValueError(f"only must be one of {list(NETWORKS)} (or none), got {self.only!r}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")


def parse_args(
    argv: Sequence[str] | None = None, prog: str = "stepdistill train-teacher"
) -> tuple[DigitsWorldArguments, ClassifierConfig, TeacherConfig]:
    """The run arguments and both configs from ``--config recipe.yaml`` and flags (prefixes as in the docstring)."""
    from ..trainers.digits_world import ClassifierConfig, TeacherConfig

    return parse_configs((DigitsWorldArguments, ClassifierConfig, TeacherConfig), argv,
                         prefixes=("", "classifier_", "teacher_"), prog=prog,
                         description="Train the digits world's feature classifier and class-conditional teacher.")


def train_digits_world(run: DigitsWorldArguments, classifier: ClassifierConfig, teacher: TeacherConfig) -> None:
    """Train what ``run.only`` asks (both by default) and write the folders with their metadata."""
    import torch
    from accelerate import Accelerator

    from ..trainers.digits_world import save_teacher, train_classifier, train_teacher
    from ..utils import atomic_save_pretrained

    accelerator = Accelerator(mixed_precision=run.mixed_precision, log_with=run.report_to)
    if run.report_to:
        accelerator.init_trackers("digits_world")
    out = run.output_dir
    if run.only in (None, "classifier"):
        t0 = time.time()
        clf, acc = train_classifier(classifier, accelerator)
        if accelerator.is_main_process:
            atomic_save_pretrained(clf, f"{out}/classifier")
            meta = {"heldout_accuracy": acc, "config": asdict(classifier), "seconds": time.time() - t0}
            with open(f"{out}/classifier/stepdistill_classifier.json", "w") as fh:
                json.dump(meta, fh, indent=2)
            print(f"classifier: held-out accuracy {acc:.4f} ({time.time() - t0:.0f}s)")
    if run.only in (None, "teacher"):
        t0 = time.time()
        unet, _, history = train_teacher(teacher, accelerator)
        if accelerator.is_main_process:
            meta = {
                "config": asdict(teacher),
                "processes": accelerator.num_processes,
                "seconds": time.time() - t0,
                "final_loss": history[-1]["loss"] if history else None,
                "guidance_scale": 1.0,
                "torch": torch.__version__,
            }
            folder = "teacher" if teacher.kind == "vp" else f"teacher_{teacher.kind}"
            save_teacher(unet, f"{out}/{folder}", meta, kind=teacher.kind)
            print(f"teacher: trained in {time.time() - t0:.0f}s, final loss {meta['final_loss']}")
    accelerator.end_training()


def main(argv: Sequence[str] | None = None, prog: str = "stepdistill train-teacher") -> int:
    """Entry point of ``stepdistill train-teacher``; user errors print one line and exit with status 1."""
    with user_errors(prog, (ValueError, FileNotFoundError)):
        run, classifier, teacher = parse_args(list(sys.argv[1:] if argv is None else argv), prog)
    train_digits_world(run, classifier, teacher)
    return 0


__all__ = ["DigitsWorldArguments", "main", "parse_args", "train_digits_world"]

r"""``stepdistill train-teacher``: train the digits world's classifier, class-conditional and text teachers.

    accelerate launch -m stepdistill train-teacher --output_dir stepdistill/assets/digits   # reproduce the assets
    stepdistill train-teacher --only teacher --teacher_max_train_steps 2000 --output_dir runs/digits_world
    stepdistill train-teacher --only text_teacher --output_dir stepdistill/assets/digits     # the text world

Writes ``<output_dir>/classifier`` and ``<output_dir>/teacher`` (diffusers / safetensors folders);
``--teacher_kind flow`` trains the rectified-flow teacher into ``<output_dir>/teacher_flow``. The
:class:`~stepdistill.trainers.digits_world.ClassifierConfig` fields are flags with the prefix ``classifier_``,
the :class:`~stepdistill.trainers.digits_world.TeacherConfig` ones with ``teacher_`` (both have ``seed``,
``batch_size``, ``learning_rate``); a ``--config`` recipe uses the same names as keys. ``--only text_teacher``
trains the text-conditioned world (:class:`~stepdistill.trainers.digits_text_world.TextTeacherConfig`, flags
``--text_teacher_<field>``) into ``<output_dir>/text_teacher``, a stock ``StableDiffusionPipeline`` folder; it is
not part of the default run (classifier and teacher).
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
    from ..trainers.digits_text_world import TextTeacherConfig
    from ..trainers.digits_world import ClassifierConfig, TeacherConfig

NETWORKS = ("classifier", "teacher", "text_teacher")


@dataclass
class DigitsWorldArguments:
    """What to train, where to write it, and how to run."""

    output_dir: str = field(default="runs/digits_world", metadata={"help": "Writes classifier/ and teacher/ here."})
    only: str | None = field(default=None, metadata={
        "help": f"Train one network: {' | '.join(NETWORKS)} (default: classifier and teacher)."})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16."})
    report_to: str | None = field(default=None, metadata={"help": "Tracker for accelerate.log (e.g. tensorboard)."})

    def __post_init__(self) -> None:
        if self.only is not None and self.only not in NETWORKS:
            raise ValueError(f"only must be one of {list(NETWORKS)} (or none), got {self.only!r}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")


def parse_args(
    argv: Sequence[str] | None = None, prog: str = "stepdistill train-teacher"
) -> tuple[DigitsWorldArguments, ClassifierConfig, TeacherConfig, TextTeacherConfig]:
    """The run arguments and the three configs from ``--config recipe.yaml`` and flags (prefixes: module docstring)."""
    from ..trainers.digits_text_world import TextTeacherConfig
    from ..trainers.digits_world import ClassifierConfig, TeacherConfig

    return parse_configs((DigitsWorldArguments, ClassifierConfig, TeacherConfig, TextTeacherConfig), argv,
                         prefixes=("", "classifier_", "teacher_", "text_teacher_"), prog=prog,
                         description="Train the digits world's feature classifier, class-conditional teacher "
                                     "and (--only text_teacher) text-conditioned teacher.")


def train_digits_world(run: DigitsWorldArguments, classifier: ClassifierConfig, teacher: TeacherConfig,
                       text_teacher: TextTeacherConfig | None = None) -> None:
    """Train what ``run.only`` asks (classifier and teacher by default) and write the folders with their metadata."""
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
    if run.only == "text_teacher":
        from ..trainers.digits_text_world import TextTeacherConfig

        _train_text_world(text_teacher or TextTeacherConfig(), accelerator, out)
    accelerator.end_training()


def _train_text_world(config: TextTeacherConfig, accelerator, out: str) -> None:
    import tempfile

    import torch

    from ..data.digits_text import HELDOUT_TEMPLATES, TRAIN_TEMPLATES
    from ..trainers.digits_text_world import folder_megabytes, save_text_teacher, train_text_teacher

    t0 = time.time()

    def metadata(report: dict, history: list, step: int) -> dict:
        return {
            "config": asdict(config),
            "step": step,
            "processes": accelerator.num_processes,
            "seconds": time.time() - t0,
            "final_loss": history[-1]["loss"] if history else None,
            "guidance_scale": config.guidance_scale,
            "vae": report,
            "train_templates": list(TRAIN_TEMPLATES),
            "heldout_templates": list(HELDOUT_TEMPLATES),
            "torch": torch.__version__,
        }

    def snapshot(parts: dict, step: int) -> None:
        if accelerator.is_main_process:
            save_text_teacher(parts, f"{out}/text_teacher_snapshots/step_{step:06d}", metadata({}, [], step))
            print(f"text teacher: snapshot at step {step} ({time.time() - t0:.0f}s)", flush=True)

    with tempfile.TemporaryDirectory() as tok_dir:
        parts, report, history = train_text_teacher(config, accelerator, tok_dir, snapshot=snapshot)
        if accelerator.is_main_process:
            meta = metadata(report, history, config.max_train_steps)
            folder = save_text_teacher(parts, f"{out}/text_teacher", meta)
            print(f"text teacher: trained in {time.time() - t0:.0f}s, final loss {meta['final_loss']}, "
                  f"{folder_megabytes(folder):.2f} MB")


def main(argv: Sequence[str] | None = None, prog: str = "stepdistill train-teacher") -> int:
    """Entry point of ``stepdistill train-teacher``; user errors print one line and exit with status 1."""
    with user_errors(prog, (ValueError, FileNotFoundError)):
        run, classifier, teacher, text_teacher = parse_args(list(sys.argv[1:] if argv is None else argv), prog)
    train_digits_world(run, classifier, teacher, text_teacher)
    return 0


__all__ = ["DigitsWorldArguments", "main", "parse_args", "train_digits_world"]

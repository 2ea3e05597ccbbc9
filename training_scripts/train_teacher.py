"""Train the digits world's feature classifier and class-conditional teacher, and ship them.

    accelerate launch training_scripts/train_teacher.py --output_dir stepdistill/assets/digits

Writes ``<output_dir>/classifier`` and ``<output_dir>/teacher`` (diffusers / safetensors folders).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields

import torch
from accelerate import Accelerator

from stepdistill.trainers.digits_world import (
    ClassifierConfig,
    TeacherConfig,
    save_teacher,
    train_classifier,
    train_teacher,
)
from stepdistill.utils import atomic_save_pretrained


def _add_fields(parser: argparse.ArgumentParser, cls, prefix: str) -> None:
    for f in fields(cls):
        parser.add_argument(f"--{prefix}{f.name}", type=type(f.default), default=f.default, help=f.metadata["help"])


def main() -> None:
    """Parse arguments, train what was asked, write the folders."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="stepdistill/assets/digits")
    parser.add_argument("--only", choices=["classifier", "teacher"], default=None, help="Train one network.")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--report_to", default=None, help="Tracker for accelerate.log (e.g. tensorboard).")
    _add_fields(parser, ClassifierConfig, "classifier_")
    _add_fields(parser, TeacherConfig, "teacher_")
    args = parser.parse_args()
    ccfg = ClassifierConfig(**{f.name: getattr(args, f"classifier_{f.name}") for f in fields(ClassifierConfig)})
    tcfg = TeacherConfig(**{f.name: getattr(args, f"teacher_{f.name}") for f in fields(TeacherConfig)})
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=args.report_to)
    if args.report_to:
        accelerator.init_trackers("digits_world")
    out = args.output_dir
    if args.only in (None, "classifier"):
        t0 = time.time()
        clf, acc = train_classifier(ccfg, accelerator)
        if accelerator.is_main_process:
            atomic_save_pretrained(clf, f"{out}/classifier")
            meta = {"heldout_accuracy": acc, "config": asdict(ccfg), "seconds": time.time() - t0}
            with open(f"{out}/classifier/stepdistill_classifier.json", "w") as fh:
                json.dump(meta, fh, indent=2)
            print(f"classifier: held-out accuracy {acc:.4f} ({time.time() - t0:.0f}s)")
    if args.only in (None, "teacher"):
        t0 = time.time()
        unet, _, history = train_teacher(tcfg, accelerator)
        if accelerator.is_main_process:
            meta = {
                "config": asdict(tcfg),
                "processes": accelerator.num_processes,
                "seconds": time.time() - t0,
                "final_loss": history[-1]["loss"] if history else None,
                "guidance_scale": 1.0,
                "torch": torch.__version__,
            }
            save_teacher(unet, f"{out}/teacher", meta)
            print(f"teacher: trained in {time.time() - t0:.0f}s, final loss {meta['final_loss']}")
    accelerator.end_training()


if __name__ == "__main__":
    main()

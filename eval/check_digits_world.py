"""Check the digits world against its targets: classifier and teacher accuracy.

    python eval/check_digits_world.py [--num_samples 400] [--steps 50]
    python eval/check_digits_world.py --teacher_kind flow                      # the shipped flow teacher
    python eval/check_digits_world.py --teacher runs/flow_world/teacher_flow   # any teacher folder

* classifier: top-1 accuracy on the held-out split (target >= 0.97);
* teacher: the classifier's accuracy on teacher samples for the requested labels (held-out class mix,
  per-sample seeds 0..N-1, the guidance scale of the teacher's own ``stepdistill_teacher.json``, its own
  scheduler's timesteps), target >= 0.95.
Exits non-zero when a target is missed. Teacher FID per step count comes from ``eval/bench_digits.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from stepdistill.conditioning import Conditioning
from stepdistill.data.digits import NULL_CLASS, class_labels_like_reference, load_digits_split
from stepdistill.data.digits_models import TEACHER_KINDS, DigitsClassifier, classifier_path, teacher_path
from stepdistill.evaluation.stats import write_json
from stepdistill.loading import load_denoiser, model_folder, teacher_guidance_scale
from stepdistill.sampling import initial_noise, make_generators, sample_teacher

CLASSIFIER_TARGET = 0.97
TEACHER_TARGET = 0.95


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure both accuracies, print them as JSON and PASS / FAIL; return the report (``report["pass"]``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--teacher_kind", choices=TEACHER_KINDS, default=None,
                       help="A shipped teacher: vp (default) or flow.")
    which.add_argument("--teacher", default=None, help="A teacher folder (or alias: digits, digits-flow).")
    parser.add_argument("--classifier", default=None, help="Feature classifier folder (default: the shipped one).")
    parser.add_argument("--num_samples", type=int, default=400)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="Also write the report as JSON here.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = model_folder(args.teacher) if args.teacher else teacher_path(args.teacher_kind or "vp")
    if not (folder / "model_index.json").is_file():
        parser.error(f"--teacher {str(folder)!r} is not a teacher folder (no model_index.json): pass a folder "
                     "written by `stepdistill train-teacher`, or --teacher_kind vp|flow for a shipped one.")

    clf = DigitsClassifier.from_pretrained(args.classifier or classifier_path()).eval()
    held = load_digits_split("heldout")
    with torch.no_grad():
        clf_acc = float((clf(held.images).argmax(-1) == held.labels).float().mean())

    teacher = load_denoiser(folder)
    guidance = teacher_guidance_scale(folder)
    w = 1.0 if guidance is None else guidance
    labels = class_labels_like_reference(args.num_samples)
    noise = initial_noise((len(labels), 1, 8, 8), make_generators(range(len(labels))))
    cond = Conditioning(class_labels=labels, null_class_label=NULL_CLASS)
    x = sample_teacher(teacher, noise, cond, num_inference_steps=args.steps, guidance_scale=w)
    with torch.no_grad():
        teacher_acc = float((clf(x.clamp(-1, 1)).argmax(-1) == labels).float().mean())

    ok = clf_acc >= CLASSIFIER_TARGET and teacher_acc >= TEACHER_TARGET
    report = {
        "classifier_heldout_accuracy": {"value": clf_acc, "target": CLASSIFIER_TARGET, "n": len(held)},
        "teacher_sample_class_accuracy": {
            "value": teacher_acc, "target": TEACHER_TARGET, "n": len(labels), "steps": args.steps,
            "guidance_scale": w, "teacher": str(folder), "schedule": teacher.schedule.family,
            "prediction_type": teacher.schedule.prediction_type,
        },
        "pass": ok,
    }
    print(json.dumps(report, indent=2))
    print("PASS" if ok else "FAIL: a digits-world target is missed")
    if args.out:
        write_json(Path(args.out), report)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["pass"] else 1)

"""Check the shipped digits world against its targets: classifier and teacher accuracy.

    python eval/check_digits_world.py [--num_samples 400] [--steps 50]

* classifier: top-1 accuracy on the held-out split (target >= 0.97);
* teacher: the classifier's accuracy on teacher samples for the requested labels (held-out class mix,
  per-sample seeds 0..N-1, the teacher's default guidance scale), target >= 0.95.
Exits non-zero when a target is missed. Teacher FID per step count comes from ``eval/bench_digits.py``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from stepdistill.conditioning import Conditioning
from stepdistill.data.digits import NULL_CLASS, class_labels_like_reference, load_digits_split
from stepdistill.data.digits_models import DigitsClassifier, classifier_path, teacher_path
from stepdistill.loading import load_denoiser
from stepdistill.sampling import initial_noise, make_generators, sample_teacher


def main() -> int:
    """Measure and print both accuracies; return 1 if a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_samples", type=int, default=400)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    clf = DigitsClassifier.from_pretrained(classifier_path()).eval()
    held = load_digits_split("heldout")
    with torch.no_grad():
        clf_acc = float((clf(held.images).argmax(-1) == held.labels).float().mean())

    teacher = load_denoiser(teacher_path())
    meta = json.loads((teacher_path() / "stepdistill_teacher.json").read_text())
    w = float(meta.get("guidance_scale", 1.0))
    labels = class_labels_like_reference(args.num_samples)
    noise = initial_noise((len(labels), 1, 8, 8), make_generators(range(len(labels))))
    cond = Conditioning(class_labels=labels, null_class_label=NULL_CLASS)
    x = sample_teacher(teacher, noise, cond, num_inference_steps=args.steps, guidance_scale=w)
    with torch.no_grad():
        teacher_acc = float((clf(x.clamp(-1, 1)).argmax(-1) == labels).float().mean())

    report = {
        "classifier_heldout_accuracy": {"value": clf_acc, "target": 0.97, "n": len(held)},
        "teacher_sample_class_accuracy": {
            "value": teacher_acc, "target": 0.95, "n": len(labels), "steps": args.steps, "guidance_scale": w,
        },
    }
    print(json.dumps(report, indent=2))
    ok = clf_acc >= 0.97 and teacher_acc >= 0.95
    print("PASS" if ok else "FAIL: a digits-world target is missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Check the shipped digits world against its targets: classifier and teacher accuracy.

    python eval/check_digits_world.py [--num_samples 400] [--steps 50]
    python eval/check_digits_world.py --text [--teacher PATH] [--guidance_scale 2]   # the text-conditioned teacher

* classifier: top-1 accuracy on the held-out split (target >= 0.97);
* teacher: the classifier's accuracy on teacher samples for the requested labels (held-out class mix,
  per-sample seeds 0..N-1, the teacher's default guidance scale), target >= 0.95.
* ``--text``: the text teacher (a stock ``StableDiffusionPipeline`` folder, sampled by diffusers itself):
  *prompt fidelity* = the classifier agrees with the digit the prompt names, on captions from the training
  templates and from the held-out templates (held-out class mix, template ``k % T`` for sample ``k``, seeds
  0..N-1), target >= 0.95 each; its VAE's held-out reconstruction MSE and the classifier's accuracy on the
  reconstructions (target >= 0.97); the folder's size (target <= 10 MB).
Exits non-zero when a target is missed. Teacher FID per step count comes from ``eval/bench_digits.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from stepdistill.conditioning import Conditioning
from stepdistill.data.digits import NULL_CLASS, class_labels_like_reference, load_digits_split
from stepdistill.data.digits_models import DigitsClassifier, classifier_path, teacher_path, text_teacher_path
from stepdistill.data.digits_text import (
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    captions_like_reference,
    digit_of_caption,
    vocabulary,
)
from stepdistill.evaluation import load_pipeline, sample_pipeline
from stepdistill.loading import load_denoiser
from stepdistill.sampling import initial_noise, make_generators, sample_teacher


def main() -> int:
    """Measure and print both accuracies; return 1 if a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_samples", type=int, default=400)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--text", action="store_true", help="Check the text-conditioned teacher instead.")
    parser.add_argument("--teacher", default=None, help="Text teacher folder (default: the shipped one).")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the teacher's own.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.text:
        return check_text_world(args.teacher or text_teacher_path(), args.num_samples, args.steps, args.guidance_scale)

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


def uint8_to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 1]`` -> float ``[N, 1, H, W]`` in ``[-1, 1]`` (the classifier's input)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def prompt_fidelity(pipe, clf: DigitsClassifier, templates, num_samples: int, steps: int, guidance_scale: float):
    """Per-sample agreement of the classifier with the prompt's digit, and the captions asked for."""
    captions, labels = captions_like_reference(num_samples, templates)
    words = vocabulary(TRAIN_TEMPLATES + HELDOUT_TEMPLATES)
    assert [digit_of_caption(c, words) for c in captions] == labels.tolist()
    images = np.concatenate([u8 for _, u8 in sample_pipeline(
        pipe, list(range(num_samples)), prompts=captions, num_inference_steps=steps, guidance_scale=guidance_scale,
    )])
    return (clf(uint8_to_unit(images)).argmax(-1) == labels).numpy(), captions


def check_text_world(folder, num_samples: int, steps: int, guidance_scale: float | None) -> int:
    """Prompt fidelity on training and held-out templates, VAE reconstruction, folder size; 1 if a target is missed."""
    from stepdistill.trainers.digits_text_world import folder_megabytes, reconstruction_report

    pipe = load_pipeline(folder)
    meta_path = Path(folder) / "stepdistill_teacher.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    w = float(guidance_scale if guidance_scale is not None else meta.get("guidance_scale", 1.0))
    clf = DigitsClassifier.from_pretrained(classifier_path()).eval()
    report = {"teacher": str(folder), "steps": steps, "guidance_scale": w, "n": num_samples}
    ok = True
    for name, templates in (("train_templates", TRAIN_TEMPLATES), ("heldout_templates", HELDOUT_TEMPLATES)):
        hits, captions = prompt_fidelity(pipe, clf, templates, num_samples, steps, w)
        per_template = {t: float(hits[[k % len(templates) == i for k in range(len(hits))]].mean())
                        for i, t in enumerate(templates)}
        report[f"prompt_fidelity_{name}"] = {"value": float(hits.mean()), "target": 0.95, "per_template": per_template}
        ok &= float(hits.mean()) >= 0.95
    rec = reconstruction_report(pipe.vae)
    report["vae"] = {**rec, "target_accuracy_on_reconstructions": 0.97}
    ok &= rec["heldout_classifier_accuracy_on_reconstructions"] >= 0.97
    size = folder_megabytes(folder)
    report["folder_megabytes"] = {"value": size, "target": 10.0}
    ok &= size <= 10.0
    print(json.dumps(report, indent=2))
    print("PASS" if ok else "FAIL: a text digits-world target is missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The EchoDistill benchmark: one-step personalization on the text digits world, against two baselines.

    OMP_NUM_THREADS=1 python eval/bench_echodistill.py --teacher T --student S --student_timestep 399 \
        --concepts slant,thick --steps 150 --out_dir eval/results

Concepts (:data:`stepdistill.data.concepts.DIGIT_CONCEPTS`, never seen by the teacher): one train-split scan of each
of the digits 2, 3, 5, 7 in a style (``slant``: sheared; ``thick``: one-pixel-wider strokes), each bound to a new
token ``<slant>`` / ``<thick>`` initialised from a related word ("handwritten" / "thin"). Each image's prompts name
its digit ("a handwritten three <slant>", ``captions.json``); the students are asked for every digit ("the digit 8
<slant>"), so the benchmark also measures whether the concept transfers to digits it was not shown with.

Methods (one :class:`~stepdistill.trainers.EchoDistillTrainer` per concept and method; ``N = --steps``):

* ``init token``: the student with the token at its initializer word's embedding (no training; a reference);
* ``TI on student``: textual inversion on the student alone (``schedule=student_token``, ``2N`` iterations): only
  the token row trains, through the student network's own denoising loss on the concept images; ``TI on student
  10x lr``: the same with a ten times larger token learning rate, as textual inversion usually runs hotter;
* ``teacher -> distill``: personalize the teacher (token + K/V, ``N`` teacher steps), then fine-tune the
  student's K/V from the frozen personalized teacher with EchoDistill's alignment + adversarial losses (``N``
  student steps) -- ``schedule=sequential``, ``2N`` iterations, the same network passes as ``N`` joint ones;
* ``EchoDistill``: joint (``N`` iterations), echo stage off; ``EchoDistill + echo``: the echo stage (a
  reconstruction) on from iteration ``N // 2`` with weight 1.

Protocol (paired): every method samples the same ``10 x --per_digit`` prompts with the same seeds (sample ``k``:
seed ``k``), one network call per image. Per image:

* **concept fidelity**: mean cosine (clamped at 0) to the *held-out* styled images of the asked-for digit
  (held-out split scans no network trained on), in raw pixels minus the train-split mean
  (:class:`~stepdistill.evaluation.PixelFeatures`, an extractor no training loss reads; the identity loss and the
  heads read the digits classifier);
* **concept margin**: that similarity minus the similarity to the same held-out scans *without* the style
  (> 0: closer to the styled digit than to the plain one);
* **prompt fidelity**: the digits classifier reads the asked-for digit.

Intervals: 95 % bootstrap over the samples (``--bootstrap`` resamples, one plan for every method, so differences are
paired); "better" / "worse" only when the difference's interval excludes zero. Trained samples are cached under
``--runs`` (``samples.safetensors`` + ``train.json`` per concept and method), so methods can be trained in separate
processes and the table rebuilt with ``--reuse``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from stepdistill.data.concepts import DIGIT_CONCEPTS, digit_concept_images, write_digit_concept
from stepdistill.data.digits import NUM_CLASSES, load_digits_split
from stepdistill.data.digits_text import NUMBER_WORDS
from stepdistill.evaluation import PixelFeatures, concept_similarities, prompt_matches
from stepdistill.evaluation.uncertainty import ResamplePlan, compare_paired, mean_replicates

METHODS = ("init token", "TI on student", "TI on student 10x lr", "teacher -> distill", "EchoDistill",
           "EchoDistill + echo")
METRICS = ("concept_fidelity", "concept_margin", "prompt_fidelity")
#: Prompt templates: ``{word}`` / ``{digit}`` name the digit, ``{}`` is the placeholder token.
TEMPLATES = ("a handwritten {word} {{}}", "the digit {digit} {{}}")
CONCEPT_DIGIT_WORDS = dict(zip(range(NUM_CLASSES), NUMBER_WORDS))


def templates_for(digits: list[int]) -> list[str]:
    """Placeholder templates (``'{}'`` = the token) for ``digits``, every template of :data:`TEMPLATES` each."""
    return [t.format(word=CONCEPT_DIGIT_WORDS[d], digit=d) for d in digits for t in TEMPLATES]


def eval_prompts(token: str, per_digit: int) -> tuple[list[str], list[int]]:
    """``10 * per_digit`` prompts (digit-major, templates alternating) and their digits."""
    prompts, digits = [], []
    for d in range(NUM_CLASSES):
        for k in range(per_digit):
            prompts.append(templates_for([d])[k % len(TEMPLATES)].replace("{}", token))
            digits.append(d)
    return prompts, digits


def method_settings(method: str, steps: int, token_lr: float) -> dict | None:
    """The trainer settings of a method (``None``: no training)."""
    return {
        "init token": None,
        "TI on student": dict(schedule="student_token", max_train_steps=2 * steps),
        "TI on student 10x lr": dict(schedule="student_token", max_train_steps=2 * steps,
                                      token_learning_rate=10 * token_lr),
        "teacher -> distill": dict(schedule="sequential", max_train_steps=2 * steps),
        "EchoDistill": dict(schedule="joint", max_train_steps=steps),
        "EchoDistill + echo": dict(schedule="joint", max_train_steps=steps, echo_loss_weight=1.0,
                                   echo_start_step=steps // 2),
    }[method]


def make_trainer(args: argparse.Namespace, concept: str, folders: dict[str, Path], run_dir: Path, settings: dict):
    """An :class:`EchoDistillTrainer` for one concept with the benchmark's shared settings plus ``settings``."""
    from stepdistill.trainers import EchoDistillConfig, EchoDistillTrainer

    _, digits, word = DIGIT_CONCEPTS[concept]
    cfg = EchoDistillConfig(
        teacher=args.teacher, student=args.student, student_timestep=args.student_timestep,
        concept_images=str(folders["train"]), placeholder_token=f"<{concept}>", initializer_token=word,
        concept_prompts="|".join(templates_for(list(digits))),  # captions.json gives each image its digit's
        student_prompts="|".join(templates_for(list(range(10)))),
        augment_fill=-1.0, ms_swd_scales=2, ms_swd_patch_size=3, ms_swd_projections=32, head_hidden=64,
        train_batch_size=args.batch_size, teacher_learning_rate=args.kv_lr,
        student_learning_rate=args.student_lr or args.kv_lr, head_learning_rate=args.head_lr,
        adversarial_loss_weight=args.adversarial_weight, output_dir=str(run_dir), export=False,
        checkpointing_steps=0, log_every=10, eval_num_samples=0, sample_grid_size=8, seed=args.seed, num_threads=1,
        **settings,
    )
    return EchoDistillTrainer(cfg)


def run_method(args: argparse.Namespace, concept: str, method: str, folders: dict[str, Path]) -> dict:
    """Train (or reuse) one method on one concept; return ``{"samples": [N, 1, 8, 8], "train_seconds": s}``."""
    from safetensors.torch import load_file, save_file

    run_dir = Path(args.runs) / concept / method.replace(" ", "_").replace(">", "").replace("+", "plus")
    cached = run_dir / "samples.safetensors"
    if args.reuse and cached.is_file():
        info = json.loads((run_dir / "train.json").read_text())
        if info["per_digit"] == args.per_digit:
            return {"samples": load_file(cached)["samples"], **info}
    settings = method_settings(method, args.steps, args.token_lr)
    trainer = make_trainer(args, concept, folders, run_dir,
                           {"token_learning_rate": args.token_lr, **(settings or dict(max_train_steps=1))})
    t0 = time.perf_counter()
    if settings is not None:
        trainer.train()
    seconds = time.perf_counter() - t0
    prompts, _ = eval_prompts(trainer.config.placeholder_token, args.per_digit)
    samples = torch.cat([trainer.sample_student_images(prompts[i: i + 100], range(i, min(i + 100, len(prompts))))
                         for i in range(0, len(prompts), 100)])
    info = {"train_seconds": seconds, "per_digit": args.per_digit, "steps": args.steps,
            "iterations": 0 if settings is None else settings["max_train_steps"],
            "settings": {} if settings is None else settings}
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file({"samples": samples.contiguous()}, cached)
    (run_dir / "train.json").write_text(json.dumps(info, indent=2) + "\n")
    return {"samples": samples, **info}


def per_sample_metrics(samples: torch.Tensor, digits: list[int], concept: dict, classifier, extractor) -> dict:
    """``{metric: [N] per-image values}`` (see the module docstring)."""
    digits_t = torch.as_tensor(digits)
    fidelity, plain = torch.zeros(len(digits)), torch.zeros(len(digits))
    for d in range(NUM_CLASSES):
        idx = torch.nonzero(digits_t == d).flatten()
        ref = concept["heldout_labels"] == d
        fidelity[idx] = concept_similarities(samples[idx], concept["heldout"][ref], extractor)
        plain[idx] = concept_similarities(samples[idx], concept["heldout_plain"][ref], extractor)
    matches = prompt_matches(samples, digits_t, classifier)
    return {"concept_fidelity": fidelity.numpy(), "concept_margin": (fidelity - plain).numpy(),
            "prompt_fidelity": matches.float().numpy()}


def fmt(summary: dict) -> str:
    """``value [low, high]``."""
    return f"{summary['value']:.3f} [{summary['low']:.3f}, {summary['high']:.3f}]"


def grid_image(concept_rows: dict[str, dict], per_digit: int):
    """Prompts x methods: per concept, its training images, then one row per method (digits 0-9, first seeds)."""
    from stepdistill.visualization import image_grid, stack_vertically

    images = []
    for concept, rows in concept_rows.items():
        train = digit_concept_images(concept)["train"]
        tiles = [[(x + 1) / 2 for x in train]]
        labels = [f"<{concept}> images ({', '.join(str(d) for d in DIGIT_CONCEPTS[concept][1])})"]
        for method, samples in rows.items():
            tiles.append([(samples[d * per_digit] + 1) / 2 for d in range(NUM_CLASSES)])
            labels.append(method)
        images.append(image_grid(tiles, row_labels=labels, column_labels=[str(d) for d in range(NUM_CLASSES)],
                                 title=f"<{concept}>: prompt 'a handwritten <digit> <{concept}>', one call each",
                                 tile_size=40))
    return stack_vertically(images)


def main(argv: list[str] | None = None) -> dict:
    """Train / reuse every method on every concept, evaluate, write ``<name>.{md,json,png}``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="Text digits teacher folder (stock StableDiffusionPipeline).")
    p.add_argument("--student", required=True, help="Its one-step student folder (e.g. the DMD2 export).")
    p.add_argument("--student_timestep", type=float, default=399.0, help="The student's one-step timestep.")
    p.add_argument("--concepts", default="slant,thick", help=f"Comma-separated, of {sorted(DIGIT_CONCEPTS)}.")
    p.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset of the methods.")
    p.add_argument("--steps", type=int, default=150, help="N: EchoDistill iterations (baselines: 2N, see above).")
    p.add_argument("--batch_size", type=int, default=8, help="Micro-batch of every method.")
    p.add_argument("--token_lr", type=float, default=1e-4, help="Learning rate of the token row (every method).")
    p.add_argument("--kv_lr", type=float, default=1e-4, help="Learning rate of the teacher's and student's K/V.")
    p.add_argument("--head_lr", type=float, default=1e-4, help="Learning rate of the discriminator heads.")
    p.add_argument("--student_lr", type=float, default=None, help="Student K/V learning rate (default: kv_lr).")
    p.add_argument("--adversarial_weight", type=float, default=1.0, help="Weight of each head's adversarial loss.")
    p.add_argument("--per_digit", type=int, default=20, help="Evaluation prompts per digit (x10 per method).")
    p.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples.")
    p.add_argument("--seed", type=int, default=0, help="Training seed (every method).")
    p.add_argument("--runs", default="runs/bench_echodistill", help="Run folders and sample caches.")
    p.add_argument("--reuse", action="store_true", help="Reuse cached samples of finished runs.")
    p.add_argument("--out_dir", default="eval/results", help="Where <name>.{md,json,png} go.")
    p.add_argument("--name", default="bench_echodistill", help="Stem of the output files.")
    args = p.parse_args(argv)
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for c in concepts:
        if c not in DIGIT_CONCEPTS:
            raise SystemExit(f"error: unknown concept {c!r}; choose from {sorted(DIGIT_CONCEPTS)}.")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"error: unknown method {m!r}; choose from {list(METHODS)}.")
    torch.set_num_threads(1)

    from stepdistill.data.digits_models import DigitsClassifier, classifier_path

    classifier = DigitsClassifier.from_pretrained(classifier_path()).requires_grad_(False).eval()
    extractor = PixelFeatures(load_digits_split("train").images.mean(0))
    n = NUM_CLASSES * args.per_digit
    plan = ResamplePlan.make(n=n, dim=1, num_bootstrap=args.bootstrap, seed=0)
    results, rows_for_grid, lines = {}, {}, []
    for concept in concepts:
        folders = write_digit_concept(concept, Path(args.runs) / "concepts",
                                      captions=lambda d: "|".join(templates_for([d])))
        images = digit_concept_images(concept)
        _, digits = eval_prompts(f"<{concept}>", args.per_digit)
        reps, results[concept], rows_for_grid[concept] = {}, {}, {}
        for method in methods:
            out = run_method(args, concept, method, folders)
            values = per_sample_metrics(out["samples"], digits, images, classifier, extractor)
            reps[method] = mean_replicates(values, plan)
            unseen = ~torch.isin(torch.as_tensor(digits), torch.as_tensor(DIGIT_CONCEPTS[concept][1]))
            results[concept][method] = {
                "train_seconds": out["train_seconds"], "iterations": out["iterations"],
                "metrics": reps[method].summary(),
                "concept_margin_unseen_digits": float(values["concept_margin"][unseen.numpy()].mean()),
            }
            rows_for_grid[concept][method] = out["samples"]
            print(f"{concept} / {method}: " + ", ".join(f"{k} {fmt(v)}" for k, v in reps[method].summary().items()),
                  flush=True)
        comparisons = {}
        for a, b in [("EchoDistill", m) for m in methods if m != "EchoDistill"] + \
                    [("EchoDistill + echo", "teacher -> distill"), ("EchoDistill + echo", "TI on student")]:
            if a in reps and b in reps and a != b:
                comparisons[f"{a} vs {b}"] = {k: vars(v) for k, v in compare_paired(reps[a], reps[b]).items()}
        results[concept]["comparisons"] = comparisons
        lines += [f"### Concept `<{concept}>`", "",
                  "| method | iterations | train s | concept fidelity | concept margin | margin, unseen digits | "
                  "prompt fidelity |", "|---|---|---|---|---|---|---|"]
        for method in methods:
            r = results[concept][method]
            m = r["metrics"]
            lines.append(f"| {method} | {r['iterations']} | {r['train_seconds']:.0f} | {fmt(m['concept_fidelity'])} | "
                         f"{fmt(m['concept_margin'])} | {r['concept_margin_unseen_digits']:.3f} | "
                         f"{fmt(m['prompt_fidelity'])} |")
        lines += ["", "| paired difference (a - b) | concept fidelity | concept margin | prompt fidelity |",
                  "|---|---|---|---|"]
        for name, diff in comparisons.items():
            cells = [f"{diff[k]['difference']:+.3f} [{diff[k]['low']:+.3f}, {diff[k]['high']:+.3f}] "
                     f"{diff[k]['verdict']}" for k in METRICS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    given = argv if argv is not None else sys.argv[1:]
    command = "OMP_NUM_THREADS=1 python eval/bench_echodistill.py " + shlex.join(a for a in given if a != "--reuse")
    header = [f"`{command}`", "",
              f"{n} images per method and concept (10 digits x {args.per_digit} prompts, seed k for image k, one "
              f"network call each); 95 % intervals from {args.bootstrap} paired bootstrap resamples; N = "
              f"{args.steps}, batch {args.batch_size}.", ""]
    markdown = "\n".join(header + lines)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "args": vars(args), "results": results, "markdown": markdown}
    (out_dir / f"{args.name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    (out_dir / f"{args.name}.md").write_text(markdown + "\n")
    grid_image(rows_for_grid, args.per_digit).save(out_dir / f"{args.name}.png")
    print(markdown)
    return payload


if __name__ == "__main__":
    main()

r"""Control transfer on the digits world: a style LoRA trained on the teacher, applied to DMD2 students.

    python eval/bench_control_transfer.py                       # trains runs/digits_style_lora if missing
    python eval/bench_control_transfer.py --lora runs/digits_style_lora --per_class 50 \
        --student dmd2-1step=runs/digits_dmd2_1step_bench/student --student dmd2-4step=runs/digits_dmd2_4step/student

Protocol: the "bold" style LoRA (strokes one pixel wider, :mod:`stepdistill.trainers.style_lora`) is
trained on the teacher only (50-step DDIM sampler). Every model (teacher and students) is then sampled with the same
per-image seeds (``seed + k``, classes 0-9 x ``--per_class``) without the LoRA, with it at each
``--scales``, and again after removing it. Reported per row: ink mass (mean of ``(x+1)/2``), ink
fraction (pixels with ``(x+1)/2 > 0.5``), their paired shift (same noise with vs without, ± standard
error) and the share of samples that got inkier, the digits classifier's accuracy and margin, and
whether removing the LoRA restored the outputs bitwise. ``Δ-map cos`` is the cosine between a model's
mean per-pixel change (with - without, scale 1) and the teacher's: where the LoRA adds ink. The
reference rows are the data the style was learned from (train split) and the held-out split, plain
and thickened.

``--reverse_from dmd2-4step`` adds the reverse direction: the same style LoRA trained on that student
(the same denoising objective, the student as the base network) and applied to the teacher and the
other students at scale 1.

Writes the markdown table and JSON (``--out``, ``--markdown``) and the comparison PNG ``--png``
(rows: teacher / students, without / with the LoRA; two samples per class).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from stepdistill.commands.common import float_list
from stepdistill.data.digits import load_digits_split
from stepdistill.data.digits_models import DigitsClassifier, classifier_path, teacher_path
from stepdistill.evaluation.stroke import stroke_statistics
from stepdistill.evaluation.transfer import comparison_grid, grid_rows, markdown_table, transfer
from stepdistill.trainers.style_lora import StyleLoraConfig, thicken_strokes, train_style_lora

DEFAULT_STUDENTS = ("dmd2-1step=runs/digits_dmd2_1step_bench/student", "dmd2-4step=runs/digits_dmd2_4step/student")


def _named(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--student expects NAME=FOLDER, got {text!r}.")
    return name, path


def reference_rows(classifier: torch.nn.Module, width: int) -> dict[str, dict]:
    """Stroke statistics of the real splits, plain and thickened (what the LoRA was trained towards)."""
    rows = {}
    for split in ("train", "heldout"):
        data = load_digits_split(split)
        rows[f"{split} (real)"] = stroke_statistics(data.images, data.labels, classifier)
        rows[f"{split} thickened (style target)"] = stroke_statistics(
            thicken_strokes(data.images, width), data.labels, classifier
        )
    return rows


def reference_table(rows: dict[str, dict]) -> str:
    """Markdown table of :func:`reference_rows`."""
    lines = ["| data | N | ink mass | ink fraction | class acc. | margin |", "|---|---|---|---|---|---|"]
    for name, st in rows.items():
        lines.append(f"| {name} | {st['n']} | {st['ink_mass']:.4f} | {st['ink_fraction']:.4f} "
                     f"| {100 * st['accuracy']:.1f} % | {st['margin']:.2f} ± {st['margin_se']:.2f} |")
    return "\n".join(lines)


def delta_map_cosines(results) -> dict[str, float]:
    """Cosine between each model's mean per-pixel change at the largest scale and the first model's."""
    maps = {}
    for r in results:
        top = max(r.images)
        maps[r.name] = (r.images[top] - r.images[0.0]).mean(0).flatten().double()
    ref = maps[results[0].name]
    return {name: float(torch.nn.functional.cosine_similarity(m, ref, dim=0)) for name, m in maps.items()}


def ensure_lora(folder: Path, base: str, steps: int) -> tuple[dict, float | None]:
    """``(stepdistill_lora.json contents, training seconds or None)``; trains the style LoRA on ``base`` if missing."""
    trained_here = None
    if not (folder / "pytorch_lora_weights.safetensors").is_file():
        print(f"{folder} has no LoRA: training the style LoRA on {base} ({steps} steps)")
        t0 = time.time()
        train_style_lora(StyleLoraConfig(teacher=base, output_dir=str(folder), max_train_steps=steps))
        trained_here = time.time() - t0
    info_file = folder / "stepdistill_lora.json"
    return (json.loads(info_file.read_text()) if info_file.is_file() else {}), trained_here


def describe_lora(folder: Path, info: dict) -> str:
    """One line: where the LoRA was trained, its rank, size and training time."""
    config = info.get("train_config", {})
    return (
        f"LoRA: `{folder}` (trained on `{info.get('base_model', '?')}`, rank {info.get('lora_config', {}).get('r')}, "
        f"{info.get('num_parameters', '?')} parameters, {config.get('max_train_steps')} steps in "
        f"{info.get('train_seconds', float('nan')):.0f} s)."
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 when every model's outputs were restored bitwise after removing the LoRA."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", default="runs/digits_style_lora", help="LoRA folder (trained here if missing).")
    parser.add_argument("--teacher", default=str(teacher_path()), help="Teacher pipeline folder.")
    parser.add_argument("--student", type=_named, action="append", default=None, metavar="NAME=FOLDER",
                        help=f"Student pipeline folder(s) (default: {', '.join(DEFAULT_STUDENTS)}).")
    parser.add_argument("--scales", type=float_list, default=[0.5, 1.0], help="LoRA scales (default 0.5,1).")
    parser.add_argument("--per_class", type=int, default=50, help="Samples per class (N = 10 x this).")
    parser.add_argument("--seed", type=int, default=0, help="First per-image seed.")
    parser.add_argument("--teacher_steps", type=int, default=50, help="Teacher ODE steps.")
    parser.add_argument("--train_steps", type=int, default=StyleLoraConfig.max_train_steps,
                        help="Style LoRA steps when it has to be trained.")
    parser.add_argument("--reverse_from", default=None, metavar="STUDENT",
                        help="Also the reverse direction: a style LoRA trained on this student (a --student name), "
                             "applied to the teacher and the students at scale 1.")
    parser.add_argument("--reverse_lora", default=None,
                        help="Folder of that LoRA (default runs/digits_style_lora_from_<STUDENT>; trained if missing).")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--out", default="runs/bench_control_transfer.json")
    parser.add_argument("--markdown", default="runs/bench_control_transfer.md")
    parser.add_argument("--png", default="docs/lora_transfer.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    students = args.student or [_named(s) for s in DEFAULT_STUDENTS]
    models = [("teacher", args.teacher), *students]
    if args.reverse_from is not None and args.reverse_from not in dict(students):
        parser.error(f"--reverse_from {args.reverse_from!r} is not a student name ({[n for n, _ in students]}).")
    lora = Path(args.lora)
    info, trained_here = ensure_lora(lora, args.teacher, args.train_steps)
    labels = [c for c in range(10) for _ in range(args.per_class)]
    seeds = list(range(args.seed, args.seed + len(labels)))
    classifier = DigitsClassifier.from_pretrained(classifier_path()).eval()
    results = transfer(lora, models, args.scales, labels, seeds, num_inference_steps=args.teacher_steps,
                       classifier=classifier)
    cosines = delta_map_cosines(results)
    refs = reference_rows(classifier, int(info.get("train_config", {}).get("stroke_width", 2)))
    cos_line = ", ".join(f"{k} {v:.3f}" for k, v in cosines.items())
    sections = [
        f"N = {len(seeds)} samples per row ({args.per_class} per class, seeds {seeds[0]}-{seeds[-1]}, the same "
        f"noise in every row of a model); teacher {args.teacher_steps}-step DDIM, guidance 1; students at their "
        f"trained timesteps. {describe_lora(lora, info)}",
        markdown_table(results),
        f"Δ-map cos (mean per-pixel change at scale {max(args.scales):g} vs the teacher's): {cos_line}.",
        reference_table(refs),
    ]
    summary = {
        "lora": str(lora), "lora_info": {k: v for k, v in info.items() if k != "history"},
        "trained_here_seconds": trained_here, "n": len(seeds), "per_class": args.per_class, "seed": args.seed,
        "teacher_steps": args.teacher_steps, "scales": args.scales,
        "results": [r.to_json() for r in results], "delta_map_cosine_vs_teacher": cosines, "reference": refs,
    }
    restored = {r.name: r.restored for r in results}
    if args.reverse_from is not None:
        rev_lora = Path(args.reverse_lora or f"runs/digits_style_lora_from_{args.reverse_from}")
        rev_info, rev_trained = ensure_lora(rev_lora, dict(students)[args.reverse_from], args.train_steps)
        order = [(n, p) for n, p in models if n == args.reverse_from] + [(n, p) for n, p in models
                                                                         if n != args.reverse_from]
        rev = transfer(rev_lora, order, [1.0], labels, seeds, num_inference_steps=args.teacher_steps,
                       classifier=classifier)
        rev_cos = delta_map_cosines(rev)
        sections += [
            f"Reverse direction: {describe_lora(rev_lora, rev_info)}",
            markdown_table(rev),
            f"Δ-map cos vs {args.reverse_from}'s: " + ", ".join(f"{k} {v:.3f}" for k, v in rev_cos.items()) + ".",
        ]
        summary["reverse"] = {
            "lora": str(rev_lora), "lora_info": {k: v for k, v in rev_info.items() if k != "history"},
            "trained_here_seconds": rev_trained, "results": [r.to_json() for r in rev],
            "delta_map_cosine_vs_source": rev_cos,
        }
        restored.update({f"reverse/{r.name}": r.restored for r in rev})
    md = "\n\n".join(sections)
    print(md)

    png = Path(args.png)
    png.parent.mkdir(parents=True, exist_ok=True)
    indices = [c * args.per_class + k for c in range(10) for k in range(min(2, args.per_class))]
    comparison_grid(grid_rows(results, indices)).save(png)
    print(f"\ncomparison grid: {png}")

    summary.update({"threads": args.threads, "torch": torch.__version__, "platform": platform.platform(),
                    "seconds": time.time() - t_start})
    print(json.dumps({"delta_map_cosine_vs_teacher": cosines, "restored_bitwise": restored}, indent=2))
    for path, text in ((args.out, json.dumps(summary, indent=2) + "\n"), (args.markdown, md + "\n")):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    if not all(restored.values()):
        print("error: removing the LoRA did not restore some model's outputs bitwise", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

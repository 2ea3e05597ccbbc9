"""Hybrid diversity sampling on the digits world: teacher vs DMD2 students vs base-then-student hybrids.

    python eval/bench_hybrid.py --threads 1 \
        --student1 runs/digits_dmd2_1step_bench/student --student4 runs/digits_dmd2_4step/student \
        --out runs/bench_hybrid.json --markdown runs/bench_hybrid.md

The students are trained on this machine with
``accelerate launch training_scripts/train_dmd.py --config recipes/digits_dmd2_1step_bench.yaml`` (one step,
conditioning timestep 399) and ``... --config recipes/digits_dmd2_4step.yaml`` (999, 749, 499, 249); the teacher is
the shipped ``stepdistill/assets/digits/teacher``. Every row runs through one
:class:`~stepdistill.pipelines.HybridDiversityPipeline` (``mode="base"`` for the teacher, ``mode="student"`` for a
student alone), so all rows share one code path and one timing method.

Protocol: eval/bench_digits.py's (N = 400 samples in the held-out class mix, sample k of seed set s uses seed
``100000 * s + k``, 3 seed sets, the digits classifier's 64-d features against the held-out split). Diversity is
measured within each class and averaged (mean pairwise cosine distance, Vendi), recall both overall and per class.
Time per sample: medians over ``--timing_rounds`` interleaved rounds (every row once per round, in rotated order,
after a warm-up), all in this run; the ratio compares each hybrid with the student it finishes with.

Targets (issue 5): hybrid diversity >= the student's and >= 95% of the teacher's; FID no worse than the student's;
time per sample <= 1.5x the student's.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from bench_digits import CallCounter, reproduce_command, timed, write_outputs

from stepdistill.data.digits import class_labels_like_reference
from stepdistill.data.digits_models import classifier_path, teacher_path
from stepdistill.evaluation import DigitsClassifierFeatures, ReferenceStats, compute_metrics, digits_features
from stepdistill.pipelines import HybridDiversityPipeline
from stepdistill.sampling import make_generators

COLUMNS = ("fid", "precision", "recall", "recall_per_class", "pairwise", "vendi", "class_accuracy")
TARGET_DIVERSITY_OF_TEACHER = 0.95
TARGET_TIME_RATIO = 1.5

#: Sample k of seed set s uses noise seed ``SEED_STRIDE * s + k`` (this benchmark keeps the seed-set protocol).
SEED_STRIDE = 100_000


def summarize(values: list[float]) -> dict:
    """Mean, sample standard deviation and the per-seed values (``None`` when there are none)."""
    if not values:
        return {"mean": None, "std": None, "values": []}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "values": arr.tolist()}


@dataclass
class Row:
    """One benchmark row: a pipeline call (``kwargs``) and, for hybrids, the student row it is compared with."""

    name: str
    pipe: HybridDiversityPipeline
    kwargs: dict
    student: str | None = None
    counters: list[CallCounter] = field(default_factory=list)


def build_rows(pipe1: HybridDiversityPipeline, pipe4: HybridDiversityPipeline, teacher_steps: int) -> list[Row]:
    """Teacher, the two students, and the hybrid variants explored (see the module docstring)."""
    s1, s4 = "dmd2 1-step", "dmd2 4-step"
    rows = [
        Row(f"teacher, {teacher_steps} steps", pipe4, dict(mode="base", base_num_inference_steps=teacher_steps)),
        Row(s1, pipe1, dict(mode="student")),
        Row(s4, pipe4, dict(mode="student")),
        Row("hybrid 4-step, k=1, renoise (paper)", pipe4, dict(base_steps=1, handover="renoise"), s4),
        Row("hybrid 4-step, k=2, renoise", pipe4, dict(base_steps=2, handover="renoise"), s4),
        Row("hybrid 4-step, k=1, transport", pipe4, dict(base_steps=1, handover="transport"), s4),
        Row("hybrid 4-step, k=2, transport", pipe4, dict(base_steps=2, handover="transport"), s4),
        Row("hybrid 4-step, k=1, renoise, base CFG 2", pipe4, dict(base_steps=1, base_guidance_scale=2.0), s4),
        Row("hybrid 1-step, k=1, resume 949", pipe1, dict(base_steps=1, resume_timestep=949), s1),
        Row("hybrid 1-step, k=1, resume 749", pipe1, dict(base_steps=1, resume_timestep=749), s1),
        Row("hybrid 1-step, k=2 (999, 749), resume 499", pipe1,
            dict(base_timesteps=[999, 749], base_steps=2, resume_timestep=499), s1),
    ]  # fmt: skip
    for row in rows:
        row.counters = [CallCounter(row.pipe.base_unet), CallCounter(row.pipe.unet)]
    return rows


def sample(row: Row, seeds: list[int], labels: list[int], batch_size: int) -> torch.Tensor:
    """Images of ``row`` in ``[-1, 1]`` (``[N, 1, 8, 8]``), one generator per seed."""
    out = []
    for i in range(0, len(seeds), batch_size):
        chunk = seeds[i : i + batch_size]
        images = row.pipe(class_labels=labels[i : i + len(chunk)], generator=make_generators(chunk),
                          output_type="pt", **row.kwargs).images  # fmt: skip
        out.append(images * 2 - 1)
    return torch.cat(out)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the markdown tables, write JSON (and markdown); returns the JSON payload."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="Teacher folder (default: the shipped digits teacher).")
    p.add_argument("--student1", default="runs/digits_dmd2_1step_bench/student", help="One-step student folder.")
    p.add_argument("--student4", default="runs/digits_dmd2_4step/student", help="Four-step student folder.")
    p.add_argument("--teacher_steps", type=int, default=50, help="Teacher steps (default 50).")
    p.add_argument("--num_samples", type=int, default=400, help="N per row and seed set (default 400).")
    p.add_argument("--seeds", type=int, default=3, help="Seed sets (default 3).")
    p.add_argument("--batch_size", type=int, default=400, help="Samples per pipeline call.")
    p.add_argument("--timing_rounds", type=int, default=5, help="Interleaved timing rounds (default 5).")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (timings depend on it).")
    p.add_argument("--out", default=None, help="Write JSON here.")
    p.add_argument("--markdown", default=None, help="Also write the markdown tables here.")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    n = args.num_samples
    teacher_dir = Path(args.teacher) if args.teacher else teacher_path()
    for what, path in (("--student1", args.student1), ("--student4", args.student4)):
        if not (Path(path) / "model_index.json").is_file():
            raise SystemExit(
                f"{what} {path!r} is not a student pipeline folder. Train it first: accelerate launch "
                "training_scripts/train_dmd.py --config recipes/digits_dmd2_1step_bench.yaml (one step) or "
                "recipes/digits_dmd2_4step.yaml (four steps)."
            )

    # 1. Features, reference, labels, seeds (bench_digits' protocol)
    extractor = DigitsClassifierFeatures.from_pretrained(classifier_path(), device=device)
    ref_feats, ref_labels = digits_features("heldout", extractor)
    ref = ReferenceStats.from_features(ref_feats, extractor, source="digits:heldout", labels=ref_labels)
    labels = class_labels_like_reference(n, "heldout").tolist()
    labels_np = np.asarray(labels)
    seed_sets = [[SEED_STRIDE * s + k for k in range(n)] for s in range(args.seeds)]

    # 2. Pipelines and rows
    pipes = {}
    for key, path in (("1", args.student1), ("4", args.student4)):
        pipe = HybridDiversityPipeline.from_pipelines(teacher_dir, path)
        pipe.set_progress_bar_config(disable=True)
        pipes[key] = pipe
    rows = build_rows(pipes["1"], pipes["4"], args.teacher_steps)

    # 3. Quality and diversity, every row, every seed set
    results: dict[str, dict] = {}
    for row in rows:
        per_seed: dict[str, list[float]] = {c: [] for c in COLUMNS}
        per_class: list[dict] = []
        for counter in row.counters:
            counter.rows = 0
        for seeds in seed_sets:
            images = sample(row, seeds, labels, args.batch_size)
            feats = extractor(images)
            m = compute_metrics(feats, ref, labels=labels_np, extractor=extractor, per_class=True)
            per_seed["fid"].append(m.fid)
            per_seed["precision"].append(m.precision)
            per_seed["recall"].append(m.recall)
            per_seed["recall_per_class"].append(float(np.mean([c["recall"] for c in m.per_class.values()])))
            per_seed["pairwise"].append(m.pairwise_cosine_distance)
            per_seed["vendi"].append(m.vendi)
            per_seed["class_accuracy"].append(float((extractor.predict(images) == labels_np).mean()))
            per_class.append(m.per_class)
        nfe = sum(c.rows for c in row.counters) / (n * len(seed_sets))
        plan = row.pipe.plan(**{k: v for k, v in row.kwargs.items() if k != "base_guidance_scale"})
        results[row.name] = {
            "name": row.name,
            "call": row.kwargs,
            "plan": plan.to_dict(),
            "student": row.student,
            "nfe": nfe,
            **{c: summarize(v) for c, v in per_seed.items()},
            "per_class": _mean_per_class(per_class),
        }
        print(f"[bench_hybrid] {row.name}: FID {results[row.name]['fid']['mean']:.3f}, "
              f"Vendi {results[row.name]['vendi']['mean']:.3f}", file=sys.stderr)  # fmt: skip

    # 4. Time per sample: interleaved rounds, medians
    timing_seeds, timing_labels = seed_sets[0], labels
    for row in rows:  # warm-up
        sample(row, timing_seeds[:8], timing_labels[:8], args.batch_size)
    times: dict[str, list[float]] = {row.name: [] for row in rows}
    for r in range(args.timing_rounds):
        order = rows[r % len(rows) :] + rows[: r % len(rows)]
        for row in order:
            _, seconds = timed(lambda row=row: sample(row, timing_seeds, timing_labels, args.batch_size), device)
            times[row.name].append(1000.0 * seconds / n)
    for name, values in times.items():
        results[name]["ms_per_sample"] = {"median": statistics.median(values), "values": values}
    for res in results.values():
        base = results.get(res["student"]) if res["student"] else None
        res["time_ratio"] = res["ms_per_sample"]["median"] / base["ms_per_sample"]["median"] if base else None

    teacher_name = rows[0].name
    protocol = {
        "num_samples": n,
        "seed_sets": args.seeds,
        "seeds": f"{SEED_STRIDE} * s + k",
        "labels": "held-out class mix (class_labels_like_reference)",
        "reference": f"digits:heldout ({ref.n} images)",
        "extractor": extractor.describe(),
        "teacher": str(teacher_dir),
        "base_guidance_scale": pipes["4"].config.base_guidance_scale,
        "students": {"1-step": args.student1, "4-step": args.student4},
        "timing": f"median of {args.timing_rounds} interleaved rounds of {n} samples (batch {args.batch_size})",
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": reproduce_command(argv if argv is not None else sys.argv[1:], "eval/bench_hybrid.py"),
    }
    table = markdown_tables(list(results.values()), results[teacher_name], protocol)
    print(table)
    payload = {"protocol": protocol, "rows": list(results.values()), "markdown": table}
    write_outputs(args, payload)
    return payload


def _mean_per_class(per_seed: list[dict]) -> dict:
    """Per-class metrics averaged over seed sets: ``{class: {metric: mean}}``."""
    out: dict = {}
    for label in per_seed[0]:
        keys = [k for k, v in per_seed[0][label].items() if isinstance(v, float)]
        out[label] = {k: float(np.mean([s[label][k] for s in per_seed])) for k in keys}
    return out


def markdown_tables(results: list[dict], teacher: dict, protocol: dict) -> str:
    """The results table (``mean ± std`` over seed sets) and the targets table of the hybrid rows."""

    def pm(cell: dict, digits: int = 3) -> str:
        return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"

    lines = [
        "| sampler | NFE | FID ↓ | precision ↑ | recall ↑ | recall / class ↑ | pairwise dist. / class ↑ "
        "| Vendi / class ↑ | class acc. ↑ | ms / sample | × student |",
        "|" + "---|" * 11,
    ]
    for r in results:
        ratio = "–" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}×"
        lines.append(
            f"| {r['name']} | {r['nfe']:g} | {pm(r['fid'], 2)} | {pm(r['precision'])} | {pm(r['recall'])} | "
            f"{pm(r['recall_per_class'])} | {pm(r['pairwise'], 4)} | {pm(r['vendi'])} | {pm(r['class_accuracy'])} | "
            f"{r['ms_per_sample']['median']:.3f} | {ratio} |"
        )
    by_name = {r["name"]: r for r in results}
    lines += [
        "",
        "| hybrid | its student | Vendi ≥ student | pairwise ≥ student | Vendi ≥ 95% teacher | FID ≤ student "
        "| time ≤ 1.5× student |",
        "|" + "---|" * 7,
    ]
    mark = lambda ok, text: f"{'yes' if ok else '**no**'} ({text})"  # noqa: E731
    for r in results:
        if r["student"] is None:
            continue
        s = by_name[r["student"]]
        v, sv, tv = r["vendi"]["mean"], s["vendi"]["mean"], teacher["vendi"]["mean"]
        d, sd = r["pairwise"]["mean"], s["pairwise"]["mean"]
        f, sf = r["fid"]["mean"], s["fid"]["mean"]
        ratio = r["time_ratio"]
        lines.append(
            f"| {r['name']} | {r['student']} | {mark(v >= sv, f'{v:.3f} vs {sv:.3f}')} | "
            f"{mark(d >= sd, f'{d:.4f} vs {sd:.4f}')} | "
            f"{mark(v >= TARGET_DIVERSITY_OF_TEACHER * tv, f'{100 * v / tv:.0f}%')} | "
            f"{mark(f <= sf, f'{f:.2f} vs {sf:.2f}')} | "
            f"{mark(ratio <= TARGET_TIME_RATIO, f'{ratio:.2f}×')} |"
        )
    lines += [
        "",
        f"N = {protocol['num_samples']} per row and seed set in the held-out class mix, {protocol['seed_sets']} seed "
        f"sets (mean ± standard deviation); metrics against {protocol['reference']} in the digits classifier's "
        f"{protocol['extractor']['dim']}-d features; diversity (pairwise cosine distance, Vendi) and recall / class "
        f"within each class, averaged over classes. Base guidance {protocol['base_guidance_scale']:g} unless stated. "
        f"NFE counts base and student network rows per sample. Time: {protocol['timing']}, CPU, "
        f"{protocol['threads']} thread(s); × student = the hybrid's time over its student's. "
        f"Reproduce: `{protocol['command']}`.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""The digits benchmark: teacher at 1/2/4/10/50 steps and distilled students, one fixed protocol.

    python eval/bench_digits.py --threads 2 --out runs/bench_digits.json --markdown runs/bench_digits.md
    python eval/bench_digits.py --student dmd2-1step=runs/digits/train/student \
        --student dmd2-4step=runs/dmd2_4step/student:999,749,499,249 --baseline dmd2-1step

Protocol (identical for every row): N = 2,000 samples, class labels in the held-out mix (200 per class),
sample k uses noise seed k in every row (so rows are paired sample by sample); metrics against the
held-out split (400 images no network trained on) in the digits classifier's 64-d feature space.

* FID at N and FID∞ (Chong & Forsyth 2020: FID on 8 subset sizes N/5..N, extrapolated linearly in 1/N);
  95 % bootstrap intervals (200 resamples of the generated samples, seed 0, the same indices in every row);
* the real-data floor: all 1,397 train-split images evaluated like a model (disjoint from the held-out
  reference; the classifier trained on them, so the floor is somewhat optimistic); "excess" = FID∞ minus
  the floor's FID∞, with an interval from the two independent bootstraps;
* paired verdicts: each row's FID∞ (and precision / recall) against the 50-step teacher and against
  ``--baseline``, from the difference's paired bootstrap interval: "better" / "worse" only when it
  excludes zero, else "not resolved";
* fidelity: FID against the teacher's own samples at ``--reference_steps`` drawn with other noise
  (seeds ``1000000 + k``);
* NFE: network evaluations per sample, counted by a hook (classifier-free guidance counts twice);
* ``--text``: the text-conditioned digits world (default teacher: the shipped ``digits-text`` pipeline, sampled
  by stock diffusers): sample k is prompted with a caption of the k-th held-out-mix digit, template
  ``k % T`` of ``--templates`` (``train`` or ``heldout``); "class acc." is then the *prompt fidelity* (the
  classifier agrees with the digit the prompt names); students are stock ``StableDiffusionPipeline`` folders
  called with ``--student_guidance_scale`` (default 1: no CFG) and their timesteps;
* ms/sample and speedup: wall-clock sampling time per sample in this run (a warm-up call first); speedup
  is relative to the teacher at ``--reference_steps``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stepdistill.conditioning import Conditioning
from stepdistill.data.digits import NULL_CLASS, class_labels_like_reference
from stepdistill.data.digits_models import classifier_path, teacher_path, text_teacher_path
from stepdistill.data.digits_text import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, captions_like_reference
from stepdistill.evaluation import DigitsClassifierFeatures, digits_features
from stepdistill.evaluation.metrics import diversity, feature_statistics, frechet_distance
from stepdistill.evaluation.sources import load_pipeline, sample_pipeline
from stepdistill.evaluation.stats import write_json
from stepdistill.evaluation.uncertainty import (
    MetricReplicates,
    ResamplePlan,
    bootstrap_metrics,
    compare_independent,
    compare_paired,
)
from stepdistill.loading import load_denoiser
from stepdistill.sampling import initial_noise, make_generators, sample_teacher

FIDELITY_SEED = 1_000_000
FLOOR_NAME = "real (train split)"


def parse_student(text: str) -> tuple[str, str, list[int] | None]:
    """``NAME=PATH[:t1,t2,...]`` -> ``(name, path, timesteps or None)``."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--student expects NAME=PATH[:timesteps], got {text!r}.")
    match = re.fullmatch(r"(.*):(\d+(?:,\d+)*)", rest)
    if match:
        return name, match.group(1), [int(t) for t in match.group(2).split(",")]
    return name, rest, None


def default_guidance_scale(teacher: Path) -> float:
    """``guidance_scale`` from ``<teacher>/stepdistill_teacher.json`` when present, else 1.0."""
    meta = Path(teacher) / "stepdistill_teacher.json"
    if meta.is_file():
        return float(json.loads(meta.read_text()).get("guidance_scale", 1.0))
    return 1.0


class CallCounter:
    """Counts the rows the networks process (per-sample NFE = rows / samples), via forward pre-hooks.

    Several modules (a phased-experts pipeline's experts, a routed pipeline's students) share one count.
    """

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.rows = 0
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in modules]

    def _hook(self, module, args, kwargs) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        self.rows += int(x.shape[0])


def timed(fn: Callable[[], np.ndarray | torch.Tensor], device: torch.device) -> tuple[np.ndarray | torch.Tensor, float]:
    """Run ``fn`` and return ``(result, seconds)`` (CUDA work is synchronized before reading the clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def without_output_flags(argv: list[str]) -> list[str]:
    """``argv`` without the output-file flags (``--out``, ``--markdown``), for a reproduce line."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--markdown"):
            skip = True
        elif not arg.startswith(("--out=", "--markdown=")):
            kept.append(arg)
    return kept


def reproduce_command(argv: list[str], script: str = "eval/bench_digits.py") -> str:
    """The command line that regenerates the numbers (output-file flags dropped)."""
    return " ".join(["python", script, *without_output_flags(argv)])


def write_outputs(args: argparse.Namespace, payload: dict) -> None:
    """Write ``payload`` to ``--out`` (JSON) and its ``"markdown"`` table to ``--markdown``, when given."""
    if args.out:
        write_json(args.out, payload)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(payload["markdown"] + "\n")


def teacher_row_name(steps: int) -> str:
    """Row name of the teacher at ``steps`` steps."""
    return f"teacher, {steps} step{'s' if steps != 1 else ''}"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the markdown tables, write JSON (and markdown); returns the JSON payload."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="Teacher folder (default: the shipped digits teacher).")
    p.add_argument("--classifier", default=None, help="Feature classifier folder (default: the shipped one).")
    p.add_argument("--guidance_scale", type=float, default=None, help="Teacher CFG (default: from the teacher's json).")
    p.add_argument("--student", action="append", type=parse_student, default=[], help="NAME=PATH[:timesteps].")
    p.add_argument("--baseline", default=None, help="Row every other row is also compared with (e.g. dmd2-1step).")
    p.add_argument("--num_samples", type=int, default=2000, help="N per row (default 2000).")
    p.add_argument("--bootstrap", type=int, default=200, help="Bootstrap resamples (default 200).")
    p.add_argument("--bootstrap_seed", type=int, default=0, help="Seed of the bootstrap indices.")
    p.add_argument("--confidence", type=float, default=0.95, help="Interval coverage (default 0.95).")
    p.add_argument("--steps", default="1,2,4,10,50", help="Teacher step counts (default 1,2,4,10,50).")
    p.add_argument("--reference_steps", type=int, default=50, help="Teacher steps of the speed / fidelity reference.")
    p.add_argument("--batch_size", type=int, default=500, help="Samples per sampler call.")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (timings depend on it).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--text", action="store_true", help="The text-conditioned world (prompts instead of labels).")
    p.add_argument("--templates", default="train", choices=("train", "heldout"), help="Caption templates (--text).")
    p.add_argument("--student_guidance_scale", type=float, default=1.0, help="Student CFG with --text (1: none).")
    p.add_argument("--out", default=None, help="Write JSON here.")
    p.add_argument("--markdown", default=None, help="Also write the markdown tables here.")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = args.num_samples
    steps = [int(s) for s in args.steps.split(",")]
    if args.reference_steps not in steps:
        steps.append(args.reference_steps)
    teacher_dir = Path(args.teacher) if args.teacher else (text_teacher_path() if args.text else teacher_path())
    guidance = args.guidance_scale if args.guidance_scale is not None else default_guidance_scale(teacher_dir)
    names = [name for name, _, _ in args.student]
    if args.baseline is not None and args.baseline not in names + [teacher_row_name(s) for s in steps]:
        p.error(f"--baseline {args.baseline!r} is not a row; rows: {names + [teacher_row_name(s) for s in steps]}")

    # 1. Features, reference, floor images and labels
    extractor = DigitsClassifierFeatures.from_pretrained(args.classifier or classifier_path(), device=device)
    ref_feats, _ = digits_features("heldout", extractor)
    floor_feats, floor_labels = digits_features("train", extractor)
    mu_ref, sigma_ref = feature_statistics(ref_feats)
    labels = class_labels_like_reference(n, "heldout")
    captions = None
    if args.text:
        templates = TRAIN_TEMPLATES if args.templates == "train" else HELDOUT_TEMPLATES
        captions, labels = captions_like_reference(n, templates)
    labels_np = labels.numpy()
    seeds = list(range(n))
    plan = ResamplePlan.make(n, ref_feats.shape[1], args.bootstrap, args.bootstrap_seed)
    floor_plan = ResamplePlan.make(len(floor_feats), ref_feats.shape[1], args.bootstrap, args.bootstrap_seed + 1)

    # 2. Samplers: each maps a list of seeds to [-1, 1] images, with a counter of network rows
    if args.text:  # the stock StableDiffusionPipeline, prompted; image k gets captions[k]
        teacher_pipe = load_pipeline(teacher_dir, device=device)
        teacher_counter = CallCounter(teacher_pipe.unet)
    else:
        teacher = load_denoiser(teacher_dir, device=device)
        teacher_counter = CallCounter(teacher.model)

    def text_sampler(pipe, seeds: list[int], guidance_scale: float, **kwargs) -> np.ndarray:
        batches = sample_pipeline(pipe, seeds, prompts=captions[: len(seeds)], guidance_scale=guidance_scale,
                                  batch_size=args.batch_size, **kwargs)  # fmt: skip
        return np.concatenate([u8 for _, u8 in batches])

    def teacher_sampler(num_steps: int) -> Callable[[list[int]], torch.Tensor | np.ndarray]:
        def run(seeds: list[int]) -> torch.Tensor | np.ndarray:
            if args.text:
                return text_sampler(teacher_pipe, seeds, guidance, num_inference_steps=num_steps)
            out = []
            for i in range(0, len(seeds), args.batch_size):
                chunk = seeds[i : i + args.batch_size]
                x = initial_noise((len(chunk), 1, 8, 8), make_generators(chunk), device=device)
                cond = Conditioning(class_labels=labels[i : i + len(chunk)].to(device), null_class_label=NULL_CLASS)
                out.append(sample_teacher(teacher, x, cond, num_inference_steps=num_steps, guidance_scale=guidance))
            return torch.cat(out)

        return run

    def student_sampler(pipe, timesteps: list[int] | None) -> Callable[[list[int]], np.ndarray]:
        def run(seeds: list[int]) -> np.ndarray:
            if args.text:
                return text_sampler(pipe, seeds, args.student_guidance_scale, timesteps=timesteps)
            batches = sample_pipeline(pipe, seeds, labels_np[: len(seeds)].tolist(), timesteps=timesteps,
                                      batch_size=args.batch_size)  # fmt: skip
            return np.concatenate([u8 for _, u8 in batches])

        return run

    rows: list[tuple[str, Callable, CallCounter]] = [
        (teacher_row_name(s), teacher_sampler(s), teacher_counter) for s in steps
    ]
    for name, path, timesteps in args.student:
        pipe = load_pipeline(path, device=device)
        # every network that can run a step: a phased pipeline's experts, a routed pipeline's students
        networks = getattr(pipe, "experts", None) or getattr(pipe, "students", None) or [pipe.unet]
        rows.append((f"{name}", student_sampler(pipe, timesteps), CallCounter(*networks)))

    # 3. The fidelity reference: the teacher's own samples with other noise
    fid_ref_images = teacher_sampler(args.reference_steps)([FIDELITY_SEED + k for k in range(n)])
    fid_ref_mu, fid_ref_sigma = feature_statistics(extractor(fid_ref_images))

    # 4. Every row: sample (timed), features, bootstrap
    floor = bootstrap_metrics(floor_feats, mu_ref, sigma_ref, floor_plan, ref_feats)
    results = [{
        "name": FLOOR_NAME, "n": len(floor_feats), "nfe": None, "ms_per_sample": None,
        "class_accuracy": float((extractor.predict(load_train_images()) == floor_labels).mean()),
        "vendi": diversity(floor_feats, floor_labels)["vendi"],
        "fidelity_fid": frechet_distance(*feature_statistics(floor_feats), fid_ref_mu, fid_ref_sigma),
        **cells(floor, args.confidence),
    }]  # fmt: skip
    replicates: dict[str, MetricReplicates] = {}
    for name, sampler, counter in rows:
        sampler(seeds[: min(8, n)])  # warm-up, untimed
        counter.rows = 0
        images, seconds = timed(lambda sampler=sampler: sampler(seeds), device)
        feats = extractor(images)
        reps = bootstrap_metrics(feats, mu_ref, sigma_ref, plan, ref_feats)
        replicates[name] = reps
        row = {
            "name": name,
            "n": n,
            "nfe": counter.rows / n,
            "ms_per_sample": 1000.0 * seconds / n,
            "class_accuracy": float((extractor.predict(images) == labels_np).mean()),
            "vendi": diversity(feats, labels_np)["vendi"],
            "fidelity_fid": frechet_distance(*feature_statistics(feats), fid_ref_mu, fid_ref_sigma),
            **cells(reps, args.confidence),
        }
        excess = compare_independent(reps, floor, args.confidence)["fid_inf"]
        row["excess_over_floor"] = {"value": excess.difference, "low": excess.low, "high": excess.high}
        results.append(row)
        print(f"[bench] {name}: FID {row['fid']['value']:.3f}, FID_inf {row['fid_inf']['value']:.3f}", file=sys.stderr)

    # 5. Paired verdicts against the reference teacher and the baseline
    reference_name = teacher_row_name(args.reference_steps)
    reference_ms = next(r for r in results if r["name"] == reference_name)["ms_per_sample"]
    for r in results[1:]:
        r["speedup"] = reference_ms / r["ms_per_sample"]
        for key, other in (("vs_teacher", reference_name), ("vs_baseline", args.baseline)):
            if other is None or other == r["name"]:
                continue
            diffs = compare_paired(replicates[r["name"]], replicates[other], args.confidence)
            r[key] = {"against": other, **{m: d.to_dict() for m, d in diffs.items()}}
            r[key]["fid_inf_ratio"] = r["fid_inf"]["value"] / replicates[other].estimates["fid_inf"]
    results[0]["speedup"] = None

    protocol = {
        "num_samples": n,
        "seeds": f"k for sample k (k = 0..{n - 1}), the same in every row",
        "fidelity_seeds": f"{FIDELITY_SEED} + k",
        "labels": "held-out class mix (class_labels_like_reference)" if not args.text else
                  f"prompts: captions of the held-out class mix, {args.templates} templates (captions_like_reference)",
        "student_guidance_scale": args.student_guidance_scale if args.text else None,
        "reference": f"digits:heldout ({len(ref_feats)} images)",
        "floor": f"digits:train ({len(floor_feats)} images)",
        "extractor": extractor.describe(),
        "teacher": str(teacher_dir),
        "guidance_scale": guidance,
        "reference_steps": args.reference_steps,
        "baseline": args.baseline,
        "bootstrap": {"resamples": args.bootstrap, "seed": args.bootstrap_seed, "confidence": args.confidence,
                      "fid_inf_sizes": plan.sizes.tolist(),
                      "interval": "percentile interval of the replicates, centred on the estimate"},  # fmt: skip
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": reproduce_command(argv if argv is not None else sys.argv[1:]),
        "seconds": time.perf_counter() - t_start,
    }
    table = markdown_table(results, protocol)
    print(table)
    payload = {"protocol": protocol, "rows": results, "markdown": table}
    write_outputs(args, payload)
    return payload


def load_train_images() -> torch.Tensor:
    """The train split's images (the floor)."""
    from stepdistill.data.digits import load_digits_split

    return load_digits_split("train").images


def cells(reps: MetricReplicates, confidence: float) -> dict:
    """``{metric: {"value", "low", "high"}}`` of one row."""
    return reps.summary(confidence)


def markdown_table(results: list[dict], protocol: dict) -> str:
    """The README tables: metrics with intervals, then the paired verdicts."""

    def ci(cell: dict | None, digits: int = 2, scale: float = 1.0) -> str:
        if not cell or cell.get("value") is None:
            return "–"
        if cell.get("low") is None:
            return f"{cell['value'] * scale:.{digits}f}"
        lo, hi = sorted((cell["low"] * scale, cell["high"] * scale))
        return f"{cell['value'] * scale:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    def verdict(comp: dict | None, metric: str, digits: int = 2) -> str:
        if not comp or metric not in comp:
            return "–"
        d = comp[metric]
        return f"{d['difference']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}] {d['verdict']}"

    ref = protocol["reference_steps"]
    head = (
        "| model | NFE | FID ↓ | FID∞ ↓ | excess over floor ↓ | KID ↓ | precision ↑ | recall ↑ | class acc. ↑ "
        f"| Vendi / class ↑ | fidelity FID ↓ | ms / sample | speedup vs {ref}-step teacher |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in results:
        nfe = "–" if r["nfe"] is None else f"{r['nfe']:g}"
        speed = "–" if r.get("speedup") is None else f"{r['speedup']:.1f}×"
        ms = "–" if r["ms_per_sample"] is None else f"{r['ms_per_sample']:.3f}"
        name = r["name"] if r["nfe"] is not None else f"{r['name']}, N = {r['n']}"
        lines.append(
            f"| {name} | {nfe} | {ci(r['fid'])} | {ci(r['fid_inf'])} | {ci(r.get('excess_over_floor'))} | "
            f"{ci(r['kid'], 1)} | {ci(r['precision'], 3)} | {ci(r['recall'], 3)} | {r['class_accuracy']:.3f} | "
            f"{r['vendi']:.2f} | {r['fidelity_fid']:.2f} | {ms} | {speed} |"
        )
    lines.append("")
    base = protocol["baseline"]
    lines.append(
        f"| model | FID∞ − {ref}-step teacher | FID∞ ratio to teacher | precision − teacher | recall − teacher"
        + (f" | FID∞ − {base} | recall − {base} |" if base else " |")
    )
    lines.append("|" + "---|" * (7 if base else 5))
    for r in results:
        if "vs_teacher" not in r and "vs_baseline" not in r:
            continue
        t = r.get("vs_teacher")
        ratio = "–" if not t else f"{t['fid_inf_ratio']:.2f}"
        cells_ = [verdict(t, "fid_inf"), ratio, verdict(t, "precision", 3), verdict(t, "recall", 3)]
        if base:
            cells_ += [verdict(r.get("vs_baseline"), "fid_inf"), verdict(r.get("vs_baseline"), "recall", 3)]
        lines.append(f"| {r['name']} | " + " | ".join(cells_) + " |")
    boot = protocol["bootstrap"]
    lines.append("")
    lines.append(
        f"N = {protocol['num_samples']} samples per row, class labels in the held-out mix, sample k from noise seed k "
        f"in every row; metrics against the {protocol['reference']} in the digits classifier's "
        f"{protocol['extractor']['dim']}-d feature space. Brackets: {boot['confidence']:.0%} bootstrap intervals "
        f"({boot['resamples']} resamples of the generated samples, seed {boot['seed']}, the same indices in every "
        f"row; the second table's differences are paired, a verdict is 'better' / 'worse' only when the interval "
        f"excludes 0). FID∞: FID at subset sizes {boot['fid_inf_sizes'][0]}..{boot['fid_inf_sizes'][-1]} "
        f"extrapolated linearly in 1/N (Chong & Forsyth 2020). Floor: {protocol['floor']} evaluated like a model "
        f"(the classifier trained on them, so it is somewhat optimistic; its precision / recall are at its own N); "
        f"excess = FID∞ − the floor's FID∞. KID: unbiased, all pairs, raw (not ×10³). Fidelity = FID against the "
        f"teacher's own {ref}-step samples with other noise. Teacher guidance scale {protocol['guidance_scale']:g}; "
        f"timings on {protocol['device']} with {protocol['threads']} thread(s). Reproduce: `{protocol['command']}`."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

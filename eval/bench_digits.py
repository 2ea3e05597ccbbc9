"""The digits benchmark: teacher at 1/2/4/10/50 steps and distilled students, one fixed protocol.

    python eval/bench_digits.py --out runs/bench_digits.json --markdown runs/bench_digits.md
    python eval/bench_digits.py --student dmd2-1step=runs/dmd2_1step/pipeline \
        --student dmd2-4step=runs/dmd2_4step/pipeline:999,749,499,249

Protocol (identical for every row): N = 400 samples (the held-out split's size) with class labels in the
held-out mix (40 per class); sample k of seed set s uses noise seed ``100000 * s + k``; metrics against the
held-out split in the digits classifier's 64-d feature space; mean and standard deviation over 3 seed sets.

* real: N train-split images (class mix matched, drawn with the seed set) vs held-out -- what "perfect"
  reads as at this N (the classifier was trained on the train split, so this floor is slightly optimistic);
* fidelity: FID against the teacher's own samples at ``--reference_steps`` drawn with other noise
  (seeds ``1000000 + k``); its floor is the teacher row at ``--reference_steps``;
* NFE: network evaluations per sample, counted by a hook (classifier-free guidance counts twice);
* ms/sample and speedup: wall-clock sampling time per sample, measured in this run on this machine (a
  warm-up call first); speedup is relative to the teacher at ``--reference_steps``.
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
from stepdistill.data.digits import NULL_CLASS, class_labels_like_reference, load_digits_split
from stepdistill.data.digits_models import classifier_path, teacher_path
from stepdistill.evaluation import DigitsClassifierFeatures, ReferenceStats, compute_metrics, digits_features
from stepdistill.evaluation.metrics import feature_statistics, frechet_distance
from stepdistill.evaluation.sources import load_pipeline, sample_pipeline
from stepdistill.evaluation.stats import write_json
from stepdistill.loading import load_denoiser
from stepdistill.sampling import initial_noise, make_generators, sample_teacher

SEED_STRIDE = 100_000
FIDELITY_SEED = 1_000_000
COLUMNS = ("fid", "kid", "precision", "recall", "class_accuracy", "vendi", "fidelity_fid", "ms_per_sample")


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

    Several modules (a phased-experts pipeline's experts) share one count.
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


def real_subset(labels: np.ndarray, seed: int) -> torch.Tensor:
    """Train-split images whose ``k``-th has class ``labels[k]`` (drawn without replacement with ``seed``)."""
    train = load_digits_split("train")
    train_labels = train.labels.numpy()
    rng = np.random.default_rng(seed)
    index = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        slots = np.flatnonzero(labels == c)
        index[slots] = rng.choice(np.flatnonzero(train_labels == c), size=len(slots), replace=False)
    return train.images[index]


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


def teacher_row_name(steps: int) -> str:
    """Row name of the teacher at ``steps`` steps."""
    return f"teacher, {steps} step{'s' if steps != 1 else ''}"


def summarize(values: list[float]) -> dict:
    """Mean, sample standard deviation and the per-seed values (``None`` when there are none)."""
    if not values:
        return {"mean": None, "std": None, "values": []}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "values": arr.tolist()}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the markdown table, write JSON (and markdown); returns the JSON payload."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="Teacher folder (default: the shipped digits teacher).")
    p.add_argument("--classifier", default=None, help="Feature classifier folder (default: the shipped one).")
    p.add_argument("--guidance_scale", type=float, default=None, help="Teacher CFG (default: from the teacher's json).")
    p.add_argument("--student", action="append", type=parse_student, default=[], help="NAME=PATH[:timesteps].")
    p.add_argument("--num_samples", type=int, default=400, help="N per row and seed set (default 400).")
    p.add_argument("--seeds", type=int, default=3, help="Seed sets averaged over (default 3).")
    p.add_argument("--steps", default="1,2,4,10,50", help="Teacher step counts (default 1,2,4,10,50).")
    p.add_argument("--reference_steps", type=int, default=50, help="Teacher steps of the speed / fidelity reference.")
    p.add_argument("--batch_size", type=int, default=400, help="Samples per sampler call.")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (timings depend on it).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="Write JSON here.")
    p.add_argument("--markdown", default=None, help="Also write the markdown table here.")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = args.num_samples
    steps = [int(s) for s in args.steps.split(",")]
    if args.reference_steps not in steps:
        steps.append(args.reference_steps)
    teacher_dir = Path(args.teacher) if args.teacher else teacher_path()
    guidance = args.guidance_scale if args.guidance_scale is not None else default_guidance_scale(teacher_dir)

    # 1. Features, reference and labels
    extractor = DigitsClassifierFeatures.from_pretrained(args.classifier or classifier_path(), device=device)
    ref_feats, ref_labels = digits_features("heldout", extractor)
    ref = ReferenceStats.from_features(ref_feats, extractor, source="digits:heldout", labels=ref_labels)
    labels = class_labels_like_reference(n, "heldout")
    labels_np = labels.numpy()
    seed_sets = [[SEED_STRIDE * s + k for k in range(n)] for s in range(args.seeds)]

    # 2. Samplers: each maps a list of seeds to [-1, 1] images, with a counter of network rows
    teacher = load_denoiser(teacher_dir, device=device)
    teacher_counter = CallCounter(teacher.model)

    def teacher_sampler(num_steps: int) -> Callable[[list[int]], torch.Tensor]:
        def run(seeds: list[int]) -> torch.Tensor:
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
            batches = sample_pipeline(pipe, seeds, labels_np[: len(seeds)].tolist(), timesteps=timesteps,
                                      batch_size=args.batch_size)  # fmt: skip
            return np.concatenate([u8 for _, u8 in batches])

        return run

    rows: list[tuple[str, Callable | None, CallCounter | None]] = [("real (train split)", None, None)]
    rows += [(teacher_row_name(s), teacher_sampler(s), teacher_counter) for s in steps]
    for name, path, timesteps in args.student:
        pipe = load_pipeline(path, device=device)
        networks = getattr(pipe, "experts", None) or [pipe.unet]  # PhasedExpertsPipeline: every expert
        rows.append((f"{name}", student_sampler(pipe, timesteps), CallCounter(*networks)))

    # 3. The fidelity reference: the teacher's own samples with other noise
    fid_ref_images = teacher_sampler(args.reference_steps)([FIDELITY_SEED + k for k in range(n)])
    fid_ref_mu, fid_ref_sigma = feature_statistics(extractor(fid_ref_images))

    # 4. Every row, every seed set
    results = []
    for name, sampler, counter in rows:
        per_seed: dict[str, list[float]] = {c: [] for c in COLUMNS}
        nfe = None
        if sampler is not None:
            sampler(seed_sets[0][: min(8, n)])  # warm-up, untimed
        for s, seeds in enumerate(seed_sets):
            if sampler is None:
                images, seconds = real_subset(labels_np, seed=s), None
            else:
                counter.rows = 0
                images, seconds = timed(lambda seeds=seeds, sampler=sampler: sampler(seeds), device)
                nfe = counter.rows / n
            feats = extractor(images)
            metrics = compute_metrics(feats, ref, labels=labels_np, extractor=extractor)
            per_seed["fid"].append(metrics.fid)
            per_seed["kid"].append(metrics.kid)
            per_seed["precision"].append(metrics.precision)
            per_seed["recall"].append(metrics.recall)
            per_seed["vendi"].append(metrics.vendi)
            per_seed["class_accuracy"].append(float((extractor.predict(images) == labels_np).mean()))
            per_seed["fidelity_fid"].append(frechet_distance(*feature_statistics(feats), fid_ref_mu, fid_ref_sigma))
            if seconds is not None:
                per_seed["ms_per_sample"].append(1000.0 * seconds / n)
        row = {"name": name, "nfe": nfe, **{c: summarize(v) for c, v in per_seed.items()}}
        results.append(row)
        print(f"[bench] {name}: FID {row['fid']['mean']:.3f} +- {row['fid']['std']:.3f}", file=sys.stderr)
    reference_ms = next(r for r in results if r["name"] == teacher_row_name(args.reference_steps))
    for r in results:
        ms = r["ms_per_sample"]["mean"]
        r["speedup"] = reference_ms["ms_per_sample"]["mean"] / ms if ms else None

    protocol = {
        "num_samples": n,
        "seed_sets": args.seeds,
        "seeds": f"{SEED_STRIDE} * s + k (s = 0..{args.seeds - 1}, k = 0..{n - 1})",
        "fidelity_seeds": f"{FIDELITY_SEED} + k",
        "labels": "held-out class mix (class_labels_like_reference)",
        "reference": f"digits:heldout ({ref.n} images)",
        "extractor": extractor.describe(),
        "teacher": str(teacher_dir),
        "guidance_scale": guidance,
        "reference_steps": args.reference_steps,
        "spread": "sample standard deviation over seed sets",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": reproduce_command(argv if argv is not None else sys.argv[1:]),
    }
    table = markdown_table(results, protocol)
    print(table)
    payload = {"protocol": protocol, "rows": results, "markdown": table}
    if args.out:
        write_json(args.out, payload)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")
    return payload


def markdown_table(results: list[dict], protocol: dict) -> str:
    """The README table: one row per model, ``mean ± std`` over seed sets."""

    def pm(cell: dict, digits: int = 2, scale: float = 1.0) -> str:
        if cell["mean"] is None:
            return "–"
        return f"{cell['mean'] * scale:.{digits}f} ± {cell['std'] * scale:.{digits}f}"

    head = (
        "| model | NFE | FID ↓ | KID ↓ | precision ↑ | recall ↑ | class acc. ↑ | Vendi / class ↑ "
        f"| fidelity FID ↓ | ms / sample | speedup vs {protocol['reference_steps']}-step teacher |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in results:
        nfe = "–" if r["nfe"] is None else f"{r['nfe']:g}"
        speed = "–" if r["speedup"] is None else f"{r['speedup']:.1f}×"
        lines.append(
            f"| {r['name']} | {nfe} | {pm(r['fid'])} | {pm(r['kid'], 1)} | {pm(r['precision'], 3)} | "
            f"{pm(r['recall'], 3)} | {pm(r['class_accuracy'], 3)} | {pm(r['vendi'])} | {pm(r['fidelity_fid'])} | "
            f"{pm(r['ms_per_sample'], 3)} | {speed} |"
        )
    lines.append("")
    lines.append(
        f"N = {protocol['num_samples']} samples per row and seed set, class labels in the held-out mix, "
        f"{protocol['seed_sets']} noise seed sets (mean ± standard deviation); metrics against the "
        f"{protocol['reference']} in the digits classifier's {protocol['extractor']['dim']}-d feature space "
        f"(KID unbiased and raw -- not x1e3 -- with the reference fixed, so its seed spread omits the reference's "
        f"own sampling noise; precision/recall k = 3; Vendi with the cosine kernel within each class). Fidelity = FID "
        f"against the teacher's own {protocol['reference_steps']}-step samples with other noise. Teacher guidance "
        f"scale {protocol['guidance_scale']:g}; timings on {protocol['device']} with {protocol['threads']} "
        f"thread(s). Reproduce: `{protocol['command']}`."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

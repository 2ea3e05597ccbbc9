"""The MSD digits benchmark: routed multi-student pipelines vs one student, paired on the same noise and labels.

    python eval/bench_msd.py --threads 1 --model k1=runs/msd_k1/student --model k4=runs/msd_k4/student \
        --pair k4:k1 --latency k4_small_tsm:k4 --out runs/bench_msd.json --markdown runs/bench_msd.md

Protocol (the digits benchmark's before its FID∞ rewrite): N = 400 samples per model and seed set, class labels
in the held-out mix, sample k of seed set s uses noise seed ``100000 * s + k``; metrics against the held-out split
in the digits classifier's 64-d feature space; 3 seed sets. A "real" row (train-split images, class mix matched)
is the floor of FID at this N.

* per-class diversity: Vendi score (cosine kernel) within each class, averaged over classes;
* paired verdict ``A:B``: both models see the same seeds and labels in each seed set, so the per-set difference
  ``FID_A - FID_B`` cancels the shared sampling noise; its mean and a 95% t-interval over the seed sets decide:
  "A better" / "B better" when the interval excludes 0, otherwise "not resolved". The interval covers sampling
  noise for these trained models only (not training-seed noise: list runs of several training seeds as models);
* latency ``A:B``: milliseconds per sample of one student network forward at batch N (the routed pipeline makes
  one call per sample, to one student), A and B interleaved in one run, median of 7 repeats, and their ratio.

Training commands of the README table: ``--print_commands``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from bench_digits import reproduce_command, write_outputs

from stepdistill.data.digits import class_labels_like_reference, load_digits_split
from stepdistill.data.digits_models import classifier_path
from stepdistill.evaluation import DigitsClassifierFeatures, ReferenceStats, compute_metrics, digits_features
from stepdistill.evaluation.sources import load_pipeline, sample_pipeline

SEED_STRIDE = 100_000

COLUMNS = ("fid", "precision", "recall", "class_accuracy", "vendi")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

#: The runs of the README table (equal total compute: 800 DMD2 iterations at batch 64 per run).
TRAIN_COMMANDS = [
    "stepdistill train msd --config recipes/digits_msd4_1step.yaml --num_students 1 --output_dir runs/msd_k1",
    "stepdistill train msd --config recipes/digits_msd4_1step.yaml --output_dir runs/msd_k4",
    "stepdistill train msd --config recipes/digits_msd4_small_tsm.yaml --output_dir runs/msd_k4_small_tsm",
    "stepdistill train msd --config recipes/digits_msd4_small_tsm.yaml --tsm_steps 0 --output_dir "
    "runs/msd_k4_small_notsm",
    "stepdistill train msd --config recipes/digits_msd4_1step.yaml --num_students 1 --seed 1 --output_dir "
    "runs/msd_k1_seed1",
    "stepdistill train msd --config recipes/digits_msd4_1step.yaml --seed 1 --output_dir runs/msd_k4_seed1",
    "stepdistill train msd --config recipes/digits_msd4_small_tsm.yaml --num_students 1 --output_dir "
    "runs/msd_k1_small_tsm",
]


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


def summarize(values: list[float]) -> dict:
    """Mean, sample standard deviation and the per-seed values."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "values": arr.tolist()}


def networks(pipe) -> list[torch.nn.Module]:
    """The student networks of a routed pipeline, or the one ``unet`` of a single-student pipeline."""
    return pipe.students if hasattr(pipe, "students") else [pipe.unet]


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of the per-set differences ``a - b``, its 95% t-interval and the verdict."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    half = float(T975.get(n - 1, 1.96) * d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    lo, hi = mean - half, mean + half
    verdict = "A better" if hi < 0 else "B better" if lo > 0 else "not resolved"
    return {"differences": d.tolist(), "mean": mean, "ci95": [lo, hi], "verdict": verdict}


@torch.no_grad()
def network_latency(nets: dict[str, torch.nn.Module], n: int, repeats: int = 7) -> dict[str, float]:
    """Median ms per sample of one forward of each network at batch ``n`` (interleaved, after a warm-up)."""
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((n,), 399)
    labels = torch.arange(n) % 10
    times: dict[str, list[float]] = {k: [] for k in nets}
    for net in nets.values():
        net.eval()(x, t, class_labels=labels)
    for _ in range(repeats):
        for name, net in nets.items():
            start = time.perf_counter()
            net(x, t, class_labels=labels)
            times[name].append(1000.0 * (time.perf_counter() - start) / n)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the markdown tables, write JSON (and markdown); returns the JSON payload."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="NAME=PIPELINE_FOLDER (routed or single).")
    p.add_argument("--pair", action="append", default=[], help="A:B, a paired FID verdict of model A vs model B.")
    p.add_argument("--latency", action="append", default=[], help="A:B, per-sample network latency ratio A / B.")
    p.add_argument("--num_samples", type=int, default=400)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--print_commands", action="store_true", help="Print the training commands and exit.")
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    if args.print_commands:
        print("\n".join(TRAIN_COMMANDS))
        return {}
    torch.set_num_threads(args.threads)
    n = args.num_samples
    models = dict(m.split("=", 1) for m in args.model)
    extractor = DigitsClassifierFeatures.from_pretrained(classifier_path())
    ref_feats, ref_labels = digits_features("heldout", extractor)
    ref = ReferenceStats.from_features(ref_feats, extractor, source="digits:heldout", labels=ref_labels)
    labels = class_labels_like_reference(n, "heldout").numpy()
    seed_sets = [[SEED_STRIDE * s + k for k in range(n)] for s in range(args.seeds)]

    def measure(images) -> dict[str, float]:
        metrics = compute_metrics(extractor(images), ref, labels=labels, extractor=extractor)
        return {"fid": metrics.fid, "precision": metrics.precision, "recall": metrics.recall,
                "class_accuracy": float((extractor.predict(images) == labels).mean()), "vendi": metrics.vendi}

    rows, per_set, pipes = [], {}, {}
    for name in ["real (train split)", *models]:
        values: dict[str, list[float]] = {c: [] for c in COLUMNS}
        info: dict = {"name": name}
        if name in models:
            pipe = pipes[name] = load_pipeline(models[name])
            nets = networks(pipe)
            info.update(students=len(nets), params_per_student=sum(q.numel() for q in nets[0].parameters()),
                        path=models[name])
        for s, seeds in enumerate(seed_sets):
            if name in models:
                batches = sample_pipeline(pipes[name], seeds, labels.tolist(), batch_size=n)
                images = np.concatenate([u8 for _, u8 in batches])
            else:
                images = real_subset(labels, seed=s)
            for k, v in measure(images).items():
                values[k].append(v)
        info.update({c: summarize(v) for c, v in values.items()})
        per_set[name] = values["fid"]
        rows.append(info)
        print(f"[bench_msd] {name}: FID {info['fid']['mean']:.3f} +- {info['fid']['std']:.3f}", file=sys.stderr)
    pairs = []
    for spec in args.pair:
        a, b = spec.split(":")
        pairs.append({"a": a, "b": b, **paired(per_set[a], per_set[b])})
    latencies = []
    for spec in args.latency:
        a, b = spec.split(":")
        ms = network_latency({a: networks(pipes[a])[0], b: networks(pipes[b])[0]}, n)
        pa = sum(q.numel() for q in networks(pipes[a])[0].parameters())
        pb = sum(q.numel() for q in networks(pipes[b])[0].parameters())
        latencies.append({"a": a, "b": b, "ms_a": ms[a], "ms_b": ms[b], "ratio": ms[a] / ms[b],
                          "params_a": pa, "params_b": pb, "param_ratio": pa / pb})
    protocol = {"num_samples": n, "seed_sets": args.seeds, "threads": torch.get_num_threads(),
                "command": reproduce_command(argv if argv is not None else sys.argv[1:], "eval/bench_msd.py")}
    table = markdown(rows, pairs, latencies, protocol)
    print(table)
    payload = {"protocol": protocol, "rows": rows, "pairs": pairs, "latency": latencies, "markdown": table}
    write_outputs(args, payload)
    return payload


def markdown(rows: list[dict], pairs: list[dict], latencies: list[dict], protocol: dict) -> str:
    """The README tables: models (mean ± sd over seed sets), paired verdicts, latency ratios."""

    def pm(cell: dict, digits: int = 2) -> str:
        return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"

    lines = ["| model | students | params / student | FID ↓ | precision ↑ | recall ↑ | class acc. ↑ | "
             "Vendi / class ↑ |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['name']} | {r.get('students', '–')} | {r.get('params_per_student', '–')} | "
                     f"{pm(r['fid'])} | {pm(r['precision'], 3)} | {pm(r['recall'], 3)} | "
                     f"{pm(r['class_accuracy'], 3)} | {pm(r['vendi'])} |")
    if pairs:
        lines += ["", "| A vs B | FID_A − FID_B per seed set | mean [95% CI] | verdict |", "|---|---|---|---|"]
        for q in pairs:
            diffs = ", ".join(f"{d:+.2f}" for d in q["differences"])
            verdict = {"A better": f"{q['a']} better", "B better": f"{q['b']} better"}.get(q["verdict"], q["verdict"])
            lines.append(f"| {q['a']} vs {q['b']} | {diffs} | {q['mean']:+.2f} [{q['ci95'][0]:+.2f}, "
                         f"{q['ci95'][1]:+.2f}] | {verdict} |")
    if latencies:
        lines += ["", "| A vs B | params A / B | ms / sample A | ms / sample B | latency A / B |",
                  "|---|---|---|---|---|"]
        for q in latencies:
            lines.append(f"| {q['a']} vs {q['b']} | {q['params_a']} / {q['params_b']} ({q['param_ratio']:.2f}) | "
                         f"{q['ms_a']:.4f} | {q['ms_b']:.4f} | {q['ratio']:.2f} |")
    lines += ["", f"N = {protocol['num_samples']} per model and seed set, {protocol['seed_sets']} seed sets, "
              f"{protocol['threads']} thread(s). Reproduce: `{protocol['command']}`."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""``stepdistill eval`` (also ``stepdistill-eval``, ``python eval/fid.py``): reference statistics and metrics.

Examples::

    # reference statistics (.npz with the extractor's identity inside)
    stepdistill eval ref --data digits:heldout --features digits --out refs/digits_heldout.npz
    stepdistill eval ref --data /data/ffhq_val --inception_weights /models/inception-2015-12-05.pt --out refs/ffhq.npz
    stepdistill eval ref --data /data/hf_dataset --split validation --label_column label --out refs/val.npz

    # metrics of a folder, or of a pipeline sampled here with per-image seeds
    stepdistill eval calc --ref refs/digits_heldout.npz --images samples/ --out metrics.json
    stepdistill eval calc --ref refs/digits_heldout.npz --pipeline runs/dmd2/pipeline \
        --class_labels reference --timesteps 999 --seeds 0-399 --out metrics.json

    # FID_inf and bootstrap intervals are printed by default; add the real-data floor and a paired comparison
    stepdistill eval calc --ref refs/digits_heldout.npz --pipeline runs/a/student --class_labels reference \
        --seeds 0-1999 --floor digits:train --out a.json         # also writes a.features.npz
    stepdistill eval calc ... --pipeline runs/b/student --seeds 0-1999 --out b.json --compare a.json
    stepdistill eval compare a.json b.json                       # the same comparison from the saved files

    # several processes / GPUs: sampling and feature extraction are split and gathered
    accelerate launch -m stepdistill eval calc --ref ... --pipeline ...

The extractor defaults to the one recorded in the reference statistics; comparing with statistics of
another extractor is an error. Outputs are written only when everything succeeded.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..evaluation.evaluate import (
    MATCH_REFERENCE,
    evaluate_folder,
    evaluate_pipeline,
    make_reference,
    resolve_extractor,
)
from ..evaluation.features import FeatureExtractorError, build_feature_extractor
from ..evaluation.io import ImageInputError
from ..evaluation.metrics import MetricsResult, MetricUndefinedError
from ..evaluation.sources import PipelineCallError, is_main_process, load_pipeline
from ..evaluation.stats import (
    ReferenceStats,
    StatsFileError,
    StatsMismatchError,
    UnverifiedStatsWarning,
    write_json,
)
from ..evaluation.uncertainty import (
    Difference,
    MetricReplicates,
    ResamplePlan,
    SampleFeatures,
    bootstrap_metrics,
    compare_independent,
    paired_comparison,
)
from ..loading import ModelFolderError
from .common import int_list, number_list, positive_int, user_errors

#: Command name in usage and error lines (the back-compatible console script; ``stepdistill eval`` passes its own).
PROG = "stepdistill-eval"

#: Errors reported as one clear line (exit status 1) instead of a traceback.
USER_ERRORS = (
    ImageInputError,
    FeatureExtractorError,
    MetricUndefinedError,
    StatsFileError,
    StatsMismatchError,
    PipelineCallError,
    ModelFolderError,
    FileNotFoundError,
)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PIPELINE_ONLY = ("seeds", "num_samples", "prompts", "steps", "timesteps", "guidance_scale", "save_images")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The argument parser of ``stepdistill eval`` (subcommands ``ref``, ``calc`` and ``compare``)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="FID / KID / precision-recall / diversity for stepdistill students, teachers and image folders.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--inception_weights", default=None, help="Path of clean-fid's inception-2015-12-05.pt (or its folder)."
        )
        p.add_argument(
            "--download", action="store_true", help="Let clean-fid download the Inception weights if missing."
        )
        p.add_argument("--batch_size", type=positive_int, default=64, help="Images per batch.")
        p.add_argument("--workers", type=int, default=0, help="DataLoader workers reading image folders.")
        p.add_argument("--device", default=None, help="Device (default: this process's accelerate device).")
        p.add_argument("--quiet", action="store_true", help="No progress bars.")

    ref = sub.add_parser("ref", help="Compute reference statistics (.npz).")
    ref.add_argument(
        "--data",
        required=True,
        help="Folder of images, a `datasets` dataset saved with save_to_disk, or digits:heldout / digits:train.",
    )
    ref.add_argument("--out", required=True, help="Output .npz.")
    ref.add_argument(
        "--features",
        default="inception",
        help="inception | inception:PATH | digits | digits:PATH | package.module:attr (default: inception).",
    )
    ref.add_argument("--split", default=None, help="Split of a saved DatasetDict.")
    ref.add_argument("--image_column", default=None, help="Image column of the dataset (auto-detected if unique).")
    ref.add_argument("--label_column", default=None, help="Class-label column to store with the statistics.")
    common(ref)

    calc = sub.add_parser("calc", help="Compute metrics of an image folder or a sampled pipeline against a reference.")
    calc.add_argument("--ref", required=True, help="Reference statistics .npz (from `ref`).")
    what = calc.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", help="Folder of generated images (recursive).")
    what.add_argument("--pipeline", help="A diffusers pipeline folder to sample here (stepdistill or stock).")
    calc.add_argument("--out", default=None, help="Write the metrics as JSON here.")
    calc.add_argument(
        "--features",
        default=None,
        help="Feature extractor (default: the one recorded in --ref; a custom one is never imported from the file).",
    )
    calc.add_argument(
        "--ref_extractor",
        choices=["inception"],
        default=None,
        help="--ref is a clean-fid statistics file (mu/sigma, no extractor identity) made with clean-fid's Inception "
        "('clean' mode): use it for FID only, on your word (a warning says it cannot be verified).",
    )
    calc.add_argument("--num_samples", type=positive_int, default=None, help="Images to sample (default: see --seeds).")
    calc.add_argument(
        "--seeds",
        type=int_list,
        default=None,
        help="Seed of each image, e.g. 0-399 (default: 0..N-1 with N = --num_samples, else the number of "
        "labels / prompts, else the reference size).",
    )
    calc.add_argument(
        "--class_labels",
        default=None,
        help=f"File of integer labels (one per image, cycled), or '{MATCH_REFERENCE}' to match the reference's "
        "class mix. With --images: one label per image in sorted-path order.",
    )
    calc.add_argument("--prompts", default=None, help="File with one prompt per line (cycled over the images).")
    calc.add_argument("--steps", type=positive_int, default=None, help="num_inference_steps passed to the pipeline.")
    calc.add_argument(
        "--timesteps", type=number_list, default=None, help="Explicit timesteps passed to the pipeline, e.g. 999,499."
    )
    calc.add_argument("--guidance_scale", type=float, default=None, help="Guidance scale passed to the pipeline.")
    calc.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="Pipeline weights dtype.")
    calc.add_argument("--save_images", default=None, help="Also save the sampled images to this folder.")
    calc.add_argument("--k", type=positive_int, default=3, help="Neighbourhood size of precision / recall (default 3).")
    calc.add_argument("--kid_subsets", type=positive_int, default=100, help="KID subsets (default 100).")
    calc.add_argument("--per_class", action="store_true", help="Also report metrics per class.")
    uncertainty(calc)
    calc.add_argument(
        "--floor",
        default=None,
        help="Real images disjoint from the reference (a folder, a saved dataset, digits:train), evaluated like a "
        "model: the real-data floor and each metric's excess over it.",
    )
    calc.add_argument(
        "--compare",
        default=None,
        help="A metrics JSON of another model sampled from the same seeds and labels (`calc --out`): paired verdict.",
    )
    common(calc)

    comp = sub.add_parser("compare", help="Paired comparison of two `calc --out` results sampled from the same noise.")
    comp.add_argument("first", help="Metrics JSON of model A (its .features.npz next to it).")
    comp.add_argument("second", help="Metrics JSON of model B.")
    comp.add_argument("--ref", default=None, help="Reference statistics (default: the one A was evaluated against).")
    comp.add_argument("--out", default=None, help="Write the comparison as JSON here.")
    comp.add_argument("--k", type=positive_int, default=3, help="Neighbourhood size of precision / recall.")
    comp.add_argument("--quiet", action="store_true", help="Accepted as in calc (compare shows no progress bars).")
    uncertainty(comp)
    return parser


def uncertainty(p: argparse.ArgumentParser) -> None:
    """The bootstrap / FID_inf flags shared by ``calc`` and ``compare``."""
    p.add_argument(
        "--bootstrap", type=int, default=200, help="Bootstrap replicates for the intervals (default 200; 0: none)."
    )
    p.add_argument("--bootstrap_seed", type=int, default=0, help="Seed of the bootstrap indices (default 0).")
    p.add_argument("--confidence", type=float, default=0.95, help="Interval coverage (default 0.95).")
    p.add_argument(
        "--fid_inf_sizes", type=positive_int, default=8, help="Subset sizes of the FID_inf fit, n/5..n (default 8)."
    )


# ---------------------------------------------------------------------------------------------------
def read_labels_file(path: str | Path) -> list[int]:
    """Integer labels separated by whitespace, commas or newlines."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"Class-label file {str(path)!r} not found.")
    try:
        labels = [int(tok) for tok in path.read_text().replace(",", " ").split()]
    except ValueError as err:
        raise ImageInputError(f"{str(path)!r} must hold integer class labels: {err}.") from err
    if not labels:
        raise ImageInputError(f"Class-label file {str(path)!r} is empty.")
    return labels


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"Prompt file {str(path)!r} not found.")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ImageInputError(f"Prompt file {str(path)!r} has no prompts.")
    return prompts


def format_table(rows: Sequence[tuple], ci_title: str | None = None) -> str:
    """A markdown table of ``(metric, value)`` rows, or ``(metric, value, interval)`` rows with ``ci_title``."""

    def fmt(v: object) -> str:
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    width = max(len("metric"), *(len(r[0]) for r in rows))
    if ci_title is None:
        lines = [f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
        return "\n".join(lines + [f"| {r[0]:<{width}} | {fmt(r[1])} |" for r in rows])
    lines = [f"| {'metric':<{width}} | value | {ci_title} |", f"|{'-' * (width + 2)}|-------|---|"]
    return "\n".join(lines + [f"| {r[0]:<{width}} | {fmt(r[1])} | {r[2]} |" for r in rows])


def _state(args: argparse.Namespace):
    """The process group (``accelerate launch`` / ``torchrun`` give several processes) and the device.

    Without CUDA (or with ``--device cpu`` / ``accelerate launch --cpu``) the processes join a CPU (gloo)
    group, so a multi-process launch on CPUs splits the work instead of running it once per process.
    """
    import os

    from accelerate import PartialState

    use_cpu = (
        not torch.cuda.is_available()
        or (args.device or "").startswith("cpu")
        or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    )
    state = PartialState(cpu=use_cpu)
    device = torch.device(args.device) if args.device else state.device
    return state, device


# ---------------------------------------------------------------------------------------------------
def run_ref(args: argparse.Namespace) -> int:
    """``ref``: compute and save reference statistics."""
    state, device = _state(args)
    extractor = build_feature_extractor(
        args.features, device, inception_weights=args.inception_weights, download=args.download
    )
    stats = make_reference(
        args.data,
        extractor,
        split=args.split,
        image_column=args.image_column,
        label_column=args.label_column,
        batch_size=args.batch_size,
        num_workers=args.workers,
        accelerator=state,
        progress=not args.quiet,
    )
    if is_main_process(state):
        stats.save(args.out)
        print(
            format_table(
                [
                    ("source", stats.source),
                    ("images", stats.n),
                    ("extractor", stats.extractor),
                    ("dim", stats.dim),
                    ("out", args.out),
                ]
            )
        )
    return 0


def run_calc(args: argparse.Namespace) -> int:
    """``calc``: metrics of a folder or a sampled pipeline against reference statistics."""
    state, device = _state(args)
    assumed = None
    if args.ref_extractor is not None:
        if args.features:
            raise FeatureExtractorError("--ref_extractor already names the extractor; drop --features.")
        assumed = build_feature_extractor(args.ref_extractor, device, args.inception_weights, args.download)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnverifiedStatsWarning)
        ref = ReferenceStats.load(args.ref, assume_extractor=assumed)
    for warning in caught:
        print(f"{getattr(args, 'prog', PROG)} calc: warning: {warning.message}", file=sys.stderr)
    # --features is the caller's choice (it may import a module); without it only a built-in extractor is rebuilt
    features = assumed or args.features or None
    extractor = resolve_extractor(ref, features, device, args.inception_weights, args.download)
    common = dict(
        extractor=extractor,
        accelerator=state,
        progress=not args.quiet,
        k=args.k,
        kid_subsets=args.kid_subsets,
        per_class=args.per_class,
        device=device,
        batch_size=args.batch_size,
    )
    labels = None
    if args.class_labels is not None:
        labels = args.class_labels if args.class_labels == MATCH_REFERENCE else read_labels_file(args.class_labels)
    if args.images is not None:
        pipeline_only = [f"--{k}" for k in _PIPELINE_ONLY if getattr(args, k) is not None]
        if pipeline_only:
            raise ImageInputError(f"{', '.join(pipeline_only)} apply to --pipeline, not to --images.")
        if labels == MATCH_REFERENCE:
            raise ImageInputError(
                f"--class_labels {MATCH_REFERENCE} applies to --pipeline; for --images pass a label file."
            )
        result = evaluate_folder(args.images, ref, labels=labels, num_workers=args.workers, **common)
        what = {"images": args.images}
    else:
        prompts = read_prompts_file(args.prompts) if args.prompts else None
        dtype = None if args.dtype == "fp32" else _DTYPES[args.dtype]
        pipe = load_pipeline(args.pipeline, device=device, torch_dtype=dtype)
        result = evaluate_pipeline(
            pipe,
            ref,
            num_samples=args.num_samples,
            seeds=args.seeds,
            class_labels=labels,
            prompts=prompts,
            num_inference_steps=args.steps,
            timesteps=args.timesteps,
            guidance_scale=args.guidance_scale,
            save_dir=args.save_images,
            **common,
        )
        what = {
            "pipeline": args.pipeline,
            "steps": args.steps,
            "timesteps": args.timesteps,
            "guidance_scale": args.guidance_scale,
        }
    what["num_processes"] = state.num_processes
    if is_main_process(state):
        other = _load_evaluation(args.compare) if args.compare else None  # fail before any work is written
        floor = None
        if args.floor:
            if str(args.floor) == ref.source:
                raise ImageInputError(f"--floor {args.floor} is the reference itself; the floor needs disjoint images.")
            floor = make_reference(args.floor, extractor, batch_size=args.batch_size, progress=not args.quiet)
        _report(result, ref, what, args, floor, other)
    return 0


def _bootstrap(feats, ref: ReferenceStats, args: argparse.Namespace, seed: int, kid: float | None = None):
    plan = ResamplePlan.make(feats.shape[0], feats.shape[1], args.bootstrap, seed, args.fid_inf_sizes)
    return bootstrap_metrics(feats, ref.mu, ref.sigma, plan, ref.features, k=args.k, kid=kid)


def _interval_rows(reps: MetricReplicates, confidence: float, prefix: str = "") -> list[tuple[str, object, str]]:
    rows = []
    for metric, cell in reps.summary(confidence).items():
        value = "n/a" if cell["value"] is None else cell["value"]
        ci = "–" if cell["low"] is None else f"[{cell['low']:.6g}, {cell['high']:.6g}]"
        rows.append((prefix + metric, value, ci))
    return rows


def _load_evaluation(path: str | Path) -> tuple[dict, SampleFeatures]:
    """A ``calc --out`` JSON and the per-sample features it names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Metrics JSON {str(path)!r} not found.")
    import json

    payload = json.loads(path.read_text())
    name = payload.get("features_file")
    if not name:
        raise StatsFileError(f"{str(path)!r} names no per-sample features; rerun `eval calc --out` with this version.")
    return payload, SampleFeatures.load(path.parent / name)


def _difference_rows(diffs: dict[str, Difference]) -> str:
    head = ["| metric | A | B | A − B | interval | verdict for A |", "|---|---|---|---|---|---|"]
    return "\n".join(
        head
        + [
            f"| {d.metric} | {d.a:.6g} | {d.b:.6g} | {d.difference:.6g} | [{d.low:.6g}, {d.high:.6g}] | {d.verdict} |"
            for d in diffs.values()
        ]
    )


def run_compare(args: argparse.Namespace) -> int:
    """``compare``: paired bootstrap comparison of two saved evaluations."""
    payload_a, a = _load_evaluation(args.first)
    payload_b, b = _load_evaluation(args.second)
    ref_path = args.ref or payload_a["reference"]["path"]
    ref = ReferenceStats.load(ref_path)
    for payload, feats in ((payload_a, a), (payload_b, b)):
        if feats.extractor != ref.extractor or payload["reference"].get("extractor") != ref.extractor:
            raise StatsMismatchError(f"Features of {feats.extractor!r} cannot be compared on {ref.extractor!r} ones.")
    if payload_b["reference"].get("path") != payload_a["reference"].get("path") and args.ref is None:
        print(f"{args.prog} compare: warning: A and B were evaluated against different reference files; "
              f"comparing both against {ref_path}.", file=sys.stderr)  # fmt: skip
    diffs, pairing = paired_comparison(
        a, b, ref.mu, ref.sigma, ref.features, args.bootstrap, args.bootstrap_seed, args.fid_inf_sizes,
        args.confidence, args.k,
    )  # fmt: skip
    print(f"A = {args.first}, B = {args.second}; paired by {pairing}; {len(a.features)} samples each; "
          f"{args.bootstrap} bootstrap replicates, {args.confidence:.0%} intervals of A − B")  # fmt: skip
    print(_difference_rows(diffs))
    if args.out:
        write_json(args.out, {"a": str(args.first), "b": str(args.second), "pairing": pairing,
                              "reference": str(ref_path), "confidence": args.confidence, "bootstrap": args.bootstrap,
                              "comparison": {m: d.to_dict() for m, d in diffs.items()}})  # fmt: skip
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _report(
    result: MetricsResult,
    ref: ReferenceStats,
    what: dict,
    args: argparse.Namespace,
    floor: ReferenceStats | None = None,
    other: tuple[dict, SampleFeatures] | None = None,
) -> None:
    flat = result.to_dict()
    reps = _bootstrap(result.features, ref, args, args.bootstrap_seed, kid=result.kid)
    flat["fid_inf"] = reps.estimates["fid_inf"]
    intervals = {m: [c["low"], c["high"]] for m, c in reps.summary(args.confidence).items() if c["low"] is not None}
    interval_rows = {m: ci for m, _, ci in _interval_rows(reps, args.confidence)}
    rows = [(k, "n/a" if v is None else v, interval_rows.get(k, "")) for k, v in flat.items()
            if k not in ("per_class", "not_computed")]  # fmt: skip
    rows.insert(0, ("reference", f"{ref.source} ({ref.n if ref.n is not None else 'unknown number of'} images)", ""))
    rows.insert(2, rows.pop([r[0] for r in rows].index("fid_inf")))  # right after fid
    floor_out = excess = None
    if floor is not None:
        floor_reps = _bootstrap(floor.features, ref, args, args.bootstrap_seed + 1)
        rows += _interval_rows(floor_reps, args.confidence, prefix=f"floor ({floor.source}, {floor.n})/")
        metrics = ("fid_inf", "fid") if floor.n == result.num_generated else ("fid_inf",)
        excess = compare_independent(reps, floor_reps, args.confidence, metrics) if args.bootstrap else {}
        for m, d in excess.items():
            rows.append((f"excess_over_floor/{m}", d.difference, f"[{d.low:.6g}, {d.high:.6g}]"))
        floor_out = {"source": floor.source, "n": floor.n, **floor_reps.summary(args.confidence)}
    print(format_table(rows, ci_title=f"{args.confidence:.0%} interval ({args.bootstrap} bootstrap)"))
    not_computed = flat.get("not_computed", {})
    for metric, why in not_computed.items():
        print(f"{metric}: not computed: {why}")
    for metric, why in reps.notes.items():
        if metric not in not_computed:
            print(f"{metric}: {why}")
    if result.per_class:
        for label, values in result.per_class.items():
            print(
                f"class {label}: "
                + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
            )
    comparison = None
    if other is not None:
        payload_b, b = other
        mine = SampleFeatures(result.features, result.sample_ids, result.labels, ref.extractor)
        if payload_b["reference"].get("extractor") != ref.extractor:
            raise StatsMismatchError(f"{args.compare} was evaluated with {payload_b['reference'].get('extractor')!r}.")
        diffs, pairing = paired_comparison(
            mine, b, ref.mu, ref.sigma, ref.features, args.bootstrap, args.bootstrap_seed, args.fid_inf_sizes,
            args.confidence, args.k,
        )  # fmt: skip
        print(f"A = this evaluation, B = {args.compare}; paired by {pairing}")
        print(_difference_rows(diffs))
        comparison = {"b": str(args.compare), "pairing": pairing, **{m: d.to_dict() for m, d in diffs.items()}}
    if args.out:
        out = Path(args.out)
        features_path = out.with_name(out.stem + ".features.npz")
        SampleFeatures(result.features, result.sample_ids, result.labels, ref.extractor).save(features_path)
        payload = {
            "metrics": flat,
            "intervals": intervals,
            "bootstrap": {
                "replicates": args.bootstrap,
                "seed": args.bootstrap_seed,
                "confidence": args.confidence,
                "fid_inf_sizes": [int(x) for x in ResamplePlan.make(
                    result.num_generated, ref.dim, 0, args.bootstrap_seed, args.fid_inf_sizes).sizes],
                "method": "generated samples resampled with replacement; percentile interval centred on the estimate",
            },  # fmt: skip
            "floor": floor_out,
            "excess_over_floor": None if excess is None else {m: d.to_dict() for m, d in excess.items()},
            "comparison": comparison,
            "features_file": features_path.name,
            "reference": {
                "path": str(args.ref),
                "source": ref.source,
                "n": ref.n,
                "extractor": ref.extractor,
                "extractor_info": ref.meta.get("extractor"),
            },
            "evaluated": what,
            "args": vars(args),
        }
        write_json(args.out, payload)
        print(f"wrote {args.out} and {features_path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Entry point of ``stepdistill eval``; user errors print one line and exit with status 1."""
    args = build_parser(prog).parse_args(argv)
    args.prog = prog
    with user_errors(f"{prog} {args.command}", USER_ERRORS):
        return {"ref": run_ref, "calc": run_calc, "compare": run_compare}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())

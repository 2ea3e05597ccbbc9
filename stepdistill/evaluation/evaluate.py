"""The evaluation entry points shared by the command line, the benchmarks and the trainers.

* :func:`make_reference` -- a folder, a ``datasets`` dataset on disk or a digits split -> :class:`ReferenceStats`;
* :func:`evaluate_folder` -- a folder of generated images -> :class:`MetricsResult`;
* :func:`evaluate_pipeline` -- samples a pipeline with per-image seeds -> :class:`MetricsResult`;
* :func:`evaluate_images` -- samples already in memory (e.g. a trainer's student samples) -> :class:`MetricsResult`;
* :func:`~stepdistill.evaluation.metrics.compute_metrics` -- features you made yourself -> :class:`MetricsResult`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .features import (
    FeatureExtractor,
    FeatureExtractorError,
    build_feature_extractor,
    builtin_feature_extractor,
    extract_features,
)
from .io import ImageInputError
from .metrics import MetricsResult, check_fid_defined, compute_metrics
from .sources import (
    PipelineCallError,
    Processes,
    dataset_features,
    digits_features,
    folder_features,
    gather_rows,
    is_saved_dataset,
    load_pipeline,
    pipeline_features,
)
from .stats import ReferenceStats

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

#: Value of ``class_labels`` that asks for labels matching the reference's class mix.
MATCH_REFERENCE = "reference"


def parse_int_list(text: str) -> list[int]:
    """Parse ``"0-3,7,10-11"`` into ``[0, 1, 2, 3, 7, 10, 11]`` (inclusive ranges, as EDM's ``--seeds``)."""
    out: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(part)])
        except ValueError as err:
            raise ValueError(f"Cannot parse {part!r} in {text!r}: expected integers or ranges like 0-99.") from err
    return out


def labels_matching_reference(ref_labels: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """``n`` labels whose class proportions match ``ref_labels`` (largest remainder), sorted by class."""
    ref = np.asarray(ref_labels).astype(np.int64)
    classes, counts = np.unique(ref, return_counts=True)
    share = counts / counts.sum() * n
    quota = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - quota), kind="stable")
    quota[order[: n - int(quota.sum())]] += 1
    return np.repeat(classes, quota)


def resolve_extractor(
    ref: ReferenceStats,
    extractor: FeatureExtractor | str | None = None,
    device: torch.device | str = "cpu",
    inception_weights: str | Path | None = None,
    download: bool = False,
) -> FeatureExtractor:
    """The extractor to evaluate against ``ref``: the given one (object or spec) or the reference's own.

    The reference's own is rebuilt only when it is built in (inception, digits): a custom extractor named in
    the file is never imported; the caller passes it (an object, or a spec the caller chose).

    Raises:
        FeatureExtractorError: when none is given and the reference's extractor cannot be rebuilt.
        StatsMismatchError: when it is not the extractor that made ``ref``.
    """
    if extractor is None:
        if not ref.extractor_spec:
            raise FeatureExtractorError(
                f"The reference statistics do not say how to rebuild their extractor {ref.extractor!r}; pass it "
                "(CLI: --features)."
            )
        extractor = builtin_feature_extractor(
            ref.extractor_spec, device, inception_weights, download,
            source=f"The reference statistics ({ref.source or 'unknown source'})",
        )  # fmt: skip
    elif isinstance(extractor, str):
        extractor = build_feature_extractor(extractor, device, inception_weights=inception_weights, download=download)
    ref.check_extractor(extractor)
    return extractor


def make_reference(
    source: str | Path,
    extractor: FeatureExtractor,
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    accelerator: Processes | None = None,
    progress: bool = True,
) -> ReferenceStats:
    """Reference statistics of an image source.

    Args:
        source: ``"digits:heldout"`` / ``"digits:train"`` (labels included), a folder written by
            ``datasets``' ``save_to_disk`` (optionally ``split``, ``image_column``, ``label_column``), or
            a folder of images (recursive).
        extractor: The feature extractor.
        split: Split of a ``DatasetDict``.
        image_column: Image column of the dataset (auto-detected when there is exactly one).
        label_column: Column of class labels to store with the statistics.
        batch_size: Images per feature batch.
        num_workers: DataLoader workers for image folders.
        accelerator: ``Accelerator`` / ``PartialState`` to split the work over processes.
        progress: Show progress bars.

    Raises:
        ImageInputError: for a bad source; MetricUndefinedError: when there are not more images than
            feature dimensions (FID undefined).

    Example:
        >>> ref = make_reference("digits:heldout", DigitsClassifierFeatures.from_pretrained())
        >>> ref.save("digits_heldout.npz")
    """
    source = str(source)
    labels = None
    if source.startswith("digits:"):
        feats, labels = digits_features(source.partition(":")[2], extractor, accelerator=accelerator)
        meta = {"source_kind": "digits"}
    elif is_saved_dataset(source):
        feats, labels = dataset_features(
            source, extractor, split, image_column, label_column, batch_size, accelerator, progress
        )
        meta = {"source_kind": "datasets", "split": split, "image_column": image_column}
    elif Path(source).is_dir():
        feats, folder = folder_features(source, extractor, batch_size, num_workers, accelerator, progress)
        meta = {
            "source_kind": "folder",
            "modes": dict(folder.modes),
            "sizes": {f"{w}x{h}": c for (w, h), c in folder.sizes.items()},
        }
    else:
        raise ImageInputError(
            f"Reference source {source!r} is neither 'digits:heldout' / 'digits:train', a dataset saved with "
            "`datasets`' save_to_disk, nor an existing folder of images."
        )
    check_fid_defined(feats.shape[0], feats.shape[1], f"the reference {source!r}")
    return ReferenceStats.from_features(feats, extractor, source=source, labels=labels, meta=meta)


def evaluate_folder(
    folder: str | Path,
    ref: ReferenceStats,
    extractor: FeatureExtractor | str | None = None,
    labels: Sequence[int] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    accelerator: Processes | None = None,
    progress: bool = True,
    k: int = 3,
    kid_subsets: int = 100,
    per_class: bool = False,
    device: torch.device | str = "cpu",
) -> MetricsResult:
    """Metrics of a folder of generated images against ``ref``.

    Args:
        folder: Images (recursive, sorted by relative path).
        ref: Reference statistics.
        extractor: Extractor (object or spec); default: rebuilt from ``ref``.
        labels: Class label of each image in sorted-path order (for per-class diversity / metrics).
        batch_size: Images per feature batch.
        num_workers: DataLoader workers.
        accelerator: ``Accelerator`` / ``PartialState`` to split the work.
        progress: Progress bars.
        k: Precision / recall neighbourhood size.
        kid_subsets: KID subsets.
        per_class: Per-class metrics (needs ``labels`` and a labelled reference).
        device: Device for an extractor built here.
    """
    extractor = resolve_extractor(ref, extractor, device)
    feats, folder_info = folder_features(folder, extractor, batch_size, num_workers, accelerator, progress)
    if labels is not None and len(labels) != feats.shape[0]:
        raise ImageInputError(f"Got {len(labels)} class labels for {feats.shape[0]} images in {str(folder)!r}.")
    result = compute_metrics(
        feats, ref, labels=labels, extractor=extractor, k=k, kid_subsets=kid_subsets, per_class=per_class
    )
    result.extra["images"] = folder_info.summary()
    return result


def evaluate_images(
    images: np.ndarray | torch.Tensor,
    ref: ReferenceStats,
    extractor: FeatureExtractor | str | None = None,
    labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    accelerator: Processes | None = None,
    batch_size: int = 256,
    k: int = 3,
    kid_subsets: int = 100,
    per_class: bool = False,
    device: torch.device | str = "cpu",
) -> MetricsResult:
    """Metrics of images already in memory -- what a trainer evaluates during training.

    Under several processes each passes its own shard of ``images`` (and ``labels``); features and
    labels are gathered in process order and every process gets the same result.

    Args:
        images: ``[B, C, H, W]`` tensor in ``[-1, 1]`` (sampler output) or uint8 (see
            :func:`~stepdistill.evaluation.io.to_uint8_nhwc`).
        ref: Reference statistics.
        extractor: Extractor (object or spec); default: rebuilt from ``ref``.
        labels: Condition of each image (per-class diversity / metrics).
        accelerator: ``Accelerator`` / ``PartialState`` when each process holds a shard.
        batch_size: Images per feature batch.
        k: Precision / recall neighbourhood size.
        kid_subsets: KID subsets.
        per_class: Per-class metrics.
        device: Device for an extractor built here.

    Example:
        >>> samples = sample_student(student, initial_noise(shape, make_generators(seeds)), cond, timesteps=[999])
        >>> result = evaluate_images(samples, ref, extractor, labels=cond.class_labels, accelerator=accelerator)
        >>> accelerator.log({"eval/fid": result.fid, "eval/recall": result.recall}, step=step)
    """
    extractor = resolve_extractor(ref, extractor, device)
    feats = gather_rows(extract_features(extractor, images, batch_size=batch_size), accelerator)
    if labels is not None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
        labels = gather_rows(labels, accelerator)
    return compute_metrics(
        feats, ref, labels=labels, extractor=extractor, k=k, kid_subsets=kid_subsets, per_class=per_class
    )


def evaluate_pipeline(
    pipeline: DiffusionPipeline | str | Path,
    ref: ReferenceStats,
    extractor: FeatureExtractor | str | None = None,
    num_samples: int | None = None,
    seeds: Sequence[int] | None = None,
    class_labels: Sequence[int] | str | None = None,
    prompts: Sequence[str] | None = None,
    num_inference_steps: int | None = None,
    timesteps: Sequence[float] | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 64,
    save_dir: str | Path | None = None,
    accelerator: Processes | None = None,
    progress: bool = True,
    k: int = 3,
    kid_subsets: int = 100,
    per_class: bool = False,
    device: torch.device | str = "cpu",
    extra_kwargs: dict | None = None,
) -> MetricsResult:
    """Sample a pipeline with one seed per image and evaluate the samples against ``ref``.

    Args:
        pipeline: A loaded diffusers pipeline, or the path of a pipeline folder.
        ref: Reference statistics.
        extractor: Extractor (object or spec); default: rebuilt from ``ref``.
        num_samples: Images to sample; default ``len(seeds)``, else the number of labels / prompts,
            else the reference size.
        seeds: Seed of each image; default ``0 .. num_samples - 1``.
        class_labels: One label per image (a shorter list is cycled), or ``"reference"`` for labels
            whose class mix matches the reference's.
        prompts: Prompts (a shorter list is cycled: ``P`` prompts x ``k`` seeds each).
        num_inference_steps: Steps.
        timesteps: Explicit timesteps.
        guidance_scale: CFG weight (passed to the pipeline).
        batch_size: Images per pipeline call.
        save_dir: Also save the images here as ``{k:06d}.png``.
        accelerator: ``Accelerator`` / ``PartialState``: sampling and features split over processes.
        progress: Progress bars.
        k: Precision / recall neighbourhood size.
        kid_subsets: KID subsets.
        per_class: Per-class metrics (class labels and a labelled reference needed).
        device: Device for a pipeline or extractor built here.
        extra_kwargs: More pipeline keyword arguments.

    Example:
        >>> result = evaluate_pipeline("runs/dmd2/pipeline", ref, class_labels="reference", timesteps=[999])
        >>> print(result.fid, result.precision, result.recall)
    """
    extractor = resolve_extractor(ref, extractor, device)
    if isinstance(class_labels, str):
        if class_labels != MATCH_REFERENCE:
            raise ValueError(f"class_labels must be a sequence or {MATCH_REFERENCE!r}, got {class_labels!r}.")
        if ref.labels is None:
            raise ImageInputError("class_labels='reference' needs reference statistics made with labels.")
    if num_samples is None:
        if seeds is not None:
            num_samples = len(seeds)
        elif class_labels is not None and not isinstance(class_labels, str):
            num_samples = len(class_labels)
        elif prompts is not None:
            num_samples = len(prompts)
        elif ref.n is None:
            raise PipelineCallError("The reference holds no image count (mu/sigma only): pass num_samples or seeds.")
        else:
            num_samples = ref.n
    seeds = list(range(num_samples)) if seeds is None else list(seeds)
    if len(seeds) != num_samples:
        raise PipelineCallError(f"Got {len(seeds)} seeds for {num_samples} samples; pass one seed per image.")
    check_fid_defined(num_samples, ref.dim, "the requested samples")  # before any sampling
    if isinstance(class_labels, str):
        labels = labels_matching_reference(ref.labels, num_samples).tolist()
    elif class_labels is not None:
        labels = [int(class_labels[i % len(class_labels)]) for i in range(num_samples)]
    else:
        labels = None
    prompt_list = None if prompts is None else [prompts[i % len(prompts)] for i in range(num_samples)]
    if isinstance(pipeline, (str, Path)):
        pipeline = load_pipeline(pipeline, device=device)
    start = time.perf_counter()
    feats = pipeline_features(
        pipeline,
        extractor,
        seeds,
        labels,
        prompt_list,
        num_inference_steps,
        timesteps,
        guidance_scale,
        batch_size,
        save_dir,
        accelerator,
        progress,
        extra_kwargs,
    )
    seconds = time.perf_counter() - start
    groups = (
        labels if labels is not None else (None if prompts is None else [i % len(prompts) for i in range(num_samples)])
    )
    result = compute_metrics(
        feats, ref, labels=groups, extractor=extractor, k=k, kid_subsets=kid_subsets, per_class=per_class
    )
    result.extra["sampling_and_features_seconds"] = seconds
    result.sample_ids = np.asarray(seeds, dtype=np.int64)
    return result


__all__ = [
    "MATCH_REFERENCE",
    "evaluate_folder",
    "evaluate_images",
    "evaluate_pipeline",
    "labels_matching_reference",
    "make_reference",
    "parse_int_list",
    "resolve_extractor",
]

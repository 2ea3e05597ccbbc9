"""Image sources -> features: folders, ``datasets`` saved on disk, the digits splits, sampled pipelines.

Every function is ``accelerate``-aware: pass an ``Accelerator`` (or ``PartialState``) and each process
reads or samples a contiguous shard of the images; the features are gathered back in the original
order on every process. Without one (or with a single process) everything runs locally.

Pipelines are sampled with one ``torch.Generator`` per image (``seeds[k]`` for image ``k``), so image
``k`` is the same at any batch size and any number of processes.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.datasets import is_saved_dataset
from .features import FeatureExtractor
from .io import (
    ImageFolder,
    ImageInputError,
    convert_channels,
    load_image,
    pil_to_array,
    save_images,
    scan_image_folder,
    to_uint8_nhwc,
    unit_to_uint8,
)

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState
    from diffusers import DiffusionPipeline

#: What the functions accept as "the processes": an ``Accelerator`` or a ``PartialState``.
Processes = Union["Accelerator", "PartialState"]


class PipelineCallError(ValueError):
    """A pipeline cannot be called with what was asked (e.g. class labels for an unconditional pipeline)."""


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------
def _world(accelerator) -> tuple[int, int]:
    if accelerator is None:
        return 0, 1
    return int(accelerator.process_index), int(accelerator.num_processes)


def is_main_process(accelerator: Processes | None = None) -> bool:
    """True on the main process (always without an accelerator)."""
    return accelerator is None or bool(accelerator.is_main_process)


def shard_indices(n: int, accelerator: Processes | None = None) -> np.ndarray:
    """The contiguous slice of ``range(n)`` this process handles (all of it without an accelerator)."""
    rank, world = _world(accelerator)
    return np.array_split(np.arange(n), world)[rank]


def gather_rows(array: np.ndarray, accelerator: Processes | None = None) -> np.ndarray:
    """Concatenate every process's ``[n_p, ...]`` rows in process order (padded gather; sizes may differ)."""
    rank, world = _world(accelerator)
    if world == 1:
        return array
    from accelerate.utils import gather

    device = accelerator.device
    t = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    lengths = gather(torch.tensor([t.shape[0]], device=device)).cpu().tolist()
    pad = max(lengths) - t.shape[0]
    if pad:
        t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
    everything = gather(t).cpu().numpy()
    m = max(lengths)
    return np.concatenate([everything[i * m : i * m + lengths[i]] for i in range(world)])


def _progress(accelerator, total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="img", disable=not progress or not _is_local_main(accelerator))


def _is_local_main(accelerator) -> bool:
    return accelerator is None or bool(getattr(accelerator, "is_local_main_process", True))


def _concat(feats: list[np.ndarray], extractor: FeatureExtractor) -> np.ndarray:
    """Concatenate feature batches; an empty shard gives ``[0, D]`` (so processes can gather it)."""
    if not feats:
        return np.zeros((0, extractor.dim or 0), dtype=np.float64)
    return np.concatenate(feats)


# ---------------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------------
class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[Path], extractor: FeatureExtractor) -> None:
        self.files = list(files)
        self.extractor = extractor

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.extractor.prepare(load_image(self.files[i], channels=self.extractor.channels))


def folder_features(
    folder: str | Path,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    num_workers: int = 0,
    accelerator: Processes | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, ImageFolder]:
    """Features of every image under ``folder`` (recursive, sorted by relative path).

    Headers are all checked first (missing or empty folder, unreadable file, mode, size): a bad
    folder fails before any work. A file that fails to decode later is named in the error.

    Returns:
        ``(features [N, D], ImageFolder)`` -- the latter lists the files, modes and sizes.
    """
    scanned = scan_image_folder(folder, extractor.input_size)
    mine = shard_indices(len(scanned.files), accelerator)
    dataset = _FolderDataset([scanned.files[i] for i in mine], extractor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats = []
    with _progress(accelerator, len(dataset), f"features {Path(folder).name}", progress) as bar:
        for batch in loader:
            feats.append(extractor.embed_prepared(batch))
            bar.update(batch.shape[0])
    return gather_rows(_concat(feats, extractor), accelerator), scanned


# ---------------------------------------------------------------------------------------------------
# Hugging Face datasets saved with save_to_disk
# ---------------------------------------------------------------------------------------------------
def load_saved_dataset(path: str | Path, split: str | None = None, image_column: str | None = None):
    """Open a ``save_to_disk`` dataset and find its image column.

    Returns:
        ``(dataset, image_column)``.

    Raises:
        ImageInputError: for an ambiguous split or image column, or an empty dataset.
    """
    import datasets

    from ..data.datasets import DataSourceError, open_dataset

    try:
        ds = open_dataset(path, split, split_flag="--split")
    except DataSourceError as err:
        raise ImageInputError(str(err)) from None
    if image_column is None:
        images = [name for name, feat in ds.features.items() if isinstance(feat, datasets.Image)]
        if len(images) != 1:
            raise ImageInputError(
                f"Cannot tell the image column of {str(path)!r}: image columns {images or 'none'} among "
                f"{list(ds.features)}. Pass --image_column."
            )
        image_column = images[0]
    if image_column not in ds.features:
        raise ImageInputError(f"{str(path)!r} has no column {image_column!r}; it has {list(ds.features)}.")
    if len(ds) == 0:
        raise ImageInputError(f"The dataset {str(path)!r} is empty.")
    return ds, image_column


def dataset_features(
    path: str | Path,
    extractor: FeatureExtractor,
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    batch_size: int = 64,
    accelerator: Processes | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (and optional labels) of an image dataset saved with ``datasets``' ``save_to_disk``.

    Returns:
        ``(features [N, D], labels [N] or None)``.
    """
    ds, image_column = load_saved_dataset(path, split, image_column)
    labels = None
    if label_column is not None:
        if label_column not in ds.features:
            raise ImageInputError(f"{str(path)!r} has no column {label_column!r}; it has {list(ds.features)}.")
        labels = np.asarray(ds[label_column])
    mine = shard_indices(len(ds), accelerator)
    feats = []
    with _progress(accelerator, len(mine), f"features {Path(path).name}", progress) as bar:
        for start in range(0, len(mine), batch_size):
            idx = mine[start : start + batch_size]
            prepared = []
            for i in idx:
                source = f"{path}[{int(i)}]"
                try:
                    image = ds[int(i)][image_column]
                except Exception as err:  # noqa: BLE001 -- PIL decoding errors come in many types
                    raise ImageInputError(f"Cannot decode image {source}: {err}.") from err
                arr = pil_to_array(image, extractor.channels, source)
                extractor.check_size(arr.shape[0], arr.shape[1], source)
                prepared.append(extractor.prepare(arr))
            feats.append(extractor.embed_prepared(torch.stack(prepared)))
            bar.update(len(idx))
    return gather_rows(_concat(feats, extractor), accelerator), labels


# ---------------------------------------------------------------------------------------------------
# The digits world
# ---------------------------------------------------------------------------------------------------
def digits_features(
    split: str, extractor: FeatureExtractor, batch_size: int = 512, accelerator: Processes | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a digits split (``train`` / ``heldout`` / ``all``), via uint8 like any image."""
    from ..data.digits import load_digits_split, to_uint8

    try:
        data = load_digits_split(split)
    except ValueError as err:
        raise ImageInputError(str(err)) from err
    images = to_uint8(data.images)
    mine = shard_indices(len(images), accelerator)
    feats = []
    for start in range(0, len(mine), batch_size):
        feats.append(extractor(images[mine[start : start + batch_size]]))
    return gather_rows(_concat(feats, extractor), accelerator), data.labels.numpy()


# ---------------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------------
def load_pipeline(
    path: str | Path, device: torch.device | str | None = None, torch_dtype: torch.dtype | None = None
) -> DiffusionPipeline:
    """Load a local diffusers pipeline folder (stock diffusers or stepdistill's own pipeline classes).

    ``path`` may also be a :data:`~stepdistill.loading.MODEL_ALIASES` name (``digits``: the shipped teacher).

    Raises:
        PipelineCallError: when the folder is not a pipeline folder.
        ModelFolderError: when it names classes outside diffusers / transformers / stepdistill, or is damaged.
    """
    from ..loading import load_pipeline_folder, model_folder

    root = model_folder(path)
    index = root / "model_index.json"
    if not index.is_file():
        raise PipelineCallError(
            f"{str(root)!r} is not a diffusers pipeline folder (no model_index.json). Save pipelines with "
            "`pipeline.save_pretrained(folder)`; for a folder of images use --images."
        )
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    pipe = load_pipeline_folder(root, **kwargs)  # only diffusers / transformers / stepdistill classes
    if device is not None:
        pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_kwargs(
    pipeline: DiffusionPipeline,
    n: int,
    class_labels: Sequence[int] | None,
    prompts: Sequence[str] | None,
    num_inference_steps: int | None,
    timesteps: Sequence[float] | None,
    guidance_scale: float | None,
    extra: dict | None,
) -> dict:
    params = inspect.signature(pipeline.__call__).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    name = type(pipeline).__name__

    def need(key: str, what: str) -> None:
        if key not in params and not var_kw:
            raise PipelineCallError(f"{name} takes no `{key}` argument, so it cannot be given {what}.")

    kwargs: dict = {}
    if class_labels is not None:
        need("class_labels", "class labels")
        kwargs["class_labels"] = [int(c) for c in class_labels]
    if prompts is not None:
        need("prompt", "prompts")
        kwargs["prompt"] = list(prompts)
    if class_labels is None and prompts is None:
        if "batch_size" in params:
            kwargs["batch_size"] = n
        elif "class_labels" in params and params["class_labels"].default is inspect.Parameter.empty:
            raise PipelineCallError(f"{name} is class-conditional: pass class labels (--class_labels).")
        elif "prompt" in params and params["prompt"].default is inspect.Parameter.empty:
            raise PipelineCallError(f"{name} is text-conditional: pass prompts (--prompts).")
    if num_inference_steps is not None:
        need("num_inference_steps", "a step count")
        kwargs["num_inference_steps"] = int(num_inference_steps)
    if timesteps is not None:
        need("timesteps", "explicit timesteps")
        kwargs["timesteps"] = list(timesteps)
    if guidance_scale is not None:
        need("guidance_scale", "a guidance scale")
        kwargs["guidance_scale"] = float(guidance_scale)
    if "output_type" in params or var_kw:
        kwargs["output_type"] = "np"
    kwargs.update(extra or {})
    return kwargs


def _images_to_uint8(images) -> np.ndarray:
    if isinstance(images, (list, tuple)):
        return to_uint8_nhwc(list(images))  # PIL images
    return unit_to_uint8(images)  # diffusers' "np" / "pt" outputs are in [0, 1]


def sample_pipeline(
    pipeline: DiffusionPipeline,
    seeds: Sequence[int],
    class_labels: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    num_inference_steps: int | None = None,
    timesteps: Sequence[float] | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 64,
    extra_kwargs: dict | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Sample a diffusers pipeline, one seeded generator per image; yields ``(indices, uint8 [b, H, W, C])``.

    The pipeline is called generically: ``generator=[...]`` always, ``class_labels`` / ``prompt`` /
    ``num_inference_steps`` / ``timesteps`` / ``guidance_scale`` when given (an error if the pipeline
    does not take them), ``batch_size`` for unconditional pipelines, ``output_type="np"``.

    Args:
        pipeline: A loaded pipeline (e.g. :func:`load_pipeline`).
        seeds: Seed of each image.
        class_labels: Class label of each image (same length as ``seeds``).
        prompts: Prompt of each image (same length as ``seeds``).
        num_inference_steps: Steps.
        timesteps: Explicit timesteps (e.g. ``[999, 499]`` for a two-step student).
        guidance_scale: CFG weight.
        batch_size: Images per call.
        extra_kwargs: More keyword arguments for the pipeline.
    """
    n = len(seeds)
    for name, values in (("class_labels", class_labels), ("prompts", prompts)):
        if values is not None and len(values) != n:
            raise PipelineCallError(f"Got {len(values)} {name} for {n} seeds; pass one per image.")
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        kwargs = _pipeline_kwargs(
            pipeline,
            len(idx),
            None if class_labels is None else [class_labels[i] for i in idx],
            None if prompts is None else [prompts[i] for i in idx],
            num_inference_steps,
            timesteps,
            guidance_scale,
            extra_kwargs,
        )
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(int(seeds[i])) for i in idx]
        out = pipeline(**kwargs)
        images = out.images if hasattr(out, "images") else out[0]
        u8 = _images_to_uint8(images)
        if u8.shape[0] != len(idx):
            raise PipelineCallError(
                f"{type(pipeline).__name__} returned {u8.shape[0]} images for a batch of {len(idx)}."
            )
        yield idx, u8


def pipeline_features(
    pipeline: DiffusionPipeline,
    extractor: FeatureExtractor,
    seeds: Sequence[int],
    class_labels: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    num_inference_steps: int | None = None,
    timesteps: Sequence[float] | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 64,
    save_dir: str | Path | None = None,
    accelerator: Processes | None = None,
    progress: bool = True,
    extra_kwargs: dict | None = None,
) -> np.ndarray:
    """Sample ``len(seeds)`` images (split over processes), extract features, gather them in order.

    With ``save_dir`` every process also saves its images as ``save_dir/{k:06d}.png`` (``k`` = image index).
    """
    mine = shard_indices(len(seeds), accelerator)
    pick = lambda values: None if values is None else [values[i] for i in mine]  # noqa: E731
    feats = []
    with _progress(accelerator, len(mine), f"sampling {type(pipeline).__name__}", progress) as bar:
        for idx, u8 in sample_pipeline(
            pipeline,
            pick(seeds),
            pick(class_labels),
            pick(prompts),
            num_inference_steps,
            timesteps,
            guidance_scale,
            batch_size,
            extra_kwargs,
        ):
            if save_dir is not None:
                save_images(u8, save_dir, [f"{int(mine[i]):06d}" for i in idx])
            u8 = convert_channels(u8, extractor.channels, f"the images of {type(pipeline).__name__}")
            feats.append(extractor(u8))
            bar.update(len(idx))
    return gather_rows(_concat(feats, extractor), accelerator)


__all__ = [
    "PipelineCallError",
    "dataset_features",
    "digits_features",
    "folder_features",
    "gather_rows",
    "is_main_process",
    "is_saved_dataset",
    "load_pipeline",
    "load_saved_dataset",
    "pipeline_features",
    "sample_pipeline",
    "shard_indices",
]

"""Where trainers draw conditioning (and, optionally, real images) from: one interface, every kind of data.

A :class:`ConditionSource` returns ``(conditioning, images or None)`` for a batch, drawing with the trainer's
explicit ``generator``. ``has_images`` says whether real images come with it (a GAN, noised real inputs and
DMD1 pair files need them; data-free methods refuse sources that have them). :meth:`ConditionSource.subset`
keeps the items whose conditions a predicate accepts (multi-student distillation filters each student's
conditions and real images, but not its regression pairs).

* :class:`DigitsSource` -- the digits world's ``train`` split (real 8x8 scans and labels);
* :class:`UniformLabelSource` -- data-free class labels; :class:`UnconditionalSource` -- nothing;
* :class:`PromptSource` -- prompts encoded on the fly by the teacher's own text encoder(s);
* :class:`DatasetSource` -- real images with captions or labels from a local dataset, VAE-encoded for
  latent teachers.

:func:`make_data_source` builds the one a :class:`~stepdistill.data.config.DataConfig` asks for.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..conditioning import Conditioning
from .config import DATA_SOURCES, DataConfig
from .datasets import (
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    PROMPT_COLUMNS,
    DataSourceError,
    class_label_map,
    open_dataset,
    pick_column,
)
from .prompts import PromptEncoder, load_prompts, vae_scale_factor

#: ``predicate(conditions of N items) -> [N] bool``: which items a subset keeps.
Predicate = Callable[[Conditioning], torch.Tensor]


def _mask(predicate: Predicate, cond: Conditioning, n: int, what: str) -> torch.Tensor:
    """Evaluate ``predicate`` on ``n`` items' conditions; a ``[n]`` bool mask keeping at least one."""
    keep = torch.as_tensor(predicate(cond))
    if keep.dtype != torch.bool or tuple(keep.shape) != (n,):
        raise ValueError(f"A subset predicate must return a [{n}] bool tensor for {n} {what}, got "
                         f"{keep.dtype} of shape {tuple(keep.shape)}.")
    if not bool(keep.any()):
        raise DataSourceError(f"The subset predicate keeps none of the {n} {what}: check the partition.")
    return keep.cpu()


class ConditionSource:
    """Where a trainer draws conditioning (and, optionally, real images) from.

    Subclasses implement :meth:`sample` and :meth:`grid_conditioning`; those with a finite pool of items also
    ``__len__`` and :meth:`subset`. ``has_images`` says whether real images come with it.
    """

    has_images: bool = False

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Conditioning, torch.Tensor | None]:
        """Return ``(conditioning, images or None)`` for ``batch_size`` samples."""
        raise NotImplementedError

    def sample_conditions(self, batch_size: int, generator: torch.Generator) -> Conditioning:
        """The conditioning :meth:`sample` would return for the same generator state, without loading images."""
        return self.sample(batch_size, generator)[0]

    def grid_conditioning(self, n: int) -> Conditioning:
        """A fixed conditioning for sample grids (class labels in order, when there are classes)."""
        raise NotImplementedError

    def subset(self, predicate: Predicate) -> ConditionSource:
        """A source drawing only the items whose conditions ``predicate`` keeps (the original is unchanged).

        Args:
            predicate: ``fn(Conditioning of N items) -> [N] bool tensor``.

        Raises:
            DataSourceError: when the predicate keeps nothing, or this source has no conditions to filter.
        """
        raise DataSourceError(f"{type(self).__name__} has no finite set of conditions to take a subset of.")


class DigitsSource(ConditionSource):
    """The digits world's ``train`` split: real 8x8 scans with their class labels (null class 10).

    Args:
        images: ``[N, 1, 8, 8]`` images in ``[-1, 1]`` (default: the ``train`` split).
        labels: Their labels ``[N]``.
    """

    has_images = True

    def __init__(self, images: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
        from .digits import NULL_CLASS, load_digits_split

        if images is None or labels is None:
            split = load_digits_split("train")
            images, labels = split.images, split.labels
        self.images, self.labels, self.null_class = images, labels, NULL_CLASS

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Conditioning, torch.Tensor]:
        """Random scans (with replacement) and their labels."""
        idx = torch.randint(0, len(self.labels), (batch_size,), generator=generator)
        cond = Conditioning(class_labels=self.labels[idx].clone(), null_class_label=self.null_class)
        return cond, self.images[idx].clone()

    def grid_conditioning(self, n: int) -> Conditioning:
        """The classes present (``0..9`` for the whole split), in order, cycling."""
        classes = torch.unique(self.labels)
        return Conditioning(class_labels=classes[torch.arange(n) % len(classes)], null_class_label=self.null_class)

    def subset(self, predicate: Predicate) -> DigitsSource:
        """The scans whose labels ``predicate`` keeps."""
        cond = Conditioning(class_labels=self.labels, null_class_label=self.null_class)
        keep = _mask(predicate, cond, len(self.labels), "digits")
        return DigitsSource(self.images[keep], self.labels[keep])


class UniformLabelSource(ConditionSource):
    """Data-free class-conditional training: labels uniform over ``classes`` (default ``0..num_classes-1``).

    Args:
        num_classes: Number of classes.
        null_class_label: The teacher's null class (CFG on labels).
        classes: The labels drawn from (a subset's); default all.
    """

    def __init__(self, num_classes: int, null_class_label: int, classes: torch.Tensor | None = None) -> None:
        self.num_classes, self.null_class = num_classes, null_class_label
        self.classes = torch.arange(num_classes) if classes is None else classes

    def __len__(self) -> int:
        return len(self.classes)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Conditioning, None]:
        """Uniform labels, no images."""
        labels = self.classes[torch.randint(0, len(self.classes), (batch_size,), generator=generator)]
        return Conditioning(class_labels=labels, null_class_label=self.null_class), None

    def grid_conditioning(self, n: int) -> Conditioning:
        """Labels in order, cycling."""
        return Conditioning(class_labels=self.classes[torch.arange(n) % len(self.classes)],
                            null_class_label=self.null_class)

    def subset(self, predicate: Predicate) -> UniformLabelSource:
        """The classes ``predicate`` keeps."""
        cond = Conditioning(class_labels=self.classes, null_class_label=self.null_class)
        keep = _mask(predicate, cond, len(self.classes), "classes")
        return UniformLabelSource(self.num_classes, self.null_class, self.classes[keep])


class UnconditionalSource(ConditionSource):
    """Data-free training of an unconditional model."""

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Conditioning, None]:
        """An empty conditioning."""
        return Conditioning(), None

    def grid_conditioning(self, n: int) -> Conditioning:
        """An empty conditioning."""
        return Conditioning()


class PromptSource(ConditionSource):
    """Text-to-image training without images: prompts drawn uniformly (with replacement), encoded on the fly.

    Args:
        prompts: The prompt list.
        encoder: A :class:`~stepdistill.data.prompts.PromptEncoder` for the teacher.
    """

    def __init__(self, prompts: Sequence[str], encoder: PromptEncoder) -> None:
        if not prompts:
            raise DataSourceError("PromptSource needs at least one prompt.")
        self.prompts, self.encoder = list(prompts), encoder

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Conditioning, None]:
        """``batch_size`` random prompts, encoded."""
        idx = torch.randint(0, len(self.prompts), (batch_size,), generator=generator)
        return self.encoder([self.prompts[int(i)] for i in idx]), None

    def grid_conditioning(self, n: int) -> Conditioning:
        """The first prompts, cycling."""
        return self.encoder([self.prompts[i % len(self.prompts)] for i in range(n)])

    def subset(self, predicate: Predicate) -> PromptSource:
        """The prompts whose embeddings ``predicate`` keeps (every prompt is encoded once, in chunks)."""
        conds = [self.encoder(self.prompts[i:i + 256]) for i in range(0, len(self.prompts), 256)]
        keep = _mask(predicate, Conditioning.cat(conds), len(self.prompts), "prompts")
        return PromptSource([p for p, k in zip(self.prompts, keep.tolist()) if k], self.encoder)


class DatasetSource(ConditionSource):
    """Real images (and their captions or class labels) from a local dataset.

    Images are converted to the teacher's channel count, resized (shorter side) and centre-cropped to
    ``resolution``, scaled to ``[-1, 1]``; with a ``vae`` they are encoded to scaled latents
    (``(z - shift_factor) * scaling_factor``, the diffusers training convention).

    Args:
        dataset: A ``datasets.Dataset``.
        image_column: Column with images (PIL, or paths relative to ``root``).
        channels: Pixel channels (1: grayscale, 3: RGB).
        resolution: Pixel resolution.
        caption_column: Optional caption column (needs ``encoder``).
        label_column: Optional integer class-label column (needs ``null_class_label``).
        encoder: :class:`PromptEncoder` for captions.
        null_class_label: The teacher's null class, for CFG on labels.
        vae: Optional ``AutoencoderKL`` (frozen) for latent teachers.
        root: Folder that relative image paths are resolved against.
    """

    has_images = True

    def __init__(
        self,
        dataset: Any,
        image_column: str,
        channels: int,
        resolution: int,
        caption_column: str | None = None,
        label_column: str | None = None,
        encoder: PromptEncoder | None = None,
        null_class_label: int | None = None,
        vae: nn.Module | None = None,
        root: Path | None = None,
        label_map: Sequence[int] | None = None,
        encode_batch_size: int = 8,
    ) -> None:
        if len(dataset) == 0:
            raise DataSourceError(f"The dataset {str(root or '')!r} has no rows: point --dataset at a folder / "
                                  "file with images (and check --data_split).")
        if caption_column and encoder is None:
            raise DataSourceError("A caption column needs a text-conditional teacher (pipeline with a text encoder).")
        self.dataset, self.image_column, self.channels, self.resolution = dataset, image_column, channels, resolution
        self.caption_column, self.label_column, self.encoder = caption_column, label_column, encoder
        self.null_class_label, self.vae, self.root = null_class_label, vae, root
        self.label_map = list(label_map) if label_map is not None else None
        self.encode_batch_size = encode_batch_size
        # conditions without decoding images (for pair generation and grids)
        cond_columns = [c for c in (caption_column, label_column) if c]
        self._conditions_view = dataset.select_columns(cond_columns) if cond_columns else None
        self.indices: list[int] | None = None  # the rows a subset keeps (None: every row)

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else len(self.indices)

    def _rows(self, idx: Sequence[int]) -> list[int]:
        """Dataset row numbers of pool positions ``idx`` (the identity without a subset)."""
        return [int(i) for i in idx] if self.indices is None else [self.indices[int(i)] for i in idx]

    def _image(self, value: Any) -> torch.Tensor:
        import numpy as np
        import PIL.Image
        from torchvision.transforms import functional as TF

        if isinstance(value, dict) and value.get("path"):
            value = value["path"]
        if isinstance(value, (str, Path)):
            path = Path(value)
            if not path.is_absolute() and self.root is not None:
                path = self.root / path
            try:
                value = PIL.Image.open(path)
                value.load()
            except (OSError, PIL.UnidentifiedImageError) as err:
                raise DataSourceError(f"Cannot read image {str(path)!r}: {err}.") from err
        if not isinstance(value, PIL.Image.Image):
            raise DataSourceError(f"Column {self.image_column!r} holds {type(value).__name__}, not images or paths.")
        img = value.convert("L" if self.channels == 1 else "RGB")
        img = TF.center_crop(TF.resize(img, self.resolution, antialias=True), [self.resolution, self.resolution])
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 127.5 - 1.0
        return arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        """VAE latents (``(z - shift) * scale``), in chunks, sampled with a generator seeded by ``seed``."""
        if self.vae is None:
            return pixels
        vae = self.vae
        dev = next(vae.parameters()).device
        gen = torch.Generator(device=dev).manual_seed(seed)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        out = []
        for chunk in pixels.split(self.encode_batch_size):
            latents = vae.encode(chunk.to(dev, vae.dtype)).latent_dist.sample(generator=gen)
            out.append(((latents - shift) * vae.config.scaling_factor).float())
        return torch.cat(out)

    def _conditions(self, rows: Sequence[dict]) -> Conditioning:
        if self.caption_column:
            return self.encoder([str(r[self.caption_column] or "") for r in rows])
        if self.label_column:
            raw = [int(r[self.label_column]) for r in rows]
            labels = torch.tensor([self.label_map[v] for v in raw] if self.label_map else raw)
            return Conditioning(class_labels=labels, null_class_label=self.null_class_label)
        return Conditioning()

    def _condition_rows(self, idx: Sequence[int]) -> Conditioning:
        if self._conditions_view is None:
            return Conditioning()
        return self._conditions([self._conditions_view[int(i)] for i in idx])

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Conditioning, torch.Tensor]:
        """Random rows (with replacement): conditioning and images (latents for latent teachers)."""
        idx = self._rows(torch.randint(0, len(self), (batch_size,), generator=generator).tolist())
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # the VAE's posterior sample
        rows = [self.dataset[i] for i in idx]
        images = self._encode(torch.stack([self._image(r[self.image_column]) for r in rows]), seed)
        return self._conditions(rows), images

    def sample_conditions(self, batch_size: int, generator: torch.Generator) -> Conditioning:
        """The conditions of :meth:`sample`'s rows for the same generator state, without loading images."""
        idx = torch.randint(0, len(self), (batch_size,), generator=generator).tolist()
        return self._condition_rows(self._rows(idx))

    def grid_conditioning(self, n: int) -> Conditioning:
        """The conditioning of the first ``n`` rows (cycling); no image is loaded."""
        return self._condition_rows(self._rows([i % len(self) for i in range(n)]))

    def subset(self, predicate: Predicate) -> DatasetSource:
        """The rows whose condition (caption embedding or class label) ``predicate`` keeps."""
        if self._conditions_view is None:
            raise DataSourceError("This dataset has no caption or label column, so there is no condition to filter.")
        pool = self._rows(range(len(self)))
        conds = [self._condition_rows(pool[i:i + 256]) for i in range(0, len(pool), 256)]
        keep = _mask(predicate, Conditioning.cat(conds), len(pool), "dataset rows")
        out = copy.copy(self)
        out.indices = [pool[i] for i in keep.nonzero().flatten().tolist()]
        return out


def make_data_source(cfg: DataConfig, teacher_folder: str | Path | None, network: nn.Module,
                     device: torch.device | str, dtype: torch.dtype | None = None) -> ConditionSource:
    """The :class:`ConditionSource` a :class:`~stepdistill.data.config.DataConfig` asks for.

    Reads ``cfg.data`` (one of :data:`DATA_SOURCES`) and the fields that go with it: ``prompts`` /
    ``prompt_column`` for ``data=prompts``; ``dataset`` / ``data_split`` / ``image_column`` /
    ``caption_column`` / ``label_column`` for ``data=dataset``; ``num_classes`` / ``null_class_label``.
    """
    data = cfg.data
    if data == "digits":
        return DigitsSource()
    if data == "uniform_labels":
        return UniformLabelSource(cfg.num_classes, cfg.null_class_label)
    if data == "unconditional":
        return UnconditionalSource()
    if teacher_folder is None:
        raise DataSourceError(f"data={data!r} needs a teacher pipeline folder (--teacher) for its text encoder / VAE; "
                              "a teacher passed as a module works with digits, uniform_labels, unconditional.")
    folder = Path(teacher_folder)
    if data == "prompts":
        if not cfg.prompts:
            raise DataSourceError("data=prompts needs --prompts <file.txt | file.csv/json | dataset folder>.")
        prompts = load_prompts(cfg.prompts, cfg.prompt_column)
        return PromptSource(prompts, PromptEncoder.from_pretrained(folder, network, device, dtype))
    if data == "dataset":
        if not cfg.dataset:
            raise DataSourceError("data=dataset needs --dataset <image folder | csv/json | save_to_disk folder>.")
        ds = open_dataset(cfg.dataset, cfg.data_split)
        where = str(cfg.dataset)
        image_col = pick_column(ds.column_names, cfg.image_column, IMAGE_COLUMNS, "image", where)
        label_col = caption_col = label_map = None
        text_teacher = (folder / "text_encoder").is_dir()
        if text_teacher:
            caption_col = pick_column(ds.column_names, cfg.caption_column, PROMPT_COLUMNS, "caption", where)
        elif cfg.label_column or any(c in ds.column_names for c in LABEL_COLUMNS):
            label_col = pick_column(ds.column_names, cfg.label_column, LABEL_COLUMNS, "label", where)
            label_map = class_label_map(ds.features[label_col], where)
        encoder = PromptEncoder.from_pretrained(folder, network, device, dtype) if caption_col else None
        vae = None
        channels = int(network.config.in_channels)
        resolution = int(network.config.sample_size)
        if (folder / "vae" / "config.json").is_file():
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(folder / "vae").requires_grad_(False).eval().to(device)
            channels = int(vae.config.in_channels)
            resolution = resolution * vae_scale_factor(folder)
        root = Path(cfg.dataset).parent if Path(cfg.dataset).is_file() else Path(cfg.dataset)
        return DatasetSource(ds, image_col, channels, resolution, caption_col, label_col, encoder,
                             cfg.null_class_label, vae, root, label_map)
    raise DataSourceError(f"data must be one of {list(DATA_SOURCES)}, got {data!r}.")


__all__ = [
    "ConditionSource",
    "DatasetSource",
    "DigitsSource",
    "Predicate",
    "PromptSource",
    "UnconditionalSource",
    "UniformLabelSource",
    "make_data_source",
]

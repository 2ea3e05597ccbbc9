"""Where trainers get conditioning and real images: prompt files, Hugging Face datasets, image folders.

The digits world and label-only sources live in :mod:`stepdistill.trainers.base`; this module adds the
sources a text-to-image or image-data user needs:

* :func:`load_prompts` reads prompts from a plain text file (one per line), a csv / json / jsonl /
  parquet file, or a dataset saved with ``Dataset.save_to_disk`` (via Hugging Face ``datasets``);
* :class:`PromptEncoder` turns prompts into a :class:`~stepdistill.conditioning.Conditioning` with the
  text encoder(s) of the teacher's own pipeline folder, through the stock diffusers pipeline's
  ``encode_prompt`` (SD1.5-style, SDXL -- with its added time ids -- and SD3), so embeddings, the
  empty-prompt negative and SDXL's zeroed negative follow diffusers exactly;
* :class:`PromptSource` samples prompts and encodes them on the fly (text encoders frozen on the
  accelerator, in the mixed-precision dtype);
* :class:`DatasetSource` samples real images (and their captions or class labels) from an image folder,
  a csv / json file with image paths, or an Arrow dataset on disk, resizes / centre-crops them to the
  teacher's resolution and, for latent teachers, encodes them with the teacher's VAE.

:func:`make_data_source` picks one from a :class:`~stepdistill.trainers.base.TrainerConfig`.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..conditioning import Conditioning
from .base import ConditionSource, DigitsSource, UnconditionalSource, UniformLabelSource

logger = logging.getLogger(__name__)

#: Values of ``TrainerConfig.data``.
DATA_SOURCES = ("digits", "uniform_labels", "unconditional", "prompts", "dataset")

#: Column names tried, in order, when no prompt / image / label column is given.
PROMPT_COLUMNS = ("prompt", "text", "caption", "captions")
IMAGE_COLUMNS = ("image", "img", "file_name", "path", "image_path")
LABEL_COLUMNS = ("label", "labels", "class", "class_label")

_TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataSourceError(ValueError):
    """A prompt file or dataset that cannot be used; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------------
# reading prompts and datasets
def open_dataset(path: str | Path, split: str = "train") -> Any:
    """Open a local dataset with Hugging Face ``datasets`` (never a hub download).

    ``path`` may be a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, an image
    folder (``imagefolder`` builder: images, optionally with ``metadata.csv`` / ``metadata.jsonl`` holding
    captions or labels, or one sub-folder per class), or a csv / json / jsonl / parquet file.
    """
    import datasets

    root = Path(path).expanduser()
    if not root.exists():
        raise DataSourceError(f"Dataset {str(root)!r} does not exist; pass a local folder or file (no hub downloads).")
    if root.is_file():
        builder = _TABLE_SUFFIXES.get(root.suffix.lower())
        if builder is None:
            raise DataSourceError(
                f"{str(root)!r}: unsupported file type {root.suffix!r}; use .txt (one prompt per line), "
                f"{sorted(_TABLE_SUFFIXES)}, an image folder or a save_to_disk folder."
            )
        kwargs = {"delimiter": "\t"} if root.suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(builder, data_files=str(root), split="train", **kwargs)
    if (root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataSourceError(f"{str(root)!r} has splits {list(ds)}, not {split!r}: pick one with "
                                      "--data_split (trainer) or save the split you want.")
            ds = ds[split]
        return ds
    return datasets.load_dataset("imagefolder", data_dir=str(root), split=split)


def _pick_column(names: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, where: str) -> str:
    if wanted:
        if wanted not in names:
            raise DataSourceError(f"{where} has no column {wanted!r} for {what}; its columns are {list(names)}.")
        return wanted
    for name in candidates:
        if name in names:
            return name
    raise DataSourceError(
        f"{where} has no {what} column (looked for {list(candidates)}; columns: {list(names)}). "
        f"Name it with --{what}_column."
    )


def load_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Read prompts: a ``.txt`` file (one per line, blank lines skipped) or any :func:`open_dataset` input.

    Raises:
        DataSourceError: for a missing file, a missing column, or no non-empty prompt.
    """
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() in (".txt", ""):
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    else:
        ds = open_dataset(p)
        col = _pick_column(ds.column_names, column, PROMPT_COLUMNS, "prompt", str(p))
        prompts = [str(v).strip() if v is not None else "" for v in ds[col]]
    prompts = [q for q in prompts if q]
    if not prompts:
        raise DataSourceError(f"{str(p)!r} holds no non-empty prompt.")
    return prompts


# --------------------------------------------------------------------------------------------------
# prompt encoding with the teacher's own text encoders
def _load_component(folder: Path, name: str, spec: Sequence[str | None], dtype: torch.dtype | None):
    library, class_name = spec
    if library is None or class_name is None:
        return None
    cls = getattr(importlib.import_module(library), class_name)
    kwargs = {"torch_dtype": dtype} if dtype is not None and issubclass(cls, nn.Module) else {}
    return cls.from_pretrained(folder / name, **kwargs)


class PromptEncoder:
    """Encode prompts with the text encoder(s) of a teacher pipeline folder, as its stock pipeline does.

    The folder's ``model_index.json`` decides the route: one text encoder -> ``StableDiffusionPipeline``;
    two with a UNet -> ``StableDiffusionXLPipeline`` (pooled embeddings and ``time_ids`` for the
    teacher's resolution, no crop); two or three with a transformer -> ``StableDiffusion3Pipeline``.
    The negative twin is what that pipeline uses for classifier-free guidance: the empty prompt's
    embeddings (SD1.5, SD3) or zeros (SDXL with ``force_zeros_for_empty_prompt``).

    Build it with :meth:`from_pretrained` (which reads the folder and picks the route).

    Args:
        pipeline: The stock diffusers pipeline (text components only) whose ``encode_prompt`` is used.
        kind: ``"sd"``, ``"sdxl"`` or ``"sd3"``.
        device: Where the text encoders run.
        resolution: SDXL's pixel resolution for the ``time_ids`` (original = target size, no crop).

    Example:
        >>> enc = PromptEncoder.from_pretrained("models/sd15", teacher.model, "cuda", torch.bfloat16)
        >>> cond = enc(["a photo of a cat"])  # prompt_embeds [1, 77, 768] and its negative
    """

    def __init__(self, pipeline: Any, kind: str, device: torch.device | str, resolution: int | None = None) -> None:
        self.pipeline, self.kind, self.device, self.resolution = pipeline, kind, torch.device(device), resolution
        self._negative: Conditioning | None = None

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        network: nn.Module,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> PromptEncoder:
        """Load the text encoders and tokenizers named in ``folder/model_index.json``.

        Args:
            folder: Teacher pipeline folder.
            network: The teacher's denoising network (SD3 reads its config for the T5-less path).
            device: Where the text encoders run.
            dtype: Their dtype (frozen; the mixed-precision dtype).
        """
        from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

        folder = Path(folder)
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise DataSourceError(
                f"{str(folder)!r} has no model_index.json: prompts need the teacher's text encoder, so pass a "
                "pipeline folder (text_encoder/ + tokenizer/ beside unet/)."
            )
        index = json.loads(index_path.read_text())
        present = {k: v for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is not None}
        if "text_encoder" not in present or "tokenizer" not in present:
            raise DataSourceError(
                f"{str(folder)!r} has no text_encoder/tokenizer: this teacher is not text-conditional. Use "
                "data=digits / uniform_labels / unconditional, or a text-to-image pipeline folder."
            )
        parts = {name: _load_component(folder, name, present[name], dtype)
                 for name in ("text_encoder", "text_encoder_2", "text_encoder_3",
                              "tokenizer", "tokenizer_2", "tokenizer_3") if name in present}
        for part in parts.values():
            if isinstance(part, nn.Module):
                part.requires_grad_(False).eval().to(device)
        cfg = network.config
        if "transformer" in present:
            pipe = StableDiffusion3Pipeline(
                transformer=network, scheduler=None, vae=None,
                text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                text_encoder_2=parts.get("text_encoder_2"), tokenizer_2=parts.get("tokenizer_2"),
                text_encoder_3=parts.get("text_encoder_3"), tokenizer_3=parts.get("tokenizer_3"),
            )
            return cls(pipe, "sd3", device)
        if "text_encoder_2" in present:
            pipe = StableDiffusionXLPipeline(
                vae=None, unet=None, scheduler=None,
                text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                text_encoder_2=parts["text_encoder_2"], tokenizer_2=parts["tokenizer_2"],
                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            )
            vae_scale = _vae_scale_factor(folder)
            return cls(pipe, "sdxl", device, resolution=int(cfg.sample_size) * vae_scale)
        pipe = StableDiffusionPipeline(
            vae=None, unet=None, scheduler=None, text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        return cls(pipe, "sd", device)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        """Embeddings of ``prompts`` with their negative (unconditional) twin attached."""
        prompts = list(prompts)
        pipe, dev = self.pipeline, self.device
        if self.kind == "sd":
            emb, neg = pipe.encode_prompt(prompts, dev, 1, True, None)
            return Conditioning(prompt_embeds=emb, negative=Conditioning(prompt_embeds=neg))
        if self.kind == "sdxl":
            emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device=dev, do_classifier_free_guidance=True)
            r = self.resolution
            time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=emb.dtype, device=dev).repeat(len(prompts), 1)
            return Conditioning(
                prompt_embeds=emb, pooled_prompt_embeds=pooled, time_ids=time_ids,
                negative=Conditioning(prompt_embeds=neg, pooled_prompt_embeds=neg_pooled, time_ids=time_ids),
            )
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompts, None, None, device=dev, do_classifier_free_guidance=True
        )
        return Conditioning(prompt_embeds=emb, pooled_prompt_embeds=pooled,
                            negative=Conditioning(prompt_embeds=neg, pooled_prompt_embeds=neg_pooled))


def _vae_scale_factor(folder: Path) -> int:
    cfg_path = folder / "vae" / "config.json"
    if not cfg_path.is_file():
        return 8
    return 2 ** (len(json.loads(cfg_path.read_text()).get("block_out_channels", [0] * 4)) - 1)


# --------------------------------------------------------------------------------------------------
# sources
class PromptSource(ConditionSource):
    """Text-to-image training without images: prompts drawn uniformly (with replacement), encoded on the fly.

    Args:
        prompts: The prompt list.
        encoder: A :class:`PromptEncoder` for the teacher.
    """

    def __init__(self, prompts: Sequence[str], encoder: PromptEncoder) -> None:
        if not prompts:
            raise DataSourceError("PromptSource needs at least one prompt.")
        self.prompts, self.encoder = list(prompts), encoder

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Conditioning, None]:
        """``batch_size`` random prompts, encoded."""
        idx = torch.randint(0, len(self.prompts), (batch_size,), generator=generator)
        return self.encoder([self.prompts[int(i)] for i in idx]), None

    def grid_conditioning(self, n: int) -> Conditioning:
        """The first prompts, cycling."""
        return self.encoder([self.prompts[i % len(self.prompts)] for i in range(n)])


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

    def __len__(self) -> int:
        return len(self.dataset)

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
        idx = torch.randint(0, len(self.dataset), (batch_size,), generator=generator).tolist()
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # the VAE's posterior sample
        rows = [self.dataset[int(i)] for i in idx]
        images = self._encode(torch.stack([self._image(r[self.image_column]) for r in rows]), seed)
        return self._conditions(rows), images

    def sample_conditions(self, batch_size: int, generator: torch.Generator) -> Conditioning:
        """The conditions of :meth:`sample`'s rows for the same generator state, without loading images."""
        idx = torch.randint(0, len(self.dataset), (batch_size,), generator=generator).tolist()
        return self._condition_rows(idx)

    def grid_conditioning(self, n: int) -> Conditioning:
        """The conditioning of the first ``n`` rows (cycling); no image is loaded."""
        return self._condition_rows([i % len(self.dataset) for i in range(n)])


def _class_label_map(feature: Any, where: str) -> list[int] | None:
    """Map a ``ClassLabel`` column's indices to the labels its names spell (image-folder classes ``0/``, ``3/``).

    ``datasets`` numbers class sub-folders 0..K-1 in sorted order; when every name is an integer the
    teacher's label is that integer, not the index. Other names keep their index (logged).
    """
    import datasets

    if not isinstance(feature, datasets.ClassLabel):
        return None
    names = list(feature.names)
    if all(n.strip().lstrip("-").isdigit() for n in names):
        return [int(n) for n in names]
    logger.warning("%s: class names %s are not integers; using their indices 0..%d as class labels.",
                   where, names, len(names) - 1)
    return None


# --------------------------------------------------------------------------------------------------
def make_data_source(cfg: Any, teacher_folder: str | Path, network: nn.Module, device: torch.device | str,
                     dtype: torch.dtype | None = None) -> ConditionSource:
    """The :class:`~stepdistill.trainers.base.ConditionSource` a trainer config asks for.

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
        image_col = _pick_column(ds.column_names, cfg.image_column, IMAGE_COLUMNS, "image", where)
        label_col = caption_col = label_map = None
        text_teacher = (folder / "text_encoder").is_dir()
        if text_teacher:
            caption_col = _pick_column(ds.column_names, cfg.caption_column, PROMPT_COLUMNS, "caption", where)
        elif cfg.label_column or any(c in ds.column_names for c in LABEL_COLUMNS):
            label_col = _pick_column(ds.column_names, cfg.label_column, LABEL_COLUMNS, "label", where)
            label_map = _class_label_map(ds.features[label_col], where)
        encoder = PromptEncoder.from_pretrained(folder, network, device, dtype) if caption_col else None
        vae = None
        channels = int(network.config.in_channels)
        resolution = int(network.config.sample_size)
        if (folder / "vae" / "config.json").is_file():
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(folder / "vae").requires_grad_(False).eval().to(device)
            channels = int(vae.config.in_channels)
            resolution = resolution * _vae_scale_factor(folder)
        root = Path(cfg.dataset).parent if Path(cfg.dataset).is_file() else Path(cfg.dataset)
        return DatasetSource(ds, image_col, channels, resolution, caption_col, label_col, encoder,
                             cfg.null_class_label, vae, root, label_map)
    raise DataSourceError(f"data must be one of {list(DATA_SOURCES)}, got {data!r}.")

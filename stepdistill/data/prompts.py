"""Prompts for text-conditional teachers: reading prompt files and encoding them as the teacher's pipeline does.

* :func:`load_prompts` reads prompts from a plain text file (one per line), a csv / json / jsonl / parquet
  file, or a dataset saved with ``Dataset.save_to_disk`` (via :func:`~stepdistill.data.datasets.open_dataset`);
* :class:`PromptEncoder` turns prompts into a :class:`~stepdistill.conditioning.Conditioning` with the
  text encoder(s) of the teacher's own pipeline folder, through the stock diffusers pipeline's
  ``encode_prompt`` (SD1.5-style, SDXL -- with its added time ids -- and SD3), so embeddings, the
  empty-prompt negative and SDXL's zeroed negative follow diffusers exactly; a gradient-enabled path
  serves methods that train a token of the text encoder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..conditioning import Conditioning
from ..loading import COMPONENT_LIBRARIES, ModelFolderError, component_class
from .datasets import PROMPT_COLUMNS, DataSourceError, open_dataset, pick_column


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
        col = pick_column(ds.column_names, column, PROMPT_COLUMNS, "prompt", str(p))
        prompts = [str(v).strip() if v is not None else "" for v in ds[col]]
    prompts = [q for q in prompts if q]
    if not prompts:
        raise DataSourceError(f"{str(p)!r} holds no non-empty prompt.")
    return prompts


#: Libraries whose classes a pipeline folder's ``model_index.json`` may name for its text components.
KNOWN_LIBRARIES = COMPONENT_LIBRARIES


def _load_component(folder: Path, name: str, spec: Sequence[str | None], dtype: torch.dtype | None):
    """Load text component ``name`` of a pipeline folder; only diffusers' / transformers' own classes."""
    try:
        cls = component_class(folder, name, spec)
    except ModelFolderError as err:
        raise DataSourceError(str(err)) from None
    if cls is None:
        return None
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
            vae_scale = vae_scale_factor(folder)
            return cls(pipe, "sdxl", device, resolution=int(cfg.sample_size) * vae_scale)
        pipe = StableDiffusionPipeline(
            vae=None, unet=None, scheduler=None, text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        return cls(pipe, "sd", device)

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The text encoder modules (to make parts of them trainable, e.g. one token embedding row)."""
        pipe = self.pipeline
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(pipe, n, None) for n in names) if isinstance(m, nn.Module)]

    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        """Embeddings of ``prompts`` with their negative (unconditional) twin attached (no gradient)."""
        return self.encode(prompts, grad=False)

    def encode(self, prompts: Sequence[str], grad: bool = False) -> Conditioning:
        """Embeddings of ``prompts`` with their negative twin; with ``grad`` the graph reaches the text encoders.

        The gradient-enabled path is for methods that train part of the text encoder (a new token's
        embedding row): set ``requires_grad`` on that part, encode with ``grad=True``, back-propagate.
        """
        with torch.set_grad_enabled(grad):
            return self._encode(list(prompts))

    def _encode(self, prompts: list[str]) -> Conditioning:
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


def vae_scale_factor(folder: Path) -> int:
    """Pixels per latent pixel of the VAE in a pipeline folder (8 when it has no VAE config)."""
    cfg_path = folder / "vae" / "config.json"
    if not cfg_path.is_file():
        return 8
    return 2 ** (len(json.loads(cfg_path.read_text()).get("block_out_channels", [0] * 4)) - 1)


__all__ = ["KNOWN_LIBRARIES", "PromptEncoder", "load_prompts", "vae_scale_factor"]

"""A tiny EchoDistill world: SD1.5-like teacher and student pipeline folders (random weights) and concept images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tiny_models import clip_text_encoder, clip_tokenizer, latent_unet, tiny_vae, write_clip_tokenizer

SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")


def write_images(folder: Path, n: int, size: int = 16, mode: str = "RGB", seed: int = 0) -> Path:
    """``n`` random ``size``-pixel images (RGB or L) as PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        PIL.Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(folder / f"{i}.png")
    return folder


def write_echo_world(root: Path) -> dict[str, Path]:
    """Teacher and student folders (the student: a perturbed teacher UNet), 4 concept and 2 held-out images."""
    tok = clip_tokenizer(write_clip_tokenizer(root / "tok"))
    for name, seed in (("teacher", 0), ("student", 1)):
        unet = latent_unet(16)
        if seed:
            with torch.no_grad():
                for p in unet.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        StableDiffusionPipeline(
            vae=tiny_vae(), text_encoder=clip_text_encoder(4), tokenizer=tok, unet=unet,
            scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        ).save_pretrained(root / name)
    return dict(root=root, teacher=root / "teacher", student=root / "student",
                concept=write_images(root / "concept", 4), heldout=write_images(root / "heldout", 2, seed=1))

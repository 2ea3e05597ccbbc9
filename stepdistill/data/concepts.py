"""Concept images for personalization: reading a few images of a new concept, and their augmentation.

:func:`load_concept_images` reads a folder of 3-5 images and checks them against the pixels the network works
on; :class:`ConceptAugment` is Custom Diffusion's augmentation (Kumari et al., CVPR 2023), which EchoDistill keeps:
a horizontal flip, and a random rescale -- shrunk onto a blank canvas (with a mask of the valid region for the
denoising loss) or zoomed in and cropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load_concept_images(folder: str | Path, shape: tuple[int, int, int], what: str = "concept_images") -> torch.Tensor:
    """Every ``.png`` / ``.jpg`` / ``.jpeg`` under ``folder`` as ``[N, C, H, W]`` floats in ``[-1, 1]``.

    Args:
        folder: The image folder.
        shape: ``(C, H, W)`` the images must have (the network's pixel shape).
        what: The setting's name, for errors.

    Raises:
        ValueError: for a missing folder, no images, or an image of another size or channel count.
    """
    from ..evaluation.io import load_image

    root = Path(folder).expanduser() if folder else None
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")) \
        if root is not None and root.is_dir() else []
    if not files:
        raise ValueError(f"No concept images: {what}={str(folder or '')!r} holds no .png/.jpg files. Pass a folder "
                         "with the 3-5 images of the concept.")
    c, h, w = shape
    images = []
    for path in files:
        array = load_image(path)  # uint8 [H, W, C]
        if array.ndim == 2:
            array = array[:, :, None]
        if array.shape != (h, w, c):
            raise ValueError(
                f"Concept image {str(path)!r} is {array.shape[1]}x{array.shape[0]} with {array.shape[2]} channel(s), "
                f"but the model works on {w}x{h} images with {c} channel(s): resize / convert the concept images "
                f"to {w}x{h}, {'grayscale' if c == 1 else 'RGB'}."
            )
        images.append(torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(images)


class ConceptAugment:
    """Custom Diffusion's augmentation of concept images: flip, then shrink-onto-canvas or zoom-and-crop.

    With probability ``shrink_probability`` the image is resized to a side ``s ~ U[size/3, size]`` and placed at a
    random position on a canvas of value ``fill``; the mask is 1 on the placed image. Otherwise it is enlarged by
    ``U[1.2, 1.4]`` and a random ``size`` window is cropped (mask all ones).

    Args:
        hflip: Flip horizontally with probability 1/2.
        shrink_probability: Probability of the shrink branch (Custom Diffusion: 0.66; 0 turns rescaling off).
        fill: Canvas value in ``[-1, 1]`` (the original uses 0, mid grey; digits use -1, their background).

    Example:
        >>> images, mask = ConceptAugment()(concept[idx], generator=rng)
    """

    def __init__(self, hflip: bool = True, shrink_probability: float = 0.66, fill: float = 0.0) -> None:
        self.hflip, self.shrink_probability, self.fill = hflip, shrink_probability, fill

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return augmented images and their masks ``[B, 1, H, W]`` (1 where the image is valid)."""
        h, w = images.shape[-2:]
        out, masks = [], []
        for img in images:
            u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
            if self.hflip and u[0] < 0.5:
                img = img.flip(-1)
            mask = torch.ones(1, h, w, dtype=img.dtype)
            if u[1] < self.shrink_probability:
                scale = 1 / 3 + (2 / 3) * u[2]
                sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
                small = _resize(img, sh, sw)
                top, left = int(u[3] * (h - sh + 1)), int(u[4] * (w - sw + 1))
                canvas = torch.full_like(img, self.fill)
                canvas[:, top: top + sh, left: left + sw] = small
                mask = torch.zeros_like(mask)
                mask[:, top: top + sh, left: left + sw] = 1
                img = canvas
            elif 0 < self.shrink_probability < 1:
                scale = 1.2 + 0.2 * u[2]
                bh, bw = round(h * scale), round(w * scale)
                big = _resize(img, bh, bw)
                top, left = int(u[3] * (bh - h + 1)), int(u[4] * (bw - w + 1))
                img = big[:, top: top + h, left: left + w]
            out.append(img)
            masks.append(mask)
        return torch.stack(out), torch.stack(masks)


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(img[None].float(), size=(h, w), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp(-1, 1).to(img.dtype)


__all__ = ["ConceptAugment", "load_concept_images"]

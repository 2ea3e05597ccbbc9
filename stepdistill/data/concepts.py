"""Concept images for personalization: reading a few images of a new concept, their augmentation, digits concepts.

:func:`load_concept_images` reads a folder of 3-5 images and checks them against the pixels the network works
on; :class:`ConceptAugment` is Custom Diffusion's augmentation (Kumari et al., CVPR 2023), which EchoDistill keeps:
a horizontal flip, and a random rescale -- shrunk onto a blank canvas (with a mask of the valid region for the
denoising loss) or zoomed in and cropped.

:data:`DIGIT_CONCEPTS` / :func:`write_digit_concept` make concepts the digits teachers never saw, deterministically
from the digits scans: a strong slant (a horizontal shear) and a thick stroke (a grey-scale dilation). The training
images are one train-split scan of each of a few digits; the held-out images are the same style on held-out-split
scans of every digit (for a class-matched concept fidelity on images no network trained on, seen digits and unseen
ones alike).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: Optional file beside the concept images: ``{"<relative image path>": "template|template", ...}``.
CAPTIONS_FILE = "captions.json"


def concept_files(folder: str | Path) -> list[Path]:
    """The concept images under ``folder`` (``.png`` / ``.jpg`` / ``.jpeg``, recursively), sorted."""
    root = Path(folder).expanduser() if folder else None
    if root is None or not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def load_concept_captions(folder: str | Path) -> list[list[str]] | None:
    """Each concept image's prompt templates from ``folder/captions.json`` (``None`` without the file).

    The file maps every image's path relative to ``folder`` to ``'|'``-separated templates, each with a ``{}``
    where the placeholder token goes (e.g. ``{"0.png": "a handwritten three {}|the digit 3 {}"}``). Returned in the
    order of :func:`load_concept_images`.

    Raises:
        ValueError: when an image has no entry or a template has no ``{}``.
    """
    path = Path(folder).expanduser() / CAPTIONS_FILE
    if not path.is_file():
        return None
    table = json.loads(path.read_text())
    out = []
    for file in concept_files(folder):
        name = file.relative_to(Path(folder).expanduser()).as_posix()
        templates = [t.strip() for t in str(table.get(name, "")).split("|") if t.strip()]
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"{str(path)!r} gives {name!r} no templates with '{{}}' (got {table.get(name)!r}): map "
                             "every concept image to '|'-separated templates such as 'a photo of {}'.")
        out.append(templates)
    return out


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

    files = concept_files(folder)
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




def shear_digits(images: torch.Tensor, shear: float) -> torch.Tensor:
    """Slant ``[-1, 1]`` images ``[N, C, H, W]``: pixel ``(x, y)`` reads ``(x + shear * (y - centre), y)`` (bilinear).

    A positive ``shear`` leans the tops of the strokes to the right; the background (-1) fills what enters the frame.
    """
    n, _, h, w = images.shape
    theta = torch.tensor([[1.0, shear * h / w, 0.0], [0.0, 1.0, 0.0]]).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    ink = F.grid_sample((images.float() + 1) / 2, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (ink * 2 - 1).clamp(-1, 1)


def dilate_digits(images: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """Thicken the strokes of ``[-1, 1]`` images: ``passes`` grey-scale dilations with a horizontal 1x2 max filter.

    (A 3x3 dilation fills most of an 8x8 digit; one-pixel-wider strokes keep the digit readable.)
    """
    x = images.float()
    for _ in range(passes):
        shifted = F.pad(x, (1, 0, 0, 0), value=-1.0)[..., :-1]  # one pixel to the right
        x = torch.maximum(x, shifted)
    return x


#: The digits concepts: name -> (style function, the digits of the training images, a related vocabulary word).
DIGIT_CONCEPTS = {
    "slant": (lambda x: shear_digits(x, 0.6), (2, 3, 5, 7), "handwritten"),
    "thick": (lambda x: dilate_digits(x, 1), (2, 3, 5, 7), "thin"),
}


def digit_concept_images(name: str, heldout_per_class: int = 8) -> dict[str, torch.Tensor]:
    """A digits concept as tensors: ``train`` ``[k, 1, 8, 8]`` (``train_labels``), ``heldout`` ``[10 * m, 1, 8, 8]``.

    ``train``: the first train-split scan of each of the concept's digits, styled; ``heldout``: the first
    ``heldout_per_class`` held-out-split scans of every digit, styled (``heldout_labels`` their digits;
    ``heldout_plain`` the same scans without the style).
    """
    from .digits import NUM_CLASSES, load_digits_split

    if name not in DIGIT_CONCEPTS:
        raise ValueError(f"Unknown digits concept {name!r}; choose one of {sorted(DIGIT_CONCEPTS)}.")
    if heldout_per_class < 1:
        raise ValueError(f"heldout_per_class must be >= 1, got {heldout_per_class}.")
    style, digits, _ = DIGIT_CONCEPTS[name]
    train, held = load_digits_split("train"), load_digits_split("heldout")
    train_idx = torch.stack([torch.nonzero(train.labels == d).flatten()[0] for d in digits])
    held_idx = torch.cat([torch.nonzero(held.labels == c).flatten()[:heldout_per_class] for c in range(NUM_CLASSES)])
    return {"train": style(train.images[train_idx]), "train_labels": train.labels[train_idx],
            "heldout": style(held.images[held_idx]),
            "heldout_labels": held.labels[held_idx], "heldout_plain": held.images[held_idx]}


def write_digit_concept(
    name: str, root: str | Path, heldout_per_class: int = 8, captions: Callable[[int], str] | None = None
) -> dict[str, Path]:
    """Write :func:`digit_concept_images` as 8x8 grayscale PNGs: ``root/name/train`` and ``root/name/heldout``.

    Held-out files are named ``d{digit}_{k}.png``. With ``captions`` (digit -> ``'|'``-separated templates with
    ``{}`` for the token), ``train/captions.json`` gives each training image its digit's templates. Returns the two
    folders.

    Example:
        >>> folders = write_digit_concept("slant", "runs/concepts")
        >>> folders["train"]  # --concept_images of EchoDistill
    """
    from PIL import Image

    from .digits import to_uint8

    images = digit_concept_images(name, heldout_per_class)
    out = {"train": Path(root) / name / "train", "heldout": Path(root) / name / "heldout"}
    for folder in out.values():
        folder.mkdir(parents=True, exist_ok=True)
    table = {}
    for k, (array, label) in enumerate(zip(to_uint8(images["train"]), images["train_labels"].tolist())):
        Image.fromarray(array[:, :, 0], mode="L").save(out["train"] / f"{k}.png")
        if captions is not None:
            table[f"{k}.png"] = captions(label)
    if captions is not None:
        (out["train"] / CAPTIONS_FILE).write_text(json.dumps(table, indent=2) + "\n")
    counts: dict[int, int] = {}
    for array, label in zip(to_uint8(images["heldout"]), images["heldout_labels"].tolist()):
        k = counts[label] = counts.get(label, -1) + 1
        Image.fromarray(array[:, :, 0], mode="L").save(out["heldout"] / f"d{label}_{k}.png")
    return out


__all__ = ["CAPTIONS_FILE", "DIGIT_CONCEPTS", "ConceptAugment", "concept_files", "digit_concept_images",
           "dilate_digits", "load_concept_captions", "load_concept_images", "shear_digits", "write_digit_concept"]

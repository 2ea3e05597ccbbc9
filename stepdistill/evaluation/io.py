"""Images in and out of the evaluation code: folders, arrays and tensors, with one explicit mode policy.

Everything that reaches a feature extractor is a **uint8 image** ``[H, W, C]`` with the channel count
the extractor asks for. Float images (``[-1, 1]``, as samplers return them) are quantized exactly as
saving a PNG would quantize them, so evaluating samples in memory and evaluating the same samples
saved to a folder give the same number.

Mode policy (applied to files, dataset rows and arrays alike):

* grayscale (``L``, ``1``) and ``RGB`` are accepted; grayscale -> RGB replicates the channel (exact),
  RGB -> grayscale uses PIL's ITU-R 601 luma (``L = 0.299 R + 0.587 G + 0.114 B``);
* palette images (``P``) are expanded with their palette;
* images with an alpha channel (``RGBA``, ``LA``, palette transparency) are accepted only when fully
  opaque (the alpha is dropped); translucent images are refused, because the number would depend on
  an arbitrary background colour;
* anything else (16-bit, float, CMYK, ...) is refused.

Sizes: an extractor that resizes (Inception) takes any size, mixed sizes included; a native-resolution
extractor (the digits classifier) refuses any image whose size is not its input size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

#: File extensions read from image folders (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

_GRAY_MODES = ("L", "1")
_RGB_MODES = ("RGB",)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_ACCEPTED_MODES = _GRAY_MODES + _RGB_MODES + _ALPHA_MODES + ("P",)


class ImageInputError(ValueError):
    """An image, folder or dataset cannot be evaluated as given (the message names it and says why)."""


# ---------------------------------------------------------------------------------------------------
# Arrays and tensors
# ---------------------------------------------------------------------------------------------------
def to_uint8_nhwc(images: np.ndarray | torch.Tensor | Sequence[Image.Image]) -> np.ndarray:
    """Bring a batch of images to uint8 ``[B, H, W, C]``.

    Conventions (fixed, so nothing is guessed from shapes):

    * ``torch.Tensor`` is ``[B, C, H, W]``; ``numpy.ndarray`` is ``[B, H, W, C]`` (PIL / imageio
      layout); a 3-d array or tensor is a batch of single-channel images ``[B, H, W]``;
    * dtype ``uint8`` holds values in ``[0, 255]``; floating dtypes hold values in ``[-1, 1]`` (the
      range of stepdistill's samplers and datasets) and are quantized as
      ``round((x + 1) * 127.5)`` after clipping -- what saving a PNG does;
    * a list of PIL images is converted with the module's mode policy to RGB or grayscale as given.

    Raises:
        ImageInputError: for other dtypes, shapes or non-finite values.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ImageInputError("Got an empty list of images.")
        if all(isinstance(im, Image.Image) for im in images):
            arrays = [pil_to_array(im, channels=None, source=f"image {i}") for i, im in enumerate(images)]
            return _stack(arrays, "the list of PIL images")
        raise ImageInputError("A list of images must hold PIL images; pass arrays or tensors as one batch.")
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu()
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4:
            raise ImageInputError(f"Expected a [B, C, H, W] tensor, got shape {tuple(images.shape)}.")
        x = x.permute(0, 2, 3, 1)
        arr = x.numpy() if x.dtype != torch.bfloat16 else x.float().numpy()
    elif isinstance(images, np.ndarray):
        arr = images
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4:
            raise ImageInputError(f"Expected a [B, H, W, C] array, got shape {images.shape}.")
    else:
        raise ImageInputError(f"Cannot read images from a {type(images).__name__}.")
    if arr.shape[0] == 0:
        raise ImageInputError("Got an empty batch of images.")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ImageInputError("The images contain NaN or infinite values (a diverged sampler?).")
        return ((np.clip(arr, -1.0, 1.0) + 1.0) * 127.5).round().astype(np.uint8)
    raise ImageInputError(f"Images of dtype {arr.dtype} are ambiguous: pass uint8 in [0, 255] or floats in [-1, 1].")


def unit_to_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Images in ``[0, 1]`` (diffusers' ``output_type="np"``/``"pt"``) -> uint8 ``[B, H, W, C]``.

    Uses diffusers' own quantization (``round(x * 255)``), which equals :func:`to_uint8_nhwc` on
    ``2 x - 1``.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float()
        if images.ndim == 4:
            images = images.permute(0, 2, 3, 1)
        images = images.numpy()
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[..., None]
    if not np.isfinite(arr).all():
        raise ImageInputError("The pipeline returned NaN or infinite pixel values.")
    return (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def convert_channels(images: np.ndarray, channels: int, source: str = "images") -> np.ndarray:
    """Convert uint8 ``[B, H, W, C]`` images to ``channels`` (1 or 3) with the module's mode policy.

    Raises:
        ImageInputError: for a translucent alpha channel or an unsupported channel count.
    """
    c = images.shape[-1]
    if c in (2, 4):
        alpha = images[..., -1]
        if (alpha != 255).any():
            raise ImageInputError(
                f"{source}: translucent alpha channel; the metrics would depend on the background colour. "
                "Flatten them onto a background first (e.g. PIL `Image.alpha_composite`)."
            )
        images, c = images[..., :-1], c - 1
    if c == channels:
        return np.ascontiguousarray(images)
    if c == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if c == 3 and channels == 1:
        return np.stack([np.asarray(Image.fromarray(im).convert("L"))[..., None] for im in images])
    raise ImageInputError(f"{source}: {c} channels; only 1 (grayscale), 3 (RGB) and opaque alpha are supported.")


def _stack(arrays: list[np.ndarray], source: str) -> np.ndarray:
    shapes = Counter(a.shape for a in arrays)
    if len(shapes) > 1:
        raise ImageInputError(f"Cannot batch images of different shapes from {source}: {dict(shapes)}.")
    return np.stack(arrays)


# ---------------------------------------------------------------------------------------------------
# PIL images and files
# ---------------------------------------------------------------------------------------------------
def check_mode(mode: str, source: str) -> None:
    """Raise a clear :class:`ImageInputError` when the PIL ``mode`` is not one the policy accepts."""
    if mode not in _ACCEPTED_MODES:
        raise ImageInputError(
            f"{source} has image mode {mode!r}, which stepdistill does not evaluate "
            f"(accepted: grayscale 'L', 'RGB', palette 'P', and opaque 'RGBA'/'LA'). Convert it to RGB or L first."
        )


def pil_to_array(image: Image.Image, channels: int | None, source: str) -> np.ndarray:
    """A PIL image -> uint8 ``[H, W, C]`` under the mode policy.

    Args:
        image: The image.
        channels: 1 or 3 to convert to; ``None`` keeps grayscale as 1 channel and colour as 3.
        source: How to name the image in errors (a path, ``dataset[12]``).
    """
    check_mode(image.mode, source)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode in ("PA", "RGBa"):
        image = image.convert("RGBA")
    elif image.mode == "La":
        image = image.convert("LA")
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    if channels is None:
        channels = 1 if arr.shape[-1] in (1, 2) else 3
    return convert_channels(arr[None], channels, source)[0]


def load_image(path: str | Path, channels: int | None = None) -> np.ndarray:
    """Read one image file as uint8 ``[H, W, C]``; a corrupt or unreadable file is an error naming it.

    Raises:
        ImageInputError: when the file cannot be opened or decoded, or breaks the mode policy.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_array(img, channels, source=repr(str(path)))
    except ImageInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageInputError(
            f"Cannot read image {str(path)!r}: {err}. The file looks corrupt or truncated: save it again or remove it."
        ) from err


def list_image_files(folder: str | Path) -> list[Path]:
    """All ``.png`` / ``.jpg`` / ``.jpeg`` files under ``folder`` (recursive), sorted by relative path.

    Raises:
        ImageInputError: when the folder does not exist or holds no image files.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise ImageInputError(f"Image folder {str(root)!r} does not exist.")
    if not root.is_dir():
        raise ImageInputError(f"{str(root)!r} is not a folder.")
    all_files = [p for p in root.rglob("*") if p.is_file()]
    files = sorted((p for p in all_files if p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.relative_to(root))
    if not files:
        others = Counter(p.suffix.lower() or "(no extension)" for p in all_files)
        found = f"it holds {dict(others)}" if others else "it is empty"
        raise ImageInputError(
            f"No images in {str(root)!r} ({found}); expected files ending in {list(IMAGE_EXTENSIONS)} "
            "(searched recursively)."
        )
    return files


@dataclass
class ImageFolder:
    """The image files of a folder, checked against an extractor's needs from their headers.

    Args:
        root: The folder.
        files: Image files, sorted by relative path.
        modes: How many files have each PIL mode.
        sizes: How many files have each ``(width, height)``.
    """

    root: Path
    files: list[Path]
    modes: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.files)

    def summary(self) -> str:
        """One line: count, modes and sizes (what the policy converted or resized)."""
        modes = ", ".join(f"{m} x{n}" for m, n in self.modes.most_common())
        sizes = ", ".join(f"{w}x{h} x{n}" for (w, h), n in self.sizes.most_common(4))
        more = f" (+{len(self.sizes) - 4} more sizes)" if len(self.sizes) > 4 else ""
        return f"{len(self.files)} images in {self.root} | modes: {modes} | sizes: {sizes}{more}"


def scan_image_folder(folder: str | Path, input_size: tuple[int, int] | None = None) -> ImageFolder:
    """List a folder's images and check every header (cheap: no decoding) before any work is done.

    Args:
        folder: The folder (searched recursively).
        input_size: ``(height, width)`` every image must have (a native-resolution extractor), or
            ``None`` when the extractor resizes (any and mixed sizes are fine).

    Raises:
        ImageInputError: for a missing or empty folder, an unreadable header (the file is named), an
            unsupported mode, or a size the extractor cannot take.
    """
    files = list_image_files(folder)
    modes: Counter = Counter()
    sizes: Counter = Counter()
    for path in files:
        try:
            with Image.open(path) as img:
                mode, size = img.mode, img.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ImageInputError(f"Cannot read image {str(path)!r}: {err}. Is the file corrupt?") from err
        check_mode(mode, repr(str(path)))
        if input_size is not None and (size[1], size[0]) != tuple(input_size):
            raise ImageInputError(
                f"{str(path)!r} is {size[0]}x{size[1]} (WxH), but the feature extractor takes "
                f"{input_size[1]}x{input_size[0]} images and does not resize (native resolution). "
                "Resize the images yourself, or use an extractor that resizes (e.g. Inception)."
            )
        modes[mode] += 1
        sizes[size] += 1
    return ImageFolder(root=Path(folder), files=files, modes=modes, sizes=sizes)


def save_images(images: np.ndarray, folder: str | Path, names: Sequence[str]) -> None:
    """Save uint8 ``[B, H, W, C]`` images as PNG files ``folder/name.png`` (grayscale when C = 1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for im, name in zip(images, names, strict=True):
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(folder / f"{name}.png")


__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "ImageInputError",
    "check_mode",
    "convert_channels",
    "list_image_files",
    "load_image",
    "pil_to_array",
    "save_images",
    "scan_image_folder",
    "to_uint8_nhwc",
    "unit_to_uint8",
]

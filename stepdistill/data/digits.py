"""The digits world: scikit-learn's 1,797 real 8x8 handwritten digit scans, offline.

Design (documented in the README):

* **Resolution 8x8, one channel, values in [-1, 1]** (``pixel / 8 - 1``; the scans hold 0..16). The
  scans are 8x8; upsampling adds no information and only costs CPU time.
* **A fixed split.** ``heldout``: 40 images per class (400), drawn with a fixed seed; ``train``: the
  other 1,397. The teacher and the feature classifier train on ``train`` only; FID reference
  statistics are taken on ``heldout``, which no network has seen (a feature network's features on
  its own training images are shifted and make FID lie).
* Class ``10`` is the *null class* of the class-conditional teacher (classifier-free guidance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUM_CLASSES = 10
NULL_CLASS = 10
RESOLUTION = 8
HELDOUT_PER_CLASS = 40
SPLIT_SEED = 0
SPLITS = ("train", "heldout", "all")


@dataclass
class DigitsSplit:
    """Images and labels of one split.

    Args:
        images: ``[N, 1, 8, 8]`` float32 in ``[-1, 1]``.
        labels: ``[N]`` int64 class labels 0..9.
        indices: ``[N]`` indices into scikit-learn's ``load_digits()`` order.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _split_indices(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    held = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(targets == c)
        held.append(np.sort(rng.permutation(idx)[:HELDOUT_PER_CLASS]))
    heldout = np.sort(np.concatenate(held))
    train = np.setdiff1d(np.arange(len(targets)), heldout)
    return train, heldout


def pixels_to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map raw scan values 0..16 to ``[-1, 1]``."""
    return torch.as_tensor(np.asarray(images, dtype=np.float32)) / 8.0 - 1.0


def load_digits_split(split: str = "train") -> DigitsSplit:
    """Load a split of the digits world (``train``, ``heldout`` or ``all``).

    Example:
        >>> ds = load_digits_split("heldout")
        >>> ds.images.shape
        torch.Size([400, 1, 8, 8])
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown digits split {split!r}; choose one of {list(SPLITS)}.")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    targets = np.asarray(bunch.target, dtype=np.int64)
    train, heldout = _split_indices(targets)
    idx = {"train": train, "heldout": heldout, "all": np.arange(len(targets))}[split]
    images = pixels_to_unit(bunch.images[idx]).unsqueeze(1)
    return DigitsSplit(images=images, labels=torch.as_tensor(targets[idx]), indices=idx)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[-1, 1]`` images ``[N, C, H, W]`` -> uint8 ``[N, H, W, C]`` (clipped, rounded)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid_image(images: torch.Tensor, nrow: int = 10, scale: int = 4, padding: int = 1):
    """A PIL image of a grid of ``[-1, 1]`` images, upscaled ``scale`` times with nearest neighbour."""
    from PIL import Image
    from torchvision.utils import make_grid

    x = images.detach().float().cpu().clamp(-1, 1)
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    grid = make_grid((x + 1) / 2, nrow=nrow, padding=padding, pad_value=1.0)
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr)


def class_labels_like_reference(n: int, split: str = "heldout") -> torch.Tensor:
    """``n`` class labels whose mix matches ``split`` (balanced for ``heldout``), in class order cycling.

    Used so generated sets have the reference's class proportions (FID is sensitive to the mix).
    """
    ref = load_digits_split(split).labels
    counts = torch.bincount(ref, minlength=NUM_CLASSES).double()
    quota = torch.floor(counts / counts.sum() * n).long()
    rem = n - int(quota.sum())
    order = torch.argsort(counts / counts.sum() * n - quota, descending=True)
    quota[order[:rem]] += 1
    return torch.repeat_interleave(torch.arange(NUM_CLASSES), quota)

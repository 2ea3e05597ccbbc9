"""Stroke-thickness statistics of digits images and the digits classifier's accuracy and margin.

Used to measure a style shift (e.g. the "bold" style LoRA of :mod:`stepdistill.trainers.style_lora`):

* **ink mass** -- mean of ``(x + 1) / 2`` over the 64 pixels of an image (clamped to ``[0, 1]``);
* **ink fraction** -- fraction of pixels with ``(x + 1) / 2 > 0.5`` (how many pixels are "on");
* **classifier accuracy / margin** -- whether the digits classifier still reads the intended class,
  and by how much (true-class logit minus the best other logit).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def ink_mass(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean ink ``mean((x + 1) / 2)`` of ``[B, C, H, W]`` images in ``[-1, 1]`` -> ``[B]``."""
    return ((images.float() + 1) / 2).clamp(0, 1).flatten(1).mean(1)


def ink_fraction(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-image fraction of pixels whose ink ``(x + 1) / 2`` exceeds ``threshold`` -> ``[B]``."""
    return (((images.float() + 1) / 2) > threshold).float().flatten(1).mean(1)


@torch.no_grad()
def classifier_margins(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(correct [B] bool, margin [B])``: margin = true-class logit minus the largest other logit.

    ``classifier`` maps ``[B, 1, H, W]`` images in ``[-1, 1]`` to logits (e.g. the shipped
    :class:`~stepdistill.data.digits_models.DigitsClassifier`, in ``eval()`` mode).
    """
    param = next(classifier.parameters())
    logits = classifier(images.to(param.device, param.dtype).clamp(-1, 1)).float().cpu()
    labels = labels.cpu().long()
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return logits.argmax(1) == labels, true - others.max(1).values


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    se = float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), se


def stroke_statistics(
    images: torch.Tensor, labels: torch.Tensor | None = None, classifier: nn.Module | None = None
) -> dict[str, float]:
    """Mean (and standard error) of ink mass, ink fraction and, with a classifier, accuracy and margin.

    Returns keys ``ink_mass``, ``ink_mass_se``, ``ink_fraction``, ``ink_fraction_se`` and, when
    ``labels`` and ``classifier`` are given, ``accuracy`` and ``margin``, ``margin_se``; plus ``n``.
    """
    out: dict[str, float] = {"n": int(images.shape[0])}
    out["ink_mass"], out["ink_mass_se"] = _mean_se(ink_mass(images))
    out["ink_fraction"], out["ink_fraction_se"] = _mean_se(ink_fraction(images))
    if classifier is not None and labels is not None:
        correct, margin = classifier_margins(classifier, images, labels)
        out["accuracy"] = float(correct.float().mean())
        out["margin"], out["margin_se"] = _mean_se(margin)
    return out


def paired_shift(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """Shift of ink mass / fraction between paired samples (same noise): mean, standard error, share that grew."""
    out: dict[str, float] = {}
    for name, fn in (("ink_mass", ink_mass), ("ink_fraction", ink_fraction)):
        d = fn(after) - fn(before)
        out[f"{name}_shift"], out[f"{name}_shift_se"] = _mean_se(d)
        out[f"{name}_increased"] = float((d > 0).float().mean())
    return out


__all__ = ["classifier_margins", "ink_fraction", "ink_mass", "paired_shift", "stroke_statistics"]

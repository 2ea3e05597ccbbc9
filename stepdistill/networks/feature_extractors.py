"""Frozen, differentiable feature extractors for image-space training losses (identity loss, discriminator heads).

The contract (EchoDistill on small offline models): input images in ``[-1, 1]``, ``[B, C, H, W]``; output
features ``[B, D]`` or tokens ``[B, N, D]``; the module does its own resizing / normalisation, has frozen
parameters, runs in eval mode, and stays differentiable with respect to its input (the generator's losses
back-propagate through it). :func:`check_differentiable` checks the last point once, before training.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Layers of the digits classifier :class:`DigitsFeatures` reads.
DIGITS_LAYERS = ("penultimate", "pooled")


class DigitsFeatures(nn.Module):
    """Pre-activation features of the digits classifier, as a frozen differentiable extractor.

    Post-activation features are almost non-negative, so the cosine of unrelated images is already high; the
    pre-activation ones are centred enough for a cosine identity loss (an optional fixed ``center`` is subtracted).

    Args:
        classifier: A :class:`~stepdistill.data.digits_models.DigitsClassifier` (frozen here, eval mode).
        layer: ``"penultimate"`` (the 64-d layer before its GELU) or ``"pooled"`` (the last conv's 128 channels
            before its GELU, averaged over space).
        center: Optional ``[D]`` mean subtracted from the features (e.g. computed on real images).

    Inputs of any size and 1 or 3 channels are converted to the classifier's 8x8 grayscale (channel mean,
    anti-aliased bilinear resize).

    Example:
        >>> feats = DigitsFeatures(DigitsClassifier.from_pretrained(classifier_path()))(images)  # [B, 64]
    """

    def __init__(self, classifier: nn.Module, layer: str = "penultimate", center: torch.Tensor | None = None) -> None:
        super().__init__()
        if layer not in DIGITS_LAYERS:
            raise ValueError(f"layer must be one of {list(DIGITS_LAYERS)}, got {layer!r}.")
        self.classifier = classifier.requires_grad_(False).eval()
        self.layer = layer
        body = classifier.body
        self.feature_dim = int(body[-2].out_features) if layer == "penultimate" else int(body[5].out_channels)
        self.register_buffer("center", None if center is None else center.float().reshape(-1))
        self.requires_grad_(False).eval()

    @classmethod
    @torch.no_grad()
    def centered(cls, classifier: nn.Module, images: torch.Tensor, layer: str = "penultimate") -> DigitsFeatures:
        """Features centred on their mean over ``images`` (e.g. real training digits), for the cosine identity loss."""
        extractor = cls(classifier, layer)
        center = torch.cat([extractor(images[i: i + 256]) for i in range(0, images.shape[0], 256)]).mean(0)
        extractor.center = center.to(extractor.center.device if extractor.center is not None else center.device)
        return extractor

    def train(self, mode: bool = True) -> DigitsFeatures:
        """Stays in eval mode (fixed statistics, no dropout), whatever ``mode``."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, D]`` of ``[-1, 1]`` images ``[B, C, H, W]``."""
        x = images.float()
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != (8, 8):
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
        body = self.classifier.body
        if self.layer == "penultimate":
            feats = body[:-1](x.to(self.classifier.dtype))
        else:
            feats = body[:6](x.to(self.classifier.dtype)).mean(dim=(2, 3))
        feats = feats.float()
        return feats - self.center if self.center is not None else feats


def digits_feature_extractors(path: str | Path | None = None) -> list[DigitsFeatures]:
    """The default extractors: the digits classifier's penultimate and pooled pre-activations (one classifier).

    Args:
        path: A saved ``DigitsClassifier`` folder (default: the shipped one).
    """
    from ..data.digits_models import DigitsClassifier, classifier_path

    folder = Path(path) if path else classifier_path()
    if not (folder / "config.json").is_file():
        raise ValueError(f"No digits classifier at {str(folder)!r} (config.json missing): pass a saved "
                         "DigitsClassifier folder, or your own extractors to the trainer.")
    clf = DigitsClassifier.from_pretrained(folder).requires_grad_(False).eval()
    return [DigitsFeatures(clf, layer) for layer in DIGITS_LAYERS]


def check_differentiable(extractor: nn.Module, example: torch.Tensor, what: str = "feature extractor") -> int:
    """Check the feature-extractor contract on ``example`` images; return the feature dimension ``D``.

    Raises:
        ValueError: when the output is not a ``[B, D]`` / ``[B, N, D]`` tensor, or carries no gradient back to
            its input (computed under ``no_grad``, detached, or through numpy).
    """
    x = example.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        out = extractor(x)
    name = type(extractor).__name__
    if not torch.is_tensor(out) or out.dim() not in (2, 3) or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"{what} {name} returned {shape} for {x.shape[0]} images; it must return features "
                         "[B, D] or tokens [B, N, D].")
    if out.grad_fn is None:
        raise ValueError(
            f"{what} {name} is not differentiable: its output has no grad_fn when the input requires grad, so the "
            "student's identity / adversarial losses cannot reach the images. Remove torch.no_grad / .detach() / "
            "numpy from its forward (freeze its weights with requires_grad_(False) instead)."
        )
    return int(out.shape[-1])


__all__ = ["DIGITS_LAYERS", "DigitsFeatures", "check_differentiable", "digits_feature_extractors"]

"""Discriminator heads on frozen feature extractors (e.g. the digits classifier, a CLIP or DINO image tower).

EchoDistill / OPAD-style personalization and projected GANs judge images through a pretrained, frozen
network: only a small head trains, and the gradient reaches the images (for the generator's loss) but never
the extractor's weights. :class:`FeatureDiscriminator` holds the extractor *outside* its registered
submodules, so its ``parameters()`` / ``state_dict()`` (what optimizers, DDP and checkpoints see) are the
head's alone, while ``.to()`` still moves the extractor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class FeatureDiscriminator(nn.Module):
    """Trainable MLP heads on the features of a frozen extractor: ``logits = mean_k head_k(features_k)``.

    Args:
        extractor: ``fn(images) -> [B, D]`` or a sequence of ``[B, D_k]`` (several layers); an ``nn.Module``
            is frozen (``requires_grad_(False)``, ``eval()``) and moved along with this module.
        feature_dims: ``D`` or ``[D_k]``, one per extractor output.
        hidden: Width of each head's hidden layer.

    Example:
        >>> clf = DigitsClassifier.from_pretrained(classifier_path())
        >>> disc = FeatureDiscriminator(clf.features, feature_dims=64)
        >>> logits = disc(images)  # [B]; the gradient reaches `images`, never `clf`
    """

    def __init__(self, extractor: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]],
                 feature_dims: int | Sequence[int], hidden: int = 256) -> None:
        super().__init__()
        if isinstance(extractor, nn.Module):
            extractor.requires_grad_(False).eval()
        self.__dict__["extractor"] = extractor  # not registered: no parameters, no state_dict entries
        dims = [feature_dims] if isinstance(feature_dims, int) else list(feature_dims)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)) for d in dims
        )

    def _apply(self, fn, recurse: bool = True):
        extractor = self.__dict__["extractor"]
        if isinstance(extractor, nn.Module):
            extractor._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]``."""
        feats = self.__dict__["extractor"](images)
        feats = [feats] if torch.is_tensor(feats) else list(feats)
        if len(feats) != len(self.heads):
            raise ValueError(f"The extractor returned {len(feats)} feature tensors for {len(self.heads)} heads: "
                             "pass one feature_dims entry per extractor output.")
        logits = [head(f.float().flatten(1)).squeeze(1) for head, f in zip(self.heads, feats)]
        return torch.stack(logits).mean(0)


__all__ = ["FeatureDiscriminator"]

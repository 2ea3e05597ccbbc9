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


class DiscriminatorSet(nn.Module):
    """One :class:`FeatureDiscriminator` per frozen extractor, judged separately: ``logits[k]`` is head ``k``'s.

    EchoDistill / OPAD keeps one discriminator per backbone (DINO, DINOv2, CLIP) and sums their losses; this is
    that, for any extractors. Token outputs ``[B, N, D]`` are averaged over the tokens before the head.

    Args:
        extractors: Frozen differentiable modules ``images -> [B, D_k]`` (or ``[B, N, D_k]``).
        feature_dims: ``D_k`` of each.
        hidden: Width of each head's hidden layer.

    Example:
        >>> disc = DiscriminatorSet([penultimate, pooled], [64, 128])
        >>> disc(images).shape  # [2, B]
    """

    def __init__(self, extractors: Sequence[nn.Module], feature_dims: Sequence[int], hidden: int = 512) -> None:
        super().__init__()
        if len(extractors) != len(feature_dims) or not extractors:
            raise ValueError("Pass one feature dimension per extractor, and at least one extractor.")
        self.discriminators = nn.ModuleList(
            FeatureDiscriminator(_TokenPool(e), d, hidden) for e, d in zip(extractors, feature_dims)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[K, B]``, one row per extractor."""
        return torch.stack([d(images) for d in self.discriminators])


class _TokenPool(nn.Module):
    """An extractor whose token outputs ``[B, N, D]`` are averaged to ``[B, D]``."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.extractor(images)
        return feats.mean(1) if feats.dim() == 3 else feats


__all__ = ["DiscriminatorSet", "FeatureDiscriminator"]

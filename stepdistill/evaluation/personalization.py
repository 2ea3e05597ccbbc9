"""Personalization metrics: concept fidelity and prompt fidelity, on any extractor / classifier module.

The offline analogues of DreamBooth's CLIP-I / DINO (concept fidelity: how much generated images look like the
concept images) and CLIP-T (prompt fidelity: whether they show what the prompt asks for). With a digits
classifier, prompt fidelity is "the digit asked for is the digit made"; the same functions take CLIP or DINO
image towers loaded from local weights (any module ``images -> [B, D]``, or ``[B, N, D]`` tokens, averaged).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Extractor = Callable[[torch.Tensor], torch.Tensor]


class PixelFeatures(torch.nn.Module):
    """Raw pixels minus a fixed mean image, flattened: a parameter-free extractor for concept fidelity.

    No network trains on it, so a concept-fidelity number in this space is not one the training losses optimised
    (the identity loss and discriminator heads read a classifier's features).

    Args:
        center: ``[C, H, W]`` mean image subtracted (e.g. the mean of real training images).

    Example:
        >>> extractor = PixelFeatures(load_digits_split("train").images.mean(0))
    """

    def __init__(self, center: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("center", center.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, C * H * W]``."""
        return (images.float() - self.center.to(images.device)).flatten(1)


@torch.no_grad()
def _features(extractor: Extractor, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, images.shape[0], batch_size):
        f = extractor(images[i: i + batch_size]).float()
        out.append(f.mean(1) if f.dim() == 3 else f)
    return torch.cat(out)


def concept_similarities(
    images: torch.Tensor, concept_images: torch.Tensor, extractor: Extractor, batch_size: int = 64
) -> torch.Tensor:
    """Per generated image, its mean cosine similarity to the concept images' features (clamped at 0): ``[N]``.

    Args:
        images: Generated images ``[N, C, H, W]`` in ``[-1, 1]``.
        concept_images: Real concept images ``[M, C, H, W]`` in ``[-1, 1]`` (held-out ones when there are enough).
        extractor: A module or function ``images -> [B, D]`` (or tokens ``[B, T, D]``, averaged over tokens).
        batch_size: Images per extractor call.
    """
    if images.shape[0] == 0 or concept_images.shape[0] == 0:
        raise ValueError("concept fidelity needs at least one generated image and one concept image.")
    a = F.normalize(_features(extractor, images, batch_size), dim=1)
    b = F.normalize(_features(extractor, concept_images, batch_size), dim=1)
    return (a @ b.T).clamp_min(0).mean(dim=1)


def concept_fidelity(
    images: torch.Tensor, concept_images: torch.Tensor, extractor: Extractor, batch_size: int = 64
) -> float:
    """Mean cosine similarity of generated images to the concept images in ``extractor``'s feature space.

    The CLIP-I / DINO protocol of DreamBooth (Ruiz et al., CVPR 2023): every generated image against every real
    concept image, similarities clamped at 0, averaged. See :func:`concept_similarities` for the arguments.

    Example:
        >>> concept_fidelity(samples, heldout_concept, DigitsFeatures(classifier))
        0.71
    """
    return float(concept_similarities(images, concept_images, extractor, batch_size).mean())


@torch.no_grad()
def prompt_matches(
    images: torch.Tensor, classes: Sequence[int] | torch.Tensor, classifier: Extractor, batch_size: int = 64
) -> torch.Tensor:
    """Per image, whether ``classifier``'s predicted class (argmax of its logits) is the asked-for class: ``[N]`` bool.

    Args:
        images: Generated images ``[N, C, H, W]`` in ``[-1, 1]``.
        classes: The class each image's prompt asks for (``N`` integers).
        classifier: A module or function ``images -> [B, num_classes]`` logits.
        batch_size: Images per classifier call.
    """
    want = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if want.shape[0] != images.shape[0]:
        raise ValueError(f"prompt fidelity got {images.shape[0]} images but {want.shape[0]} asked-for classes.")
    logits = torch.cat([classifier(images[i: i + batch_size]).float() for i in range(0, images.shape[0], batch_size)])
    return logits.argmax(dim=1).cpu() == want


def prompt_fidelity(
    images: torch.Tensor, classes: Sequence[int] | torch.Tensor, classifier: Extractor, batch_size: int = 64
) -> float:
    """Fraction of generated images whose predicted class is the class their prompt asks for.

    The classifier analogue of CLIP-T (prompt-image agreement). See :func:`prompt_matches` for the arguments.

    Example:
        >>> prompt_fidelity(samples, [7] * len(samples), digits_classifier)
        0.94
    """
    return float(prompt_matches(images, classes, classifier, batch_size).float().mean())


__all__ = ["PixelFeatures", "concept_fidelity", "concept_similarities", "prompt_fidelity", "prompt_matches"]

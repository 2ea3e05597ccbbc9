"""Image-space alignment losses: a cosine identity loss on frozen features, and multi-scale sliced Wasserstein.

* :class:`CosineIdentityLoss` -- ``1 - cos(phi(x), phi(y))`` per sample (mean over tokens for token features), the
  offline stand-in for EchoDistill / OPAD's IP-Adapter identity loss.
* :class:`MultiScaleSWDLoss` -- the sliced Wasserstein distance between the patch distributions of two images at
  several scales of a Gaussian pyramid (He et al., "Multiscale Sliced Wasserstein Distances as Perceptual Color
  Difference Measures", ECCV 2024): random unit projections of ``C x p x p`` patches, sorted over pixel positions,
  compared with L1. Three-channel images are converted sRGB -> CIELAB first; one-channel images are projected as
  they are. Small images use fewer scales (the coarsest keeps at least one patch) and a smaller patch when the
  image is smaller than the patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import per_sample_mean


class CosineIdentityLoss:
    """``1 - cos(phi(x), phi(target))`` per sample; the target's features carry no gradient.

    Args:
        extractor: A frozen differentiable module ``images -> [B, D]`` or ``[B, N, D]``.

    Example:
        >>> loss = CosineIdentityLoss(extractor)(student_images, teacher_images.detach())  # [B]
    """

    def __init__(self, extractor: nn.Module) -> None:
        self.extractor = extractor

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return ``[B]`` losses."""
        feats = self.extractor(x).float()
        with torch.no_grad():
            ref = self.extractor(target).float()
        cos = F.cosine_similarity(feats, ref, dim=-1)
        return 1.0 - (cos.mean(dim=1) if cos.dim() == 2 else cos)


def srgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """CIELAB (D65) of sRGB images in ``[-1, 1]`` ``[B, 3, H, W]``, scaled to about unit range (L/100, a/110, b/110)."""
    rgb = ((images.float() + 1) / 2).clamp(0, 1)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).clamp_min(1e-8) ** 2.4)
    m = torch.tensor([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
                     device=images.device, dtype=linear.dtype)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear)
    white = torch.tensor([0.95047, 1.0, 1.08883], device=images.device, dtype=linear.dtype).reshape(1, 3, 1, 1)
    t = xyz / white
    delta = 6 / 29
    f = torch.where(t > delta**3, t.clamp_min(1e-8) ** (1 / 3), t / (3 * delta**2) + 4 / 29)
    lab = torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)
    return lab / torch.tensor([100.0, 110.0, 110.0], device=images.device).reshape(1, 3, 1, 1)


def _blur_down(x: torch.Tensor) -> torch.Tensor:
    """One Gaussian-pyramid level: a 5-tap binomial blur (reflect padding), then every second pixel."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k[:, None] * k[None, :]) / 256.0
    c = x.shape[1]
    pad = min(2, x.shape[-1] - 1, x.shape[-2] - 1)
    x = F.pad(x, (pad,) * 4, mode="reflect") if pad > 0 else x
    k = k[2 - pad: 3 + pad, 2 - pad: 3 + pad]
    x = F.conv2d(x, (k / k.sum()).expand(c, 1, *k.shape).contiguous(), groups=c)
    return x[..., ::2, ::2]


class MultiScaleSWDLoss:
    """Multi-scale sliced Wasserstein distance between the patch statistics of two image batches, per sample.

    Args:
        num_scales: Pyramid levels (5 in EchoDistill / OPAD); fewer are used when the coarsest would be smaller
            than the patch.
        patch_size: Patch side (11); images smaller than it use the largest odd size that fits.
        num_projections: Random unit projections per scale (128), redrawn on every call from ``generator``.
        lab: Convert 3-channel images from sRGB to CIELAB first (1-channel images are used as they are).

    Example:
        >>> swd = MultiScaleSWDLoss()
        >>> swd(student_images, teacher_images, generator=rng).shape  # [B]
    """

    def __init__(self, num_scales: int = 5, patch_size: int = 11, num_projections: int = 128, lab: bool = True):
        if num_scales < 1 or patch_size < 1 or num_projections < 1:
            raise ValueError("num_scales, patch_size and num_projections must be >= 1.")
        self.num_scales, self.patch_size, self.num_projections, self.lab = num_scales, patch_size, num_projections, lab

    def plan(self, height: int, width: int) -> tuple[int, int]:
        """``(patch size, number of scales)`` used for ``height x width`` images."""
        side = min(height, width)
        patch = min(self.patch_size, side if side % 2 else side - 1)
        scales = 1
        while scales < self.num_scales and side // 2 ** scales >= patch:
            scales += 1
        return max(patch, 1), scales

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return ``[B]`` distances between ``x`` (with gradient) and ``y`` (targets), images in ``[-1, 1]``."""
        if x.shape != y.shape:
            raise ValueError(f"MS-SWD needs images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
        x, y = x.float(), y.float()
        if self.lab and x.shape[1] == 3:
            x, y = srgb_to_lab(x), srgb_to_lab(y)
        patch, scales = self.plan(*x.shape[-2:])
        total = x.new_zeros(x.shape[0])
        for level in range(scales):
            if level:
                x, y = _blur_down(x), _blur_down(y)
            proj = torch.randn(self.num_projections, x.shape[1] * patch * patch, generator=generator)
            proj = F.normalize(proj, dim=1).reshape(self.num_projections, x.shape[1], patch, patch).to(x.device)
            px = F.conv2d(x, proj).flatten(2).sort(dim=2).values  # [B, P, positions]
            py = F.conv2d(y, proj).flatten(2).sort(dim=2).values
            total = total + per_sample_mean((px - py).abs())
        return total / scales


__all__ = ["CosineIdentityLoss", "MultiScaleSWDLoss", "srgb_to_lab"]

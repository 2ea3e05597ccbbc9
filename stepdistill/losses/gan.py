"""Non-saturating GAN losses on discriminator logits, and the diffusion-GAN input noise.

DMD2 (Yin et al. 2024, Sec. 4.3): the discriminator reads the fake score's features of noised real and
generated images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..schedules import NoiseSchedule


class GANGeneratorLoss:
    """Non-saturating generator loss ``softplus(-D(fake))`` per sample."""

    def __call__(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """Return ``[B]`` losses from ``[B]`` or ``[B, 1]`` logits."""
        return F.softplus(-fake_logits.float().reshape(fake_logits.shape[0], -1)).mean(dim=1)


class GANDiscriminatorLoss:
    """Discriminator loss ``softplus(D(fake)) + softplus(-D(real))`` per sample.

    The fake and real batches must have the same size (the trainer draws them so).
    """

    def __call__(self, fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
        """Return ``[B]`` losses."""
        fake = F.softplus(fake_logits.float().reshape(fake_logits.shape[0], -1)).mean(dim=1)
        real = F.softplus(-real_logits.float().reshape(real_logits.shape[0], -1)).mean(dim=1)
        return fake + real


class GANInputNoise:
    """The discriminator's input noise: ``t ~ U[0, T)`` per sample (diffusion-GAN), or clean inputs at ``t = 0``.

    Args:
        schedule: The noise schedule of the network the discriminator reads.
        noisy: Noise the inputs (DMD2's SD setting); ``False`` feeds clean images at ``t = 0``.
    """

    def __init__(self, schedule: NoiseSchedule, noisy: bool = True) -> None:
        self.schedule, self.noisy = schedule, noisy

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(input, t)``; draws ``t`` then the noise from ``generator`` when ``noisy``."""
        if not self.noisy:
            return x, torch.zeros(x.shape[0], dtype=torch.float64)
        t = self.schedule.sample_timesteps(x.shape[0], 0.0, 1.0, generator)
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        return self.schedule.add_noise(x, eps, t), t


__all__ = ["GANDiscriminatorLoss", "GANGeneratorLoss", "GANInputNoise"]

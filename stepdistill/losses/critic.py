"""The fake-score critic's objective (DMD / DMD2), in ONE forward of the critic.

Denoising score matching on generated samples and, with a GAN head, the discriminator loss on generated vs real
images; one forward keeps a DDP critic at one forward per backward (Yin et al., DMD2, NeurIPS 2024, Sec. 4.1
and 4.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..conditioning import Conditioning
from ..schedules import NoiseSchedule
from .gan import GANDiscriminatorLoss, GANInputNoise
from .score_matching import DenoisingScoreMatchingLoss


@dataclass
class CriticTerms:
    """Per-sample terms of the critic's objective.

    Args:
        score_matching: Denoising score matching on the generated samples ``[B]``.
        discriminator: ``softplus(D(fake)) + softplus(-D(real))`` ``[B]``, or ``None`` without a GAN head.
    """

    score_matching: torch.Tensor
    discriminator: torch.Tensor | None = None


class FakeScoreLoss:
    """Denoising score matching of a fake score on detached generator samples (+ its GAN head's loss).

    Draws, from the given generator and in this order: the score-matching level and noise, then (with a GAN
    head) the discriminator inputs' noise for the generated and the real batch.

    Args:
        schedule: The teacher's noise schedule.
        gan_inputs: The GAN head's input noise (``None``: no GAN head).

    Example:
        >>> loss = FakeScoreLoss(teacher.schedule, GANInputNoise(teacher.schedule, noisy=False))
        >>> terms = loss(critic, x.detach(), cond, real, real_cond, generator=rng)
        >>> (terms.score_matching.mean() + 0.1 * terms.discriminator.mean()).backward()
    """

    def __init__(self, schedule: NoiseSchedule, gan_inputs: GANInputNoise | None = None) -> None:
        self.score_matching = DenoisingScoreMatchingLoss(schedule)
        self.gan_inputs = gan_inputs
        self.discriminator = GANDiscriminatorLoss()

    def __call__(
        self,
        critic: nn.Module,
        x: torch.Tensor,
        cond: Conditioning,
        real: torch.Tensor | None = None,
        real_cond: Conditioning | None = None,
        generator: torch.Generator | None = None,
    ) -> CriticTerms:
        """The terms for samples ``x`` (and real images ``real`` with a GAN head) in one critic forward.

        Args:
            critic: A :class:`~stepdistill.networks.FakeScore` (possibly DDP-wrapped): ``critic(x_t, t, cond)``
                returns ``(x0, eps, model_output, logits or None)``.
            x: Generated samples (detached here).
            cond: Their conditioning.
            real: Real images (GAN head only).
            real_cond: Their conditioning.
            generator: The trainer's generator.
        """
        device = x.device
        x = x.detach().float()
        b = x.shape[0]
        noised = self.score_matching.noise(x, generator)
        inputs, times, conds = [noised.x_t], [noised.t], [cond.to(device)]
        if self.gan_inputs is not None:
            fake_gan, t_fake = self.gan_inputs(x, generator)
            real_gan, t_real = self.gan_inputs(real.to(device), generator)
            inputs += [fake_gan, real_gan]
            times += [t_fake, t_real]
            conds += [cond.to(device), real_cond.to(device)]
        all_cond = Conditioning.cat(conds) if not conds[0].is_empty else None
        _, _, model_output, logits = critic(torch.cat(inputs), torch.cat(times), all_cond)  # t stays on the host
        terms = CriticTerms(self.score_matching(model_output[:b], noised.target))
        if self.gan_inputs is not None:
            terms.discriminator = self.discriminator(logits[b:2 * b], logits[2 * b:])
        return terms


__all__ = ["CriticTerms", "FakeScoreLoss"]

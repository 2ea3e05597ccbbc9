"""Phased DMD's losses on a subinterval ``(s, T]``: fake-score matching from ``x_s`` and the generator's DM loss.

Fan et al., "Phased DMD: Few-step Distribution Matching Distillation via Score Matching within Subintervals",
CVPR 2026 (arXiv 2510.27684), Sec. 3.2-3.3.

* :class:`SubintervalScoreMatchingLoss` -- the fake score's loss in phase ``k`` when only ``x_{t_k}`` exists:
  re-noise with the conditional kernel, regress on the unbiased target (Eq. 11 / 12, any prediction type),
  weighted by the clamp of Eq. 13 (``clamp_max``) or kept a ``margin`` above ``s`` (LightX2V's variant);
* :class:`NaiveSubintervalScoreMatchingLoss` -- the biased ablation that treats ``x_s`` as clean data;
* :class:`SubintervalDistributionMatchingLoss` -- DMD's normalised generator loss on a boundary state ``x_s``.

As everywhere in :mod:`stepdistill.losses`, each loss owns its noise-level draw and returns per-sample values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning import Conditioning
from ..denoiser import Denoiser, guided_denoise
from ..schedules import NoiseSchedule
from ._common import per_sample_mean
from .distribution_matching import DistributionMatchingResult, distribution_matching_gradient


@dataclass
class SubintervalBatch:
    """``x_s`` re-noised to ``t > s`` with the regression target of the fake score.

    Args:
        x_t: ``alpha_{t|s} x_s + sigma_{t|s} noise``.
        t: Per-sample levels ``[B]`` (float64).
        noise: The Gaussian noise of the conditional kernel.
        target: The regression target in the network's parameterization.
        weight: Per-sample loss weight ``[B]`` (the clamp of Eq. 13; ones without it).
    """

    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


class SubintervalScoreMatchingLoss:
    """Score matching within the subinterval ``(s, high]`` from samples ``x_s`` (Phased DMD Eq. 11-13).

    The target is ``schedule.target(x0_hat, eps_hat, t)`` with the unbiased stand-ins of
    :meth:`~stepdistill.schedules.NoiseSchedule.subinterval_x0_eps`: for a flow network it is Eq. 11, for an
    x0 network Eq. 12, and eps / v networks get the same construction. Its regression on ``x_t`` equals the
    full-interval target's. With ``s = None`` (the last phase, ``x_s`` is clean) it is ordinary denoising score
    matching.

    The weight is Eq. 13's clamp rewritten per sample: ``clamp(1 / sigma_{t|s}^2, 0, c) * sigma_{t|s}^2 =
    min(1, c * sigma_{t|s}^2)``, so pairs with ``sigma_{t|s}^2 < 1 / c`` are down-weighted in proportion to
    ``sigma_{t|s}^2`` (``clamp_max=None``: weight 1, Eq. 11 as is). Eq. 13 is written for a velocity network;
    here the weight multiplies the squared error in the network's own parameterization.

    Args:
        schedule: The fake score's noise schedule.
        clamp_max: ``c`` of Eq. 13 (paper: 10); ``None`` for no clamp (e.g. with a ``margin``).
        margin: Re-noise levels are drawn above ``s + margin`` (timestep units; LightX2V: 20).

    Example:
        >>> loss = SubintervalScoreMatchingLoss(teacher.schedule, clamp_max=10.0)
        >>> batch = loss.noise(x_s, s=499.0, generator=rng)
        >>> per_sample = loss(fake(batch.x_t, batch.t, cond).model_output, batch)  # [B]
    """

    def __init__(self, schedule: NoiseSchedule, clamp_max: float | None = 10.0, margin: float = 0.0) -> None:
        if clamp_max is not None and not clamp_max > 0:
            raise ValueError(f"clamp_max must be > 0 (or None for no clamp), got {clamp_max}.")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}.")
        self.schedule, self.clamp_max, self.margin = schedule, clamp_max, float(margin)

    def targets(
        self, x_s: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, s: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, target)`` for ``x_s`` at level ``s`` re-noised to ``t`` with ``noise``."""
        x_t, x0_hat, eps_hat = self.schedule.subinterval_x0_eps(x_s, noise, t, s)
        return x_t, self.schedule.target(x0_hat, eps_hat, t)

    def weight(self, t: torch.Tensor, s: float) -> torch.Tensor:
        """Per-sample weight ``min(1, clamp_max * sigma_{t|s}^2)`` (ones without a clamp)."""
        if self.clamp_max is None:
            return torch.ones_like(t, dtype=torch.float64)
        _, sigma_ts = self.schedule.conditional_kernel(t, s)
        return (self.clamp_max * sigma_ts.square()).clamp(max=1.0)

    def noise(
        self, x_s: torch.Tensor, s: float | None, high: float | None = None,
        generator: torch.Generator | None = None,
    ) -> SubintervalBatch:
        """Draw ``t`` in ``(s + margin, high]`` then the noise, and build the batch.

        Args:
            x_s: Samples at level ``s`` (detached by the caller).
            s: Their level; ``None`` when they are clean data (the last phase).
            high: Upper end of the draw (default: the pure-noise end; the previous boundary for the disjoint
                ablation).
            generator: The trainer's explicit generator (levels first, then noise).
        """
        b = x_s.shape[0]
        t = self.schedule.sample_subinterval_timesteps(b, 0.0 if s is None else s, high, self.margin, generator)
        noise = torch.randn(x_s.shape, generator=generator).to(x_s.device)
        if s is None:
            x_t = self.schedule.add_noise(x_s, noise, t)
            target, weight = self.schedule.target(x_s, noise, t), torch.ones(b, dtype=torch.float64)
        else:
            x_t, target = self.targets(x_s, noise, t, s)
            weight = self.weight(t, s)
        return SubintervalBatch(x_t, t, noise, target, weight)

    def __call__(self, model_output: torch.Tensor, batch: SubintervalBatch) -> torch.Tensor:
        """Return ``[B]``: ``weight * mean_{C,H,W} (model_output - target)^2``."""
        err = per_sample_mean((model_output.float() - batch.target.float()) ** 2)
        return batch.weight.to(err) * err


class NaiveSubintervalScoreMatchingLoss(SubintervalScoreMatchingLoss):
    """The biased target that treats ``x_s`` as clean: ``schedule.target(x_s, noise, t)`` (flow: ``noise - x_s``).

    The ablation Phased DMD warns against (Sec. 3.3): its regression on ``x_t`` is not the full-interval one, so
    the fake score no longer estimates the generator's score (assumption A2 of the paper). Same draw and weight
    as :class:`SubintervalScoreMatchingLoss`.
    """

    def targets(
        self, x_s: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, s: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, target(x_s, noise, t))`` with ``x_t`` from the conditional kernel."""
        return self.schedule.add_noise_from(x_s, noise, t, s), self.schedule.target(x_s, noise, t)


class SubintervalDistributionMatchingLoss:
    """DMD's generator loss on boundary states ``x_s``, re-noised inside ``(s + margin, high]``.

    1. ``t`` in the subinterval; ``x_t = alpha_{t|s} x_s + sigma_{t|s} noise`` (no gradient); ``s = None``:
       ``x_s`` is clean and this is DMD's ordinary noising;
    2. the teacher's CFG x0 prediction and the fake score's at ``x_t``;
    3. the gradient ``(x0_fake - x0_real) / mean|x0_ref - x0_real|`` (DMD's per-sample normaliser, in x0 space
       as LightX2V does; ``x0_ref`` is the generator's own x0 estimate of its last step), pushed into ``x_s``
       through the stop-gradient surrogate. The chain-rule factor ``alpha_{t|s}`` of Phased DMD's weight is
       left to the normaliser, as the DMD normaliser absorbs DMD's ``w_t``.

    Args:
        schedule: The teacher's schedule.
        real_guidance_scale: The teacher's CFG weight.
        margin: Gap above ``s`` for the draw (timestep units).

    Example:
        >>> dm = SubintervalDistributionMatchingLoss(teacher.schedule, 4.5)
        >>> out = dm(x_s, x0_ref, 499.0, cond, teacher, fake, generator=rng)
        >>> out.loss.mean().backward()
    """

    def __init__(self, schedule: NoiseSchedule, real_guidance_scale: float = 1.0, margin: float = 0.0) -> None:
        self.schedule, self.real_guidance_scale, self.margin = schedule, real_guidance_scale, float(margin)

    def __call__(
        self,
        x_s: torch.Tensor,
        x0_ref: torch.Tensor,
        s: float | None,
        cond: Conditioning | None,
        real_score: Denoiser,
        fake_score: Denoiser,
        high: float | None = None,
        generator: torch.Generator | None = None,
    ) -> DistributionMatchingResult:
        """Draw ``t`` and noise, return the per-sample surrogate loss and both scores' outputs."""
        b = x_s.shape[0]
        t = self.schedule.sample_subinterval_timesteps(b, 0.0 if s is None else s, high, self.margin, generator)
        noise = torch.randn(x_s.shape, generator=generator).to(x_s.device)
        with torch.no_grad():
            xs = x_s.detach().float()
            if s is None:
                x_t = self.schedule.add_noise(xs, noise.float(), t)
            else:
                x_t = self.schedule.add_noise_from(xs, noise.float(), t, s)
            real = guided_denoise(real_score, x_t, t, cond, self.real_guidance_scale)
            fake = fake_score(x_t, t, cond)
            grad = distribution_matching_gradient(x0_ref, real.x0, fake.x0)
        target = (x_s.float() - grad).detach()
        loss = 0.5 * per_sample_mean((x_s.float() - target) ** 2)
        return DistributionMatchingResult(loss, real, fake, t)


__all__ = [
    "NaiveSubintervalScoreMatchingLoss",
    "SubintervalBatch",
    "SubintervalDistributionMatchingLoss",
    "SubintervalScoreMatchingLoss",
]

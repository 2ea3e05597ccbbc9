"""DMD's distribution-matching generator loss.

Yin et al., "One-step Diffusion with Distribution Matching Distillation", CVPR 2024, Eq. 7-8; DMD2,
NeurIPS 2024, Sec. 4.

* :func:`distribution_matching_gradient` -- the per-sample normalised gradient;
* :func:`compute_distribution_matching_loss` -- noise, score with the real (CFG) and fake denoisers, and
  the stop-gradient surrogate, for given timesteps and noise;
* :class:`DistributionMatchingLoss` -- the same, owning its noise-level draw (``t ~ U[min, max]`` of the
  schedule) the way NVlabs/edm's losses do: ``loss(x, cond, real, fake, generator)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning import Conditioning
from ..denoiser import Denoiser, DenoiserOutput, guided_denoise
from ..schedules import NoiseSchedule
from ._common import per_sample_mean


@torch.no_grad()
def distribution_matching_gradient(
    x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """DMD's normalised distribution-matching gradient.

    ``grad = (x0_fake - x0_real) / mean_{C,H,W} |x - x0_real|``, the mean taken **per sample**.
    It equals ``(p_real - p_fake) / mean|p_real|`` with ``p = x - x0``, i.e. DMD Eq. 7-8 without the
    ``alpha_t`` factor, as in the official code. Non-finite entries become 0 (``nan_to_num``) and the
    normaliser is clamped at ``eps``.

    Args:
        x: Generator samples ``[B, ...]`` (x0 space).
        x0_real: The teacher's (real score's, CFG-guided) x0 prediction at ``x_t``.
        x0_fake: The fake score's x0 prediction at the same ``x_t``.
        eps: Lower clamp of the per-sample normaliser.

    Returns:
        ``grad`` with the shape of ``x`` (float32).
    """
    x, x0_real, x0_fake = x.float(), x0_real.float(), x0_fake.float()
    dims = list(range(1, x.ndim))
    norm = (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
    return torch.nan_to_num((x0_fake - x0_real) / norm)


def distribution_matching_surrogate(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """The DM loss as a stop-gradient surrogate, per sample ``[B]``.

    ``loss = 0.5 * mean_{C,H,W} (x - sg(x - grad))^2``, so that after the trainer's batch mean
    ``d loss / d x = grad / numel`` exactly as in the reference code (``reduction="mean"``).
    """
    grad = distribution_matching_gradient(x, x0_real, x0_fake)
    target = (x.float() - grad).detach()
    return 0.5 * per_sample_mean((x.float() - target) ** 2)


def compute_distribution_matching_loss(
    x: torch.Tensor,
    cond: Conditioning | None,
    real_score: Denoiser,
    fake_score: Denoiser,
    t: torch.Tensor,
    noise: torch.Tensor,
    real_guidance_scale: float = 1.0,
) -> tuple[torch.Tensor, DenoiserOutput, DenoiserOutput]:
    """DMD's generator loss for samples ``x`` at given timesteps and noise, per sample.

    1. ``x_t = alpha_t x + sigma_t noise`` (no gradient);
    2. ``x0_real``: the teacher with CFG ``uncond + w (cond - uncond)``; ``x0_fake``: the fake score,
       conditional only;
    3. the stop-gradient surrogate, whose gradient w.r.t. ``x`` is
       ``(x0_fake - x0_real) / mean|x - x0_real| / numel``.

    Args:
        x: Generator samples (x0 space) that keep their graph.
        cond: Their conditioning.
        real_score: The frozen teacher.
        fake_score: The fake-score denoiser (its weights are not updated by this loss).
        t: Per-sample timesteps ``[B]``.
        noise: Gaussian noise like ``x``.
        real_guidance_scale: CFG weight ``w`` of the real score.

    Returns:
        ``(loss [B], real_output, fake_output)``.
    """
    with torch.no_grad():
        x_t = real_score.schedule.add_noise(x.detach().float(), noise.float(), t)
        real = guided_denoise(real_score, x_t, t, cond, real_guidance_scale)
        fake = fake_score(x_t, t, cond)
    return distribution_matching_surrogate(x, real.x0, fake.x0), real, fake


@dataclass
class DistributionMatchingResult:
    """What :class:`DistributionMatchingLoss` returns.

    Args:
        loss: Per-sample surrogate loss ``[B]``.
        real: The real score's (guided) output at the noised samples.
        fake: The fake score's output there.
        t: The drawn timesteps ``[B]``.
    """

    loss: torch.Tensor
    real: DenoiserOutput
    fake: DenoiserOutput
    t: torch.Tensor


class DistributionMatchingLoss:
    """DMD's generator loss with its own noise-level draw: ``t ~ U[min_step, max_step]`` (fractions of T).

    Draws, in this order, ``t`` (``schedule.sample_timesteps``) and the noise (``torch.randn`` on the
    generator's device, moved to ``x``'s), then :func:`compute_distribution_matching_loss`.

    Args:
        schedule: The teacher's noise schedule.
        min_step: Lower end of the timestep range, a fraction of T (DMD: 0.02).
        max_step: Upper end (DMD: 0.98).
        real_guidance_scale: CFG weight of the real score.

    Example:
        >>> dm = DistributionMatchingLoss(teacher.schedule, 0.02, 0.98, real_guidance_scale=4.5)
        >>> out = dm(x, cond, teacher, fake_score, generator=rng)
        >>> out.loss.mean().backward()  # pushes grad / x.numel() into dG/dtheta
    """

    def __init__(self, schedule: NoiseSchedule, min_step: float = 0.02, max_step: float = 0.98,
                 real_guidance_scale: float = 1.0) -> None:
        if not 0.0 <= min_step < max_step <= 1.0:
            raise ValueError(f"Need 0 <= min_step < max_step <= 1, got {min_step}, {max_step}.")
        self.schedule, self.min_step, self.max_step = schedule, min_step, max_step
        self.real_guidance_scale = real_guidance_scale

    def __call__(self, x: torch.Tensor, cond: Conditioning | None, real_score: Denoiser, fake_score: Denoiser,
                 generator: torch.Generator | None = None) -> DistributionMatchingResult:
        """Draw ``t`` and noise, return the per-sample loss and both scores' outputs."""
        t = self.schedule.sample_timesteps(x.shape[0], self.min_step, self.max_step, generator)
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        loss, real, fake = compute_distribution_matching_loss(x, cond, real_score, fake_score, t, noise,
                                                              self.real_guidance_scale)
        return DistributionMatchingResult(loss, real, fake, t)


__all__ = [
    "DistributionMatchingLoss",
    "DistributionMatchingResult",
    "compute_distribution_matching_loss",
    "distribution_matching_gradient",
    "distribution_matching_surrogate",
]

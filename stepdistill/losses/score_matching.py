"""Denoising score matching: the loss that trains fake-score critics and (re)trains denoisers.

As in NVlabs/edm's ``training/loss.py``, the loss owns its noise-level draw: :meth:`DenoisingScoreMatchingLoss.noise`
draws ``t`` over a fraction of the schedule and the Gaussian noise, returns the noised input and the
regression target in the network's own parameterization; :meth:`~DenoisingScoreMatchingLoss.__call__`
compares the network's raw output with that target, per sample. The two halves are separate so that a
trainer can batch other inputs (e.g. GAN inputs) into the same network forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schedules import NoiseSchedule
from ._common import per_sample_mean


@dataclass
class NoisedBatch:
    """A noised batch for denoising score matching.

    Args:
        x_t: ``alpha_t x0 + sigma_t noise``.
        t: Per-sample timesteps ``[B]`` (float64).
        noise: The Gaussian noise.
        target: ``schedule.target(x0, noise, t)``: eps for eps-models, v for v-models, ``eps - x0`` for flow,
            x0 for sample-prediction models.
    """

    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor


class DenoisingScoreMatchingLoss:
    """Unweighted denoising score matching in the network's parameterization (DMD's fake-score loss).

    ``mean_{C,H,W} (model_output - target)^2`` per sample.

    Args:
        schedule: The network's noise schedule.
        low: Lower end of the training timestep range, a fraction of T.
        high: Upper end.

    Example:
        >>> dsm = DenoisingScoreMatchingLoss(teacher.schedule)
        >>> batch = dsm.noise(x0, generator=rng)
        >>> loss = dsm(fake_score(batch.x_t, batch.t, cond).model_output, batch.target)  # [B]
    """

    def __init__(self, schedule: NoiseSchedule, low: float = 0.0, high: float = 1.0) -> None:
        self.schedule, self.low, self.high = schedule, low, high

    def noise(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> NoisedBatch:
        """Draw ``t`` then the noise (on the generator's device, moved to ``x0``'s) and noise ``x0``."""
        t = self.schedule.sample_timesteps(x0.shape[0], self.low, self.high, generator)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        return NoisedBatch(self.schedule.add_noise(x0, eps, t), t, eps, self.schedule.target(x0, eps, t))

    def __call__(self, model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return ``[B]`` per-sample MSE."""
        return per_sample_mean((model_output.float() - target.float()) ** 2)


__all__ = ["DenoisingScoreMatchingLoss", "NoisedBatch"]

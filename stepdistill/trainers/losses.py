"""Small loss callables shared by the distillation trainers.

Every loss returns **one value per sample** (shape ``[B]``); the trainer weights and reduces (the
NVlabs/edm habit). No Accelerate, no networks: the callers feed tensors they computed.

* :func:`distribution_matching_gradient` and :class:`DistributionMatchingLoss` -- DMD's generator
  gradient with per-sample normalisation and its stop-gradient MSE surrogate (``dmd.md`` §2.1).
* :class:`DenoisingScoreMatchingLoss` -- the fake-score critic's loss in the network's own
  parameterization (``dmd.md`` §4.1).
* :class:`GANGeneratorLoss`, :class:`GANDiscriminatorLoss` -- DMD2's non-saturating softplus losses
  (``dmd.md`` §7).
* :class:`MSEDistance` -- the pluggable distance of DMD1's regression loss (``dmd.md`` §6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: ``[B, ...] -> [B]``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


@torch.no_grad()
def distribution_matching_gradient(
    x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """DMD's normalised distribution-matching gradient (``dmd.md`` §2.1 step 6).

    ``grad = (x0_fake - x0_real) / mean_{C,H,W} |x - x0_real|``, the mean taken **per sample**.
    It equals ``(p_real - p_fake) / mean|p_real|`` with ``p = x - x0``, i.e. DMD1 Eq. 7-8 without the
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


class DistributionMatchingLoss:
    """The DM generator loss as a stop-gradient surrogate (``dmd.md`` §2.1 step 7).

    ``loss = 0.5 * mean_{C,H,W} (x - sg(x - grad))^2`` per sample, so that after the trainer's batch
    mean ``d loss / d x = grad / numel`` exactly as in the reference code (``reduction="mean"``).

    Example:
        >>> loss = DistributionMatchingLoss()(x, x0_real, x0_fake)  # [B]
        >>> loss.mean().backward()  # pushes grad / x.numel() into dG/dtheta
    """

    def __call__(self, x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
        """Return the per-sample surrogate loss ``[B]`` (its value is ``0.5 * mean(grad^2)``)."""
        grad = distribution_matching_gradient(x, x0_real, x0_fake)
        target = (x.float() - grad).detach()
        return 0.5 * _per_sample_mean((x.float() - target) ** 2)


class DenoisingScoreMatchingLoss:
    """Unweighted denoising score matching in the network's parameterization (``dmd.md`` §4.1).

    ``mean_{C,H,W} (model_output - target)^2`` per sample, where ``target`` is
    ``schedule.target(x0, eps, t)`` (eps for eps-models, v for v-models, ``eps - x0`` for flow).
    """

    def __call__(self, model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return ``[B]`` per-sample MSE."""
        return _per_sample_mean((model_output.float() - target.float()) ** 2)


class GANGeneratorLoss:
    """Non-saturating generator loss ``softplus(-D(fake))`` per sample (``dmd.md`` §7)."""

    def __call__(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """Return ``[B]`` losses from ``[B]`` or ``[B, 1]`` logits."""
        return F.softplus(-fake_logits.float().reshape(fake_logits.shape[0], -1)).mean(dim=1)


class GANDiscriminatorLoss:
    """Discriminator loss ``softplus(D(fake)) + softplus(-D(real))`` per sample (``dmd.md`` §7).

    The fake and real batches must have the same size (the trainer draws them so).
    """

    def __call__(self, fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
        """Return ``[B]`` losses."""
        fake = F.softplus(fake_logits.float().reshape(fake_logits.shape[0], -1)).mean(dim=1)
        real = F.softplus(-real_logits.float().reshape(real_logits.shape[0], -1)).mean(dim=1)
        return fake + real


class MSEDistance:
    """Per-sample mean squared distance, the default distance of DMD1's regression loss."""

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return ``[B]`` per-sample MSE."""
        return _per_sample_mean((prediction.float() - target.float()) ** 2)


__all__ = [
    "DenoisingScoreMatchingLoss",
    "DistributionMatchingLoss",
    "GANDiscriminatorLoss",
    "GANGeneratorLoss",
    "MSEDistance",
    "distribution_matching_gradient",
]

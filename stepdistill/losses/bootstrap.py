"""BOOT's two losses on the signal ODE.

Gu et al., "BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping", arXiv 2306.05544;
ICML 2024 as "Data-free Distillation of Diffusion Models with Bootstrapping".

The student ``g(eps, t)`` predicts the signal ``y_t = (x_t - sigma_t eps) / alpha_t`` of the teacher's ODE
trajectory through ``x_T = eps``. With the teacher's x-prediction ``f`` (CFG already applied) at
``x_t = alpha_t SG[g(eps, t)] + sigma_t eps``:

* :class:`SignalBootstrapLoss` -- ``(1 / delta^2) ||g(eps, s) - SG[y_t + delta (f - y_t)]||^2``, the squared
  error of the finite-difference derivative; ``delta`` is :meth:`~stepdistill.NoiseSchedule.signal_step_size`;
* :class:`SignalBoundaryLoss` -- ``||g(eps, T) - f(eps, T)||^2``, the anchor at the noise end.

Both return one value per sample; the trainer weights and reduces.
"""

from __future__ import annotations

import torch

from ._common import per_sample_mean


def _expand(delta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return delta.to(device=like.device).reshape(-1, *([1] * (like.ndim - 1)))


def bootstrap_target(y_t: torch.Tensor, f: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``y_t + delta (f - y_t)``: one teacher DDIM step from ``t`` to ``s`` in signal space (no gradient).

    Args:
        y_t: The student's signal at ``t`` ``[B, ...]``.
        f: The teacher's (guided) x-prediction at ``x_t = alpha_t y_t + sigma_t eps``.
        delta: ``[B]`` step coefficients.
    """
    d = _expand(delta, y_t).to(torch.float64)
    return (y_t.double() + d * (f.double() - y_t.double())).to(y_t.dtype).detach()


class SignalBootstrapLoss:
    """BOOT's bootstrapping loss, per sample: ``mean((g_s - y_t) / delta - (f - y_t))^2``.

    That is ``(1 / delta^2) ||g_s - SG[y_t + delta (f - y_t)]||^2`` rearranged so small steps do not lose
    precision. Gradient flows only through ``g_s`` (``y_t`` and ``f`` are detached here).

    Example:
        >>> loss = SignalBootstrapLoss()(g_s, y_t, f, delta)  # [B]
    """

    def __call__(self, g_s: torch.Tensor, y_t: torch.Tensor, f: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Return ``[B]`` per-sample losses.

        Args:
            g_s: The student's signal at the cleaner level ``s`` (with its graph).
            y_t: The student's signal at ``t`` (detached here).
            f: The teacher's x-prediction at ``(x_t, t)`` (detached here).
            delta: ``[B]`` step coefficients from ``t`` to ``s`` (:meth:`NoiseSchedule.signal_step_size`).
        """
        y_t, f = y_t.detach().float(), f.detach().float()
        d = _expand(delta, g_s).float()
        return per_sample_mean(((g_s.float() - y_t) / d - (f - y_t)) ** 2)


class SignalBoundaryLoss:
    """BOOT's boundary loss at the noise end, per sample: ``mean(g(eps, T) - f(eps, T))^2`` (``f`` detached).

    Example:
        >>> loss = SignalBoundaryLoss()(g_T, f_T)  # [B]
    """

    def __call__(self, g_end: torch.Tensor, f_end: torch.Tensor) -> torch.Tensor:
        """Return ``[B]`` per-sample squared errors."""
        return per_sample_mean((g_end.float() - f_end.detach().float()) ** 2)


__all__ = ["SignalBootstrapLoss", "SignalBoundaryLoss", "bootstrap_target"]

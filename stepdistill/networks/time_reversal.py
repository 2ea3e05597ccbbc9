"""Reverse the direction of a diffusers network's timestep input by rewriting one weight matrix.

BOOT's student (Gu et al. 2023, arXiv 2306.05544) reads the same noise at every time ``t`` and must give the
*clean* signal at ``t = 0``. stepdistill samples every one-step student with one network call on pure noise at
the noise-end timestep ``T`` (the exported ``LCMScheduler`` pipelines do the same), so the BOOT student is the
teacher network whose timestep input runs backwards: ``student(x, tau) = teacher(x, T - tau)`` at
initialisation, so that the student's call at ``tau = T`` plays the role of ``t = 0``.

Sinusoidal timestep embeddings (Vaswani et al. 2017; DDPM, Ho et al. 2020) make this exact and free of new
modules: for every frequency ``w`` the pair ``(sin w(T - tau), cos w(T - tau))`` is a fixed rotation-reflection
of ``(sin w tau, cos w tau)``, so ``emb(T - tau) = R emb(tau)`` for a constant matrix ``R``, and the first linear
layer of the timestep MLP absorbs it: ``W <- W R``. The result is a stock diffusers network of the same class.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _timestep_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Linear]]:
    """The (sinusoidal projection, first linear layer of its MLP) pairs that embed the diffusion timestep."""
    pairs = []
    proj, mlp = getattr(model, "time_proj", None), getattr(model, "time_embedding", None)
    if proj is not None and mlp is not None:  # UNet2DModel, UNet2DConditionModel
        pairs.append((proj, getattr(mlp, "linear_1", None)))
    combined = getattr(model, "time_text_embed", None)  # SD3-style transformers
    if combined is not None and hasattr(combined, "time_proj") and hasattr(combined, "timestep_embedder"):
        pairs.append((combined.time_proj, getattr(combined.timestep_embedder, "linear_1", None)))
    return pairs


def reflection_matrix(proj: nn.Module, center: float) -> torch.Tensor:
    """``R`` (float64) with ``proj(center - tau) = R proj(tau)`` for a diffusers ``Timesteps`` projection."""
    dim, flip = int(proj.num_channels), bool(proj.flip_sin_to_cos)
    half = dim // 2
    # the frequencies exactly as diffusers' get_timestep_embedding computes them (float32, max_period 10000)
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - proj.downscale_freq_shift)
    phase = float(proj.scale) * torch.exp(exponent).double() * float(center)
    sin_idx = torch.arange(half) + (half if flip else 0)
    cos_idx = torch.arange(half) + (0 if flip else half)
    r = torch.zeros(dim, dim, dtype=torch.float64)
    r[sin_idx, sin_idx], r[sin_idx, cos_idx] = -torch.cos(phase), torch.sin(phase)
    r[cos_idx, cos_idx], r[cos_idx, sin_idx] = torch.cos(phase), torch.sin(phase)
    return r  # an odd dim's zero-padded channel stays zero


@torch.no_grad()
def reverse_timestep_input(model: nn.Module, center: float) -> nn.Module:
    """Rewrite ``model`` in place so that ``model(x, tau, ...) == original(x, center - tau, ...)``; return it.

    Args:
        model: A diffusers network with a sinusoidal timestep embedding (``UNet2DModel``,
            ``UNet2DConditionModel``, SD3-style transformers).
        center: The reflection point in the network's own timestep units (the noise end, e.g. 999).

    Raises:
        ValueError: the network embeds its timestep some other way (learned Fourier features, a custom module):
            BOOT then needs a student that takes its time input in this direction already.

    Example:
        >>> student = reverse_timestep_input(copy.deepcopy(teacher_unet), 999.0)
    """
    from diffusers.models.embeddings import Timesteps

    pairs = _timestep_pairs(model)
    if not pairs or any(not isinstance(p, Timesteps) or not isinstance(lin, nn.Linear) for p, lin in pairs):
        raise ValueError(
            f"Cannot reverse the timestep input of {type(model).__name__}: BOOT's one-network-call student needs a "
            "diffusers network with a sinusoidal timestep embedding (UNet2DModel, UNet2DConditionModel, SD3-style "
            "transformers); use such a teacher, or one whose network embeds time with diffusers' Timesteps."
        )
    for proj, lin in pairs:
        if lin.in_features != proj.num_channels:
            raise ValueError(f"{type(model).__name__}: the timestep MLP takes {lin.in_features} inputs, but the "
                             f"projection gives {proj.num_channels}; cannot reverse its timestep input.")
        taus = torch.tensor([0.0, 1.0, center / 3, center / 2, center], dtype=torch.float32)
        expected = lin(proj(center - taus).to(lin.weight.dtype))
        r = reflection_matrix(proj, center)
        lin.weight.copy_((lin.weight.double() @ r).to(lin.weight.dtype))
        got = lin(proj(taus).to(lin.weight.dtype))
        err = float((got - expected).abs().max())
        if not err <= 1e-3 * (1.0 + float(expected.abs().max())):
            raise ValueError(f"Reversing the timestep input of {type(model).__name__} is off by {err:.3g}: its "
                             "timestep projection is not diffusers' sinusoidal embedding.")
    return model


__all__ = ["reflection_matrix", "reverse_timestep_input"]

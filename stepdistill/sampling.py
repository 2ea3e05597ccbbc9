"""Samplers with explicit randomness: the teacher's deterministic ODE sampler and the student sampler.

Both take ``generator`` as diffusers does: one ``torch.Generator`` for the batch, or a list with one
generator per sample, in which case sample ``k`` is identical whatever the batch size (the EDM
``generate.py`` habit). Noise is drawn with diffusers' ``randn_tensor`` in the order a stock diffusers
pipeline with ``LCMScheduler`` draws it (initial latents first, then one fresh draw per re-noising),
so an exported student reproduces stepdistill's samples seed for seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from .conditioning import Conditioning
from .denoiser import Denoiser, DenoiserOutput, guided_denoise
from .schedules import NoiseSchedule

Generator = torch.Generator | list[torch.Generator] | None
StepCallback = Callable[[int, float, DenoiserOutput, torch.Tensor], None]


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One seeded ``torch.Generator`` per sample (sample ``k`` then never depends on the batch size)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def initial_noise(
    shape: Sequence[int],
    generator: Generator = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard Gaussian starting latents, drawn with diffusers' ``randn_tensor``.

    Raises:
        ValueError: when a generator list does not have one generator per sample.
    """
    _check_generators(generator, shape[0])
    return randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)


def _check_generators(generator: Generator, batch_size: int) -> None:
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(
            f"Got {len(generator)} generators for a batch of {batch_size}: pass one generator per sample "
            "(e.g. make_generators(seeds)) or a single generator."
        )


def _check_latents(latents: torch.Tensor, cond: Conditioning | None) -> None:
    if latents.ndim < 2:
        raise ValueError(f"latents must be batched [B, C, ...], got shape {tuple(latents.shape)}.")
    if cond is not None and cond.batch_size is not None and cond.batch_size != latents.shape[0]:
        raise ValueError(f"Conditioning has batch size {cond.batch_size} but latents have {latents.shape[0]}.")


def ddim_step(schedule: NoiseSchedule, out: DenoiserOutput, t_next: float | None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) step to ``t_next``: ``alpha_next * x0 + sigma_next * eps``.

    For rectified flow this is exactly the Euler step of the velocity ODE. ``t_next=None`` returns x0.
    """
    if t_next is None:
        return out.x0
    return schedule.add_noise(out.x0, out.eps, t_next)


@torch.no_grad()
def sample_teacher(
    denoiser: Denoiser,
    latents: torch.Tensor,
    cond: Conditioning | None = None,
    num_inference_steps: int = 50,
    timesteps: Sequence[float] | None = None,
    guidance_scale: float | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Sample the teacher's probability-flow ODE with DDIM (VP) / Euler (flow), ending at x0.

    Args:
        denoiser: The teacher.
        latents: Starting noise ``[B, C, H, W]`` at the first timestep (pure noise: use
            :func:`initial_noise`).
        cond: Conditioning for the batch.
        num_inference_steps: Steps on the teacher scheduler's own spacing (diffusers' ``set_timesteps``).
        timesteps: An explicit decreasing list instead of ``num_inference_steps``.
        guidance_scale: CFG weight ``w`` (``uncond + w (cond - uncond)``); ``None``/1 disables it.
        callback: Called as ``callback(i, t, denoiser_output, x)`` after each step.

    Returns:
        The final x0 estimate (float32).
    """
    _check_latents(latents, cond)
    schedule = denoiser.schedule
    if timesteps is None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        timesteps = schedule.inference_timesteps(num_inference_steps)
    ts = schedule.validate_timesteps(timesteps)
    x = latents
    for i, t in enumerate(ts):
        out = guided_denoise(denoiser, x, t, cond, guidance_scale)
        x = ddim_step(schedule, out, ts[i + 1] if i + 1 < len(ts) else None)
        if callback is not None:
            callback(i, t, out, x)
    return x.float() if x.dtype != torch.float64 else x


@torch.no_grad()
def sample_student(
    denoiser: Denoiser,
    latents: torch.Tensor,
    cond: Conditioning | None = None,
    timesteps: Sequence[float] | None = None,
    generator: Generator = None,
    guidance_scale: float | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Few-step student sampling: denoise, then re-noise the x0 estimate with *fresh* noise (DMD2 / LCM).

    Step ``i`` feeds ``x`` at ``timesteps[i]`` to the student, takes its x0, and (unless last) draws
    new noise to reach ``timesteps[i+1]``. A one-step student is ``timesteps=[999]`` (SD1.5-like) or
    a smaller conditioning timestep such as ``[399]`` (DMD2's SDXL one-step), still fed pure noise.

    Args:
        denoiser: The student.
        latents: Pure noise ``[B, C, H, W]`` (the student sees it at ``timesteps[0]``).
        cond: Conditioning.
        timesteps: Strictly decreasing timestep list; default ``[schedule.max_timestep]`` (one step from
            pure noise: 999 for VP, 1000 = sigma 1 for flow).
        generator: Generator(s) for the re-noising draws (one per sample for batch invariance).
        guidance_scale: Optional CFG on the student (distilled students usually need none).
        callback: Called as ``callback(i, t, denoiser_output, x)`` after each step.
    """
    _check_latents(latents, cond)
    _check_generators(generator, latents.shape[0])  # also for one step, where no noise is drawn
    schedule = denoiser.schedule
    ts = schedule.validate_timesteps([schedule.max_timestep] if timesteps is None else timesteps)
    x = latents
    x0 = latents
    for i, t in enumerate(ts):
        out = guided_denoise(denoiser, x, t, cond, guidance_scale)
        x0 = out.x0
        if i + 1 < len(ts):
            noise = initial_noise(x0.shape, generator, device=x0.device, dtype=x0.dtype)
            x = schedule.add_noise(x0, noise, ts[i + 1]).to(latents.dtype)
        else:
            x = x0
        if callback is not None:
            callback(i, t, out, x)
    return x0

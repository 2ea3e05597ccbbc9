"""Samplers with explicit randomness: the teacher's deterministic ODE sampler and the student sampler.

Both are one-segment :class:`StepPlan` s run by :func:`run_step_plan`, the one sampling loop: a plan lists which
network runs which timesteps with which sampler (deterministic ODE or fresh re-noising) and how the state is handed
from one network to the next, so hybrid base/student sampling and phased experts are plans too.
:func:`rollout` is the student loop stopped at an intermediate noise level (DMD2's backward simulation).

All take ``generator`` as diffusers does: one ``torch.Generator`` for the batch, or a list with one
generator per sample, in which case sample ``k`` is identical whatever the batch size (the EDM
``generate.py`` habit). Noise is drawn with diffusers' ``randn_tensor`` in the order a stock diffusers
pipeline with ``LCMScheduler`` draws it (initial latents first, then one fresh draw per re-noising),
so an exported student reproduces stepdistill's samples seed for seed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from diffusers.utils.torch_utils import randn_tensor

from .conditioning import Conditioning
from .denoiser import Denoiser, DenoiserOutput, guided_denoise
from .schedules import NoiseSchedule

Generator = torch.Generator | list[torch.Generator] | None
#: ``callback(i, t, denoiser_output, x)`` after step ``i``; a returned tensor replaces the state ``x`` (None: kept).
StepCallback = Callable[[int, float, DenoiserOutput, torch.Tensor], torch.Tensor | None]


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


# ----------------------------------------------------------------------------------------------------
# step plans: which network runs which timesteps, and how the state is handed from one network to the next
SEGMENT_SAMPLERS = ("ode", "renoise")
SEGMENT_HANDOVERS = ("noise", "renoise", "transport")


@dataclass(frozen=True)
class PlanSegment:
    """One network running consecutive steps of a :class:`StepPlan`.

    Args:
        network: Key of the network's :class:`~stepdistill.Denoiser` in the mapping given to
            :func:`run_step_plan`; pipelines use their component names (``"unet"``, ``"base_unet"``, ``"expert_0"``).
        timesteps: The timesteps the network is called at, strictly decreasing, in its schedule's units.
        sampler: The move between this segment's own steps: ``"ode"``, the deterministic DDIM (VP) / Euler (flow)
            step with the step's eps estimate, or ``"renoise"``, the x0 estimate re-noised with *fresh* noise
            (DMD2 / LCM students).
        guidance_scale: CFG weight ``w`` of this segment's calls (:func:`~stepdistill.guided_denoise`: ``None`` or 1
            runs the conditional model alone).
        handover: How the state enters the segment. ``"noise"`` (the first segment, and only it): the starting
            latents, pure noise at ``timesteps[0]``. ``"renoise"``: the previous segment's last x0 estimate
            re-noised with fresh noise. ``"transport"``: the deterministic DDIM / Euler move with the previous
            segment's last x0 and eps estimates.
        resume_timestep: Noise level of the handed-over state (default ``timesteps[0]``). A one-step student
            keeps its conditioning timestep (e.g. ``[399]``) while being fed a state at another level.

    Example:
        >>> PlanSegment("unet", [749, 499, 249], sampler="renoise", handover="renoise")
    """

    network: str
    timesteps: tuple[float, ...]
    sampler: str = "ode"
    guidance_scale: float | None = None
    handover: str = "noise"
    resume_timestep: float | None = None

    def __post_init__(self) -> None:
        values = self.timesteps.tolist() if torch.is_tensor(self.timesteps) else self.timesteps
        object.__setattr__(self, "timesteps", tuple(float(t) for t in values))
        if self.resume_timestep is not None:
            object.__setattr__(self, "resume_timestep", float(self.resume_timestep))
        if not isinstance(self.network, str) or not self.network:
            raise ValueError(f"PlanSegment.network must be a non-empty name, got {self.network!r}.")
        if self.sampler not in SEGMENT_SAMPLERS:
            raise ValueError(
                f"sampler={self.sampler!r} is not supported; use 'ode' (deterministic DDIM / Euler) or 'renoise' "
                "(fresh noise between steps, DMD2 / LCM students)."
            )
        if self.handover not in SEGMENT_HANDOVERS:
            raise ValueError(f"handover={self.handover!r} is not supported; choose one of {list(SEGMENT_HANDOVERS)}.")
        if self.handover == "noise" and self.resume_timestep is not None:
            raise ValueError(
                "resume_timestep is the level of a handed-over state: give the segment handover='renoise' or "
                "'transport' (a segment entered with 'noise' starts from the latents at its first timestep)."
            )

    @property
    def level(self) -> float:
        """Noise level of the state the segment's first step is fed."""
        return self.timesteps[0] if self.resume_timestep is None else self.resume_timestep


@dataclass(frozen=True)
class StepPlan:
    """An ordered list of :class:`PlanSegment`: which network runs which timesteps, with which sampler.

    :func:`run_step_plan` runs it. A teacher or a student alone is a one-segment plan; the hybrid diversity
    pipeline is a base segment (ODE) and a student segment entered by ``"renoise"`` / ``"transport"``; phased experts
    are one segment per expert (``expert_0 .. expert_{K-1}``), each with its phase's timesteps, entered by
    ``"renoise"`` as a student's own steps are.

    Args:
        segments: The segments, in sampling order. The first is entered with ``handover="noise"``, every later one
            with ``"renoise"`` or ``"transport"`` to a level below the previous segment's last timestep.

    Example:
        >>> plan = StepPlan([
        ...     PlanSegment("base_unet", [999], guidance_scale=2.0),
        ...     PlanSegment("unet", [749, 499, 249], sampler="renoise", handover="renoise"),
        ... ])
        >>> x0 = run_step_plan(plan, {"base_unet": teacher, "unet": student}, latents, cond, generator=gens)
        >>> plan.describe()
        'base_unet ode [999] w=2 -> renoise to 749 -> unet renoise [749, 499, 249]'
    """

    segments: tuple[PlanSegment, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.segments))
        if not self.segments:
            raise ValueError("A StepPlan needs at least one segment.")
        for k, seg in enumerate(self.segments):
            if not isinstance(seg, PlanSegment):
                raise TypeError(f"StepPlan segments must be PlanSegment objects, got {type(seg).__name__}.")
            if (k == 0) != (seg.handover == "noise"):
                raise ValueError(
                    f"Segment {k} ({seg.network}) has handover={seg.handover!r}: the first segment starts from the "
                    "latents (handover='noise'), every later one is handed the previous state ('renoise' or "
                    "'transport')."
                )

    @classmethod
    def single(
        cls, network: str, timesteps: Sequence[float], sampler: str = "ode", guidance_scale: float | None = None
    ) -> StepPlan:
        """A one-network plan: a teacher's ODE (``sampler="ode"``) or a student's few steps (``"renoise"``)."""
        return cls((PlanSegment(network, timesteps, sampler=sampler, guidance_scale=guidance_scale),))

    @property
    def num_steps(self) -> int:
        """Network evaluations per image without guidance."""
        return sum(len(s.timesteps) for s in self.segments)

    @property
    def timesteps(self) -> list[float]:
        """Every step's timestep (the one its network is called at), in order."""
        return [t for s in self.segments for t in s.timesteps]

    @property
    def networks(self) -> list[str]:
        """The network of every step, in order."""
        return [s.network for s in self.segments for _ in s.timesteps]

    @property
    def levels(self) -> list[float]:
        """The noise level of every step's input (its timestep, or a segment's ``resume_timestep``)."""
        return [s.level if i == 0 else t for s in self.segments for i, t in enumerate(s.timesteps)]

    def describe(self) -> str:
        """One line, e.g. ``base_unet ode [999] w=2 -> renoise to 749 -> unet renoise [749, 499, 249]``."""
        parts = []
        for seg in self.segments:
            if seg.handover != "noise":
                parts.append(f"{seg.handover} to {_plain(seg.level)}")
            w = f" w={_plain(seg.guidance_scale)}" if seg.guidance_scale is not None else ""
            parts.append(f"{seg.network} {seg.sampler} [{', '.join(_plain(t) for t in seg.timesteps)}]{w}")
        return " -> ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (one dict per segment, plus :meth:`describe`)."""
        return {"segments": [asdict(s) | {"timesteps": list(s.timesteps)} for s in self.segments],
                "describe": self.describe()}  # fmt: skip


def _plain(t: float) -> str:
    return f"{float(t):g}"


class _Step(NamedTuple):
    segment: int  # index into plan.segments
    t: float  # the timestep the network is called at
    level: float  # the noise level of the step's input


def _plan_steps(plan: StepPlan, denoisers: Mapping[str, Denoiser]) -> list[_Step]:
    """The plan's steps, after checking it against the networks' schedules."""
    steps, last = [], None
    for k, seg in enumerate(plan.segments):
        if denoisers.get(seg.network) is None:
            raise ValueError(
                f"The plan runs network {seg.network!r} but the denoisers given are {sorted(denoisers)}: pass "
                f"denoisers={{{seg.network!r}: Denoiser.from_model(...), ...}}."
            )
        schedule = denoisers[seg.network].schedule
        ts = schedule.validate_timesteps(seg.timesteps)
        if k > 0:
            schedule.as_timesteps(seg.level)  # range check
            if not seg.level < last:
                raise ValueError(
                    f"Segment {k} ({seg.network}) is handed the state at level {seg.level:g}, not below the previous "
                    f"segment's last timestep {last:g}: a hand-over moves to a cleaner noise level."
                )
        steps += [_Step(k, t, seg.level if i == 0 else t) for i, t in enumerate(ts)]
        last = ts[-1]
    return steps


def _stop_index(steps: list[_Step], stop: float) -> int:
    for i, step in enumerate(steps):
        if step.level == float(stop):
            return i
    levels = ", ".join(_plain(s.level) for s in steps)
    raise ValueError(
        f"stop={stop!r} is not one of the timesteps [{levels}]: a rollout stops where a step would run next and "
        "returns the state fed to it, so stop must be one of them (stop=timesteps[0] returns the latents unchanged)."
    )


def _move(kind: str, schedule: NoiseSchedule, out: DenoiserOutput, level: float, generator: Generator) -> torch.Tensor:
    """The state at ``level`` from a step's output: fresh re-noising of x0, or the deterministic DDIM / Euler move."""
    if kind == "renoise":
        noise = initial_noise(out.x0.shape, generator, device=out.x0.device, dtype=out.x0.dtype)
        return schedule.add_noise(out.x0, noise, level)
    return ddim_step(schedule, out, level)


@torch.no_grad()
def run_step_plan(
    plan: StepPlan,
    denoisers: Mapping[str, Denoiser],
    latents: torch.Tensor,
    cond: Conditioning | None = None,
    generator: Generator = None,
    callback: StepCallback | None = None,
    stop: float | None = None,
) -> torch.Tensor:
    """Run a :class:`StepPlan`: every step denoises, then moves the state to the next step's noise level.

    1. Step ``i`` feeds the state to its segment's network at its timestep, with the segment's guidance.
    2. The next step's input is, within a segment, the ODE move (``sampler="ode"``) or the x0 estimate re-noised
       with fresh noise (``"renoise"``); into a new segment, its ``handover`` to its level; after the last step, x0.
    3. ``callback(i, t, out, x)`` sees the step's :class:`~stepdistill.DenoiserOutput` and that new state ``x``;
       a tensor it returns replaces the state (``None`` keeps it). After the last step the state is the final x0.

    Noise is drawn from ``generator`` in step order, one draw per re-noising (after the starting latents the caller
    drew), as a stock diffusers pipeline with ``LCMScheduler`` draws it. Re-noised and handed-over states are cast
    to the latents' dtype; ODE states keep the x0 estimate's precision.

    Args:
        plan: What to run.
        denoisers: The networks by name (the names of ``plan``'s segments).
        latents: Starting noise ``[B, C, H, W]``, seen by the first step.
        cond: Conditioning, shared by every network.
        generator: Generator(s) of the re-noising draws (one per sample: sample ``k`` independent of the batch).
        callback: ``callback(i, t, out, x) -> Tensor | None`` after each step, ``i`` counting all segments' steps.
        stop: Stop before the first step whose input is at this noise level and return that input (one of
            ``plan.levels``; its first entry returns ``latents`` unchanged).

    Returns:
        The final x0 estimate (float32, or float64 for float64 inputs), or the state at ``stop``.
    """
    _check_latents(latents, cond)
    _check_generators(generator, latents.shape[0])  # also when no noise is drawn
    steps = _plan_steps(plan, denoisers)
    end = len(steps) if stop is None else _stop_index(steps, stop)
    x = latents
    for i, step in enumerate(steps[:end]):
        segment = plan.segments[step.segment]
        out = guided_denoise(denoisers[segment.network], x, step.t, cond, segment.guidance_scale)
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        if nxt is None:
            x = out.x0
        elif nxt.segment == step.segment:  # the segment's own sampler
            x = _move(segment.sampler, denoisers[segment.network].schedule, out, nxt.level, generator)
            x = x if segment.sampler == "ode" else x.to(latents.dtype)
        else:  # hand-over, on the receiving network's schedule
            receiver = plan.segments[nxt.segment]
            x = _move(receiver.handover, denoisers[receiver.network].schedule, out, nxt.level, generator)
            x = x.to(latents.dtype)
        if callback is not None:
            replaced = callback(i, step.t, out, x)
            x = x if replaced is None else replaced
    if stop is not None:
        return x
    return x.float() if x.dtype != torch.float64 else x


# ----------------------------------------------------------------------------------------------------
# the two samplers and the student rollout: one-segment plans
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
        callback: Called as ``callback(i, t, denoiser_output, x)`` after each step; a returned tensor replaces the
            state ``x`` (the final x0 after the last step), ``None`` keeps it.

    Returns:
        The final x0 estimate (float32).
    """
    _check_latents(latents, cond)
    if timesteps is None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        timesteps = denoiser.schedule.inference_timesteps(num_inference_steps)
    plan = StepPlan.single("teacher", timesteps, sampler="ode", guidance_scale=guidance_scale)
    return run_step_plan(plan, {"teacher": denoiser}, latents, cond, callback=callback)


@torch.no_grad()
def rollout(
    denoiser: Denoiser,
    latents: torch.Tensor,
    cond: Conditioning | None = None,
    timesteps: Sequence[float] | None = None,
    generator: Generator = None,
    stop: float | None = None,
    guidance_scale: float | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """The few-step student loop, stopped at noise level ``stop``: DMD2's backward simulation, Phased DMD's phases.

    Step ``i`` denoises the state at ``timesteps[i]`` and re-noises the x0 estimate with fresh noise to
    ``timesteps[i+1]``. With ``stop`` the loop ends when the next timestep is ``stop`` and returns that noised
    state (the input the student would see at ``stop``, in the latents' dtype); ``stop=timesteps[0]`` returns
    ``latents`` unchanged. With ``stop=None`` it runs every step and returns the final x0
    (:func:`sample_student`). Runs without gradients.

    Args:
        denoiser: The student.
        latents: Pure noise ``[B, C, H, W]`` (seen at ``timesteps[0]``).
        cond: Conditioning.
        timesteps: Strictly decreasing timesteps; default ``[schedule.max_timestep]``.
        generator: Generator(s) of the re-noising draws (one per sample for batch invariance).
        stop: One of ``timesteps``, or ``None`` for the full loop.
        guidance_scale: Optional CFG weight (distilled students usually need none).
        callback: ``callback(i, t, denoiser_output, x)`` after each step; a returned tensor replaces ``x``.

    Raises:
        ValueError: when ``stop`` is not one of ``timesteps``.

    Example:
        >>> gens = make_generators(seeds)
        >>> z = initial_noise(shape, gens)
        >>> x_499 = rollout(student, z, cond, [999, 749, 499, 249], generator=gens, stop=499)  # two steps run
    """
    ts = [denoiser.schedule.max_timestep] if timesteps is None else timesteps
    plan = StepPlan.single("student", ts, sampler="renoise", guidance_scale=guidance_scale)
    return run_step_plan(plan, {"student": denoiser}, latents, cond, generator, callback, stop=stop)


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
    This is :func:`rollout` run to the end.

    Args:
        denoiser: The student.
        latents: Pure noise ``[B, C, H, W]`` (the student sees it at ``timesteps[0]``).
        cond: Conditioning.
        timesteps: Strictly decreasing timestep list; default ``[schedule.max_timestep]`` (one step from
            pure noise: 999 for VP, 1000 = sigma 1 for flow).
        generator: Generator(s) for the re-noising draws (one per sample for batch invariance).
        guidance_scale: Optional CFG on the student (distilled students usually need none).
        callback: Called as ``callback(i, t, denoiser_output, x)`` after each step; a returned tensor replaces the
            state ``x`` (the re-noised input of the next step, or the final x0 after the last step).
    """
    return rollout(denoiser, latents, cond, timesteps, generator, guidance_scale=guidance_scale, callback=callback)

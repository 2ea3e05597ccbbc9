"""``HybridDiversityPipeline``: the base (teacher) takes the first, layout-setting step(s), the student finishes.

Diversity distillation (Gandikota & Bau, "Distilling Diversity and Control in Diffusion Models", arXiv 2503.10637):
distilled students tend to commit to one layout per prompt at their first step; running the multi-step *base*
model for the first step(s) and handing its state to the student restores the base's variety at about the
student's cost, with no training.

The mapping from the two schedules to the steps that run is resolved by :meth:`HybridDiversityPipeline.plan`
(a :class:`HybridPlan`) before anything is sampled:

1. **Base timesteps** ``B``: ``base_timesteps=[...]``; or the base scheduler's own spacing for
   ``base_num_inference_steps``; or, by default, **the paper's setting**: the student's own timesteps (one
   shared schedule, so the base's first step is the student's first step, e.g. ``t = 999``).
2. **Base steps**: the first ``k = base_steps`` entries of ``B`` (default 1), or, with ``handover_timestep=tau``,
   every base timestep strictly above ``tau``. The base runs them from pure noise with its deterministic
   DDIM / Euler sampler and its own guidance ``base_guidance_scale``.
3. **Hand-over** at the first student timestep ``s`` strictly below the base's last timestep ``b``:

   * ``handover="renoise"`` (default, the paper's LCM/DMD2 step): ``x_s = alpha_s x0_b + sigma_s xi`` with
     *fresh* noise ``xi`` drawn from ``generator``;
   * ``handover="transport"``: the deterministic DDIM (VP) / Euler (flow) move
     ``x_s = alpha_s x0_b + sigma_s eps_b`` with the base's own noise estimate.

4. **Student**: its remaining timesteps, with its own sampler (fresh re-noising between steps for
   ``LCMScheduler``-like schedulers, the deterministic ODE otherwise).

Mappings that run zero base steps (the reference script's default: a DDIM "leading" 4-step base never reaches
the student's 759) or leave zero student steps are refused with a ``ValueError`` that names the fix.

**One-step students.** A one-step student (one timestep, e.g. DMD2's ``[399]`` or ``[999]``) is always fed pure
noise: its timestep is a conditioning label, not a noise level, and no student timestep lies "after" the base.
Its hand-over therefore needs an explicit ``resume_timestep=r``: the base (default: one step from pure noise,
``[T]``) hands over its state moved to noise level ``r``, and the student takes its single step on that state,
conditioned on its own trained timestep. On the digits world this *lowers* the student's diversity and FID
(``eval/bench_hybrid.py``): the student has only ever seen pure noise, and the base's first x0 is close to the
class mean. Few-step students are the intended use.

Noise is drawn with diffusers' ``randn_tensor`` in a fixed order: the starting noise, then the re-noising draw
of the hand-over, then the student's own re-noising draws, so one generator per image makes image ``k``
independent of the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.utils import BaseOutput, logging
from torch import nn

from ..conditioning import Conditioning
from ..denoiser import Denoiser
from ..loading import teacher_guidance_scale
from ..sampling import Generator, PlanSegment, StepCallback, StepPlan, run_step_plan
from ..schedules import NoiseSchedule
from .mixin import StepDistillPipelineMixin, StepEndCallback, _check_count, _plain_number
from .pipeline_stepdistill import DEFAULT_TEACHER_STEPS

logger = logging.get_logger(__name__)

HANDOVERS = ("renoise", "transport")
MODES = ("hybrid", "base", "student")

#: Student steps when the student has neither trained ``default_timesteps`` nor an explicit step count.
DEFAULT_STUDENT_STEPS = 4


@dataclass(frozen=True)
class HybridPlan:
    """Which steps a hybrid call runs: the base's timesteps, the hand-over, the student's timesteps.

    :meth:`step_plan` turns it into the :class:`~stepdistill.StepPlan` that runs (segments ``"base_unet"`` and
    ``"unet"``, the pipeline's component names).

    Args:
        mode: ``"hybrid"``, ``"base"`` (the base alone, its whole schedule) or ``"student"`` (the student alone).
        base_timesteps: Timesteps the base runs from pure noise, in the base schedule's units.
        student_timesteps: Timesteps the student is called on (its conditioning timesteps).
        resume_timestep: Noise level of the state handed to the student (``None`` without a hand-over). For a
            few-step student it equals ``student_timesteps[0]``; for a one-step student it is ``resume_timestep``.
        handover: ``"renoise"`` or ``"transport"`` (``None`` without a hand-over).
        one_step: Whether the student is a one-step student (always fed pure noise on its own).
    """

    mode: str
    base_timesteps: list[float]
    student_timesteps: list[float]
    resume_timestep: float | None = None
    handover: str | None = None
    one_step: bool = False

    @property
    def num_steps(self) -> int:
        """Network evaluations per image without guidance: base steps plus student steps."""
        return len(self.base_timesteps) + len(self.student_timesteps)

    @property
    def phases(self) -> list[str]:
        """``"base"`` / ``"student"`` for each step, in order."""
        return ["base"] * len(self.base_timesteps) + ["student"] * len(self.student_timesteps)

    @property
    def timesteps(self) -> list[float]:
        """Every step's timestep, base steps first."""
        return list(self.base_timesteps) + list(self.student_timesteps)

    def describe(self) -> str:
        """One line, e.g. ``base [999] -> renoise to 749 -> student [749, 499, 249]``."""
        fmt = lambda ts: "[" + ", ".join(f"{_plain_number(t):g}" for t in ts) + "]"  # noqa: E731
        if self.mode == "base":
            return f"base {fmt(self.base_timesteps)}"
        if self.mode == "student":
            return f"student {fmt(self.student_timesteps)}"
        label = " (one-step student)" if self.one_step else ""
        return (
            f"base {fmt(self.base_timesteps)} -> {self.handover} to {_plain_number(self.resume_timestep):g} "
            f"-> student {fmt(self.student_timesteps)}{label}"
        )

    def step_plan(
        self,
        base_guidance_scale: float | None = None,
        student_guidance_scale: float | None = None,
        student_renoise: bool = True,
    ) -> StepPlan:
        """The :class:`~stepdistill.StepPlan` of this mapping, on the networks ``"base_unet"`` and ``"unet"``.

        Args:
            base_guidance_scale: CFG weight of the base steps (``None``: off).
            student_guidance_scale: CFG weight of the student steps (``None``: off).
            student_renoise: Student sampler: fresh re-noising between steps (DMD2 / LCM) or the deterministic ODE.
        """
        sampler = "renoise" if student_renoise else "ode"
        base = PlanSegment("base_unet", self.base_timesteps, "ode", base_guidance_scale)
        if self.mode == "base":
            return StepPlan([base])
        if self.mode == "student":
            return StepPlan.single("unet", self.student_timesteps, sampler, student_guidance_scale)
        student = PlanSegment("unet", self.student_timesteps, sampler, student_guidance_scale,
                              handover=self.handover, resume_timestep=self.resume_timestep)  # fmt: skip
        return StepPlan([base, student])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description."""
        return {
            "mode": self.mode,
            "base_timesteps": [_plain_number(t) for t in self.base_timesteps],
            "student_timesteps": [_plain_number(t) for t in self.student_timesteps],
            "resume_timestep": None if self.resume_timestep is None else _plain_number(self.resume_timestep),
            "handover": self.handover,
            "one_step": self.one_step,
            "describe": self.describe(),
        }


@dataclass
class HybridDiversityPipelineOutput(BaseOutput):
    """Output of :class:`HybridDiversityPipeline`.

    Args:
        images: PIL images, a ``[B, H, W, C]`` array in ``[0, 1]`` (``"np"``), a ``[B, C, H, W]`` tensor in
            ``[0, 1]`` (``"pt"``) or the raw final x0 latents (``"latent"``).
        plan: The :class:`HybridPlan` that ran.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    plan: HybridPlan | None = None


# ----------------------------------------------------------------------------------------------------
# the sampler
@torch.no_grad()
def sample_hybrid(
    base: Denoiser | None,
    student: Denoiser | None,
    latents: torch.Tensor,
    plan: HybridPlan,
    cond: Conditioning | None = None,
    generator: Generator = None,
    base_guidance_scale: float | None = None,
    student_guidance_scale: float | None = None,
    student_renoise: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run a :class:`HybridPlan`: base steps from pure noise, the hand-over, then the student; returns x0.

    A thin wrapper of :func:`~stepdistill.run_step_plan` on :meth:`HybridPlan.step_plan`.

    Args:
        base: The base (teacher) denoiser (unused in ``"student"`` mode).
        student: The student denoiser (unused in ``"base"`` mode).
        latents: Pure noise ``[B, C, H, W]``, seen at the first timestep.
        plan: What to run (:meth:`HybridDiversityPipeline.plan`).
        cond: Conditioning shared by both networks.
        generator: Generator(s) of the hand-over and student re-noising draws (one per image for batch invariance).
        base_guidance_scale: CFG weight of the base steps (``None``/1: off).
        student_guidance_scale: CFG weight of the student steps (``None``/1: off).
        student_renoise: Student sampler: fresh re-noising between steps (DMD2 / LCM) or the deterministic ODE.
        callback: ``callback(i, t, out, x)`` after every step, ``i`` counting base and student steps together; a
            returned tensor replaces the state ``x`` (after the last base step: the state handed to the student).

    Returns:
        The final x0 estimate (float32, or float64 for float64 inputs).
    """
    steps = plan.step_plan(base_guidance_scale, student_guidance_scale, student_renoise)
    denoisers = {name: d for name, d in (("base_unet", base), ("unet", student)) if d is not None}
    return run_step_plan(steps, denoisers, latents, cond, generator, callback)


# ----------------------------------------------------------------------------------------------------
# the pipeline
class HybridDiversityPipeline(DiffusionPipeline, StepDistillPipelineMixin):
    r"""Hybrid sampling: a base (teacher) model runs the first step(s), a distilled student finishes.

    ``unet`` / ``scheduler`` are the **student**'s (the names of stock pipelines and of
    :class:`~stepdistill.pipelines.StepDistillPipeline`); ``base_unet`` / ``base_scheduler`` the base's. Both
    networks must share the latent space (and the VAE / text encoder when there is one) and take the same
    conditioning: class labels (digits), text (SD1.5-like, ``prompt`` with ``text_encoder``/``tokenizer``, or
    precomputed ``prompt_embeds`` / ``pooled_prompt_embeds`` for SDXL / SD3-style networks), or none. VP and flow
    schedules both work; see the module docstring for the step mapping and :meth:`plan`.

    Args:
        unet: The student network (any network :meth:`Denoiser.from_model <stepdistill.Denoiser.from_model>`
            wraps).
        scheduler: The student's scheduler: ``LCMScheduler``-like schedulers re-noise with fresh noise between
            student steps, others run the deterministic ODE; its config gives the student's noise schedule.
        base_unet: The base (teacher) network.
        base_scheduler: The base's scheduler (its spacing gives ``base_num_inference_steps`` timesteps; its config
            the base's schedule and prediction type).
        vae: Optional autoencoder of latent models.
        text_encoder: Optional CLIP-style text encoder (SD1.5-like).
        tokenizer: Its tokenizer.
        null_class_label: The null class of class-conditional models (needed for guidance).
        default_timesteps: The student's trained timesteps.
        default_guidance_scale: The student's guidance weight (1: off, as distilled students are sampled).
        base_guidance_scale: The base's guidance weight (CFG when ``> 1``).
        base_steps: Default number of base steps ``k``.
        handover: Default hand-over, ``"renoise"`` or ``"transport"``.
        resume_timestep: Default hand-over noise level of a one-step student (``None``: must be given).

    Example:
        >>> from stepdistill.pipelines import HybridDiversityPipeline
        >>> from stepdistill.sampling import make_generators
        >>> pipe = HybridDiversityPipeline.from_pipelines(
        ...     "stepdistill/assets/digits/teacher", "runs/digits_dmd2_4step/student"
        ... )
        >>> out = pipe(class_labels=[3] * 4, generator=make_generators(range(4)))
        >>> out.plan.describe()
        'base [999] -> renoise to 749 -> student [749, 499, 249]'
    """

    model_cpu_offload_seq = "text_encoder->base_unet->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        unet: nn.Module,
        scheduler: SchedulerMixin,
        base_unet: nn.Module,
        base_scheduler: SchedulerMixin,
        vae: ModelMixin | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any | None = None,
        null_class_label: int | None = None,
        default_timesteps: Optional[list[Union[int, float]]] = None,  # noqa: UP007, UP045 (diffusers checks typing.Union)
        default_guidance_scale: float = 1.0,
        base_guidance_scale: float = 1.0,
        base_steps: int = 1,
        handover: str = "renoise",
        resume_timestep: Optional[Union[int, float]] = None,  # noqa: UP007, UP045
    ) -> None:
        super().__init__()
        _check_handover(handover)
        if int(base_steps) < 1:
            raise ValueError(f"base_steps must be >= 1 (the base runs at least one step), got {base_steps}.")
        self.register_modules(
            unet=unet,
            scheduler=scheduler,
            base_unet=base_unet,
            base_scheduler=base_scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
        if default_timesteps is not None:
            default_timesteps = [_plain_number(t) for t in default_timesteps]
        self.register_to_config(
            null_class_label=None if null_class_label is None else int(null_class_label),
            default_timesteps=default_timesteps,
            default_guidance_scale=float(default_guidance_scale),
            base_guidance_scale=float(base_guidance_scale),
            base_steps=int(base_steps),
            handover=handover,
            resume_timestep=None if resume_timestep is None else _plain_number(resume_timestep),
        )
        _check_latent_spaces(base_unet, unet)

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pipelines(
        cls,
        base: DiffusionPipeline | str | Path,
        student: DiffusionPipeline | str | Path,
        student_timesteps: Sequence[float] | None = None,
        base_guidance_scale: float | None = None,
        torch_dtype: torch.dtype | None = None,
        **config: Any,
    ) -> HybridDiversityPipeline:
        """Build a hybrid pipeline from a base pipeline and a student pipeline (objects or local folders).

        Accepts :class:`~stepdistill.pipelines.StepDistillPipeline` folders / objects (digits teacher and
        students) and stock diffusers pipelines, e.g. a student exported with
        :func:`~stepdistill.pipelines.export_stable_diffusion` (``StableDiffusionPipeline`` + ``LCMScheduler``) and
        its SD base. The networks and schedulers come from each side; ``vae`` / ``text_encoder`` / ``tokenizer``
        from the student (else the base). SDXL / SD3 pipelines have two or three text encoders, which this
        pipeline does not run: their prompts are passed as ``prompt_embeds`` / ``pooled_prompt_embeds`` (from
        the base pipeline's ``encode_prompt``).

        Args:
            base: The base (teacher) pipeline or its local folder.
            student: The student pipeline or its local folder.
            student_timesteps: The student's trained timesteps (default: the student's ``default_timesteps``
                when it is a StepDistillPipeline; stock students need them, e.g. ``[999, 749, 499, 249]``, or use
                ``num_inference_steps`` at call time).
            base_guidance_scale: The base's guidance (default: ``stepdistill_teacher.json`` in the base folder,
                else the base pipeline's ``default_guidance_scale``, else 1 = off).
            torch_dtype: dtype to load folders in.
            **config: Other constructor arguments (``base_steps``, ``handover``, ``resume_timestep``,
                ``null_class_label``, ``default_guidance_scale``).
        """
        base_pipe, base_dir = _as_pipeline(base, "base", torch_dtype)
        student_pipe, _ = _as_pipeline(student, "student", torch_dtype)
        parts = {}
        for side, pipe in (("student", student_pipe), ("base", base_pipe)):
            for name in ("vae", "text_encoder", "tokenizer"):
                if parts.get(name) is None and getattr(pipe, name, None) is not None:
                    parts[name] = getattr(pipe, name)
            if getattr(pipe, "text_encoder_2", None) is not None and parts.get("text_encoder") is not None:
                logger.warning(
                    f"The {side} pipeline has several text encoders (SDXL / SD3): HybridDiversityPipeline runs none of "
                    "them; pass prompt_embeds / pooled_prompt_embeds from base_pipe.encode_prompt instead of prompt."
                )
                parts["text_encoder"] = parts["tokenizer"] = None
        if student_timesteps is None:
            student_timesteps = _config_value(student_pipe, "default_timesteps")
        if base_guidance_scale is None:
            base_guidance_scale = teacher_guidance_scale(base_dir)
        if base_guidance_scale is None:
            base_guidance_scale = _config_value(base_pipe, "default_guidance_scale")
        config.setdefault("null_class_label", _config_value(student_pipe, "null_class_label"))
        if config["null_class_label"] is None:
            config["null_class_label"] = _config_value(base_pipe, "null_class_label")
        default_w = _config_value(student_pipe, "default_guidance_scale")
        config.setdefault("default_guidance_scale", 1.0 if default_w is None else default_w)
        return cls(
            unet=_network(student_pipe, "student"),
            scheduler=student_pipe.scheduler,
            base_unet=_network(base_pipe, "base"),
            base_scheduler=base_pipe.scheduler,
            default_timesteps=None if student_timesteps is None else list(student_timesteps),
            base_guidance_scale=1.0 if base_guidance_scale is None else float(base_guidance_scale),
            **parts,
            **config,
        )

    # ------------------------------------------------------------------------------------------------
    # the student side is the mixin's `schedule` / `denoiser` / `is_student` (unet + scheduler); the base's:
    @property
    def base_schedule(self) -> NoiseSchedule:
        """The base's noise schedule (from ``base_scheduler.config``)."""
        return self.schedule_of(self.base_scheduler)

    @property
    def base_denoiser(self) -> Denoiser:
        """The base wrapped as a :class:`~stepdistill.Denoiser`."""
        return Denoiser.from_model(self.base_unet, self.base_schedule)

    # ------------------------------------------------------------------------------------------------
    def student_timesteps(
        self, num_inference_steps: int | None = None, timesteps: Sequence[float] | None = None
    ) -> list[float]:
        """The student's full timestep list.

        ``timesteps`` when given; else its trained ``default_timesteps`` (when ``num_inference_steps`` is unset or
        equal to their count); else its scheduler's spacing for ``num_inference_steps`` (default
        :data:`DEFAULT_STUDENT_STEPS`).
        """
        return self._resolve_timesteps(num_inference_steps, timesteps, DEFAULT_STUDENT_STEPS)

    def plan(
        self,
        mode: str = "hybrid",
        num_inference_steps: int | None = None,
        timesteps: Sequence[float] | None = None,
        base_steps: int | None = None,
        handover_timestep: float | None = None,
        base_num_inference_steps: int | None = None,
        base_timesteps: Sequence[float] | None = None,
        handover: str | None = None,
        resume_timestep: float | None = None,
    ) -> HybridPlan:
        """Resolve which steps run (see the module docstring); raises a ``ValueError`` naming the fix.

        Args:
            mode: ``"hybrid"``; ``"base"``: the base alone on ``base_timesteps`` or ``base_num_inference_steps``
                (default 50) of its own spacing; ``"student"``: the student alone from pure noise.
            num_inference_steps: Student steps (see :meth:`student_timesteps`).
            timesteps: Explicit student timesteps.
            base_steps: Base steps ``k`` (default: the ``base_steps`` config, 1).
            handover_timestep: Instead of ``base_steps``: the base runs every base timestep strictly above it.
            base_num_inference_steps: The base's timesteps are its scheduler's spacing for this many steps.
            base_timesteps: Explicit base timesteps (strictly decreasing).
            handover: ``"renoise"`` or ``"transport"`` (default: the config's, ``"renoise"``).
            resume_timestep: One-step students only: the noise level of the state the student is fed.
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not supported; choose one of {list(MODES)}.")
        if base_num_inference_steps is not None and base_timesteps is not None:
            raise ValueError("Pass base_num_inference_steps or base_timesteps, not both.")
        _check_count("base_num_inference_steps", base_num_inference_steps)
        base_schedule = self.base_schedule
        if mode == "base":
            if base_timesteps is not None:
                return HybridPlan("base", base_schedule.validate_timesteps(base_timesteps), [])
            return HybridPlan("base", self._base_spacing(base_num_inference_steps or DEFAULT_TEACHER_STEPS), [])
        student_ts = self.student_timesteps(num_inference_steps, timesteps)
        if mode == "student":
            return HybridPlan("student", [], student_ts, one_step=len(student_ts) == 1)

        handover = handover if handover is not None else self.config.handover
        _check_handover(handover)
        one_step = len(student_ts) == 1
        schedule = self.schedule
        if base_schedule.family != schedule.family:  # timesteps are compared across the two schedules below
            raise ValueError(
                f"The base has a {base_schedule.family} schedule and the student a {schedule.family} one: their "
                "timesteps are different units, so no hand-over level can be matched. Pair a base and a student of "
                "the same family (both VP / DDPM, or both flow matching)."
            )
        if base_timesteps is not None:
            full = base_schedule.validate_timesteps(base_timesteps)
        elif base_num_inference_steps is not None:
            full = self._base_spacing(base_num_inference_steps)
        else:  # the paper's setting: one shared schedule (a one-step student's shared start is pure noise)
            full = [base_schedule.max_timestep] if one_step else list(student_ts)

        # how many base steps
        if base_steps is not None and handover_timestep is not None:
            raise ValueError("Pass base_steps or handover_timestep, not both.")
        if handover_timestep is not None:
            k = sum(1 for t in full if t > float(handover_timestep))
            if k == 0:
                raise ValueError(
                    f"handover_timestep={handover_timestep:g} runs zero base steps: the base's first timestep "
                    f"{full[0]:g} is not above it (base timesteps {_fmt(full)}). Lower handover_timestep, or give the "
                    "base timesteps that start above it (more base_num_inference_steps, 'trailing' spacing, or "
                    "base_timesteps=[...]); a DDIM 'leading' 4-step base, for example, starts at 751."
                )
        else:
            k = self.config.base_steps if base_steps is None else base_steps
            if not isinstance(k, (int, np.integer)) or k < 1:
                raise ValueError(
                    f"base_steps={k!r} runs zero base steps: the hybrid needs base_steps >= 1 (use mode='student' "
                    "for the student alone)."
                )
            if k > len(full):
                raise ValueError(
                    f"base_steps={k} but the base has only {len(full)} timesteps {_fmt(full)}: lower base_steps or "
                    "give the base more steps (base_num_inference_steps / base_timesteps)."
                )
        ran = full[: int(k)]
        last = ran[-1]

        # where the student resumes
        if one_step:
            resume = resume_timestep if resume_timestep is not None else self.config.resume_timestep
            if resume is None:
                raise ValueError(
                    f"The student is a one-step student (timesteps {_fmt(student_ts)}, always fed pure noise), so no "
                    f"student timestep follows the base's last one ({last:g}). Pass resume_timestep=r with "
                    f"r < {last:g}: the base's state is moved to noise level r and the student takes its one step "
                    "on it. Or use a few-step student (the intended use), or mode='student'."
                )
            resume = float(resume)
            schedule.as_timesteps(resume)  # range check
            if not resume < last:
                raise ValueError(
                    f"resume_timestep={resume:g} must be strictly below the base's last timestep {last:g} (the "
                    "hand-over goes to a cleaner noise level); lower it or run fewer base steps."
                )
            return HybridPlan("hybrid", ran, student_ts, resume, handover, one_step=True)
        if resume_timestep is not None:
            raise ValueError(
                f"resume_timestep is for one-step students; this student has timesteps {_fmt(student_ts)} and resumes "
                "at its first timestep below the base's last one. Choose it with base_steps, handover_timestep or "
                "timesteps=[...]."
            )
        rest = [s for s in student_ts if s < last]
        if not rest:
            raise ValueError(
                f"No student timestep of {_fmt(student_ts)} lies below the base's last timestep {last:g}: the student "
                "would run zero steps. Run fewer base steps (base_steps / a higher handover_timestep), or give the "
                "student timesteps below it."
            )
        return HybridPlan("hybrid", ran, rest, rest[0], handover, one_step=False)

    def _base_spacing(self, num_inference_steps: int) -> list[float]:
        self.base_scheduler.set_timesteps(num_inference_steps)
        return self.base_schedule.validate_timesteps(self.base_scheduler.timesteps.tolist())

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        batch_size: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[float] | None = None,
        guidance_scale: float | None = None,
        base_steps: int | None = None,
        handover_timestep: float | None = None,
        base_num_inference_steps: int | None = None,
        base_timesteps: list[float] | None = None,
        base_guidance_scale: float | None = None,
        handover: str | None = None,
        resume_timestep: float | None = None,
        mode: str = "hybrid",
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> HybridDiversityPipelineOutput | tuple:
        r"""Generate images: base step(s), hand-over, student steps (or one side alone with ``mode``).

        Args:
            class_labels: Class label(s); each makes ``num_images_per_prompt`` images.
            prompt: Prompt(s) of an SD1.5-like text model (needs ``text_encoder`` and ``tokenizer``).
            prompt_embeds: Precomputed text embeddings ``[N, L, D]`` instead of ``prompt``.
            pooled_prompt_embeds: ``[N, D]`` pooled embeddings (SDXL / SD3-style networks).
            negative_prompt: Unconditional prompt for guidance (default ``""``).
            negative_prompt_embeds: Precomputed unconditional embeddings (default: the embedding of
                ``negative_prompt``, the empty prompt by default; zeros without a text encoder).
            negative_pooled_prompt_embeds: Precomputed unconditional pooled embeddings (default: zeros).
            num_images_per_prompt: Images per label / prompt (adjacent in the output).
            batch_size: Number of images of an unconditional model.
            height: Image height in pixels.
            width: Image width in pixels.
            num_inference_steps: Student steps (see :meth:`student_timesteps`).
            timesteps: Explicit student timesteps.
            guidance_scale: Student CFG weight (default: ``default_guidance_scale``; applied when ``> 1``).
            base_steps: Base steps ``k >= 1`` (default: the config's, 1).
            handover_timestep: Instead of ``base_steps``: the base runs its timesteps strictly above this one.
            base_num_inference_steps: The base's own spacing with this many steps (default: the student's
                timesteps, the paper's setting; 50 in ``mode="base"``).
            base_timesteps: Explicit base timesteps.
            base_guidance_scale: Base CFG weight (default: the config's; applied when ``> 1``).
            handover: ``"renoise"`` (fresh noise, the default) or ``"transport"`` (deterministic DDIM / Euler move).
            resume_timestep: One-step students: noise level of the state the student is fed.
            mode: ``"hybrid"``, ``"base"`` (the base alone) or ``"student"`` (the student alone), with the same
                seeds and conditioning -- for side-by-side comparisons.
            generator: One generator, or one per image (image ``k`` then does not depend on the batch size).
            latents: Starting noise instead of drawing it.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: Return a :class:`HybridDiversityPipelineOutput` instead of a tuple.
            callback_on_step_end: ``callback_on_step_end(pipe, i, t, callback_kwargs)`` after every base and student
                step (``i`` counts both; ``"latents"``: the state after the step -- the next step's input, after the
                last base step the state handed to the student, after the last step the final x0; ``"denoised"``:
                the x0 estimate). A ``"latents"`` entry of the dict it returns replaces the state, as in diffusers.
            callback_on_step_end_tensor_inputs: Which tensors the callback receives.
            cross_attention_kwargs: Passed to both networks' attention processors (e.g. ``{"scale": 0.5}``).

        Returns:
            :class:`HybridDiversityPipelineOutput` (``images``, ``plan``), or ``(images,)``.
        """
        # 0. Defaults and the plan
        plan = self.plan(mode, num_inference_steps, timesteps, base_steps, handover_timestep,
                         base_num_inference_steps, base_timesteps, handover, resume_timestep)  # fmt: skip
        student = self.denoiser_of(self.unet, self.schedule, cross_attention_kwargs)
        base = self.denoiser_of(self.base_unet, self.base_schedule, cross_attention_kwargs)
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        if base_guidance_scale is None:
            base_guidance_scale = self.config.base_guidance_scale
        w_student = guidance_scale if guidance_scale > 1.0 and mode != "base" else None
        w_base = base_guidance_scale if base_guidance_scale > 1.0 and mode != "student" else None
        self._guidance_scale = guidance_scale
        self._do_classifier_free_guidance = w_student is not None or w_base is not None
        self._cross_attention_kwargs = cross_attention_kwargs
        if mode != "student" and tuple(base.required()) != tuple(student.required()):
            raise ValueError(
                f"The base {type(self.base_unet).__name__} needs conditioning {list(base.required())} but the "
                f"student {type(self.unet).__name__} needs {list(student.required())}: both must take the same "
                "conditioning (and share the latent space)."
            )

        # 1-3. Check inputs, encode the conditioning (shared by both networks), starting latents (seen by the
        # plan's first network: the base, or the student in mode="student")
        cond, x_T = self._prepare_call(
            base if mode == "base" else student, class_labels, prompt, prompt_embeds, pooled_prompt_embeds,
            negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds, num_images_per_prompt,
            batch_size, height, width, generator, latents, output_type, callback_on_step_end_tensor_inputs,
        )  # fmt: skip

        # 4. Sample: base steps, hand-over, student steps
        steps = plan.step_plan(w_base, w_student, student_renoise=self.is_student)
        x0 = self._sample(steps, {"base_unet": base, "unet": student}, x_T, cond, generator, callback_on_step_end,
                          callback_on_step_end_tensor_inputs)  # fmt: skip

        # 5. Decode, post-process, offload
        images = self._finish(x0, output_type)
        if not return_dict:
            return (images,)
        return HybridDiversityPipelineOutput(images=images, plan=plan)


# ----------------------------------------------------------------------------------------------------
# helpers
def _fmt(ts: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(t):g}" for t in ts) + "]"


def _check_handover(handover: str) -> None:
    if handover not in HANDOVERS:
        raise ValueError(
            f"handover={handover!r} is not supported; use 'renoise' (re-noise the base's x0 with fresh noise, the "
            "paper's setting) or 'transport' (deterministic DDIM / Euler move with the base's noise estimate)."
        )


def _check_latent_spaces(base: nn.Module, student: nn.Module) -> None:
    """Refuse networks whose inputs cannot be the same latents (different channel counts)."""
    get = lambda net: getattr(getattr(net, "config", None), "in_channels", None)  # noqa: E731
    b, s = get(base), get(student)
    if b is not None and s is not None and b != s:
        raise ValueError(
            f"The base takes {b}-channel inputs and the student {s}-channel ones: a hybrid needs both networks in the "
            "same latent space (the student distilled from this base)."
        )


def _as_pipeline(
    pipe: DiffusionPipeline | str | Path, side: str, torch_dtype: torch.dtype | None
) -> tuple[DiffusionPipeline, Path | None]:
    """``(pipeline, its folder or None)`` from a pipeline object or a local pipeline folder."""
    if isinstance(pipe, DiffusionPipeline):
        return pipe, None
    if not isinstance(pipe, (str, Path)):
        raise TypeError(
            f"The {side} must be a DiffusionPipeline or a local pipeline folder, got {type(pipe).__name__}."
        )
    folder = Path(pipe).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"The {side} {str(folder)!r} is not a local diffusers pipeline folder (no model_index.json). Pass the "
            "folder written by save_pretrained (e.g. a student's `.../student` folder)."
        )
    from ..loading import load_pipeline_folder

    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    return load_pipeline_folder(folder, **kwargs), folder


def _network(pipe: DiffusionPipeline, side: str) -> nn.Module:
    for name in ("unet", "transformer"):
        net = getattr(pipe, name, None)
        if net is not None:
            return net
    raise ValueError(f"The {side} pipeline {type(pipe).__name__} has neither a `unet` nor a `transformer`.")


def _config_value(pipe: DiffusionPipeline, key: str) -> Any:
    value = pipe.config.get(key) if hasattr(pipe, "config") else None
    return list(value) if isinstance(value, tuple) else value


__all__ = [
    "HANDOVERS",
    "HybridDiversityPipeline",
    "HybridDiversityPipelineOutput",
    "HybridPlan",
    "sample_hybrid",
]

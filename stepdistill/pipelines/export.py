"""Export a distilled student as a folder that stock diffusers loads, with a model card giving the exact call.

A student of an SD1.5 / SD2.1, SDXL or SD3-style teacher becomes a standard ``StableDiffusionPipeline``,
``StableDiffusionXLPipeline`` or ``StableDiffusion3Pipeline`` folder: the teacher's VAE, text encoders and
tokenizers, the student's network, and a scheduler configured so that the stock pipeline runs
stepdistill's own student sampler (:func:`stepdistill.sampling.sample_student`):

* **VP teachers (SD1.5 / SDXL) -> ``LCMScheduler``.** Its ``step`` computes x0 from the model output, forms
  ``denoised = c_out * x0 + c_skip * x_t`` and re-noises ``denoised`` to the next timestep with fresh noise
  drawn from the pipeline's ``generator`` -- DMD2's multi-step sampler, noise for noise. The consistency
  boundary scalings are switched off by ``timestep_scaling = 1e6`` (``c_skip <= 2.5e-13`` and
  ``c_out == 1.0`` in float32 for every ``t >= 1``; the default 10 gives ``c_skip = 4e-8`` at ``t = 249``
  but ``2.5e-5`` at ``t = 10``).
  ``original_inference_steps`` is chosen so that ``num_inference_steps=len(timesteps)`` gives the trained
  list when LCM's spacing can produce it (1000 for DMD2's evenly spaced lists); the model card still passes
  ``timesteps=[...]`` explicitly.
* **Flow teachers (SD3) -> ``FlowMatchEulerDiscreteScheduler``** with ``shift=1.0`` (the exact call passes
  ``sigmas = t / T``) and, for several steps, ``stochastic_sampling=True``, whose step is
  ``x0 = x_t - sigma v`` then ``(1 - sigma_next) x0 + sigma_next * noise``: the student sampler again. The
  gap: ``StableDiffusion3Pipeline`` does not pass ``generator`` to ``scheduler.step``, so the re-noising
  draws come from torch's global generator. One-step students are exact with any generator(s);
  multi-step ones reproduce stepdistill's samples for a single generator (``torch.manual_seed(seed)``
  before a call made without ``generator``), not for per-image generator lists. diffusers 0.42's
  ``FlowMatchLCMScheduler`` draws its noise the same way and closes no gap.
* **Anything else** (the digits world's class-conditional ``UNet2DModel``, DiT, custom networks) is saved as
  a :class:`~stepdistill.pipelines.StepDistillPipeline` folder.

Guidance is off in every exported call (``guidance_scale=0.0``: stock pipelines apply CFG only for ``> 1``).
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, LCMScheduler
from torch import nn

from ..denoiser import Denoiser
from ..schedules import FlowSchedule, NoiseSchedule, VPSchedule
from .mixin import _plain_number
from .pipeline_stepdistill import StepDistillPipeline

#: ``LCMScheduler.timestep_scaling`` of exported students: turns LCM's consistency boundary condition into
#: the identity (``denoised == x0``), so its step is exactly "x0, then fresh re-noising".
LCM_TIMESTEP_SCALING = 1.0e6

KINDS = ("stable-diffusion", "stable-diffusion-xl", "stable-diffusion-3", "stepdistill")

StudentLike = Denoiser | nn.Module
SchedulerConfigLike = Mapping[str, Any] | Any

#: The text components that SDXL and SD3 bases must both supply.
_DUAL_TEXT_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


@dataclass
class ExportResult:
    """What an export wrote and how to call it.

    Args:
        path: The pipeline folder.
        pipeline_class: Name of the pipeline class in ``model_index.json``.
        kind: Teacher family (one of :data:`KINDS`).
        timesteps: The student's timesteps, in the teacher scheduler's units.
        call_kwargs: The keyword arguments that make the stock pipeline sample like stepdistill
            (besides the prompt / class labels and the generator).
        load_kwargs: Keyword arguments to pass to ``from_pretrained`` (usually none).
        exact: Whether the stock call reproduces ``sample_student`` seed for seed with per-image generators.
        notes: Human-readable notes on exactness (copied into the model card).
    """

    path: Path
    pipeline_class: str
    kind: str
    timesteps: list[int | float]
    call_kwargs: dict[str, Any]
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    exact: bool = True
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# schedulers for students
def _scheduler_config(scheduler: SchedulerConfigLike) -> dict[str, Any]:
    if isinstance(scheduler, Mapping):
        return dict(scheduler)
    config = getattr(scheduler, "config", None)
    if config is None:
        raise TypeError(f"Expected a diffusers scheduler or its config dict, got {type(scheduler).__name__}.")
    out = dict(config)
    out.setdefault("_class_name", type(scheduler).__name__)
    return out


def _integer_timesteps(schedule: NoiseSchedule, timesteps: Sequence[float]) -> list[int]:
    values = schedule.validate_timesteps(timesteps)
    if any(not v.is_integer() for v in values):
        raise ValueError(
            f"LCMScheduler runs on integer timesteps; got {values}. Train / export the student on integer "
            "timesteps (e.g. [999, 749, 499, 249])."
        )
    if values[-1] < 1:
        raise ValueError(
            f"The last timestep is 0 in {values}: at t=0 LCMScheduler returns its input instead of the student's "
            "x0 (c_skip = 1). Use timesteps >= 1."
        )
    return [int(v) for v in values]


def lcm_original_inference_steps(timesteps: Sequence[int], num_train_timesteps: int = 1000) -> int | None:
    """An ``original_inference_steps`` for which LCM's own spacing gives ``timesteps``, or ``None``.

    ``LCMScheduler.set_timesteps(num_inference_steps=len(timesteps))`` then reproduces the trained list.
    ``num_train_timesteps`` is preferred: LCM's spacing is then ``T - 1 - floor(i * T / n)``, DMD2's evenly
    spaced lists (``[999]``, ``[999, 499]``, ``[999, 749, 499, 249]``), so other step counts stay meaningful
    and every integer timestep counts as "trained" (no warnings). Otherwise the smallest value that works.
    Returns ``None`` when none does (e.g. ``[399]``: LCM's spacing always starts at ``N * (T // N) - 1``);
    then the list must be passed as ``timesteps=``.
    """
    ts = [int(t) for t in timesteps]
    n = len(ts)
    for original in [num_train_timesteps, *range(n, num_train_timesteps)]:
        k = num_train_timesteps // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, original, num=n, endpoint=False)).astype(np.int64)
        if origin[picks].tolist() == ts:
            return original
    return None


def lcm_scheduler_for_student(
    scheduler: SchedulerConfigLike,
    timesteps: Sequence[int],
    prediction_type: str | None = None,
) -> LCMScheduler:
    """An ``LCMScheduler`` whose ``step`` is exactly stepdistill's student step on the teacher's VP schedule.

    Args:
        scheduler: The teacher's scheduler (DDPM / DDIM / Euler / LCM ...) or its config: betas and
            ``rescale_betas_zero_snr`` are kept.
        timesteps: The student's strictly decreasing integer timesteps.
        prediction_type: The student's prediction type (default: the teacher config's).

    Example:
        >>> lcm = lcm_scheduler_for_student(teacher.scheduler, [999, 749, 499, 249])
        >>> lcm.set_timesteps(4); lcm.timesteps.tolist()
        [999, 749, 499, 249]
        >>> lcm.set_timesteps(2); lcm.timesteps.tolist()
        [999, 499]
    """
    config = _scheduler_config(scheduler)
    schedule = NoiseSchedule.from_scheduler_config(config, prediction_type=prediction_type)
    if not isinstance(schedule, VPSchedule):
        raise ValueError(
            f"LCMScheduler needs a VP (DDPM-style) teacher schedule; {config.get('_class_name')} is a flow schedule. "
            "Use flow_scheduler_for_student."
        )
    ts = _integer_timesteps(schedule, timesteps)
    original = lcm_original_inference_steps(ts, schedule.num_train_timesteps) or schedule.num_train_timesteps
    # With T // original = 1 every integer timestep is on LCM's "training" grid: no warnings for custom lists.
    lcm = LCMScheduler.from_config(
        {k: v for k, v in config.items() if k != "_class_name"},
        prediction_type=schedule.prediction_type,
        original_inference_steps=original,
        timestep_scaling=LCM_TIMESTEP_SCALING,
        clip_sample=False,
        thresholding=False,
    )
    if not torch.allclose(lcm.alphas_cumprod.double(), schedule.alphas_cumprod, rtol=0, atol=1e-7):
        raise ValueError("LCMScheduler could not reproduce the teacher's alphas_cumprod from its config.")
    return lcm


def flow_scheduler_for_student(
    scheduler: SchedulerConfigLike,
    timesteps: Sequence[float],
    stochastic: bool | None = None,
) -> tuple[FlowMatchEulerDiscreteScheduler, list[float]]:
    """A ``FlowMatchEulerDiscreteScheduler`` that runs a flow student's steps, and the ``sigmas`` to pass.

    ``shift=1.0`` so that the sigmas ``t / T`` reach the network unchanged as ``timestep = t``;
    ``stochastic_sampling`` (default: more than one step) re-noises x0 with fresh noise between steps.

    Returns:
        ``(scheduler, sigmas)``.
    """
    config = _scheduler_config(scheduler)
    schedule = NoiseSchedule.from_scheduler_config(config)
    if not isinstance(schedule, FlowSchedule):
        raise ValueError("flow_scheduler_for_student needs a flow-matching teacher scheduler config.")
    values = schedule.validate_timesteps(timesteps)
    if values[-1] <= 0:
        raise ValueError(f"The last timestep is 0 in {values}: a flow student is never fed clean data.")
    stochastic = len(values) > 1 if stochastic is None else stochastic
    flow = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=schedule.num_train_timesteps, shift=1.0, stochastic_sampling=bool(stochastic)
    )
    sigmas = [v / schedule.num_train_timesteps for v in values]
    return flow, sigmas


# ----------------------------------------------------------------------------------------------------
# inputs
def _split_student(student: StudentLike) -> tuple[nn.Module, NoiseSchedule | None]:
    if isinstance(student, Denoiser):
        return student.model, student.schedule
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be a stepdistill Denoiser or a torch module, got {type(student).__name__}.")
    return student, None


def teacher_kind(network: nn.Module) -> str:
    """Which stock pipeline a network belongs in: one of :data:`KINDS`.

    ``UNet2DConditionModel`` -> ``stable-diffusion`` (``stable-diffusion-xl`` with ``addition_embed_type="text_time"``),
    ``SD3Transformer2DModel`` -> ``stable-diffusion-3``, anything else -> ``stepdistill``.
    """
    name = type(network).__name__
    if name == "UNet2DConditionModel":
        sdxl = getattr(network.config, "addition_embed_type", None) == "text_time"
        return "stable-diffusion-xl" if sdxl else "stable-diffusion"
    if name == "SD3Transformer2DModel":
        return "stable-diffusion-3"
    return "stepdistill"


def _base_components(
    base: DiffusionPipeline | Mapping[str, Any] | str | Path,
    pipeline_cls: type[DiffusionPipeline],
    network_key: str,
    network: nn.Module,
) -> dict[str, Any]:
    if isinstance(base, DiffusionPipeline):
        return dict(base.components)
    if isinstance(base, Mapping):
        return dict(base)
    if isinstance(base, (str, Path)):
        folder = Path(base)
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"{str(folder)!r} is not a local diffusers pipeline folder (no model_index.json).")
        index = json.loads((folder / "model_index.json").read_text())
        absent = {k: None for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is None}
        from ..loading import load_pipeline_folder

        return dict(load_pipeline_folder(folder, pipeline_cls, **absent, **{network_key: network}).components)
    raise TypeError(
        "base must be a DiffusionPipeline, a dict of its components or a local pipeline folder, "
        f"got {type(base).__name__}."
    )


def _require(components: Mapping[str, Any], names: Sequence[str], pipeline: str) -> None:
    missing = [n for n in names if components.get(n) is None]
    if missing:
        present = sorted(k for k, v in components.items() if v is not None)
        raise ValueError(f"Exporting a {pipeline} needs the base pipeline's {missing} (got {present}).")


def _teacher_scheduler(components: Mapping[str, Any], schedule: NoiseSchedule | None) -> dict[str, Any]:
    if components.get("scheduler") is not None:
        return _scheduler_config(components["scheduler"])
    if schedule is not None and getattr(schedule, "scheduler_config", None):
        return dict(schedule.scheduler_config)
    raise ValueError("Exporting needs the teacher's scheduler (base['scheduler']) or a Denoiser student carrying it.")


def _prediction_type(schedule: NoiseSchedule | None) -> str | None:
    return None if schedule is None else schedule.prediction_type


def _plain(values: Sequence[float]) -> list[int | float]:
    return [_plain_number(v) for v in values]


def _stock_inputs(
    student: StudentLike,
    base: DiffusionPipeline | Mapping[str, Any] | str | Path,
    pipeline_cls: type[DiffusionPipeline],
    network_key: str,
    kind: str,
    required: Sequence[str],
    wrong_kind: str,
) -> tuple[nn.Module, NoiseSchedule | None, dict[str, Any]]:
    """The student's network and schedule and the base's components, checked for a stock ``pipeline_cls`` export.

    ``wrong_kind`` is the error message when the network is not of ``kind``; it is formatted with ``name``
    (the network's class name) and ``kind`` (its :func:`teacher_kind`).
    """
    network, schedule = _split_student(student)
    if teacher_kind(network) != kind:
        raise ValueError(wrong_kind.format(name=type(network).__name__, kind=teacher_kind(network)))
    components = _base_components(base, pipeline_cls, network_key, network)
    _require(components, required, pipeline_cls.__name__)
    return network, schedule, components


def _stock_lcm_scheduler(
    components: Mapping[str, Any], schedule: NoiseSchedule | None, timesteps: Sequence[int]
) -> tuple[LCMScheduler, list[int]]:
    """The student ``LCMScheduler`` of a VP stock export and its integer timesteps."""
    scheduler = lcm_scheduler_for_student(
        _teacher_scheduler(components, schedule), timesteps, prediction_type=_prediction_type(schedule)
    )
    ts = _integer_timesteps(NoiseSchedule.from_scheduler_config(dict(scheduler.config)), timesteps)
    return scheduler, ts


def _save_export(
    pipe: DiffusionPipeline,
    result: ExportResult,
    model_card: bool,
    title: str | None,
    card_path: str | Path | None = None,
) -> ExportResult:
    """Save ``pipe`` to ``result.path`` atomically (durable; a previous folder is replaced whole) with its card."""
    from ..utils import atomic_write_dir

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if model_card:
            write_model_card(result, title=title, folder=tmp, path=card_path or result.path)

    atomic_write_dir(result.path, write)
    return result


# ----------------------------------------------------------------------------------------------------
# exports
def export_stable_diffusion(
    student: StudentLike,
    base: DiffusionPipeline | Mapping[str, Any] | str | Path,
    timesteps: Sequence[int],
    out_dir: str | Path,
    model_card: bool = True,
    title: str | None = None,
    card_path: str | Path | None = None,
) -> ExportResult:
    """Write a student of an SD1.5 / SD2.1-like teacher as a stock ``StableDiffusionPipeline`` folder.

    Args:
        student: The student ``UNet2DConditionModel``, or its :class:`~stepdistill.Denoiser` (whose schedule
            gives the prediction type).
        base: The teacher pipeline, a dict with its ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler``,
            or a local pipeline folder.
        timesteps: The student's integer timesteps, e.g. ``[999]`` or ``[999, 749, 499, 249]``.
        out_dir: Output folder.
        model_card: Write ``README.md`` with the exact call.
        title: Model-card title.
        card_path: The folder the model card's usage loads (default ``out_dir``; pass the final folder when
            ``out_dir`` is a temporary one that is renamed afterwards).

    Example:
        >>> result = export_stable_diffusion(student_unet, teacher_pipe, [999, 749, 499, 249], "out/sd-dmd2")
        >>> pipe = DiffusionPipeline.from_pretrained("out/sd-dmd2")
        >>> image = pipe("a cat", **result.call_kwargs, generator=torch.Generator().manual_seed(0)).images[0]
    """
    from diffusers import StableDiffusionPipeline  # stock pipelines import lazily: they pull in transformers

    network, schedule, components = _stock_inputs(
        student,
        base,
        StableDiffusionPipeline,
        "unet",
        "stable-diffusion",
        ("vae", "text_encoder", "tokenizer"),
        "export_stable_diffusion needs an SD1.5-like UNet2DConditionModel, got {name} ({kind}); "
        "use export_student to dispatch.",
    )
    scheduler, ts = _stock_lcm_scheduler(components, schedule, timesteps)
    pipe = StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=network,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    result = ExportResult(
        path=Path(out_dir),
        pipeline_class="StableDiffusionPipeline",
        kind="stable-diffusion",
        timesteps=ts,
        call_kwargs={"timesteps": ts, "guidance_scale": 0.0},
        notes=_lcm_notes(scheduler, ts),
    )
    return _save_export(pipe, result, model_card, title, card_path)


def export_stable_diffusion_xl(
    student: StudentLike,
    base: DiffusionPipeline | Mapping[str, Any] | str | Path,
    timesteps: Sequence[int],
    out_dir: str | Path,
    model_card: bool = True,
    title: str | None = None,
    card_path: str | Path | None = None,
) -> ExportResult:
    """Write a student of an SDXL-like teacher as a stock ``StableDiffusionXLPipeline`` folder.

    The exact call fixes ``height``/``width`` to the UNet's native size, so the SDXL micro-conditioning is
    ``(H, W, 0, 0, H, W)`` as in DMD2's training. Arguments as in :func:`export_stable_diffusion`; ``base``
    supplies ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2`` and ``scheduler``.
    """
    from diffusers import StableDiffusionXLPipeline

    network, schedule, components = _stock_inputs(
        student,
        base,
        StableDiffusionXLPipeline,
        "unet",
        "stable-diffusion-xl",
        _DUAL_TEXT_COMPONENTS,
        "export_stable_diffusion_xl needs an SDXL-like UNet (addition_embed_type='text_time'), got {name} ({kind}).",
    )
    scheduler, ts = _stock_lcm_scheduler(components, schedule, timesteps)
    pipe = StableDiffusionXLPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        text_encoder_2=components["text_encoder_2"],
        tokenizer=components["tokenizer"],
        tokenizer_2=components["tokenizer_2"],
        unet=network,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    size = network.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    height, width = height * pipe.vae_scale_factor, width * pipe.vae_scale_factor
    result = ExportResult(
        path=Path(out_dir),
        pipeline_class="StableDiffusionXLPipeline",
        kind="stable-diffusion-xl",
        timesteps=ts,
        call_kwargs={"timesteps": ts, "guidance_scale": 0.0, "height": height, "width": width},
        load_kwargs={"add_watermarker": False},
        notes=_lcm_notes(scheduler, ts)
        + ["`add_watermarker=False` at load time: the invisible watermark (when installed) changes pixels."],
    )
    return _save_export(pipe, result, model_card, title, card_path)


def export_stable_diffusion_3(
    student: StudentLike,
    base: DiffusionPipeline | Mapping[str, Any] | str | Path,
    timesteps: Sequence[float],
    out_dir: str | Path,
    model_card: bool = True,
    title: str | None = None,
    card_path: str | Path | None = None,
) -> ExportResult:
    """Write a student of an SD3-like (rectified-flow MMDiT) teacher as a stock ``StableDiffusion3Pipeline`` folder.

    The scheduler is ``FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=<more than one step>)``;
    see the module docstring for the one gap (multi-step re-noising uses torch's global generator). ``base``
    supplies ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``,
    ``text_encoder_3`` / ``tokenizer_3`` (may be ``None``: T5 off) and ``scheduler``.
    """
    from diffusers import StableDiffusion3Pipeline

    network, schedule, components = _stock_inputs(
        student,
        base,
        StableDiffusion3Pipeline,
        "transformer",
        "stable-diffusion-3",
        _DUAL_TEXT_COMPONENTS,
        "export_stable_diffusion_3 needs an SD3Transformer2DModel, got {name}.",
    )
    scheduler, sigmas = flow_scheduler_for_student(_teacher_scheduler(components, schedule), timesteps)
    ts = _plain(NoiseSchedule.from_scheduler_config(dict(scheduler.config)).validate_timesteps(timesteps))
    pipe = StableDiffusion3Pipeline(
        transformer=network,
        scheduler=scheduler,
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        text_encoder_2=components["text_encoder_2"],
        tokenizer_2=components["tokenizer_2"],
        text_encoder_3=components.get("text_encoder_3"),
        tokenizer_3=components.get("tokenizer_3"),
    )
    load_kwargs = {}
    if components.get("text_encoder_3") is None:
        load_kwargs = {"text_encoder_3": None, "tokenizer_3": None}
    multi = len(ts) > 1
    notes = [
        "`FlowMatchEulerDiscreteScheduler` with `shift=1.0`: the `sigmas` of the call are `t / 1000`, so the "
        f"transformer sees the trained timesteps {ts}.",
    ]
    if multi:
        notes.append(
            "`stochastic_sampling=True` re-noises the x0 estimate with fresh noise between steps, as stepdistill "
            "does, but `StableDiffusion3Pipeline` does not pass `generator` to `scheduler.step`: the re-noising draws "
            "come from torch's global generator. Seed it with `torch.manual_seed(seed)` and call without "
            "`generator` to reproduce stepdistill's samples for `generator=torch.Generator().manual_seed(seed)`; "
            "per-image generator lists are not reproducible with this stock pipeline."
        )
    result = ExportResult(
        path=Path(out_dir),
        pipeline_class="StableDiffusion3Pipeline",
        kind="stable-diffusion-3",
        timesteps=ts,
        call_kwargs={"sigmas": sigmas, "guidance_scale": 0.0},
        load_kwargs=load_kwargs,
        exact=not multi,
        notes=notes,
    )
    return _save_export(pipe, result, model_card, title, card_path)


def export_stepdistill_pipeline(
    student: StudentLike,
    scheduler: SchedulerConfigLike,
    timesteps: Sequence[float],
    out_dir: str | Path,
    vae: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    tokenizer: Any | None = None,
    null_class_label: int | None = None,
    model_card: bool = True,
    title: str | None = None,
    card_path: str | Path | None = None,
) -> ExportResult:
    """Save a student that has no stock diffusers pipeline (digits, DiT, custom) as a :class:`StepDistillPipeline`.

    Args:
        student: The student network or its :class:`~stepdistill.Denoiser`.
        scheduler: The teacher's scheduler or config (VP -> ``LCMScheduler``, flow -> stochastic flow Euler).
        timesteps: The student's timesteps; stored as the pipeline's ``default_timesteps``.
        out_dir: Output folder.
        vae: Autoencoder of a latent student.
        text_encoder: Text encoder of an SD1.5-like text-conditional student.
        tokenizer: Its tokenizer.
        null_class_label: The null class of a class-conditional student (10 for digits).
        model_card: Write ``README.md``.
        title: Model-card title.
        card_path: The folder the model card's usage loads (default ``out_dir``).

    Example:
        >>> export_stepdistill_pipeline(student, teacher_scheduler(), [999, 499], "out/digits", null_class_label=10)
        >>> StepDistillPipeline.from_pretrained("out/digits")(class_labels=[3]).images[0]
    """
    network, schedule = _split_student(student)
    config = _scheduler_config(scheduler)
    target = NoiseSchedule.from_scheduler_config(config, prediction_type=_prediction_type(schedule))
    if isinstance(target, FlowSchedule):
        sched, _ = flow_scheduler_for_student(config, timesteps, stochastic=True)
        ts = _plain(target.validate_timesteps(timesteps))
        notes = ["Flow student: `FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=1.0)`."]
    else:
        sched = lcm_scheduler_for_student(config, timesteps, prediction_type=target.prediction_type)
        ts = _integer_timesteps(target, timesteps)
        notes = _lcm_notes(sched, ts)
    pipe = StepDistillPipeline(
        unet=network,
        scheduler=sched,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        null_class_label=null_class_label,
        default_timesteps=ts,
        default_guidance_scale=1.0,
    )
    result = ExportResult(
        path=Path(out_dir),
        pipeline_class="StepDistillPipeline",
        kind="stepdistill",
        timesteps=ts,
        call_kwargs={"timesteps": ts},
        notes=notes
        + [
            "Load with `StepDistillPipeline.from_pretrained(path)` (or `DiffusionPipeline.from_pretrained` after "
            "`import stepdistill.pipelines`)."
        ],
    )
    return _save_export(pipe, result, model_card, title, card_path)


def export_student(
    student: StudentLike,
    base: DiffusionPipeline | Mapping[str, Any] | str | Path,
    timesteps: Sequence[float],
    out_dir: str | Path,
    **kwargs: Any,
) -> ExportResult:
    """Export ``student`` to the pipeline its teacher family calls for (see :func:`teacher_kind`).

    SD1.5 / SDXL / SD3-like networks go to the stock pipelines; everything else to a
    :class:`StepDistillPipeline` folder, for which ``base`` is the teacher's scheduler (or config, or a
    mapping with ``scheduler`` and optional ``vae`` / ``text_encoder`` / ``tokenizer`` / ``null_class_label``).
    ``kwargs`` go to the specific export function.
    """
    network, _ = _split_student(student)
    kind = teacher_kind(network)
    if kind == "stable-diffusion":
        return export_stable_diffusion(student, base, timesteps, out_dir, **kwargs)
    if kind == "stable-diffusion-xl":
        return export_stable_diffusion_xl(student, base, timesteps, out_dir, **kwargs)
    if kind == "stable-diffusion-3":
        return export_stable_diffusion_3(student, base, timesteps, out_dir, **kwargs)
    if isinstance(base, Mapping) and "scheduler" in base:
        extra = {k: base[k] for k in ("vae", "text_encoder", "tokenizer", "null_class_label") if k in base}
        return export_stepdistill_pipeline(student, base["scheduler"], timesteps, out_dir, **extra, **kwargs)
    if isinstance(base, DiffusionPipeline):
        parts = base.components
        extra = {k: parts.get(k) for k in ("vae", "text_encoder", "tokenizer")}
        return export_stepdistill_pipeline(student, parts["scheduler"], timesteps, out_dir, **extra, **kwargs)
    return export_stepdistill_pipeline(student, base, timesteps, out_dir, **kwargs)


def _lcm_notes(scheduler: LCMScheduler, timesteps: list[int]) -> list[str]:
    original = scheduler.config.original_inference_steps
    scaling = f"{LCM_TIMESTEP_SCALING:.0e}".replace("e+0", "e")
    notes = [
        f"`LCMScheduler` with `timestep_scaling={scaling}`: its consistency boundary condition becomes the identity "
        "(c_out = 1, c_skip <= 2.5e-13), so each step takes the student's x0 and re-noises it with fresh noise "
        "from the pipeline's `generator`, exactly as stepdistill samples.",
    ]
    if lcm_original_inference_steps(timesteps, scheduler.config.num_train_timesteps) == original:
        notes.append(
            f"`original_inference_steps={original}`: `num_inference_steps={len(timesteps)}` alone also gives "
            f"{timesteps}."
        )
    else:
        notes.append(
            f"LCM's own spacing cannot produce {timesteps}: always pass `timesteps=` (diffusers may warn that the "
            "list is unusual for LCM; it runs it as given)."
        )
    return notes


# ----------------------------------------------------------------------------------------------------
# model card
MODEL_CARD_TEMPLATE = string.Template(
    """---
library_name: diffusers
pipeline_tag: $pipeline_tag
tags:
$tags
---

# $title

A $steps-step student distilled with stepdistill.
This folder is a standard diffusers `$pipeline_class`$needs.

## Usage (exact)

```python
import torch
from diffusers import DiffusionPipeline
$import_extra
pipe = DiffusionPipeline.from_pretrained("$path"$load_args)
$seed_lines
images = pipe($call_args).images
```

The student was trained on the timesteps `$timesteps` and samples them as
*denoise -> re-noise the x0 estimate with fresh noise* (DMD2 / LCM style). Guidance is off:
the student already carries the teacher's guidance.

## Exactness

$exactness

## Files

- `model_index.json`: `$pipeline_class`
- `scheduler/scheduler_config.json`: `$scheduler_class`
$files
"""
)


def write_model_card(
    result: ExportResult, title: str | None = None, folder: str | Path | None = None, path: str | Path | None = None
) -> Path:
    """Write ``README.md`` from :data:`MODEL_CARD_TEMPLATE` and return its path.

    Args:
        result: What the export wrote.
        title: Card title.
        folder: The folder to write into and read the pipeline files from (default ``result.path``; a
            temporary folder while an atomic write is under way).
        path: The folder the usage example loads (default ``result.path``): the final folder, never a temporary one.
    """
    folder = Path(folder) if folder is not None else result.path
    index = json.loads((folder / "model_index.json").read_text())
    scheduler_class = index.get("scheduler", [None, "?"])[1]
    stepdistill = result.kind == "stepdistill"
    call = [_example_inputs(folder, index, stepdistill)]
    seed_lines = "seeds = [0, 1, 2, 3]\ngenerator = [torch.Generator().manual_seed(s) for s in seeds]  # one per image"
    if result.exact:
        call.append("generator=generator")
    else:
        seed_lines = "torch.manual_seed(0)  # re-noising draws come from the global generator (see Exactness)"
    call += [f"{k}={_literal(v)}" for k, v in result.call_kwargs.items()]
    load_args = "".join(f", {k}={_literal(v)}" for k, v in result.load_kwargs.items())
    import_extra = ""
    if stepdistill:
        import_extra = "import stepdistill.pipelines  # registers StepDistillPipeline with diffusers\n"
    needs = " (stepdistill is needed to run it)" if stepdistill else " (stepdistill is not needed to run it)"
    if result.exact:
        exactness = (
            "With one `torch.Generator` per image, image k is the same as stepdistill's "
            "`sample_student(..., generator=make_generators(seeds))` (then the VAE decode for latent models), up to "
            "float32 rounding, at any batch size."
        )
    else:
        exactness = (
            "After `torch.manual_seed(seed)`, the call above gives stepdistill's "
            "`sample_student(..., generator=torch.Generator().manual_seed(seed))` for the whole batch (then the VAE "
            "decode), up to float32 rounding; per-image generator lists are not reproducible (see below)."
        )
    exactness += "\n\n" + "\n".join(f"- {n}" for n in result.notes)
    subfolders = sorted(k for k in index if k != "scheduler" and (folder / k).is_dir())
    files = "\n".join(f"- `{k}/`: `{index[k][1]}`" for k in subfolders)
    text = MODEL_CARD_TEMPLATE.substitute(
        pipeline_tag="text-to-image" if call[0].startswith("prompt") else "unconditional-image-generation",
        tags="\n".join(f"- {tag}" for tag in dict.fromkeys(["stepdistill", "distillation", "few-step", result.kind])),
        title=title or f"{len(result.timesteps)}-step {result.pipeline_class} student",
        steps=len(result.timesteps),
        pipeline_class=result.pipeline_class,
        needs=needs,
        import_extra=import_extra,
        path=str(path if path is not None else result.path),
        load_args=load_args,
        seed_lines=seed_lines,
        call_args=", ".join(call),
        timesteps=result.timesteps,
        exactness=exactness,
        scheduler_class=scheduler_class,
        files=files,
    )
    path = folder / "README.md"
    path.write_text(text)
    return path


def _example_inputs(folder: Path, index: Mapping[str, Any], stepdistill: bool) -> str:
    """The conditioning argument of the example call: prompts, class labels or a batch size."""
    if not stepdistill or (index.get("text_encoder") or [None])[0] is not None:
        return 'prompt=["a photo of a cat"] * 4'
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("num_class_embeds") is not None or config.get("num_embeds_ada_norm") is not None:
        return "class_labels=[0, 1, 2, 3]"
    return "batch_size=4"


def _literal(value: Any) -> str:
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return repr(value)

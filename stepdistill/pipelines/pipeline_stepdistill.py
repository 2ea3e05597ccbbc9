"""``StepDistillPipeline``: one diffusers pipeline for distilled students and their teachers.

The pipeline is a thin, diffusers-shaped shell around stepdistill's samplers (the structure follows
diffusers' ``ConsistencyModelPipeline``): the registered ``scheduler`` carries the noise schedule and
picks the sampler, and all the sampling math lives in :mod:`stepdistill.sampling`: a call runs a one-segment
:class:`~stepdistill.StepPlan` on the network ``"unet"`` (checks, conditioning, latents and decoding come from
:class:`~stepdistill.pipelines.StepDistillPipelineMixin`).

* ``LCMScheduler`` / ``FlowMatchLCMScheduler`` / ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``
  -> the few-step **student** sampler :func:`~stepdistill.sampling.sample_student` (denoise, then re-noise
  the x0 estimate with fresh noise between steps, as DMD2 and LCM do);
* any other scheduler (``DDIMScheduler``, ``EulerDiscreteScheduler``, ``FlowMatchEulerDiscreteScheduler``, ...)
  -> the deterministic **teacher** ODE sampler :func:`~stepdistill.sampling.sample_teacher` (DDIM / Euler) on
  that scheduler's own timestep spacing.

Noise is drawn with diffusers' ``randn_tensor`` in the order ``StableDiffusionPipeline`` + ``LCMScheduler``
draws it (initial latents first, then one draw per re-noising), so a student gives the same images here
and in the stock pipeline it is exported to (:mod:`stepdistill.pipelines.export`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.utils import BaseOutput, logging
from torch import nn

from .mixin import (  # noqa: F401 (re-exported: the names' old home)
    OUTPUT_TYPES,
    STUDENT_SCHEDULERS,
    StepDistillPipelineMixin,
    StepEndCallback,
    _plain_number,
    is_student_scheduler,
)

logger = logging.get_logger(__name__)

#: The teacher ODE's default number of steps when neither ``timesteps`` nor ``num_inference_steps`` is given.
DEFAULT_TEACHER_STEPS = 50

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from stepdistill.pipelines import StepDistillPipeline
        >>> from stepdistill.sampling import make_generators

        >>> pipe = StepDistillPipeline.from_pretrained("runs/digits-dmd2/student")  # a local folder
        >>> images = pipe(class_labels=[3, 7], generator=make_generators([0, 1])).images
        >>> images[0].save("three.png")  # 8x8 grayscale
        ```
"""


@dataclass
class StepDistillPipelineOutput(BaseOutput):
    """Output of :class:`StepDistillPipeline`.

    Args:
        images: ``B`` PIL images (grayscale for 1-channel models), a ``[B, H, W, C]`` float array in
            ``[0, 1]`` (``output_type="np"``), a ``[B, C, H, W]`` tensor in ``[0, 1]`` (``"pt"``), or the
            raw final x0 latents (``"latent"``).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class StepDistillPipeline(DiffusionPipeline, StepDistillPipelineMixin):
    r"""Pipeline for distilled one-/few-step students and for the multi-step teachers they come from.

    Pixel-space or latent (with a ``vae``); unconditional, class-conditional or text-conditional. The
    ``scheduler`` picks the sampler (see :func:`is_student_scheduler`) and supplies the noise schedule and
    prediction type (``NoiseSchedule.from_scheduler_config(scheduler.config)``).

    Classifier-free guidance follows diffusers: it is applied when ``guidance_scale > 1`` as
    ``uncond + w * (cond - uncond)``; any ``guidance_scale <= 1`` means "conditional model only"
    (distilled students are sampled with guidance off). As in diffusers, ``guidance_scale``,
    ``do_classifier_free_guidance``, ``num_timesteps`` and ``cross_attention_kwargs`` report the current (or last)
    call's settings, and ``callback_on_step_end`` may replace the latents.

    Args:
        unet: The denoising network: any model :meth:`Denoiser.from_model <stepdistill.Denoiser.from_model>`
            wraps (``UNet2DModel``, ``UNet2DConditionModel`` incl. SDXL, ``SD3Transformer2DModel``, DiT, or a
            custom module predicting the scheduler's ``prediction_type``).
        scheduler: A diffusers scheduler. Its class selects student or teacher sampling; its config gives
            the noise schedule.
        vae: Optional autoencoder of latent models; the final x0 is decoded from
            ``latents / vae.config.scaling_factor`` (plus ``shift_factor`` / ``latents_mean`` when set).
        text_encoder: Optional CLIP-style text encoder (``encoder_hidden_states = text_encoder(ids)[0]``,
            as ``StableDiffusionPipeline`` does) for SD1.5-like text-conditional models.
        tokenizer: The tokenizer of ``text_encoder``.
        null_class_label: The "no class" label of class-conditional models (needed for guidance).
        default_timesteps: The student's trained timesteps, used when ``__call__`` gets neither
            ``timesteps`` nor a different ``num_inference_steps``.
        default_guidance_scale: Guidance weight used when ``__call__`` gets ``guidance_scale=None``.

    Example:
        >>> from diffusers import LCMScheduler
        >>> from stepdistill.data.digits_models import teacher_scheduler
        >>> pipe = StepDistillPipeline(
        ...     unet=student_unet,
        ...     scheduler=LCMScheduler.from_config(teacher_scheduler().config),
        ...     null_class_label=10,
        ...     default_timesteps=[999, 749, 499, 249],
        ... )
        >>> pipe(class_labels=[3], generator=torch.Generator().manual_seed(0)).images[0]
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        unet: nn.Module,
        scheduler: SchedulerMixin,
        vae: ModelMixin | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any | None = None,
        null_class_label: int | None = None,
        default_timesteps: Optional[list[Union[int, float]]] = None,  # noqa: UP007, UP045 (diffusers type-checks typing.Union only)
        default_guidance_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        if default_timesteps is not None:
            default_timesteps = [_plain_number(t) for t in default_timesteps]
        self.register_to_config(
            null_class_label=None if null_class_label is None else int(null_class_label),
            default_timesteps=default_timesteps,
            default_guidance_scale=float(default_guidance_scale),
        )

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
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> StepDistillPipelineOutput | tuple:
        r"""Generate images.

        Args:
            class_labels: Class label(s) of a class-conditional model; each makes ``num_images_per_prompt`` images.
            prompt: Prompt(s) of a text-conditional model (needs ``text_encoder`` and ``tokenizer``).
            prompt_embeds: Precomputed ``encoder_hidden_states`` ``[N, L, D]`` instead of ``prompt``.
            pooled_prompt_embeds: ``[N, D]`` pooled embeddings (SDXL / SD3-style networks need them).
            negative_prompt: The unconditional prompt for guidance (default ``""``, as in Stable Diffusion).
            negative_prompt_embeds: Precomputed unconditional embeddings (default: the embedding of
                ``negative_prompt``, i.e. of the empty prompt, also when only ``prompt_embeds`` are given; zeros when
                the pipeline has no text encoder).
            negative_pooled_prompt_embeds: Precomputed unconditional pooled embeddings (default: zeros).
            num_images_per_prompt: Images per class label / prompt (adjacent in the output).
            batch_size: Number of images of an unconditional model (default 1).
            height: Image height in pixels (default ``sample_size * vae_scale_factor``).
            width: Image width in pixels.
            num_inference_steps: Number of steps. Students: ``default_timesteps`` when it has that length,
                else the scheduler's own (LCM) spacing; teachers: the scheduler's spacing (default 50).
            timesteps: Explicit strictly decreasing timesteps (overrides everything else).
            guidance_scale: CFG weight ``w``; applied as ``uncond + w (cond - uncond)`` only when ``w > 1``.
                ``None`` uses ``default_guidance_scale``.
            generator: One ``torch.Generator``, or one per image (image ``k`` is then the same at any batch size).
            latents: Starting noise ``[B, C, h, w]`` instead of drawing it from ``generator``.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (pixels in ``[0, 1]``) or ``"latent"`` (raw x0).
            return_dict: Return a :class:`StepDistillPipelineOutput` instead of a tuple.
            callback_on_step_end: Called as ``callback_on_step_end(pipe, i, t, callback_kwargs)`` after each step
                with the requested tensors (``"latents"``: the state after the step -- the next step's input, or the
                final x0 after the last step; ``"denoised"``: the step's x0 estimate). As in diffusers, a
                ``"latents"`` entry of the dict it returns replaces the state (``None`` or no entry: unchanged).
            callback_on_step_end_tensor_inputs: Which tensors the callback receives.
            cross_attention_kwargs: Passed to the network's attention processors on every call (e.g.
                ``{"scale": 0.5}``, the LoRA scale); SD3-style transformers get them as ``joint_attention_kwargs``.

        Returns:
            :class:`StepDistillPipelineOutput` with ``images``, or ``(images,)`` when ``return_dict=False``.
        """
        # 0. Defaults and the plan: one network, student (fresh re-noising) or teacher (deterministic ODE) sampler
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        self._guidance_scale = guidance_scale
        self._do_classifier_free_guidance = guidance_scale > 1.0
        self._cross_attention_kwargs = cross_attention_kwargs
        denoiser = self.denoiser_of(self.unet, self.schedule, cross_attention_kwargs)
        student = self.is_student
        plan = self._single_plan(num_inference_steps, timesteps, "renoise" if student else "ode",
                                 guidance_scale if self.do_classifier_free_guidance else None,
                                 1 if student else DEFAULT_TEACHER_STEPS)  # fmt: skip

        # 1-3. Check inputs, encode the conditioning, starting latents
        cond, x_T = self._prepare_call(
            denoiser, class_labels, prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt,
            negative_prompt_embeds, negative_pooled_prompt_embeds, num_images_per_prompt, batch_size, height, width,
            generator, latents, output_type, callback_on_step_end_tensor_inputs,
        )  # fmt: skip

        # 4. Sample
        x0 = self._sample(plan, {"unet": denoiser}, x_T, cond, generator, callback_on_step_end,
                          callback_on_step_end_tensor_inputs)  # fmt: skip

        # 5. Decode, post-process, offload
        images = self._finish(x0, output_type)
        if not return_dict:
            return (images,)
        return StepDistillPipelineOutput(images=images)


__all__ = ["StepDistillPipeline", "StepDistillPipelineOutput", "is_student_scheduler"]

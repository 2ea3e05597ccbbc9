"""``StepDistillPipeline``: one diffusers pipeline for distilled students and their teachers.

The pipeline is a thin, diffusers-shaped shell around stepdistill's samplers (the structure follows
diffusers' ``ConsistencyModelPipeline``): the registered ``scheduler`` carries the noise schedule and
picks the sampler, and all the sampling math lives in :mod:`stepdistill.sampling`.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.utils import BaseOutput, logging
from torch import nn

from ..conditioning import Conditioning
from ..denoiser import Denoiser, DenoiserOutput
from ..sampling import initial_noise, sample_student, sample_teacher
from ..schedules import NoiseSchedule

logger = logging.get_logger(__name__)

#: Scheduler classes that always mean "few-step student sampling with fresh re-noising".
STUDENT_SCHEDULERS = ("LCMScheduler", "FlowMatchLCMScheduler")

#: The teacher ODE's default number of steps when neither ``timesteps`` nor ``num_inference_steps`` is given.
DEFAULT_TEACHER_STEPS = 50

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

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


def is_student_scheduler(scheduler: SchedulerMixin) -> bool:
    """True when ``scheduler`` asks for few-step student sampling (fresh re-noising between steps).

    That is ``LCMScheduler``, ``FlowMatchLCMScheduler`` and ``FlowMatchEulerDiscreteScheduler`` with
    ``stochastic_sampling=True``; any other scheduler selects the teacher's deterministic ODE sampler.
    """
    name = type(scheduler).__name__
    if name in STUDENT_SCHEDULERS:
        return True
    return name == "FlowMatchEulerDiscreteScheduler" and bool(scheduler.config.get("stochastic_sampling", False))


@dataclass
class StepDistillPipelineOutput(BaseOutput):
    """Output of :class:`StepDistillPipeline`.

    Args:
        images: ``B`` PIL images (grayscale for 1-channel models), a ``[B, H, W, C]`` float array in
            ``[0, 1]`` (``output_type="np"``), a ``[B, C, H, W]`` tensor in ``[0, 1]`` (``"pt"``), or the
            raw final x0 latents (``"latent"``).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class StepDistillPipeline(DiffusionPipeline):
    r"""Pipeline for distilled one-/few-step students and for the multi-step teachers they come from.

    Pixel-space or latent (with a ``vae``); unconditional, class-conditional or text-conditional. The
    ``scheduler`` picks the sampler (see :func:`is_student_scheduler`) and supplies the noise schedule and
    prediction type (``NoiseSchedule.from_scheduler_config(scheduler.config)``).

    Classifier-free guidance follows diffusers: it is applied when ``guidance_scale > 1`` as
    ``uncond + w * (cond - uncond)``; any ``guidance_scale <= 1`` means "conditional model only"
    (distilled students are sampled with guidance off).

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
    _callback_tensor_inputs = ["latents", "denoised"]

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
    # what the registered modules imply
    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule (and prediction type) given by ``scheduler.config``."""
        return NoiseSchedule.from_scheduler_config(dict(self.scheduler.config))

    @property
    def denoiser(self) -> Denoiser:
        """``unet`` wrapped as a stepdistill :class:`~stepdistill.Denoiser`."""
        return Denoiser.from_model(self.unet, self.schedule)

    @property
    def is_student(self) -> bool:
        """True when the scheduler selects few-step student sampling."""
        return is_student_scheduler(self.scheduler)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (1 for pixel-space models)."""
        if getattr(self, "vae", None) is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def num_class_labels(self) -> int | None:
        """How many class labels (null class included) the network embeds, or ``None`` if unknown."""
        config = getattr(self.unet, "config", None)
        if config is None:
            return None
        if getattr(config, "num_class_embeds", None) is not None:
            return int(config.num_class_embeds)
        if getattr(config, "num_embeds_ada_norm", None) is not None:  # DiT: LabelEmbedding adds the null class
            return int(config.num_embeds_ada_norm) + 1
        return None

    def _latent_shape(
        self, total: int, height: int | None, width: int | None, latents: torch.Tensor | None
    ) -> tuple[tuple[int, ...], int, int]:
        """``(latent shape, height, width)`` from the network config; custom networks without one need ``latents``."""
        config = getattr(self.unet, "config", None)
        channels = getattr(config, "in_channels", None)
        size = getattr(config, "sample_size", None)
        factor = self.vae_scale_factor
        if channels is None or (size is None and not (height and width)):
            if latents is None:
                raise ValueError(
                    f"{type(self.unet).__name__} has no config.in_channels / config.sample_size: pass latents=... "
                    "(the starting noise, e.g. stepdistill.initial_noise(shape, generator))."
                )
            return tuple(latents.shape), latents.shape[-2] * factor, latents.shape[-1] * factor
        if size is not None:
            size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
            height = height or size[0] * factor
            width = width or size[1] * factor
        return (total, int(channels), height // factor, width // factor), height, width

    # ------------------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device,
        num_images_per_prompt: int = 1,
    ) -> torch.Tensor:
        """Encode prompts exactly as ``StableDiffusionPipeline`` does (no LoRA scale, no clip skip).

        Returns ``[len(prompt) * num_images_per_prompt, L, D]`` hidden states, images of one prompt adjacent.
        """
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = ids.attention_mask.to(device)
        embeds = self.text_encoder(ids.input_ids.to(device), attention_mask=mask)[0]
        embeds = embeds.to(dtype=self.text_encoder.dtype, device=device)
        return embeds.repeat_interleave(num_images_per_prompt, dim=0)

    def prepare_latents(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Starting noise (``randn_tensor``, like diffusers pipelines), or the given ``latents`` moved to ``device``."""
        if latents is None:
            return initial_noise(shape, generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=dtype)

    def decode_latents(self, x0: torch.Tensor) -> torch.Tensor:
        """Map the final x0 to pixels in ``[-1, 1]``: identity without a VAE, else a VAE decode.

        Latents are un-normalized as the stock pipelines do: ``latents * std / scaling_factor + mean``
        when the VAE config has ``latents_mean``/``latents_std`` (SDXL), else
        ``latents / scaling_factor (+ shift_factor)`` (SD1.5 / SD3).
        """
        if self.vae is None:
            return x0
        config = self.vae.config
        latents = x0.to(self.vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
            if getattr(config, "shift_factor", None) is not None:
                latents = latents + config.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]

    def postprocess(self, pixels: torch.Tensor, output_type: str = "pil"):
        """``[-1, 1]`` pixels -> ``[0, 1]`` in the requested format (grayscale PIL for 1-channel images)."""
        pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return pixels
        array = pixels.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return array
        return self.numpy_to_pil(array)

    # ------------------------------------------------------------------------------------------------
    def check_inputs(
        self,
        denoiser: Denoiser,
        class_labels: torch.Tensor | None,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        batch_size: int | None,
        num_images_per_prompt: int,
        num_inference_steps: int | None,
        timesteps: Sequence[float] | None,
        guidance_scale: float,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        latent_shape: tuple[int, ...],
        output_type: str,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> None:
        """Raise a ``ValueError`` that says what to change when the inputs do not fit this pipeline."""
        model = type(self.unet).__name__
        required, accepted = denoiser.required(), denoiser.accepted()
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; choose one of {list(OUTPUT_TYPES)}.")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}.")

        # class labels
        if class_labels is not None and "class_labels" not in accepted:
            raise ValueError(
                f"class_labels were given but this {model} is not class-conditional "
                f"(it takes {list(accepted) or 'no conditioning'}); drop class_labels."
            )
        if class_labels is None and "class_labels" in required:
            raise ValueError(f"This {model} is class-conditional: pass class_labels=[...] (one label per sample).")
        if class_labels is not None:
            if class_labels.ndim != 1 or class_labels.numel() == 0:
                raise ValueError(
                    f"class_labels must be an int or a non-empty 1-D list, got shape {tuple(class_labels.shape)}."
                )
            n = self.num_class_labels()
            bad = [int(c) for c in class_labels.tolist() if c < 0 or (n is not None and c >= n)]
            if bad:
                raise ValueError(
                    f"Class label(s) {bad} out of range: this {model} embeds labels 0..{n - 1 if n else '?'}"
                    + (
                        f" (null class {self.config.null_class_label})."
                        if self.config.null_class_label is not None
                        else "."
                    )
                )

        # text
        wants_text = "prompt_embeds" in required
        if (prompt is not None or prompt_embeds is not None) and not wants_text:
            raise ValueError(
                f"A prompt was given but this {model} is not text-conditional (it takes {list(accepted) or 'nothing'})."
            )
        if wants_text:
            if prompt is not None and prompt_embeds is not None:
                raise ValueError("Pass either prompt or prompt_embeds, not both.")
            if prompt is None and prompt_embeds is None:
                raise ValueError(f"This {model} is text-conditional: pass prompt=... or prompt_embeds=....")
            if prompt is not None and (self.text_encoder is None or self.tokenizer is None):
                raise ValueError(
                    "prompt needs a text_encoder and a tokenizer in the pipeline; this one has none. "
                    "Pass prompt_embeds (and pooled_prompt_embeds where the model needs them) instead."
                )
            if prompt is not None and not isinstance(prompt, (str, list)):
                raise ValueError(f"prompt must be a str or a list of str, got {type(prompt).__name__}.")
            if "pooled_prompt_embeds" in required and pooled_prompt_embeds is None:
                raise ValueError(
                    f"This {model} also needs pooled text embeddings: pass pooled_prompt_embeds=... "
                    "(compute them with the base pipeline's encode_prompt)."
                )
            if negative_prompt_embeds is not None and prompt_embeds is not None:
                if negative_prompt_embeds.shape != prompt_embeds.shape:
                    raise ValueError(
                        f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have the shape of "
                        f"prompt_embeds {tuple(prompt_embeds.shape)}."
                    )
        if batch_size is not None and (class_labels is not None or wants_text):
            raise ValueError(
                "batch_size is for unconditional models; conditional ones make num_images_per_prompt per condition."
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")

        # guidance
        if guidance_scale > 1 and class_labels is not None and self.config.null_class_label is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} on class labels needs the model's null class: build the pipeline "
                "with null_class_label=... (10 for the digits teacher), or use guidance_scale <= 1."
            )

        # timesteps
        if num_inference_steps is not None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}.")
        if timesteps is not None:
            if num_inference_steps is not None and num_inference_steps != len(timesteps):
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} disagrees with the {len(timesteps)} timesteps given; "
                    "pass only timesteps."
                )
            denoiser.schedule.validate_timesteps(timesteps)

        # randomness and latents
        total = latent_shape[0]
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(
                f"Got a list of {len(generator)} generators for {total} images: pass one generator per image "
                "(e.g. stepdistill.make_generators(seeds)) or a single generator."
            )
        if latents is not None and tuple(latents.shape) != tuple(latent_shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {tuple(latent_shape)}.")

        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; "
                f"choose from {self._callback_tensor_inputs}."
            )

    def _resolve_timesteps(
        self, schedule: NoiseSchedule, num_inference_steps: int | None, timesteps: Sequence[float] | None, device
    ) -> list[float]:
        if timesteps is not None:
            return schedule.validate_timesteps(timesteps)
        default = self.config.default_timesteps
        if default is not None and num_inference_steps in (None, len(default)):
            return schedule.validate_timesteps(default)
        if num_inference_steps is None:
            num_inference_steps = 1 if self.is_student else DEFAULT_TEACHER_STEPS
        # The scheduler's own spacing (LCM's schedule for students, DDIM/Euler/flow spacing for teachers).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        return schedule.validate_timesteps(self.scheduler.timesteps.tolist())

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
        callback_on_step_end: Callable[[DiffusionPipeline, int, float, dict], Any] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> StepDistillPipelineOutput | tuple:
        r"""Generate images.

        Args:
            class_labels: Class label(s) of a class-conditional model; each makes ``num_images_per_prompt`` images.
            prompt: Prompt(s) of a text-conditional model (needs ``text_encoder`` and ``tokenizer``).
            prompt_embeds: Precomputed ``encoder_hidden_states`` ``[N, L, D]`` instead of ``prompt``.
            pooled_prompt_embeds: ``[N, D]`` pooled embeddings (SDXL / SD3-style networks need them).
            negative_prompt: The unconditional prompt for guidance (default ``""``, as in Stable Diffusion).
            negative_prompt_embeds: Precomputed unconditional embeddings (default: zeros).
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
            callback_on_step_end: Called as ``callback_on_step_end(pipe, i, t, tensors)`` after each step with
                the requested tensors (``"latents"``: the state after the step, ``"denoised"``: the x0 estimate).
                It observes the sampler; returned values are ignored (the samplers own their state).
            callback_on_step_end_tensor_inputs: Which tensors the callback receives.

        Returns:
            :class:`StepDistillPipelineOutput` with ``images``, or ``(images,)`` when ``return_dict=False``.
        """
        # 0. Defaults
        denoiser = self.denoiser
        # diffusers' device lookup reads `module.device`, which only its own models have
        device = self._execution_device if isinstance(self.unet, ModelMixin) else denoiser.device
        schedule = denoiser.schedule
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        do_cfg = guidance_scale > 1.0
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        if isinstance(class_labels, (str, list)) and any(isinstance(c, str) for c in np.ravel(class_labels)):
            raise ValueError("class_labels got text: pass prompts as prompt=... (class_labels is the first argument).")
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, dtype=torch.long)
        if isinstance(prompt, str):
            prompt = [prompt]
        if class_labels is not None and class_labels.ndim == 1:
            num_conditions = class_labels.shape[0]
        elif prompt is not None:
            num_conditions = len(prompt)
        elif prompt_embeds is not None:
            num_conditions = prompt_embeds.shape[0]
        else:
            num_conditions = batch_size or 1
        total = num_conditions * num_images_per_prompt
        latent_shape, height, width = self._latent_shape(total, height, width, latents)

        # 1. Check inputs
        self.check_inputs(
            denoiser, class_labels, prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
            batch_size, num_images_per_prompt, num_inference_steps, timesteps, guidance_scale, generator,
            latents, latent_shape, output_type, callback_on_step_end_tensor_inputs,
        )  # fmt: skip

        # 2. Encode the conditioning (and its unconditional twin when guiding)
        cond = self._conditioning(
            denoiser, class_labels, prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt,
            negative_prompt_embeds, negative_pooled_prompt_embeds, num_images_per_prompt, height, width,
            do_cfg, device,
        )  # fmt: skip
        dtype = cond.prompt_embeds.dtype if cond.prompt_embeds is not None else denoiser.dtype

        # 3. Prepare timesteps
        ts = self._resolve_timesteps(schedule, num_inference_steps, timesteps, device)

        # 4. Prepare latents (pure noise, seen by the network at ts[0])
        x_T = self.prepare_latents(latent_shape, dtype, device, generator, latents)

        # 5. Sample: student (denoise -> fresh re-noise) or teacher (deterministic ODE)
        with self.progress_bar(total=len(ts)) as progress_bar:

            def on_step(i: int, t: float, out: DenoiserOutput, x: torch.Tensor) -> None:
                if callback_on_step_end is not None:
                    available = {"latents": x, "denoised": out.x0}
                    tensors = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    callback_on_step_end(self, i, t, tensors)
                progress_bar.update()

            guidance = guidance_scale if do_cfg else None
            if self.is_student:
                x0 = sample_student(
                    denoiser, x_T, cond, timesteps=ts, generator=generator, guidance_scale=guidance, callback=on_step
                )
            else:
                x0 = sample_teacher(denoiser, x_T, cond, timesteps=ts, guidance_scale=guidance, callback=on_step)

        # 6. Decode and post-process
        if output_type == "latent":
            images = x0
        else:
            images = self.postprocess(self.decode_latents(x0), output_type=output_type)

        # 7. Offload all models
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return StepDistillPipelineOutput(images=images)

    def _conditioning(
        self,
        denoiser: Denoiser,
        class_labels: torch.Tensor | None,
        prompt: list[str] | None,
        prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        negative_prompt: str | list[str] | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_pooled_prompt_embeds: torch.Tensor | None,
        num_images_per_prompt: int,
        height: int,
        width: int,
        do_cfg: bool,
        device: torch.device,
    ) -> Conditioning:
        """Build the :class:`~stepdistill.Conditioning` of the whole batch (images of a condition adjacent)."""
        n = num_images_per_prompt
        rep = lambda v: None if v is None else v.to(device).repeat_interleave(n, dim=0)  # noqa: E731
        null = self.config.null_class_label
        if class_labels is not None:
            return Conditioning(class_labels=rep(class_labels), null_class_label=null)
        if prompt is None and prompt_embeds is None:
            return Conditioning()

        if prompt is not None:
            prompt_embeds = self.encode_prompt(prompt, device, n)
            if do_cfg and negative_prompt_embeds is None:
                negative = negative_prompt if negative_prompt is not None else ""
                negative = [negative] * len(prompt) if isinstance(negative, str) else list(negative)
                if len(negative) != len(prompt):
                    raise ValueError(f"Got {len(negative)} negative prompts for {len(prompt)} prompts.")
                negative_prompt_embeds = self.encode_prompt(negative, device, n)
            elif negative_prompt_embeds is not None:
                negative_prompt_embeds = rep(negative_prompt_embeds)
        else:
            prompt_embeds = rep(prompt_embeds)
            negative_prompt_embeds = rep(negative_prompt_embeds)
        pooled = rep(pooled_prompt_embeds)
        time_ids = None
        if "time_ids" in denoiser.required():  # SDXL micro-conditioning: (H, W, 0, 0, H, W), as DMD2 does
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=prompt_embeds.dtype, device=device)
            time_ids = time_ids.repeat(prompt_embeds.shape[0], 1)

        negative = None
        if do_cfg and (negative_prompt_embeds is not None or negative_pooled_prompt_embeds is not None):
            neg_embeds = (
                negative_prompt_embeds if negative_prompt_embeds is not None else torch.zeros_like(prompt_embeds)
            )
            neg_pooled = rep(negative_pooled_prompt_embeds)
            if pooled is not None and neg_pooled is None:
                neg_pooled = torch.zeros_like(pooled)
            negative = Conditioning(prompt_embeds=neg_embeds, pooled_prompt_embeds=neg_pooled, time_ids=time_ids)
        return Conditioning(
            prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, time_ids=time_ids, negative=negative
        )


def _plain_number(t: float | int) -> float | int:
    """``999.0 -> 999`` so integral timesteps stay integers in ``model_index.json``."""
    t = float(t)
    return int(t) if t.is_integer() else t

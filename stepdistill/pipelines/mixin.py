"""``StepDistillPipelineMixin``: what every stepdistill pipeline shares, around one :class:`~stepdistill.StepPlan`.

A stepdistill pipeline is a diffusers ``DiffusionPipeline`` whose ``__call__`` has the same shape every time
(the numbered sections of diffusers' ``ConsistencyModelPipeline``):

0. resolve its defaults and its :class:`~stepdistill.StepPlan` (which network runs which timesteps);
1. check the inputs, 2. encode the conditioning (class labels, prompts or precomputed embeddings), 3. draw the
   starting latents -- :meth:`StepDistillPipelineMixin._prepare_call`;
4. run the plan with the step callback and progress bar -- :meth:`StepDistillPipelineMixin._sample`;
5. decode and post-process -- :meth:`StepDistillPipelineMixin._finish`.

The mixin expects the component names of the stock pipelines: ``scheduler`` (the noise schedule of ``unet``),
optional ``vae``, ``text_encoder`` and ``tokenizer``, and a config key ``null_class_label``; the network that sees
the starting latents is passed in explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import ModelMixin, SchedulerMixin
from torch import nn

from ..conditioning import Conditioning
from ..denoiser import (
    Denoiser,
    DenoiserOutput,
    _casting_dtype,
    diffusers_hook,
)
from ..sampling import Generator, StepPlan, initial_noise, run_step_plan
from ..schedules import NoiseSchedule

#: Scheduler classes that always mean "few-step student sampling with fresh re-noising".
STUDENT_SCHEDULERS = ("LCMScheduler", "FlowMatchLCMScheduler")

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

#: Component names of each pipeline class, in ``__init__`` order (what diffusers' ``device`` iterates).
_SIGNATURE_KEYS: dict[type, tuple[str, ...]] = {}

#: ``callback_on_step_end(pipe, i, t, callback_kwargs) -> dict | None``, as in diffusers.
StepEndCallback = Callable[[Any, int, float, dict], Any]


def is_student_scheduler(scheduler: SchedulerMixin) -> bool:
    """True when ``scheduler`` asks for few-step student sampling (fresh re-noising between steps).

    That is ``LCMScheduler``, ``FlowMatchLCMScheduler`` and ``FlowMatchEulerDiscreteScheduler`` with
    ``stochastic_sampling=True``; any other scheduler selects the teacher's deterministic ODE sampler.
    """
    name = type(scheduler).__name__
    if name in STUDENT_SCHEDULERS:
        return True
    return name == "FlowMatchEulerDiscreteScheduler" and bool(scheduler.config.get("stochastic_sampling", False))


class StepDistillPipelineMixin:
    r"""Input checks, conditioning, latents, decoding and the sampling loop shared by stepdistill pipelines.

    Mixed into a ``DiffusionPipeline`` (``class MyPipeline(DiffusionPipeline, StepDistillPipelineMixin)``) that
    registers ``unet`` / ``scheduler`` (plus optional ``vae``, ``text_encoder``, ``tokenizer``) and a
    ``null_class_label`` config key. Its ``__call__`` resolves a :class:`~stepdistill.StepPlan`, sets
    ``self._guidance_scale`` / ``self._do_classifier_free_guidance`` / ``self._cross_attention_kwargs``, then calls
    :meth:`_prepare_call`, :meth:`_sample` and :meth:`_finish`.

    Example:
        >>> class OneNetworkPipeline(DiffusionPipeline, StepDistillPipelineMixin):
        ...     def __call__(self, class_labels, timesteps, generator=None):
        ...         self._guidance_scale, self._do_classifier_free_guidance = 1.0, False
        ...         denoiser = self.denoiser
        ...         cond, latents = self._prepare_call(denoiser, class_labels, None, None, None, None, None, None,
        ...                                            1, None, None, None, generator, None, "pt", ())
        ...         plan = StepPlan.single("unet", timesteps, sampler="renoise")
        ...         x0 = self._sample(plan, {"unet": denoiser}, latents, cond, generator, None, ())
        ...         return self._finish(x0, "pt")
    """

    _callback_tensor_inputs = ["latents", "denoised"]

    # ------------------------------------------------------------------------------------------------
    # diffusers' call-state properties, set by __call__
    @property
    def guidance_scale(self) -> float:
        """The guidance weight ``w`` of the current (or last) call; ``default_guidance_scale`` before any call."""
        return getattr(self, "_guidance_scale", self.config.default_guidance_scale)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current (or last) call runs classifier-free guidance on any of its networks."""
        return getattr(self, "_do_classifier_free_guidance", self.guidance_scale > 1)

    @property
    def num_timesteps(self) -> int | None:
        """Network steps of the current (or last) call (``None`` before any call)."""
        return getattr(self, "_num_timesteps", None)

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        """The ``cross_attention_kwargs`` of the current (or last) call."""
        return getattr(self, "_cross_attention_kwargs", None)

    # ------------------------------------------------------------------------------------------------
    # what the registered modules imply
    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule (and prediction type) of ``unet``, given by ``scheduler.config``."""
        return self.schedule_of(self.scheduler)

    def schedule_of(self, scheduler: SchedulerMixin) -> NoiseSchedule:
        """``NoiseSchedule.from_scheduler_config(scheduler.config)``, built once per scheduler configuration.

        diffusers configs are frozen (``register_to_config`` and a new scheduler both make a new config object), so
        a schedule is kept while ``scheduler.config`` is the same object; building one costs a ``DDPMScheduler``.
        """
        config = scheduler.config
        cache = self.__dict__.setdefault("_stepdistill_schedules", {})
        cached = cache.get(id(config))
        if cached is None or cached[0] is not config:
            if len(cache) >= 8:  # schedulers swapped many times: start over rather than keep old configs alive
                cache.clear()
            cached = cache[id(config)] = (config, NoiseSchedule.from_scheduler_config(dict(config)))
        return cached[1]

    @property
    def denoiser(self) -> Denoiser:
        """``unet`` wrapped as a stepdistill :class:`~stepdistill.Denoiser`."""
        return Denoiser.from_model(self.unet, self.schedule)

    def denoiser_of(
        self, network: nn.Module, schedule: NoiseSchedule, attention_kwargs: dict[str, Any] | None = None
    ) -> Denoiser:
        """``Denoiser.from_model(network, schedule, attention_kwargs=...)``, kept between calls.

        A wrapper is reused while it wraps this very ``network`` with this very ``schedule`` (both looked up by
        identity on every call): replacing a component (``pipe.unet = ...``, ``register_modules``) or the scheduler's
        config (a new schedule, :meth:`schedule_of`) makes a new one, and a replaced component's wrappers are dropped
        at once (:meth:`__setattr__`), so they do not keep the old network alive. Calls with attention kwargs get a
        new wrapper (the kwargs are the caller's, possibly changed between calls). The call pins the wrapper's
        compute dtype afresh (:meth:`_device_of`).
        """
        if attention_kwargs:
            return Denoiser.from_model(network, schedule, attention_kwargs=attention_kwargs)
        cache = self.__dict__.setdefault("_stepdistill_denoisers", {})
        key = (id(network), id(schedule))
        denoiser = cache.get(key)
        if denoiser is None or denoiser.model is not network or denoiser.schedule is not schedule:
            if len(cache) >= 16:  # many scheduler configs over time: start over rather than keep old schedules
                cache.clear()
            denoiser = cache[key] = Denoiser.from_model(network, schedule)
        return denoiser

    def __setattr__(self, name: str, value: Any) -> None:
        """Set an attribute; replacing a component drops the denoisers kept around the old one (:meth:`denoiser_of`).

        diffusers' ``DiffusionPipeline.__setattr__`` (which ``register_modules`` and ``pipe.unet = ...`` go through)
        hands on to this one with ``super()``.
        """
        cache = self.__dict__.get("_stepdistill_denoisers")
        if cache:
            old = self.__dict__.get(name)
            if old is not None and old is not value:
                for key in [k for k, d in cache.items() if d.model is old]:
                    del cache[key]
        super().__setattr__(name, value)

    @property
    def is_student(self) -> bool:
        """True when ``scheduler`` selects few-step student sampling (fresh re-noising between steps)."""
        return is_student_scheduler(self.scheduler)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (1 for pixel-space models)."""
        if getattr(self, "vae", None) is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def num_class_labels(self, network: nn.Module | None = None) -> int | None:
        """How many class labels (null class included) ``network`` (default ``unet``) embeds, or ``None``."""
        config = getattr(self.unet if network is None else network, "config", None)
        if config is None:
            return None
        if getattr(config, "num_class_embeds", None) is not None:
            return int(config.num_class_embeds)
        if getattr(config, "num_embeds_ada_norm", None) is not None:  # DiT: LabelEmbedding adds the null class
            return int(config.num_embeds_ada_norm) + 1
        return None

    def _component_names(self) -> tuple[str, ...]:
        """The pipeline's component names, in ``__init__`` order (diffusers reads the signature on every access)."""
        names = _SIGNATURE_KEYS.get(type(self))
        if names is None:
            names = _SIGNATURE_KEYS[type(self)] = tuple(self._get_signature_keys(self)[0])
        return names

    def _device_of(self, denoiser: Denoiser) -> torch.device:
        """The device a call runs on (evaluated once per call): diffusers' ``_execution_device``, without its cost.

        diffusers' property walks every module of every component three times looking for offload hooks (about
        3 ms for the digits UNet on a CPU: half the one-step student's forward at batch 1). Here one walk of the
        module trees finds whether any accelerate or group-offloading hook is present -- only then is
        ``_execution_device`` read (its answer is the hooks' execution device) -- and, on the same walk, the
        compute dtype of ``denoiser``'s network (diffusers' layerwise casting), which is pinned on ``denoiser`` for
        the call, so that its forward does not walk the network again. The walk runs on every call (hooks and
        casting can be added to any submodule between calls; nothing signals it), and so does the pinning (the
        pipeline keeps its denoisers between calls). Without hooks the answer is diffusers' ``device`` rule: the
        first component on an accelerator, else the first component's device. Networks that are not diffusers
        models (diffusers' lookup reads ``module.device``, which only its own models have) give their own device.
        """
        if not isinstance(denoiser.model, ModelMixin):
            return denoiser.device
        modules = [m for m in (getattr(self, n, None) for n in self._component_names()) if isinstance(m, nn.Module)]
        scans = [_scan(m) for m in modules]
        network, compute_dtype = denoiser.model, None
        for component, (_, casting, first) in zip(modules, scans):
            if component is network:
                parameter_dtype = first.dtype if first is not None else torch.float32
                compute_dtype = casting if casting is not None else parameter_dtype
                break
        denoiser.compute_dtype = compute_dtype  # None (looked up per forward) for a network that is no component
        if any(hooked for hooked, _, _ in scans):
            return self._execution_device
        devices = [first.device if first is not None else torch.device("cpu") for _, _, first in scans]
        return next((d for d in devices if d.type not in ("cpu", "meta")), devices[0] if devices else denoiser.device)

    def _latent_shape(
        self, network: nn.Module, total: int, height: int | None, width: int | None, latents: torch.Tensor | None
    ) -> tuple[tuple[int, ...], int, int]:
        """``(latent shape, height, width)`` from the network config; custom networks without one need ``latents``."""
        config = getattr(network, "config", None)
        channels = getattr(config, "in_channels", None)
        size = getattr(config, "sample_size", None)
        factor = self.vae_scale_factor
        if channels is None or (size is None and not (height and width)):
            if latents is None:
                raise ValueError(
                    f"{type(network).__name__} has no config.in_channels / config.sample_size: pass latents=... "
                    "(the starting noise, e.g. stepdistill.initial_noise(shape, generator))."
                )
            return tuple(latents.shape), latents.shape[-2] * factor, latents.shape[-1] * factor
        if size is not None:
            size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
            height = height or size[0] * factor
            width = width or size[1] * factor
        return (total, int(channels), height // factor, width // factor), height, width

    def _resolve_timesteps(
        self, num_inference_steps: int | None, timesteps: Sequence[float] | None, default_steps: int
    ) -> list[float]:
        """``unet``'s timesteps, validated on its schedule.

        Explicit ``timesteps``; else the trained ``default_timesteps`` (when ``num_inference_steps`` is unset or
        equals their count); else ``scheduler``'s own spacing for ``num_inference_steps`` (default ``default_steps``).
        """
        _check_count("num_inference_steps", num_inference_steps)
        schedule = self.schedule
        if timesteps is not None:
            if num_inference_steps is not None and num_inference_steps != len(timesteps):
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} disagrees with the {len(timesteps)} timesteps given; "
                    "pass only timesteps."
                )
            return schedule.validate_timesteps(timesteps)
        default = self.config.default_timesteps
        if default is not None and num_inference_steps in (None, len(default)):
            return schedule.validate_timesteps(default)
        self.scheduler.set_timesteps(num_inference_steps or default_steps)
        return schedule.validate_timesteps(self.scheduler.timesteps.tolist())

    def _single_plan(
        self,
        num_inference_steps: int | None,
        timesteps: Sequence[float] | None,
        sampler: str,
        guidance_scale: float | None,
        default_steps: int,
    ) -> StepPlan:
        """``StepPlan.single("unet", ...)`` on :meth:`_resolve_timesteps`, kept between calls where it can be.

        A plan from explicit ``timesteps`` or the trained ``default_timesteps`` depends only on the call's arguments,
        the pipeline's config (``default_timesteps``) and the scheduler's config (its schedule checks the timesteps):
        it is kept per arguments while both configs are the same objects (diffusers makes a new config object on
        every ``register_to_config``, ``register_modules`` or component replacement). A plan from the scheduler's
        own spacing is built on every call, as ``set_timesteps`` (whose state the scheduler keeps) runs then.
        """
        key = _plan_key(num_inference_steps, timesteps, sampler, guidance_scale, default_steps)
        default = self.config.default_timesteps
        if key is None or (timesteps is None and (default is None or num_inference_steps not in (None, len(default)))):
            ts = self._resolve_timesteps(num_inference_steps, timesteps, default_steps)
            return StepPlan.single("unet", ts, sampler, guidance_scale)
        configs = (self.config, self.scheduler.config)
        cached = self.__dict__.get("_stepdistill_plans")
        if cached is None or cached[0][0] is not configs[0] or cached[0][1] is not configs[1] or len(cached[1]) >= 32:
            cached = self.__dict__["_stepdistill_plans"] = (configs, {})
        plan = cached[1].get(key)
        if plan is None:
            ts = self._resolve_timesteps(num_inference_steps, timesteps, default_steps)
            plan = cached[1][key] = StepPlan.single("unet", ts, sampler, guidance_scale)
        return plan

    # ------------------------------------------------------------------------------------------------
    # conditioning
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = False,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode prompts as ``StableDiffusionPipeline.encode_prompt`` does (no LoRA scale, no clip skip).

        Given ``prompt_embeds`` / ``negative_prompt_embeds`` are used as they are. With guidance and no
        ``negative_prompt_embeds``, the unconditional embedding is the text encoder's embedding of
        ``negative_prompt`` (default ``""``, the empty prompt, as Stable Diffusion does), also when only
        ``prompt_embeds`` are given; a pipeline without a text encoder uses zeros.

        Returns:
            ``(prompt_embeds, negative_prompt_embeds)``, each ``[N * num_images_per_prompt, L, D]`` with the images
            of one prompt adjacent; ``negative_prompt_embeds`` is ``None`` without guidance unless given.
        """
        n = num_images_per_prompt
        if prompt is None and prompt_embeds is None:
            raise ValueError("encode_prompt needs prompt=... or prompt_embeds=....")
        if prompt_embeds is None:
            prompt_embeds = self._encode_text([prompt] if isinstance(prompt, str) else list(prompt), device)
        prompt_embeds = prompt_embeds.to(device)
        batch = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if getattr(self, "text_encoder", None) is None or getattr(self, "tokenizer", None) is None:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            else:
                negative = "" if negative_prompt is None else negative_prompt
                negative = [negative] * batch if isinstance(negative, str) else list(negative)
                if len(negative) != batch:
                    raise ValueError(f"Got {len(negative)} negative prompts for {batch} prompts.")
                negative_prompt_embeds = self._encode_text(negative, device, max_length=prompt_embeds.shape[1])
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = _repeat(negative_prompt_embeds.to(device), n)
        return _repeat(prompt_embeds, n), negative_prompt_embeds

    def _encode_text(self, prompts: list[str], device: torch.device, max_length: int | None = None) -> torch.Tensor:
        """``text_encoder(ids)[0]`` of ``prompts`` padded to ``max_length`` (default: the tokenizer's)."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=max_length or self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = ids.attention_mask.to(device)
        embeds = self.text_encoder(ids.input_ids.to(device), attention_mask=mask)[0]
        return embeds.to(dtype=self.text_encoder.dtype, device=device)

    # ------------------------------------------------------------------------------------------------
    # latents in, pixels out
    def prepare_latents(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        generator: Generator,
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

    def postprocess(self, pixels: torch.Tensor, output_type: str = "pil") -> Any:
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
        negative_prompt: str | list[str] | None,
        negative_prompt_embeds: torch.Tensor | None,
        batch_size: int | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        generator: Generator,
        latents: torch.Tensor | None,
        latent_shape: tuple[int, ...],
        output_type: str,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> None:
        """Raise a ``ValueError`` that says what to change when the inputs do not fit ``denoiser``'s network."""
        model = type(denoiser.model).__name__
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
            n = self.num_class_labels(denoiser.model)
            bad = [int(c) for c in class_labels.tolist() if c < 0 or (n is not None and c >= n)]
            if bad:
                null = self.config.null_class_label
                raise ValueError(
                    f"Class label(s) {bad} out of range: this {model} embeds labels 0..{n - 1 if n else '?'}"
                    + (f" (null class {null})." if null is not None else ".")
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
            no_encoder = self.text_encoder is None or self.tokenizer is None
            if (prompt is not None or negative_prompt is not None) and no_encoder:
                raise ValueError(
                    "prompt / negative_prompt need a text_encoder and a tokenizer in the pipeline; this one has none. "
                    "Pass prompt_embeds / negative_prompt_embeds (and pooled_prompt_embeds where the model needs them)."
                )
            if prompt is not None and not isinstance(prompt, (str, list)):
                raise ValueError(f"prompt must be a str or a list of str, got {type(prompt).__name__}.")
            if negative_prompt is not None and negative_prompt_embeds is not None:
                raise ValueError("Pass either negative_prompt or negative_prompt_embeds, not both.")
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
        if do_classifier_free_guidance and class_labels is not None and self.config.null_class_label is None:
            raise ValueError(
                "Classifier-free guidance (guidance_scale > 1) on class labels needs the model's null class: build "
                "the pipeline with null_class_label=... (10 for the digits teacher), or use guidance_scale <= 1."
            )

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

    # ------------------------------------------------------------------------------------------------
    # the three parts of every __call__
    def _prepare_call(
        self,
        denoiser: Denoiser,
        class_labels: int | list[int] | torch.Tensor | None,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        negative_prompt: str | list[str] | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_pooled_prompt_embeds: torch.Tensor | None,
        num_images_per_prompt: int,
        batch_size: int | None,
        height: int | None,
        width: int | None,
        generator: Generator,
        latents: torch.Tensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> tuple[Conditioning, torch.Tensor]:
        """Sections 1-3 of ``__call__``: check the inputs, encode the conditioning, draw the starting latents.

        ``denoiser`` is the network that sees the starting latents (its config gives their shape; the checks and
        the conditioning follow what it requires). Guidance follows ``self.do_classifier_free_guidance``.

        Returns:
            ``(cond, latents)``: the batch's :class:`~stepdistill.Conditioning` and its starting noise.
        """
        device = self._device_of(denoiser)
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
        latent_shape, height, width = self._latent_shape(denoiser.model, total, height, width, latents)
        do_cfg = self.do_classifier_free_guidance

        # 1. Check inputs
        self.check_inputs(
            denoiser, class_labels, prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt,
            negative_prompt_embeds, batch_size, num_images_per_prompt, do_cfg, generator, latents, latent_shape,
            output_type, callback_on_step_end_tensor_inputs,
        )  # fmt: skip

        # 2. Encode the conditioning of the whole batch (images of a condition adjacent) and, when guiding, its
        # unconditional twin: the null class, or the negative prompt's embeddings (zeros for pooled embeddings)
        n = num_images_per_prompt
        rep = lambda v: None if v is None else _repeat(v.to(device), n)  # noqa: E731
        if class_labels is not None:
            cond = Conditioning(class_labels=rep(class_labels), null_class_label=self.config.null_class_label)
        elif prompt is None and prompt_embeds is None:
            cond = Conditioning()
        else:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt, device, n, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds
            )
            pooled, time_ids, negative = rep(pooled_prompt_embeds), None, None
            if "time_ids" in denoiser.required():  # SDXL micro-conditioning: (H, W, 0, 0, H, W), as DMD2 does
                size = [[height, width, 0, 0, height, width]]
                time_ids = torch.tensor(size, dtype=prompt_embeds.dtype, device=device).repeat(len(prompt_embeds), 1)
            if do_cfg:
                neg_pooled = rep(negative_pooled_prompt_embeds)
                if pooled is not None and neg_pooled is None:
                    neg_pooled = torch.zeros_like(pooled)
                negative = Conditioning(
                    prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=neg_pooled, time_ids=time_ids
                )
            cond = Conditioning(
                prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, time_ids=time_ids, negative=negative
            )

        # 3. Starting latents (pure noise, seen by the plan's first step)
        dtype = cond.prompt_embeds.dtype if cond.prompt_embeds is not None else denoiser.dtype
        return cond, self.prepare_latents(latent_shape, dtype, device, generator, latents)

    def _sample(
        self,
        plan: StepPlan,
        denoisers: Mapping[str, Denoiser],
        latents: torch.Tensor,
        cond: Conditioning,
        generator: Generator,
        callback_on_step_end: StepEndCallback | None,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> torch.Tensor:
        """Section 4 of ``__call__``: run ``plan`` (:func:`~stepdistill.run_step_plan`) with a progress bar.

        After every step ``callback_on_step_end(self, i, t, callback_kwargs)`` gets the requested tensors
        (``"latents"``: the state after the step, i.e. the next step's input or, after the last step, the final
        x0; ``"denoised"``: the step's x0 estimate). As in diffusers, a ``"latents"`` entry of the dict it returns
        replaces the state.
        """
        self._num_timesteps = plan.num_steps
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs  # diffusers' convention
        with self._progress(plan.num_steps) as progress_bar:

            def on_step(i: int, t: float, out: DenoiserOutput, x: torch.Tensor) -> torch.Tensor | None:
                replaced = None
                if callback_on_step_end is not None:
                    available = {"latents": x, "denoised": out.x0}
                    callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs if k in available}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    replaced = (callback_outputs or {}).pop("latents", None)
                progress_bar.update()
                return replaced

            return run_step_plan(plan, denoisers, latents, cond, generator, on_step)

    def _progress(self, total: int) -> Any:
        """Diffusers' ``progress_bar(total=...)``, or a bar that draws nothing when it is disabled.

        ``set_progress_bar_config(disable=True)`` still makes diffusers build a ``tqdm`` object (through a
        ``torch.compiler.disable`` wrapper) on every call; a disabled bar here is a plain object.
        """
        config = getattr(self, "_progress_bar_config", None)
        if isinstance(config, dict) and config.get("disable") is True:
            return _NoProgressBar()
        return self.progress_bar(total=total)

    def _free_model_hooks(self) -> None:
        """Diffusers' ``maybe_free_model_hooks``, without its per-call signature inspection when nothing is offloaded.

        diffusers resets the stateful caches of the components (``_reset_stateful_cache``), then, after
        ``enable_model_cpu_offload``, offloads the models and re-installs the hooks. Its components come from an
        ``inspect.signature`` of ``__init__`` on every call; here from the names read once per class. With model
        offload hooks installed, diffusers' own method runs.
        """
        if getattr(self, "_all_hooks", None):
            self.maybe_free_model_hooks()
            return
        for name in self._component_names():
            component = getattr(self, name, None)
            # the class's method or an instance attribute: what hasattr finds, without a failing __getattr__ each
            if component is not None and (hasattr(type(component), "_reset_stateful_cache")
                                          or "_reset_stateful_cache" in getattr(component, "__dict__", ())):
                component._reset_stateful_cache()

    def _finish(self, x0: torch.Tensor, output_type: str) -> Any:
        """Section 5 of ``__call__``: decode and post-process the final x0, then offload the models."""
        images = x0 if output_type == "latent" else self.postprocess(self.decode_latents(x0), output_type=output_type)
        self._free_model_hooks()
        return images


class _NoProgressBar:
    """What a disabled progress bar does: nothing (a context manager with ``update``)."""

    def __enter__(self) -> _NoProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        """Count nothing."""


# ----------------------------------------------------------------------------------------------------
def _scan(component: nn.Module) -> tuple[bool, torch.dtype | None, torch.Tensor | None]:
    """What a call needs to know of ``component``, from one walk of its module tree.

    Returns ``(hooked, casting, first)``: whether an accelerate or group-offloading hook sits anywhere in it; the
    compute dtype of its first layerwise-casting hook in ``modules()`` order (``None`` without one); and its first
    parameter in ``parameters()`` order (``None`` without one), whose dtype and device are the component's. An
    explicit stack over ``_modules`` (pre-order, as :func:`~stepdistill.denoiser.submodules`), with the checks made
    as each module is popped: no list of the modules, no generator per level, no second walk for the parameter.
    """
    hooked, casting, first = False, None, None
    stack = [component]
    pop, push = stack.pop, stack.extend
    while stack:
        module = pop()
        if module is None:  # a child registered as None
            continue
        attributes = module.__dict__
        if "_hf_hook" in attributes:
            hooked = True
        elif "_diffusers_hook" in attributes:
            hooked = hooked or diffusers_hook(module, "group_offloading") is not None
            casting = _casting_dtype(module) if casting is None else casting
        if first is None and attributes.get("_parameters"):
            first = next((p for p in attributes["_parameters"].values() if p is not None), None)
        children = attributes.get("_modules")
        if children:
            push(reversed(children.values()))
    return hooked, casting, first


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    """Each row ``n`` times, adjacent (``repeat_interleave``); ``x`` itself for ``n = 1`` (nothing writes into it)."""
    return x if n == 1 else x.repeat_interleave(n, dim=0)


def _plan_key(
    num_inference_steps: Any, timesteps: Any, sampler: str, guidance_scale: float | None, default_steps: int
) -> tuple | None:
    """The arguments a one-network plan is built from, as a key; ``None`` for anything but plain numbers."""
    plain = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if num_inference_steps is not None and not plain(num_inference_steps):
        return None
    if timesteps is not None and not (isinstance(timesteps, (list, tuple)) and all(plain(t) for t in timesteps)):
        return None
    return num_inference_steps, None if timesteps is None else tuple(timesteps), sampler, guidance_scale, default_steps


def _check_count(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _plain_number(t: float | int) -> float | int:
    """``999.0 -> 999`` so integral timesteps stay integers in ``model_index.json``."""
    t = float(t)
    return int(t) if t.is_integer() else t

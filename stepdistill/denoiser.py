"""One denoiser interface over every teacher kind: ``D(x_t, t, cond) -> (x0, eps)``.

A :class:`Denoiser` owns a network and a :class:`~stepdistill.schedules.NoiseSchedule`; subclasses only
know how to *call* their network (argument names, added conditioning, learned-variance outputs).
Everything downstream -- samplers, DMD losses, evaluation -- sees x0 / eps and never the raw output.

Classifier-free guidance lives in :func:`cfg` / :func:`guided_denoise` with the single convention
``uncond + w * (cond - uncond)`` (``w = 1``: conditional only, ``w = 0``: unconditional).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .conditioning import Conditioning
from .schedules import NoiseSchedule, TimestepLike, _is_number, check_prediction_type


@dataclass
class DenoiserOutput:
    """The output of a :class:`Denoiser`.

    Args:
        x0: Estimate of the clean sample (float32 or float64).
        eps: Estimate of the noise.
        model_output: The raw network output (its own parameterization), or ``None`` after guidance.
    """

    x0: torch.Tensor
    eps: torch.Tensor
    model_output: torch.Tensor | None = None


def cfg(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance, the one convention of stepdistill: ``uncond + w * (cond - uncond)``.

    ``w = 1`` is the conditional prediction, ``w = 0`` the unconditional one. Code written as
    ``cond + s * (cond - uncond)`` (FastVideo, CausVid) corresponds to ``w = 1 + s``.
    """
    return uncond + guidance_scale * (cond - uncond)


def submodules(model: nn.Module) -> list[nn.Module]:
    """``model`` and every submodule, in the order of ``model.modules()`` (shared modules listed once per parent).

    An explicit stack over ``_modules`` instead of torch's recursive generators: this is what the per-call hook
    lookups below walk, and it costs a fraction of ``modules()`` (no prefix strings, no memo set, no generator per
    level), which matters when a one-step student's whole call is a few milliseconds.
    """
    out, stack = [], [model]
    while stack:
        module = stack.pop()
        out.append(module)
        children = module.__dict__.get("_modules")
        if children:
            stack.extend(reversed([m for m in children.values() if m is not None]))
    return out


def diffusers_hook(module: nn.Module, name: str) -> Any:
    """The diffusers hook ``name`` (``"layerwise_casting"``, ``"group_offloading"``) on ``module`` itself, or None."""
    registry = module.__dict__.get("_diffusers_hook")
    return registry.get_hook(name) if registry is not None else None


def _casting_dtype(module: nn.Module) -> torch.dtype | None:
    """The compute dtype of a diffusers layerwise-casting hook on ``module`` itself, or ``None``."""
    if "_diffusers_hook" not in module.__dict__:
        return None
    hook = diffusers_hook(module, "layerwise_casting")
    return hook.compute_dtype if hook is not None else None


def _parameter_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the network computes in (what inputs and conditioning are cast to).

    Under diffusers' layerwise casting (``enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
    compute_dtype=torch.bfloat16)``) the weights are *stored* in float8 and cast up to the compute dtype around each
    layer; the casting hook records that compute dtype, which is what inputs must be cast to. Otherwise it is the
    first parameter's dtype (float32 for parameter-free callables).
    """
    if not isinstance(model, nn.Module):
        return torch.float32
    for module in submodules(model):  # the hook sits on each cast layer (diffusers' get_parameter_dtype reads it)
        dtype = _casting_dtype(module)
        if dtype is not None:
            return dtype
    return _parameter_dtype(model)


def _model_device(model: nn.Module) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


class Denoiser(nn.Module):
    """Base wrapper: calls the network and converts its output to ``(x0, eps)``.

    Use :meth:`from_model` to wrap a diffusers model or a custom module.

    Args:
        model: The network.
        schedule: Its noise schedule (which also fixes the prediction type).
        attention_kwargs: Keyword arguments for the network's attention processors, passed on every call as the
            network names them (``cross_attention_kwargs`` of UNets and DiTs, ``joint_attention_kwargs`` of SD3),
            e.g. ``{"scale": 0.5}`` for the LoRA scale; diffusers pipelines' ``cross_attention_kwargs``.

    Example:
        >>> den = Denoiser.from_model(unet, schedule)
        >>> out = den(x_t, 999, Conditioning(class_labels=labels, null_class_label=10))
        >>> out.x0.shape == x_t.shape
        True
    """

    #: Conditioning fields this kind of network requires / accepts.
    required_fields: tuple[str, ...] = ()
    accepted_fields: tuple[str, ...] = ()
    #: The network's keyword for attention kwargs (``None``: it takes none).
    attention_kwargs_argument: str | None = None

    def __init__(
        self, model: nn.Module, schedule: NoiseSchedule, attention_kwargs: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(
                f"schedule must be a stepdistill NoiseSchedule, got {type(schedule).__name__}; build one with "
                "NoiseSchedule.from_scheduler_config(scheduler.config)."
            )
        self.model = model
        self.schedule = schedule
        if attention_kwargs and self.attention_kwargs_argument is None:
            raise ValueError(
                f"{type(model).__name__} takes no attention kwargs (got {sorted(attention_kwargs)}); drop "
                "cross_attention_kwargs for this network."
            )
        self.attention_kwargs = dict(attention_kwargs) if attention_kwargs else None
        #: The compute dtype when fixed by the caller (a pipeline call that has already walked the network);
        #: ``None``: looked up on every call, as the network may be cast or hooked between calls.
        self.compute_dtype: torch.dtype | None = None

    @property
    def prediction_type(self) -> str:
        """The network's prediction type (from the schedule)."""
        return self.schedule.prediction_type

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the wrapped network computes in (the compute dtype under diffusers' layerwise casting)."""
        return self.compute_dtype if self.compute_dtype is not None else _model_dtype(self.model)

    @property
    def device(self) -> torch.device:
        """Device of the wrapped network."""
        return _model_device(self.model)

    # ------------------------------------------------------------------------------------------------
    def required(self) -> tuple[str, ...]:
        """Conditioning fields this particular network needs (may depend on its config)."""
        return self.required_fields

    def accepted(self) -> tuple[str, ...]:
        """Conditioning fields this network can use."""
        return self.accepted_fields

    def check_conditioning(self, cond: Conditioning | None, batch_size: int) -> Conditioning:
        """Raise a clear ``ValueError`` when ``cond`` does not fit this network; return it (never None)."""
        cond = cond if cond is not None else Conditioning()
        if not isinstance(cond, Conditioning):
            raise TypeError(f"cond must be a stepdistill Conditioning, got {type(cond).__name__}.")
        name = type(self.model).__name__
        missing = [f for f in self.required() if getattr(cond, f) is None]
        if missing:
            raise ValueError(
                f"{name} needs conditioning field(s) {missing}, but the Conditioning has {cond.present() or 'none'}. "
                f"Pass Conditioning({', '.join(f'{m}=...' for m in missing)})."
            )
        accepted = self.accepted()
        extra = [f for f in cond.present() if f not in accepted]
        if extra:
            raise ValueError(
                f"{name} does not take conditioning field(s) {extra} (it accepts {list(accepted) or 'none'}). "
                "Is this the right model for this conditioning (e.g. class labels for an unconditional UNet)?"
            )
        if cond.batch_size is not None and cond.batch_size != batch_size:
            raise ValueError(f"Conditioning batch size {cond.batch_size} does not match the input batch {batch_size}.")
        return cond

    def _call_model(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    def _attention(self) -> dict[str, Any]:
        """``{attention_kwargs_argument: attention_kwargs}`` for the network call, or nothing."""
        if self.attention_kwargs is None:
            return {}
        return {self.attention_kwargs_argument: self.attention_kwargs}

    def forward(self, x_t: torch.Tensor, t: TimestepLike, cond: Conditioning | None = None) -> DenoiserOutput:
        """Denoise ``x_t`` at timestep(s) ``t``.

        Args:
            x_t: Noisy input ``[B, C, H, W]``.
            t: One timestep or one per sample, in the schedule's units.
            cond: The conditioning (``None`` for unconditional networks).
        """
        batch = x_t.shape[0]
        cond = self.check_conditioning(cond, batch)
        # the timesteps are checked once, here, and stay where they were given (the host, for numbers): their
        # checks, the network timestep's integrality test and the schedule's coefficients run there, with no host
        # sync of an accelerator. A number (what samplers pass) is checked in Python, and what it gives (network
        # timestep, coefficients) is kept by the schedule.
        if _is_number(t):
            level = self.schedule._checked(t)
            timestep = self.schedule._network_timestep(level, batch)
        else:
            level = self.schedule.as_timesteps(t, batch_size=batch)
            timestep = self.schedule.model_timestep(level)
        dtype, device = self.dtype, x_t.device
        timestep = timestep.to(device)
        raw = self._call_model(x_t.to(dtype), timestep, cond.to(device=device, dtype=dtype))
        if raw.shape[1] == 2 * x_t.shape[1] and raw.shape[1] != x_t.shape[1]:
            raw = raw[:, : x_t.shape[1]]  # learned-variance heads (DiT, IF): keep the mean prediction
        if raw.shape != x_t.shape:
            raise ValueError(
                f"{type(self.model).__name__} returned shape {tuple(raw.shape)} for input {tuple(x_t.shape)}; "
                "a denoiser must return a prediction of the input's shape."
            )
        x0, eps = self.schedule._to_x0_eps(raw, x_t, level, batch_size=batch)
        return DenoiserOutput(x0=x0, eps=eps, model_output=raw)

    # ------------------------------------------------------------------------------------------------
    @staticmethod
    def from_model(
        model: nn.Module | Callable,
        schedule: NoiseSchedule,
        prediction_type: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Denoiser:
        """Wrap ``model`` in the right :class:`Denoiser` subclass.

        Supported: diffusers ``UNet2DModel``, ``UNet2DConditionModel`` (SD1.5 / 2.1 / SDXL),
        ``SD3Transformer2DModel``, ``Transformer2DModel`` (DiT) and any other module or callable
        ``fn(x_t, timestep, cond) -> Tensor`` (:class:`CallableDenoiser`), whose prediction type is the
        schedule's unless ``prediction_type`` overrides it. ``attention_kwargs`` go to the network's attention
        processors on every call (networks without such an argument refuse them).
        """
        if prediction_type is not None and prediction_type != schedule.prediction_type:
            check_prediction_type(prediction_type)
            raise ValueError(
                f"prediction_type={prediction_type!r} disagrees with the schedule's {schedule.prediction_type!r}; "
                "build the schedule with NoiseSchedule.from_scheduler_config(config, prediction_type=...)."
            )
        kind = type(model).__name__
        for cls in (UNet2DDenoiser, UNet2DConditionDenoiser, SD3TransformerDenoiser, DiTDenoiser):
            if kind in cls.model_classes:
                return cls(model, schedule, attention_kwargs=attention_kwargs)
        return CallableDenoiser(model, schedule, attention_kwargs=attention_kwargs)


class UNet2DDenoiser(Denoiser):
    """diffusers ``UNet2DModel``: unconditional or class-conditional (``num_class_embeds``)."""

    model_classes = ("UNet2DModel",)

    def _class_conditional(self) -> bool:
        return getattr(self.model, "class_embedding", None) is not None

    def required(self) -> tuple[str, ...]:
        """``class_labels`` when the UNet has a class embedding."""
        return ("class_labels",) if self._class_conditional() else ()

    def accepted(self) -> tuple[str, ...]:
        """Same as :meth:`required`."""
        return self.required()

    def _call_model(self, x, timestep, cond):
        return self.model(x, timestep, class_labels=cond.class_labels).sample


class UNet2DConditionDenoiser(Denoiser):
    """diffusers ``UNet2DConditionModel``: SD1.5 / SD2.1 (text) and SDXL (text + pooled + time ids)."""

    model_classes = ("UNet2DConditionModel",)
    attention_kwargs_argument = "cross_attention_kwargs"

    def _sdxl(self) -> bool:
        return getattr(self.model.config, "addition_embed_type", None) == "text_time"

    def required(self) -> tuple[str, ...]:
        """``prompt_embeds``, plus ``pooled_prompt_embeds`` and ``time_ids`` for SDXL-style UNets."""
        req = ("prompt_embeds",)
        if self._sdxl():
            req += ("pooled_prompt_embeds", "time_ids")
        if getattr(self.model, "class_embedding", None) is not None:
            req += ("class_labels",)
        return req

    def accepted(self) -> tuple[str, ...]:
        """Same as :meth:`required`."""
        return self.required()

    def _call_model(self, x, timestep, cond):
        added = None
        if self._sdxl():
            added = {"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.time_ids}
        return self.model(
            x,
            timestep,
            encoder_hidden_states=cond.prompt_embeds,
            class_labels=cond.class_labels,
            added_cond_kwargs=added,
            **self._attention(),
        ).sample


class SD3TransformerDenoiser(Denoiser):
    """diffusers ``SD3Transformer2DModel`` (MMDiT, rectified flow): text + pooled embeddings."""

    model_classes = ("SD3Transformer2DModel",)
    required_fields = ("prompt_embeds", "pooled_prompt_embeds")
    accepted_fields = required_fields
    attention_kwargs_argument = "joint_attention_kwargs"

    def _call_model(self, x, timestep, cond):
        return self.model(
            hidden_states=x,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
            timestep=timestep,
            **self._attention(),
        ).sample


class DiTDenoiser(Denoiser):
    """diffusers ``Transformer2DModel`` / ``DiTTransformer2DModel`` (class-conditional DiT)."""

    model_classes = ("Transformer2DModel", "DiTTransformer2DModel")
    required_fields = ("class_labels",)
    accepted_fields = required_fields
    attention_kwargs_argument = "cross_attention_kwargs"

    def _call_model(self, x, timestep, cond):
        out = self.model(hidden_states=x, timestep=timestep, class_labels=cond.class_labels, **self._attention())
        return out.sample


class CallableDenoiser(Denoiser):
    """Any ``torch.nn.Module`` (or callable) ``fn(x_t, timestep, cond) -> Tensor`` with a declared type.

    The callable receives the network timestep (``schedule.model_timestep(t)``) and the full
    :class:`Conditioning`; it may return a tensor or an object with a ``.sample`` attribute.

    Args:
        model: The module or callable.
        schedule: Its schedule; ``schedule.prediction_type`` declares what ``model`` predicts.
        accepted_fields: Conditioning fields the callable understands (default: any).
        attention_kwargs: Not supported (the callable's contract has no place for them); must be ``None``.
    """

    def __init__(
        self,
        model: nn.Module | Callable,
        schedule: NoiseSchedule,
        accepted_fields: tuple[str, ...] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"A custom denoiser must be callable, got {type(model).__name__}.")
        if not isinstance(model, nn.Module):
            model = _CallableModule(model)
        super().__init__(model, schedule, attention_kwargs=attention_kwargs)
        self._accepted = accepted_fields

    def accepted(self) -> tuple[str, ...]:
        """The declared fields, or all fields when undeclared."""
        if self._accepted is None:
            return ("class_labels", "prompt_embeds", "pooled_prompt_embeds", "time_ids")
        return self._accepted

    def _call_model(self, x, timestep, cond):
        out = self.model(x, timestep, cond)
        return out.sample if hasattr(out, "sample") else out


class _CallableModule(nn.Module):
    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def guided_denoise(
    denoiser: Denoiser,
    x_t: torch.Tensor,
    t: TimestepLike,
    cond: Conditioning | None,
    guidance_scale: float | None = None,
) -> DenoiserOutput:
    """Denoise with classifier-free guidance ``uncond + w * (cond - uncond)`` in one batched call.

    ``guidance_scale`` of ``None`` or ``1`` runs the conditional model alone. Guidance is applied to
    x0 and eps (the conversions are affine at fixed ``(x_t, t)``, so the space does not matter).
    """
    if guidance_scale is None or guidance_scale == 1.0 or cond is None or cond.is_empty:
        return denoiser(x_t, t, cond)
    batch = x_t.shape[0]
    uncond = cond.unconditional()
    t_vec = denoiser.schedule.as_timesteps(t, batch_size=batch)  # where given (the host for numbers): no sync
    both = denoiser(torch.cat([x_t, x_t]), torch.cat([t_vec, t_vec]), Conditioning.cat([uncond, _strip(cond)]))
    x0_u, x0_c = both.x0.chunk(2)
    eps_u, eps_c = both.eps.chunk(2)
    return DenoiserOutput(x0=cfg(x0_u, x0_c, guidance_scale), eps=cfg(eps_u, eps_c, guidance_scale))


def _strip(cond: Conditioning) -> Conditioning:
    """``cond`` without its ``negative`` twin (so it can be concatenated with the unconditional half)."""
    return Conditioning(**{f: getattr(cond, f) for f in cond.present()}, null_class_label=cond.null_class_label)

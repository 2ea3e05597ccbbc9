"""Shared-base LoRA students for DMD: one frozen teacher network, two peft LoRA adapters.

The generator and the fake score are LoRA adapters (``"generator"``, ``"fake_score"``) injected into
ONE copy of the teacher network; the teacher itself is that network with the adapters disabled. Each
role is an :class:`AdapterDenoiser` that activates its adapter around every forward and whose
``parameters()`` are only its own LoRA weights (so each optimizer, EMA and ``requires_grad_`` touch
only that role). :func:`merged_network` folds one adapter into a plain copy of the base for export.

Example:
    >>> teacher_view, gen, fake = make_shared_lora_denoisers(load_denoiser(path), rank=8)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..denoiser import Denoiser, DenoiserOutput

GENERATOR_ADAPTER = "generator"
FAKE_SCORE_ADAPTER = "fake_score"
#: Default LoRA targets: UNet resnet convs / time projections and attention projections.
DEFAULT_TARGET_MODULES = ("conv1", "conv2", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0")


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def lora_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The LoRA parameters of ``adapter`` in ``model`` (peft names them ``...lora_A.<adapter>.weight``)."""
    return [p for n, p in model.named_parameters() if "lora_" in n and f".{adapter}." in f"{n}."]


@contextmanager
def active_adapter(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Run ``model`` with only ``adapter`` active (``None``: adapters disabled, the base network).

    peft's ``set_adapter`` / ``enable_adapters`` also rewrite ``requires_grad``; the flags are restored
    so the trainer keeps control of which role is frozen.
    """
    layers = _tuner_layers(model)
    flags = [(p, p.requires_grad) for m in layers for n, p in m.named_parameters() if "lora_" in n]
    try:
        for m in layers:
            if adapter is None:
                m.enable_adapters(False)
            else:
                m.enable_adapters(True)
                m.set_adapter(adapter)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    yield


class AdapterDenoiser(Denoiser):
    """A view of a shared network with one adapter active (or none: the teacher).

    The shared network is NOT a registered submodule: ``parameters()`` / ``state_dict()`` hold only this
    role's LoRA weights (registered again under ``lora_params``), so optimizers, EMA, DDP and
    checkpoints see one role at a time.

    Args:
        inner: ``Denoiser.from_model(shared_network, schedule)``.
        adapter: Adapter to activate around each forward; ``None`` disables adapters.
    """

    def __init__(self, inner: Denoiser, adapter: str | None) -> None:
        super().__init__(inner.model, inner.schedule)
        del self._modules["model"]
        self.__dict__["model"] = inner.model
        self.__dict__["_inner"] = inner
        self.adapter = adapter
        params = lora_parameters(inner.model, adapter) if adapter is not None else []
        self.lora_params = nn.ParameterList(params)

    def required(self) -> tuple[str, ...]:
        """The shared network's required conditioning fields."""
        return self.__dict__["_inner"].required()

    def accepted(self) -> tuple[str, ...]:
        """The shared network's accepted conditioning fields."""
        return self.__dict__["_inner"].accepted()

    def forward(self, x_t: torch.Tensor, t, cond=None) -> DenoiserOutput:
        """Denoise with this role's adapter active (see :meth:`Denoiser.forward`)."""
        with active_adapter(self.model, self.adapter):
            return self.__dict__["_inner"](x_t, t, cond)


def inject_lora_adapters(
    model: nn.Module, rank: int, alpha: float | None = None, target_modules: Sequence[str] | None = None,
    adapters: Sequence[str] = (GENERATOR_ADAPTER, FAKE_SCORE_ADAPTER),
) -> nn.Module:
    """Freeze ``model`` and inject one LoRA adapter per name (B = 0: each starts equal to the base)."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        target_modules=list(target_modules or DEFAULT_TARGET_MODULES), lora_dropout=0.0)
    for name in adapters:
        with warnings.catch_warnings():  # a second adapter on purpose: silence peft's "multiple adapters"
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            model = inject_adapter_in_model(config, model, adapter_name=name)
    for name in adapters:
        for p in lora_parameters(model, name):
            p.requires_grad_(True)
    return model


def make_shared_lora_denoisers(
    teacher: Denoiser, rank: int, alpha: float | None = None, target_modules: Sequence[str] | None = None,
    base_dtype: torch.dtype = torch.float32,
) -> tuple[AdapterDenoiser, AdapterDenoiser, AdapterDenoiser]:
    """``(teacher view, generator view, fake-score view)`` on one copy of ``teacher``'s network.

    The frozen base weights are kept in ``base_dtype`` (the mixed-precision dtype, as diffusers' LoRA
    training examples do); the LoRA weights are fp32.
    """
    from diffusers.training_utils import cast_training_params

    shared = copy.deepcopy(teacher.model).to(dtype=base_dtype).eval()
    shared = inject_lora_adapters(shared, rank, alpha, target_modules)
    cast_training_params(shared, dtype=torch.float32)
    inner = Denoiser.from_model(shared, teacher.schedule)
    return (AdapterDenoiser(inner, None), AdapterDenoiser(inner, GENERATOR_ADAPTER),
            AdapterDenoiser(inner, FAKE_SCORE_ADAPTER))


def merged_network(model: nn.Module, adapter: str) -> nn.Module:
    """A plain fp32 copy of the base network with ``adapter`` merged in and all LoRA layers removed."""
    net = copy.deepcopy(model).float()
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[adapter])
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, child, module.get_base_layer())
    net.requires_grad_(True)
    return net


def parameter_memory_report(
    model: nn.Module, rank: int, alpha: float | None = None, target_modules: Sequence[str] | None = None,
    bytes_per_param: int = 4,
) -> dict[str, float]:
    """Parameter counts and MB (``bytes_per_param``, fp32 by default) of the DMD networks, full vs shared.

    Full: teacher + generator copy + fake-score copy. Shared: one base + two LoRA adapters.
    """
    base = sum(p.numel() for p in model.parameters())
    probe = inject_lora_adapters(copy.deepcopy(model), rank, alpha, target_modules)
    per_adapter = sum(p.numel() for p in lora_parameters(probe, GENERATOR_ADAPTER))
    full, shared = 3 * base, base + 2 * per_adapter
    mb = bytes_per_param / 2**20
    return {
        "base_params": base, "lora_params_per_adapter": per_adapter,
        "full_params": full, "shared_params": shared,
        "full_trainable_params": 2 * base, "shared_trainable_params": 2 * per_adapter,
        "full_mb": full * mb, "shared_mb": shared * mb, "ratio": shared / full,
    }


__all__ = [
    "AdapterDenoiser",
    "DEFAULT_TARGET_MODULES",
    "FAKE_SCORE_ADAPTER",
    "GENERATOR_ADAPTER",
    "active_adapter",
    "inject_lora_adapters",
    "lora_parameters",
    "make_shared_lora_denoisers",
    "merged_network",
    "parameter_memory_report",
]

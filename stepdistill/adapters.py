"""Named peft LoRA adapters on one network, and the two layouts a trainer can put its networks in.

Several distillation methods train more than one network that starts from the teacher: DMD's generator
and fake score, Phased DMD's per-phase experts and critics, EchoDistill's teacher and student copies.
They can be full copies of the teacher, or LoRA adapters on ONE frozen copy (the teacher itself is that
copy with the adapters switched off), which takes a fraction of the memory. This module gives both,
behind one interface, so a trainer never branches on the mode:

* the peft helpers: :func:`tuner_layers`, :func:`adapter_parameters`, :func:`active_adapter`,
  :func:`inject_adapters` (also used by :mod:`stepdistill.control` for inference-time LoRAs);
* :class:`NamedAdapters`: N named adapters on one frozen network -- add, activate, a per-adapter
  :class:`AdapterDenoiser` view, adapter-only state dicts (what checkpoints save), and :meth:`~NamedAdapters.merged`,
  a plain fp32 network with one adapter folded in whose base weights are the fp32 originals even when the
  shared base was kept in bf16;
* :class:`NetworkLayout` with :class:`FullCopies` and :class:`SharedBaseAdapters`, built by
  :func:`make_layout`: ``teacher`` (the frozen view), ``network(role)`` (a trainable denoiser for a role),
  ``activate(role)`` (the context backward passes run in), ``standalone(role, denoiser)`` (the exported
  network).

Example:
    >>> layout = make_layout(teacher, lora_rank=8, roles=("generator", "fake_score"))
    >>> generator = layout.network("generator")          # LoRA parameters only
    >>> with layout.activate("generator"):
    ...     loss.backward()                               # recomputed checkpointed blocks see this adapter
    >>> student = layout.standalone("generator", generator)  # plain network, adapter merged
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .conditioning import Conditioning
from .denoiser import Denoiser, DenoiserOutput
from .schedules import NoiseSchedule, TimestepLike

#: Default LoRA targets: UNet resnet convs / time projections and attention projections.
DEFAULT_TARGET_MODULES = ("conv1", "conv2", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0")


# --------------------------------------------------------------------------------------------------
# peft helpers
def tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every peft tuner layer (a layer wrapped by LoRA) in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _adapter_key(adapter: str) -> re.Pattern:
    """Matches ``.lora_A.<adapter>.`` (and ``lora_B`` / ``lora_embedding_*`` / ``lora_magnitude_vector``) in a name.

    The adapter name must follow a ``lora_*`` component: an adapter called ``"0"`` must not match ``blocks.0.``.
    """
    return re.compile(rf"\.lora_[A-Za-z_]+\.{re.escape(adapter)}(\.|$)")


def _strip_adapter(param_name: str, adapter: str) -> str:
    """``a.lora_A.<adapter>.weight`` -> ``a.lora_A.weight`` (peft's saved form)."""
    return _adapter_key(adapter).sub(lambda m: m.group(0).replace(f".{adapter}", "", 1), param_name, count=1)


def adapter_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The LoRA parameters of ``adapter`` in ``model`` (peft names them ``...lora_A.<adapter>.weight``)."""
    key = _adapter_key(adapter)
    return [p for n, p in model.named_parameters() if key.search(n)]


@contextmanager
def active_adapter(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Run ``model`` with only ``adapter`` active (``None``: adapters disabled, the base network).

    peft's ``set_adapter`` / ``enable_adapters`` also rewrite ``requires_grad``; the flags are restored
    so the caller keeps control of which adapter is frozen. The adapter stays active after the block (the
    next ``active_adapter`` call sets its own).
    """
    layers = [m for _, m in tuner_layers(model)]
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


def inject_adapters(
    model: nn.Module,
    names: Sequence[str],
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] | None = None,
) -> nn.Module:
    """Freeze ``model`` and inject one LoRA adapter per name (``B = 0``: each starts equal to the base).

    The adapters are injected in the order given (their ``A`` matrices draw from torch's global RNG);
    their parameters require grad, the base's do not.
    """
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        target_modules=list(target_modules or DEFAULT_TARGET_MODULES), lora_dropout=0.0)
    for name in names:
        with warnings.catch_warnings():  # several adapters on purpose: silence peft's "multiple adapters"
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            model = inject_adapter_in_model(config, model, adapter_name=name)
    for name in names:
        for p in adapter_parameters(model, name):
            p.requires_grad_(True)
    return model


def merge_adapter(model: nn.Module, adapter: str) -> nn.Module:
    """A plain fp32 copy of ``model`` with ``adapter`` merged in and every peft layer removed."""
    net = copy.deepcopy(model).float()
    for name, module in tuner_layers(net):
        module.merge(adapter_names=[adapter])
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, module.get_base_layer())
    net.requires_grad_(True)
    return net


# --------------------------------------------------------------------------------------------------
class AdapterDenoiser(Denoiser):
    """A view of a shared network with one adapter active (or none: the frozen base, e.g. the teacher).

    The shared network is NOT a registered submodule: ``parameters()`` / ``state_dict()`` hold only this
    adapter's LoRA weights (registered again under ``lora_params``), so optimizers, EMA, DDP and
    checkpoints see one adapter at a time.

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
        params = adapter_parameters(inner.model, adapter) if adapter is not None else []
        self.lora_params = nn.ParameterList(params)

    def required(self) -> tuple[str, ...]:
        """The shared network's required conditioning fields."""
        return self.__dict__["_inner"].required()

    def accepted(self) -> tuple[str, ...]:
        """The shared network's accepted conditioning fields."""
        return self.__dict__["_inner"].accepted()

    def forward(self, x_t: torch.Tensor, t: TimestepLike, cond: Conditioning | None = None) -> DenoiserOutput:
        """Denoise with this view's adapter active (see :meth:`Denoiser.forward`)."""
        with active_adapter(self.model, self.adapter):
            return self.__dict__["_inner"](x_t, t, cond)


class NamedAdapters:
    """N named LoRA adapters (same rank and targets) on one frozen network.

    The base weights are cast to ``base_dtype`` (the mixed-precision dtype, as diffusers' LoRA training
    examples keep them) and never train; the adapters are fp32.

    Args:
        network: The network to adapt (modified in place: frozen, cast, wrapped by peft layers).
        schedule: Its noise schedule (for the :class:`AdapterDenoiser` views).
        rank: LoRA rank.
        alpha: LoRA alpha (``None``: the rank).
        target_modules: Module names that get LoRA layers (``None``: :data:`DEFAULT_TARGET_MODULES`).
        names: Adapters to inject now, in this order (more with :meth:`add`).
        base_dtype: dtype of the frozen base weights.

    Example:
        >>> experts = NamedAdapters(copy.deepcopy(teacher.model), teacher.schedule, rank=16,
        ...                         names=["expert_0", "expert_1", "expert_2"])
        >>> x0 = experts.view("expert_1")(x_t, t, cond).x0
    """

    def __init__(
        self,
        network: nn.Module,
        schedule: NoiseSchedule,
        rank: int,
        alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        names: Sequence[str] = (),
        base_dtype: torch.dtype = torch.float32,
    ) -> None:
        from diffusers.training_utils import cast_training_params

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
        self.rank, self.alpha, self.target_modules = rank, alpha, list(target_modules or DEFAULT_TARGET_MODULES)
        self.base_dtype = base_dtype
        self.network = inject_adapters(network.to(dtype=base_dtype).eval(), list(names), rank, alpha,
                                       self.target_modules)
        cast_training_params(self.network, dtype=torch.float32)
        self.names: list[str] = list(names)
        self.inner = Denoiser.from_model(self.network, schedule)

    def add(self, name: str) -> None:
        """Inject another adapter called ``name`` (fp32, ``B = 0``)."""
        from diffusers.training_utils import cast_training_params

        if name in self.names:
            raise ValueError(f"Adapter {name!r} exists already (adapters: {self.names}).")
        flags = [(p, p.requires_grad) for p in self.network.parameters()]
        inject_adapters(self.network, [name], self.rank, self.alpha, self.target_modules)
        for p, flag in flags:  # inject_adapters freezes the network; earlier adapters keep their own flags
            p.requires_grad_(flag)
        cast_training_params(self.network, dtype=torch.float32)
        self.names.append(name)

    def _check(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise KeyError(f"No adapter {name!r} on this network (adapters: {self.names}).")

    def parameters(self, name: str) -> list[nn.Parameter]:
        """The LoRA parameters of adapter ``name``."""
        self._check(name)
        return adapter_parameters(self.network, name)

    def activate(self, name: str | None) -> contextlib.AbstractContextManager:
        """Context with only ``name`` active (``None``: the base network)."""
        self._check(name)
        return active_adapter(self.network, name)

    def view(self, name: str | None) -> AdapterDenoiser:
        """A denoiser running the network with adapter ``name`` (``None``: the frozen base)."""
        self._check(name)
        return AdapterDenoiser(self.inner, name)

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s weights, keyed by module path without the adapter name (peft's saved form)."""
        self._check(name)
        return {_strip_adapter(n, name): p.detach() for n, p in self.network.named_parameters()
                if _adapter_key(name).search(n)}

    @torch.no_grad()
    def load_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Load weights from :meth:`state_dict` into adapter ``name`` (keys and shapes must match exactly)."""
        self._check(name)
        own = {_strip_adapter(n, name): p for n, p in self.network.named_parameters() if _adapter_key(name).search(n)}
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ValueError(f"Adapter {name!r}: state dict does not match (missing {missing[:3]}, "
                             f"unexpected {extra[:3]}).")
        for key, p in own.items():
            p.copy_(state[key])

    def save(self, name: str, path: str | Path) -> Path:
        """Write adapter ``name`` to a safetensors file (rank, alpha and targets in its metadata)."""
        import json

        from safetensors.torch import save_file

        meta = {"adapter": name, "rank": str(self.rank), "alpha": json.dumps(self.alpha),
                "target_modules": json.dumps(self.target_modules)}
        save_file({k: v.contiguous().cpu() for k, v in self.state_dict(name).items()}, str(path), metadata=meta)
        return Path(path)

    def load(self, name: str, path: str | Path) -> None:
        """Load a file written by :meth:`save` into adapter ``name`` (its rank and targets must match)."""
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if int(meta.get("rank", self.rank)) != self.rank or json.loads(
                meta.get("target_modules", "null")) not in (None, self.target_modules):
            raise ValueError(f"{str(path)!r} holds a rank-{meta.get('rank')} adapter on "
                             f"{meta.get('target_modules')}, this network's adapters are rank {self.rank} on "
                             f"{self.target_modules}.")
        self.load_state_dict(name, load_file(str(path)))

    @torch.no_grad()
    def merged(
        self, name: str, base_weights: Callable[[], Mapping[str, torch.Tensor]] | None = None
    ) -> nn.Module:
        """A plain fp32 network with adapter ``name`` merged in (no peft layers; what an export writes).

        When the shared base is stored in a lower precision, ``merged = round(W) + delta``; pass a function
        returning the fp32 original weights (``named_parameters`` of the unadapted network) as ``base_weights``
        to get ``W + delta`` exactly (it is only called for a low-precision base).
        """
        self._check(name)
        net = merge_adapter(self.network, name).eval()
        if base_weights is not None and self.base_dtype != torch.float32:
            original = base_weights()
            for key, p in net.named_parameters():
                w = original[key].to(p.device, torch.float32)
                p.add_(w - w.to(self.base_dtype).float())
        return net


# --------------------------------------------------------------------------------------------------
# layouts
class NetworkLayout:
    """Where the trainable copies of a teacher live: full copies, or adapters on one shared base.

    A trainer asks its layout for the frozen ``teacher`` view, one trainable denoiser per role
    (:meth:`network`), the context a role's backward pass runs in (:meth:`activate`) and a standalone
    network for export (:meth:`standalone`); it never branches on the mode.
    """

    @property
    def teacher(self) -> Denoiser:
        """The frozen teacher."""
        raise NotImplementedError

    def network(self, role: str, init: nn.Module | None = None) -> Denoiser:
        """A trainable denoiser for ``role`` that starts as the teacher (or as ``init``, full copies only)."""
        raise NotImplementedError

    def activate(self, role: str) -> contextlib.AbstractContextManager:
        """The context in which ``role``'s forward and backward passes run."""
        return contextlib.nullcontext()

    def standalone(self, role: str, denoiser: Denoiser) -> nn.Module:
        """A plain fp32 copy of ``role``'s network for export."""
        raise NotImplementedError

    def finalize(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Put the frozen teacher on ``device`` in ``dtype`` once every role is built."""


class FullCopies(NetworkLayout):
    """Every role is its own fp32 deep copy of the teacher network; the teacher stays a separate network.

    Args:
        teacher: The teacher denoiser.
    """

    def __init__(self, teacher: Denoiser) -> None:
        self._teacher = teacher

    @property
    def teacher(self) -> Denoiser:
        """The teacher (frozen and cast by :meth:`finalize`)."""
        return self._teacher

    def network(self, role: str, init: nn.Module | None = None) -> Denoiser:
        """A trainable fp32 copy of the teacher network, or ``init`` when given."""
        net = init if init is not None else copy.deepcopy(self._teacher.model)
        return Denoiser.from_model(net.float().train().requires_grad_(True), self._teacher.schedule)

    def standalone(self, role: str, denoiser: Denoiser) -> nn.Module:
        """A deep copy of the role's network."""
        return copy.deepcopy(denoiser.model).eval()

    def finalize(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Freeze the teacher and move it to ``device`` in ``dtype``."""
        self._teacher.model.requires_grad_(False).eval().to(device=device, dtype=dtype)


class SharedBaseAdapters(NetworkLayout):
    """Every role is a LoRA adapter on ONE frozen copy of the teacher; the teacher is that copy, adapters off.

    Args:
        teacher: The teacher denoiser (its network is copied once, then no longer referenced).
        roles: Adapter names, injected in this order.
        rank: LoRA rank.
        alpha: LoRA alpha (``None``: the rank).
        target_modules: Module names that get LoRA layers.
        base_dtype: dtype of the shared base (the mixed-precision dtype).
        base_weights: A callable returning the fp32 teacher weights (``named_parameters``), used by
            :meth:`standalone` to undo the rounding of a low-precision base; ``None`` when the base is fp32.
    """

    def __init__(
        self,
        teacher: Denoiser,
        roles: Sequence[str],
        rank: int,
        alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        base_dtype: torch.dtype = torch.float32,
        base_weights: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        self.adapters = NamedAdapters(copy.deepcopy(teacher.model), teacher.schedule, rank, alpha, target_modules,
                                      roles, base_dtype)
        self._teacher = self.adapters.view(None)
        self._base_weights = base_weights

    @property
    def teacher(self) -> Denoiser:
        """The shared network with every adapter disabled."""
        return self._teacher

    def network(self, role: str, init: nn.Module | None = None) -> Denoiser:
        """The adapter view of ``role`` (added now if it was not injected at construction)."""
        if init is not None:
            raise ValueError("A LoRA role starts at the teacher; an init network needs full copies (lora_rank=0).")
        if role not in self.adapters.names:
            self.adapters.add(role)
        return self.adapters.view(role)

    def activate(self, role: str) -> contextlib.AbstractContextManager:
        """``role``'s adapter active on the shared network."""
        return self.adapters.activate(role)

    def standalone(self, role: str, denoiser: Denoiser) -> nn.Module:
        """The shared network with ``role``'s adapter merged, on the fp32 teacher weights."""
        return self.adapters.merged(role, self._base_weights)

    def finalize(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Move the shared network to ``device`` (its base dtype was fixed at construction)."""
        self.adapters.network.to(device)


def make_layout(
    teacher: Denoiser,
    lora_rank: int = 0,
    roles: Sequence[str] = (),
    alpha: float | None = None,
    target_modules: Sequence[str] | None = None,
    base_dtype: torch.dtype = torch.float32,
    base_weights: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> NetworkLayout:
    """:class:`FullCopies` for ``lora_rank == 0``, else :class:`SharedBaseAdapters` with ``roles`` injected."""
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0: full copies), got {lora_rank}.")
    if lora_rank == 0:
        return FullCopies(teacher)
    return SharedBaseAdapters(teacher, roles, lora_rank, alpha, target_modules, base_dtype, base_weights)


def parameter_memory_report(
    model: nn.Module, rank: int, alpha: float | None = None, target_modules: Sequence[str] | None = None,
    num_roles: int = 2, bytes_per_param: int = 4,
) -> dict[str, float]:
    """Parameter counts and MB (``bytes_per_param``, fp32 by default) of ``num_roles`` networks, full vs shared.

    Full: the teacher + one copy per role. Shared: one base + one LoRA adapter per role.
    """
    base = sum(p.numel() for p in model.parameters())
    probe = inject_adapters(copy.deepcopy(model), ["probe"], rank, alpha, target_modules)
    per_adapter = sum(p.numel() for p in adapter_parameters(probe, "probe"))
    full, shared = (num_roles + 1) * base, base + num_roles * per_adapter
    mb = bytes_per_param / 2**20
    return {
        "base_params": base, "lora_params_per_adapter": per_adapter,
        "full_params": full, "shared_params": shared,
        "full_trainable_params": num_roles * base, "shared_trainable_params": num_roles * per_adapter,
        "full_mb": full * mb, "shared_mb": shared * mb, "ratio": shared / full,
    }


__all__ = [
    "DEFAULT_TARGET_MODULES",
    "AdapterDenoiser",
    "FullCopies",
    "NamedAdapters",
    "NetworkLayout",
    "SharedBaseAdapters",
    "active_adapter",
    "adapter_parameters",
    "inject_adapters",
    "make_layout",
    "merge_adapter",
    "parameter_memory_report",
    "tuner_layers",
]

"""Control transfer: apply a LoRA trained on one network to another network of the same architecture.

Gandikota & Bau ("Distilling Diversity and Control in Diffusion Models") observe that a LoRA trained
on a base model transfers to its distilled students (DMD2, Lightning, Turbo, LCM are *full* fine-tunes,
so parameter names and shapes match and weight-space deltas still line up) and back. This module
does that with peft LoRA layers and diffusers' LoRA file format:

* :class:`LoraWeights` -- a LoRA in peft form (``<module>.lora_A.weight`` / ``lora_B.weight``) plus its
  ``LoraConfig``; saved as a diffusers LoRA folder (``pytorch_lora_weights.safetensors`` with keys
  ``unet.<module>.lora_A.weight`` and the config in the safetensors header, written by diffusers'
  ``StableDiffusionLoraLoaderMixin.save_lora_weights``), so a LoRA of an SD-family UNet also loads
  with a stock ``pipe.load_lora_weights(folder)``; ``stepdistill_lora.json`` beside it records where
  the LoRA came from.
* :func:`apply_lora` / :func:`set_lora_scale` / :func:`remove_lora` / :func:`lora_applied` -- load
  it into a network (a model, a :class:`~stepdistill.Denoiser` or a pipeline) at a ``scale``, change
  the scale, take it out again. Models with diffusers' ``PeftAdapterMixin`` (``UNet2DConditionModel``,
  the transformers) go through ``load_lora_adapter`` / ``delete_adapters`` / ``unload_lora``; others
  (``UNet2DModel``) through peft's ``inject_adapter_in_model`` / ``set_peft_model_state_dict``.
  Removing the last LoRA unwraps every peft layer, so the network is the original module tree and its
  outputs are restored bitwise (the base weights are never merged or touched).
* :func:`check_lora_compatible` -- raises :class:`LoraCompatibilityError` naming the first LoRA key
  whose module is missing or has another shape, before anything is injected.

Example:
    >>> lora = load_lora("runs/digits_style_lora")          # trained on the digits teacher
    >>> student = StepDistillPipeline.from_pretrained("runs/digits_dmd2_4step/student")
    >>> with lora_applied(student, lora, scale=1.0):
    ...     bold = student(class_labels=[3], generator=make_generators([0])).images
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapters import DEFAULT_TARGET_MODULES, adapter_parameters, inject_adapters, tuner_layers

if TYPE_CHECKING:
    from peft import LoraConfig

#: File name of a diffusers LoRA (``diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE``).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: stepdistill's provenance file inside a LoRA folder (base model, training config, ...).
LORA_INFO_NAME = "stepdistill_lora.json"
#: Adapter name used when none is given.
DEFAULT_ADAPTER_NAME = "control"
#: Pipeline attributes that may hold the denoising network, in lookup order (also the key prefixes).
NETWORK_ATTRIBUTES = ("unet", "transformer", "prior")


class LoraCompatibilityError(ValueError):
    """A LoRA does not fit the network it is applied to (a module is missing or has another shape)."""


class LoraFolderError(ValueError):
    """A path that should hold a LoRA folder does not."""


# ----------------------------------------------------------------------------------------------------
# where the network is
def resolve_network(target: Any) -> nn.Module:
    """The denoising network inside ``target``.

    Accepts a diffusers / stepdistill pipeline (its ``unet``, ``transformer`` or ``prior``), a
    :class:`~stepdistill.Denoiser` (its ``model``) or a bare ``nn.Module`` (returned as is).

    Raises:
        TypeError: when ``target`` is none of these.
    """
    from .denoiser import Denoiser

    if isinstance(target, Denoiser):
        return target.model
    if isinstance(target, nn.Module):
        return target
    for attr in NETWORK_ATTRIBUTES:
        net = getattr(target, attr, None)
        if isinstance(net, nn.Module):
            return net
    raise TypeError(
        f"Cannot find a denoising network in a {type(target).__name__}: pass a pipeline with a "
        f"{' / '.join(NETWORK_ATTRIBUTES)} component, a stepdistill Denoiser or the nn.Module itself."
    )


def default_prefix(model: nn.Module) -> str:
    """The key prefix diffusers uses for ``model``'s LoRA weights: ``"unet"`` for UNets, else ``"transformer"``."""
    return "unet" if type(model).__name__.startswith("UNet") else "transformer"


def loaded_adapters(target: Any) -> list[str]:
    """Names of the LoRA adapters loaded in ``target``'s network (sorted; empty when it has none)."""
    names: set[str] = set()
    for _, layer in tuner_layers(resolve_network(target)):
        names.update(layer.lora_A.keys() if hasattr(layer, "lora_A") else [])
    return sorted(names)


def active_adapters(target: Any) -> list[str]:
    """Names of the adapters currently active in ``target``'s network."""
    layers = tuner_layers(resolve_network(target))
    return list(layers[0][1].active_adapters) if layers else []


# ----------------------------------------------------------------------------------------------------
# the LoRA itself
def _jsonable(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and isinstance(value.value, str):  # enums such as PeftType.LORA
        return value.value
    return value


@dataclass
class LoraWeights:
    """A LoRA in peft form, ready to load into any network whose modules match.

    Args:
        state_dict: peft keys without adapter name or prefix, e.g. ``down_blocks.0.resnets.0.conv1.lora_A.weight``.
        config: ``peft.LoraConfig`` keyword arguments (``r``, ``lora_alpha``, ``target_modules``, ...);
            ``None`` to infer ranks from the weights (alpha = rank, diffusers' convention for LoRAs without
            metadata) or from ``network_alphas``.
        prefix: Key prefix in the diffusers file (``"unet"`` or ``"transformer"``).
        info: Provenance (base model class and path, training settings, ...), saved to ``stepdistill_lora.json``.
        network_alphas: kohya-style alphas of converted third-party LoRAs (diffusers' ``lora_state_dict``).
    """

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None = None
    prefix: str = "unet"
    info: dict[str, Any] = field(default_factory=dict)
    network_alphas: dict[str, float] | None = None

    @property
    def module_names(self) -> list[str]:
        """The (sorted) names of the modules this LoRA adapts."""
        return sorted({k.split(".lora_")[0] for k in self.state_dict if ".lora_" in k})

    @property
    def num_parameters(self) -> int:
        """Number of LoRA parameters."""
        return sum(v.numel() for v in self.state_dict.values())

    def lora_config(self) -> LoraConfig:
        """The ``peft.LoraConfig`` to inject this LoRA with."""
        from peft import LoraConfig

        if self.config is not None:
            kwargs = {k: v for k, v in self.config.items() if k not in ("peft_type", "task_type", "peft_version")}
            return LoraConfig(**kwargs)
        from diffusers.utils.peft_utils import get_peft_kwargs

        ranks = {k: v.shape[1] for k, v in self.state_dict.items() if "lora_B" in k and v.ndim > 1}
        if not ranks:
            raise LoraFolderError("The LoRA has no lora_B weights, so its rank cannot be inferred; it looks empty.")
        kwargs = get_peft_kwargs(ranks, self.network_alphas, self.state_dict, is_unet=self.prefix == "unet")
        return LoraConfig(**kwargs)

    def config_dict(self) -> dict[str, Any]:
        """The LoRA config as JSON-able ``LoraConfig`` keyword arguments (what diffusers stores as metadata)."""
        return _jsonable(self.lora_config().to_dict())

    def prefixed_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<prefix>.<key>": tensor}``, the layout of a diffusers pipeline LoRA file."""
        return {f"{self.prefix}.{k}": v for k, v in self.state_dict.items()}

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, target: Any, adapter_name: str = DEFAULT_ADAPTER_NAME, info: dict | None = None) -> LoraWeights:
        """Extract adapter ``adapter_name`` from ``target``'s network (weights copied to CPU fp32).

        Raises:
            ValueError: when the network has no such adapter.
        """
        from peft.utils import get_peft_model_state_dict

        model = resolve_network(target)
        configs = getattr(model, "peft_config", {}) or {}
        if adapter_name not in configs:
            raise ValueError(
                f"{type(model).__name__} has no LoRA adapter {adapter_name!r} (loaded: {loaded_adapters(model)}); "
                "inject one with add_lora / apply_lora first."
            )
        sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
        sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}
        meta = {"base_model_class": type(model).__name__}
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
        if name_or_path:
            meta["base_model"] = str(name_or_path)
        meta.update(info or {})
        return cls(sd, _jsonable(configs[adapter_name].to_dict()), default_prefix(model), meta)

    def save(self, folder: str | Path) -> Path:
        """Write a diffusers LoRA folder (``pytorch_lora_weights.safetensors`` + ``stepdistill_lora.json``), atomically.

        The weights file is written by diffusers' own ``save_lora_weights`` (SD mixin for ``unet``,
        SD3 mixin for ``transformer``), so stock pipelines' ``load_lora_weights(folder)`` read it.
        """
        from .utils import atomic_write_dir

        metadata = self.config_dict()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict.items()}

        def write(tmp: Path) -> None:
            if self.prefix == "unet":
                from diffusers.loaders import StableDiffusionLoraLoaderMixin

                StableDiffusionLoraLoaderMixin.save_lora_weights(
                    tmp, unet_lora_layers=tensors, unet_lora_adapter_metadata=metadata, safe_serialization=True
                )
            elif self.prefix == "transformer":
                from diffusers.loaders import SD3LoraLoaderMixin

                SD3LoraLoaderMixin.save_lora_weights(
                    tmp, transformer_lora_layers=tensors, transformer_lora_adapter_metadata=metadata,
                    safe_serialization=True,
                )
            else:
                raise ValueError(f"Cannot save a LoRA with prefix {self.prefix!r}; use 'unet' or 'transformer'.")
            info = {
                "prefix": self.prefix,
                "weights": LORA_WEIGHT_NAME,
                "num_modules": len(self.module_names),
                "num_parameters": self.num_parameters,
                "lora_config": {k: metadata[k] for k in ("r", "lora_alpha", "target_modules") if k in metadata},
                **_jsonable(self.info),
            }
            (tmp / LORA_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")

        return atomic_write_dir(folder, write)

    @classmethod
    def load(cls, path: str | Path, prefix: str | None = None) -> LoraWeights:
        """Read a LoRA folder (or a ``.safetensors`` file) in diffusers format.

        Keys are read with diffusers' ``lora_state_dict`` (which also converts kohya / A1111 files);
        non-peft key layouts are converted with ``convert_unet_state_dict_to_peft``.

        Args:
            path: A folder with ``pytorch_lora_weights.safetensors`` or the file itself.
            prefix: Which network's keys to take (default: ``unet`` if present, else ``transformer``).

        Raises:
            LoraFolderError: when the path is missing, holds no LoRA file, or has no keys for ``prefix``.
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise LoraFolderError(
                f"LoRA path {str(path)!r} does not exist; pass a folder written by save_lora / "
                "`stepdistill sample train-style-lora` (it holds pytorch_lora_weights.safetensors)."
            )
        folder, weight_name = (path.parent, path.name) if path.is_file() else (path, LORA_WEIGHT_NAME)
        if not (folder / weight_name).is_file():
            found = sorted(p.name for p in folder.glob("*.safetensors"))
            raise LoraFolderError(
                f"{str(folder)!r} has no {weight_name}"
                + (f" (found {found}; pass the file path instead)" if found else "")
                + ". A LoRA folder is written by save_lora or diffusers' save_lora_weights."
            )
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
                str(folder), weight_name=weight_name, use_safetensors=True, local_files_only=True,
                return_lora_metadata=True,
            )
        prefixes = sorted({k.split(".", 1)[0] for k in sd})
        if prefix is None:
            prefix = next((p for p in NETWORK_ATTRIBUTES if p in prefixes), None)
            if prefix is None:
                raise LoraFolderError(
                    f"{str(folder / weight_name)!r} has no keys for a denoising network (key prefixes: {prefixes}); "
                    f"expected keys starting with one of {list(NETWORK_ATTRIBUTES)}."
                )
        state = {k[len(prefix) + 1 :]: v for k, v in sd.items() if k.startswith(f"{prefix}.")}
        if not state:
            raise LoraFolderError(f"{str(folder / weight_name)!r} has no {prefix!r} keys (key prefixes: {prefixes}).")
        if not any("lora_A" in k for k in state):
            from diffusers.utils import convert_unet_state_dict_to_peft

            state = convert_unet_state_dict_to_peft(state)
        config = None
        if metadata:
            config = {k[len(prefix) + 1 :]: v for k, v in metadata.items() if k.startswith(f"{prefix}.")} or None
        if alphas:
            alphas = {k[len(prefix) + 1 :]: v for k, v in alphas.items() if k.startswith(f"{prefix}.")} or None
        info: dict[str, Any] = {}
        if (folder / LORA_INFO_NAME).is_file():
            info = json.loads((folder / LORA_INFO_NAME).read_text())
        info.setdefault("source", str(folder / weight_name))
        return cls(state, config, prefix, info, alphas or None)


def load_lora(path: str | Path, prefix: str | None = None) -> LoraWeights:
    """Read a LoRA folder or file (see :meth:`LoraWeights.load`)."""
    return LoraWeights.load(path, prefix=prefix)


def save_lora(
    target: Any, folder: str | Path, adapter_name: str = DEFAULT_ADAPTER_NAME, info: dict | None = None
) -> Path:
    """Save adapter ``adapter_name`` of ``target``'s network as a diffusers LoRA folder (:meth:`LoraWeights.save`)."""
    return LoraWeights.from_model(target, adapter_name, info).save(folder)


# ----------------------------------------------------------------------------------------------------
# compatibility
def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return f"Conv2d(in={module.in_channels}, out={module.out_channels}, kernel={tuple(module.kernel_size)})"
    if isinstance(module, nn.Linear):
        return f"Linear(in={module.in_features}, out={module.out_features})"
    return type(module).__name__


def _fix_hint(lora: LoraWeights, model: nn.Module) -> str:
    base = lora.info.get("base_model_class")
    where = lora.info.get("base_model")
    trained = f"a {base}" + (f" ({where})" if where else "") if base else "another network"
    return (
        f"This LoRA was trained on {trained}; apply it to a network with the same architecture (that model or a "
        f"full fine-tune of it, e.g. its DMD2 / LCM / Turbo student) or retrain it on this {type(model).__name__} "
        "(stepdistill sample train-style-lora --teacher <this model folder>)."
    )


def check_lora_compatible(target: Any, lora: LoraWeights) -> None:
    """Check that every module ``lora`` adapts exists in ``target``'s network with matching shapes.

    ``lora_A`` must match the base weight's input side (``W.shape[1:]``: in-features, or in-channels and
    kernel) and ``lora_B`` its output side (``W.shape[0]``).

    Raises:
        LoraCompatibilityError: naming the first offending key, what the network has instead, and the fix.
    """
    model = resolve_network(target)
    modules = dict(model.named_modules())
    missing = [n for n in lora.module_names if n not in modules]
    if missing:
        key = next(k for k in sorted(lora.state_dict) if k.startswith(f"{missing[0]}.lora_"))
        raise LoraCompatibilityError(
            f"LoRA key {lora.prefix}.{key!s} targets module {missing[0]!r}, which this {type(model).__name__} does "
            f"not have ({len(missing)} of {len(lora.module_names)} LoRA modules are missing). " + _fix_hint(lora, model)
        )
    for key in sorted(lora.state_dict):
        name, _, rest = key.partition(".lora_")
        side = rest.split(".", 1)[0]
        if side not in ("A", "B") or not key.endswith(".weight"):
            continue
        module = modules[name]
        if hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        weight = getattr(module, "weight", None)
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Conv3d)) or weight is None:
            raise LoraCompatibilityError(
                f"LoRA key {lora.prefix}.{key} targets {name!r}, a {type(module).__name__} in this "
                f"{type(model).__name__}, where a Linear / Conv layer was expected. " + _fix_hint(lora, model)
            )
        value = lora.state_dict[key]
        if side == "A":
            ok = value.ndim == weight.ndim and tuple(value.shape[1:]) == tuple(weight.shape[1:])
            need = f"(r, {', '.join(str(s) for s in weight.shape[1:])})"
        else:
            ok = value.ndim == weight.ndim and value.shape[0] == weight.shape[0]
            need = f"({weight.shape[0]}, r{', 1' * (weight.ndim - 2)})"
        if not ok:
            raise LoraCompatibilityError(
                f"LoRA key {lora.prefix}.{key} has shape {tuple(value.shape)}, but {name!r} in this "
                f"{type(model).__name__} is {_describe(module)}, which needs {need}. " + _fix_hint(lora, model)
            )


# ----------------------------------------------------------------------------------------------------
# apply / scale / remove
def _is_peft_adapter_model(model: nn.Module) -> bool:
    from diffusers.loaders.peft import PeftAdapterMixin

    return isinstance(model, PeftAdapterMixin)


def _activate(model: nn.Module, names: list[str], trainable: set[str]) -> None:
    """Make ``names`` the active adapters; LoRA ``requires_grad`` flags stay as they were except ``trainable``."""
    layers = [m for _, m in tuner_layers(model)]
    flags = [(p, p.requires_grad) for m in layers for n, p in m.named_parameters() if "lora_" in n]
    for layer in layers:
        layer.set_adapter(names)
    for p, flag in flags:
        p.requires_grad_(flag)
    for n, p in model.named_parameters():
        if "lora_" in n and any(f".{a}." in f"{n}." for a in trainable):
            p.requires_grad_(True)


def set_lora_scale(target: Any, scale: float, adapter_name: str = DEFAULT_ADAPTER_NAME) -> None:
    """Scale adapter ``adapter_name`` to ``scale`` times its trained strength (peft's ``set_scale``; 0 = off).

    Raises:
        ValueError: when the network has no such adapter.
    """
    model = resolve_network(target)
    if adapter_name not in loaded_adapters(model):
        loaded = loaded_adapters(model)
        raise ValueError(f"No LoRA adapter {adapter_name!r} in {type(model).__name__} (loaded: {loaded}).")
    for _, layer in tuner_layers(model):
        layer.set_scale(adapter_name, float(scale))


def apply_lora(
    target: Any,
    lora: LoraWeights | str | Path,
    scale: float = 1.0,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    trainable: bool = False,
) -> str:
    """Load ``lora`` into ``target``'s network as adapter ``adapter_name`` at ``scale``; returns the adapter name.

    The base weights are not modified: the LoRA lives in peft layers wrapped around the adapted modules,
    next to any adapters already loaded (which stay active). The LoRA weights are frozen unless ``trainable``.

    Args:
        target: A pipeline, :class:`~stepdistill.Denoiser` or ``nn.Module`` (see :func:`resolve_network`).
        lora: A :class:`LoraWeights` or the path of a LoRA folder / file.
        scale: Strength relative to training (``1``: as trained, ``0``: no effect, ``-1``: the opposite direction).
        adapter_name: Name of the new adapter (must not be loaded yet).
        trainable: Leave the LoRA parameters with ``requires_grad=True``.

    Raises:
        LoraCompatibilityError: when the network lacks a module the LoRA needs or its shapes differ.
        ValueError: when ``adapter_name`` is already loaded.
    """
    model = resolve_network(target)
    if not isinstance(lora, LoraWeights):
        lora = load_lora(lora)
    if adapter_name in loaded_adapters(model):
        raise ValueError(
            f"{type(model).__name__} already has a LoRA adapter named {adapter_name!r}; remove_lora(target, "
            f"{adapter_name!r}) first or pass another adapter_name."
        )
    check_lora_compatible(model, lora)
    before = active_adapters(model)
    param = next(model.parameters(), None)
    sd = {k: v if param is None else v.to(device=param.device, dtype=param.dtype) for k, v in lora.state_dict.items()}
    config = lora.lora_config()
    if _is_peft_adapter_model(model):
        metadata = {f"{lora.prefix}.{k}": v for k, v in _jsonable(config.to_dict()).items()}
        model.load_lora_adapter(
            {f"{lora.prefix}.{k}": v for k, v in sd.items()}, prefix=lora.prefix, adapter_name=adapter_name,
            metadata=metadata,
        )
    else:
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        with warnings.catch_warnings():  # stacking on existing adapters is intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, model, adapter_name=adapter_name, state_dict=sd)
        result = set_peft_model_state_dict(model, sd, adapter_name=adapter_name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if f".{adapter_name}" in k or "lora_" in k]
        if unexpected:
            remove_lora(model, adapter_name)
            raise LoraCompatibilityError(
                f"LoRA key {lora.prefix}.{unexpected[0]} could not be loaded into {type(model).__name__} "
                f"({len(unexpected)} keys unused). " + _fix_hint(lora, model)
            )
    _activate(model, [*before, adapter_name], {adapter_name} if trainable else set())
    if not trainable:
        for n, p in model.named_parameters():
            if "lora_" in n and f".{adapter_name}." in f"{n}.":
                p.requires_grad_(False)
    set_lora_scale(model, scale, adapter_name)
    return adapter_name


def remove_lora(target: Any, adapter_name: str | None = None) -> nn.Module:
    """Remove adapter ``adapter_name`` (``None``: all) from ``target``'s network; returns the network.

    When no adapter is left, every peft layer is replaced by the module it wrapped (diffusers'
    ``recurse_remove_peft_layers``) and ``peft_config`` is deleted: the network is its original module
    tree again, with untouched base weights, so its outputs are bitwise the same as before :func:`apply_lora`.
    Adapters that stay keep their active / inactive state.

    Raises:
        ValueError: when ``adapter_name`` is not loaded.
    """
    model = resolve_network(target)
    loaded = loaded_adapters(model)
    names = loaded if adapter_name is None else [adapter_name]
    if adapter_name is not None and adapter_name not in loaded:
        raise ValueError(f"No LoRA adapter {adapter_name!r} in {type(model).__name__} (loaded: {loaded}).")
    before = [a for a in active_adapters(model) if a not in names]
    remaining = [a for a in loaded if a not in names]
    if _is_peft_adapter_model(model):
        if remaining:
            model.delete_adapters(names)
        else:
            model.unload_lora()
    else:
        from diffusers.utils.peft_utils import delete_adapter_layers

        if remaining:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                for name in names:
                    delete_adapter_layers(model, name)
                    getattr(model, "peft_config", {}).pop(name, None)
        else:
            from diffusers.utils import recurse_remove_peft_layers

            recurse_remove_peft_layers(model)
            if hasattr(model, "peft_config"):
                del model.peft_config
    if remaining:
        _activate(model, before, set())
    return model


@contextmanager
def lora_applied(
    target: Any, lora: LoraWeights | str | Path, scale: float = 1.0, adapter_name: str = DEFAULT_ADAPTER_NAME
) -> Iterator[str]:
    """Context manager: :func:`apply_lora` on entry, :func:`remove_lora` of that adapter on exit (also on error)."""
    name = apply_lora(target, lora, scale=scale, adapter_name=adapter_name)
    try:
        yield name
    finally:
        remove_lora(target, name)


def sweep_lora_scales(
    target: Any,
    lora: LoraWeights | str | Path,
    generate: Callable[[], torch.Tensor],
    scales: Sequence[float] = (1.0,),
    adapter_name: str = DEFAULT_ADAPTER_NAME,
) -> tuple[dict[float, torch.Tensor], dict[float, torch.Tensor], bool]:
    """Outputs of ``generate()`` without the LoRA, at each scale, and again after removing it.

    ``generate`` must be deterministic (create its seeded generators inside), e.g.
    ``lambda: pipe(class_labels=labels, generator=make_generators(seeds), output_type="pt").images``.

    Returns:
        ``(without, with_lora, restored)``: ``without = {0.0: images}``, ``with_lora = {scale: images}``,
        and whether the outputs after :func:`remove_lora` equal ``without`` bitwise.
    """
    with torch.no_grad():
        base = generate()
        outputs: dict[float, torch.Tensor] = {}
        name = apply_lora(target, lora, scale=1.0, adapter_name=adapter_name)
        try:
            for scale in scales:
                set_lora_scale(target, scale, name)
                outputs[float(scale)] = generate()
        finally:
            remove_lora(target, name)
        restored = generate()
    return {0.0: base}, outputs, bool(torch.equal(restored, base))


def add_lora(
    target: Any,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: list[str] | tuple[str, ...] | None = None,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
) -> list[nn.Parameter]:
    """Inject a fresh trainable LoRA (``B = 0``: the network's outputs do not change) and freeze the base.

    Uses :func:`stepdistill.adapters.inject_adapters` (default targets: UNet resnet convs, time
    projections and attention projections). Returns the new LoRA parameters (``requires_grad=True``).

    Raises:
        ValueError: when ``adapter_name`` is already loaded or no module matches ``target_modules``.
    """
    from peft import LoraConfig


    model = resolve_network(target)
    if adapter_name in loaded_adapters(model):
        raise ValueError(f"{type(model).__name__} already has a LoRA adapter named {adapter_name!r}.")
    targets = list(target_modules or DEFAULT_TARGET_MODULES)
    before = active_adapters(model)
    try:
        if _is_peft_adapter_model(model):  # diffusers' own entry point keeps its adapter bookkeeping right
            model.requires_grad_(False)
            config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                                lora_dropout=0.0)
            model.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapters(model, [adapter_name], rank, alpha, targets)
    except ValueError as err:
        raise ValueError(
            f"Could not add a LoRA to {type(model).__name__} with target_modules={targets}: {err}. Pass module "
            "names that exist in the network (e.g. 'conv1', 'conv2', 'to_q')."
        ) from err
    _activate(model, [*before, adapter_name], {adapter_name})
    return adapter_parameters(model, adapter_name)


__all__ = [
    "DEFAULT_ADAPTER_NAME",
    "LORA_INFO_NAME",
    "LORA_WEIGHT_NAME",
    "LoraCompatibilityError",
    "LoraFolderError",
    "LoraWeights",
    "active_adapters",
    "add_lora",
    "apply_lora",
    "check_lora_compatible",
    "default_prefix",
    "load_lora",
    "loaded_adapters",
    "lora_applied",
    "remove_lora",
    "resolve_network",
    "save_lora",
    "set_lora_scale",
    "sweep_lora_scales",
]

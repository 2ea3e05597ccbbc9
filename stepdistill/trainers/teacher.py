"""The teacher side of every trainer: its folder, input shape, recommended guidance, and networks that start from it.

Plain functions, so that every method (and a script) gets the same answers; the base trainer exposes them as
methods. No Accelerate in here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..loading import load_network, resolve_model_folder, teacher_guidance_scale


def teacher_root(spec: str | Path | None) -> Path | None:
    """The pipeline folder of a teacher given as a pipeline or model folder (``None`` without a folder)."""
    if not spec or not str(spec):
        return None
    folder, _ = resolve_model_folder(spec)
    return folder.parent if (folder.parent / "model_index.json").is_file() else Path(spec)


def resolve_guidance(override: float | None, spec: str | Path | None) -> float:
    """The teacher's CFG weight: ``override`` if given, else the folder's ``stepdistill_teacher.json``, else 1."""
    if override is not None:
        return float(override)
    value = teacher_guidance_scale(spec) if spec else None
    return 1.0 if value is None else value


def infer_sample_shape(network: nn.Module, override: list[int] | None = None) -> tuple[int, int, int]:
    """``[C, H, W]`` of the teacher's inputs: ``override``, else its config's ``in_channels`` and ``sample_size``."""
    if override is not None:
        return tuple(int(v) for v in override)
    model_cfg = getattr(network, "config", None)
    channels, size = getattr(model_cfg, "in_channels", None), getattr(model_cfg, "sample_size", None)
    if channels is None or size is None:
        raise ValueError(
            f"Cannot tell the input shape of the teacher network {type(network).__name__} (no config with "
            "in_channels and sample_size): set sample_shape: [C, H, W] in the config."
        )
    h, w = (size, size) if isinstance(size, int) else size
    return int(channels), int(h), int(w)


def load_init_network(path: str | Path, like: nn.Module, role: str, what: str) -> nn.Module:
    """A trainable fp32 network from a model / pipeline / student / checkpoint folder, checked against ``like``.

    Looks in ``path``, ``path/student`` (a run folder), then, in a checkpoint, trainable ``role``'s EMA weights
    (``path/<role>/ema/model``) and raw weights (``path/<role>/model``). The network must have ``like``'s class
    and config (the teacher's architecture); ``what`` names the setting in errors.
    """
    path = Path(path)
    for candidate in (path, path / "student", path / role / "ema" / "model", path / role / "model"):
        try:
            folder, _ = resolve_model_folder(candidate)
        except ValueError:
            continue
        net = load_network(folder)
        arch = lambda m: {k: v for k, v in dict(m.config).items() if not k.startswith("_")}  # noqa: E731
        if type(net) is not type(like) or arch(net) != arch(like):
            raise ValueError(
                f"{what} {str(folder)!r} holds a {type(net).__name__} whose config differs from the "
                f"teacher's {type(like).__name__}: the network must have the teacher's architecture."
            )
        return net.float().train().requires_grad_(True)
    raise ValueError(
        f"{what} {str(path)!r} holds no diffusers network (looked in it, student/, {role}/ema/model/ and "
        f"{role}/model/). Pass an exported student folder, a run folder or a checkpoint folder."
    )


def fp32_weights(spec: str | Path) -> Mapping[str, torch.Tensor]:
    """The teacher network's parameters as stored on disk (fp32 when saved so), by name."""
    folder, _ = resolve_model_folder(spec)
    return dict(load_network(folder).named_parameters())


__all__ = ["fp32_weights", "infer_sample_shape", "load_init_network", "resolve_guidance", "teacher_root"]

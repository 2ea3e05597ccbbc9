"""Critic networks of distribution-matching methods: the fake score and its GAN head (DMD2, Yin et al. 2024).

* :class:`FakeScore` -- a fake-score denoiser plus an optional :class:`GANHead` reading its bottleneck through
  a forward hook, so that ONE forward gives both the denoising prediction and the logits (one DDP forward
  per critic backward);
* :class:`GANHead` -- DMD2's classifier branch: stride-2 conv blocks down to <= 4x4, a conv to 1x1, a logit;
  :func:`build_gan_head` sizes it from one dry-run forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..conditioning import Conditioning
from ..denoiser import Denoiser


def find_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model``'s submodule called ``name``, or a ``ValueError`` listing the top-level choices."""
    modules = dict(model.named_modules())
    if name not in modules:
        top = [n for n, _ in model.named_children()]
        raise ValueError(
            f"{type(model).__name__} has no submodule {name!r} for the GAN head; choose one of {top} "
            "(set gan_feature_module)."
        )
    return modules[name]


def gan_head_groups(channels: int) -> int:
    """GroupNorm groups for the GAN head: up to 32, with at least 16 channels per group.

    The head's last GroupNorm sees 1x1 maps, where a group of 2 channels normalises to +-1 and erases
    the features (a digits-size bottleneck of 64 channels with 32 groups could not tell blurry from real
    digits); SD's 1280 channels keep DMD2's 32 groups.
    """
    for groups in (32, 16, 8, 4, 2):
        if channels % groups == 0 and channels // groups >= 16:
            return groups
    return 1


class GANHead(nn.Module):
    """DMD2's classifier branch: stride-2 conv blocks down to <= 4x4, a conv to 1x1, a logit.

    Args:
        channels: Channels of the bottleneck features.
        size: Their spatial size (square).
    """

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        groups = gan_head_groups(channels)
        layers: list[nn.Module] = []
        while size > 4:
            layers += [nn.Conv2d(channels, channels, 4, 2, 1), nn.GroupNorm(groups, channels), nn.SiLU()]
            size //= 2
        layers += [nn.Conv2d(channels, channels, size, size), nn.GroupNorm(groups, channels), nn.SiLU(),
                   nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` from features ``[B, C, S, S]``."""
        return self.net(features).reshape(features.shape[0])


def _first_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def build_gan_head(
    denoiser: Denoiser, feature_module: str, sample_shape: tuple[int, ...], cond: Conditioning | None
) -> GANHead:
    """A :class:`GANHead` sized from one dry-run forward of ``denoiser`` at its noisiest timestep.

    Args:
        denoiser: The network the head will read (the fake score).
        feature_module: Name of its submodule whose output the head reads (``mid_block`` for UNets).
        sample_shape: ``[C, H, W]`` of one input.
        cond: A conditioning for one sample.
    """
    captured: list[torch.Tensor] = []
    hook = find_submodule(denoiser.model, feature_module).register_forward_hook(
        lambda m, i, o: captured.append(_first_output(o))
    )
    try:
        denoiser(torch.zeros(1, *sample_shape), denoiser.schedule.max_timestep, cond)
    finally:
        hook.remove()
    feats = captured[-1]
    if feats.ndim != 4 or feats.shape[2] != feats.shape[3]:
        raise ValueError(
            f"gan_feature_module={feature_module!r} gives features of shape {tuple(feats.shape)}; the GAN head "
            "needs square [B, C, S, S] maps."
        )
    return GANHead(int(feats.shape[1]), int(feats.shape[2]))


class FakeScore(nn.Module):
    """The DMD critic: a fake-score denoiser and (optionally) a GAN head on its bottleneck features.

    The features are captured by a forward hook on ``feature_module`` of the network, so a single
    forward gives both the denoising prediction and the logits (one DDP forward per critic step).

    Args:
        denoiser: The fake-score denoiser (a copy of the teacher).
        head: The GAN head, or ``None``.
        feature_module: Name of the submodule whose output feeds the head (``mid_block`` for UNets).
    """

    def __init__(self, denoiser: Denoiser, head: GANHead | None = None, feature_module: str = "mid_block") -> None:
        super().__init__()
        self.denoiser = denoiser
        self.head = head
        self._features: torch.Tensor | None = None
        self._hook = None
        if head is not None:
            self._hook = find_submodule(denoiser.model, feature_module).register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs, output) -> None:
        self._features = _first_output(output)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return ``(x0, eps, model_output, logits or None)`` for ``x_t`` at ``t``."""
        self._features = None
        out = self.denoiser(x_t, t, cond)
        logits = None
        if self.head is not None:
            if self._features is None:
                raise RuntimeError("The GAN feature hook did not fire: check gan_feature_module.")
            logits = self.head(self._features.float())
            self._features = None
        return out.x0, out.eps, out.model_output, logits


__all__ = ["FakeScore", "GANHead", "build_gan_head", "find_submodule", "gan_head_groups"]

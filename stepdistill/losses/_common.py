"""Reductions shared by the loss modules."""

from __future__ import annotations

import torch


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: ``[B, ...] -> [B]``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)

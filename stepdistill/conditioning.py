"""The conditioning object every denoiser, sampler and trainer passes around."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

_TENSOR_FIELDS = ("class_labels", "prompt_embeds", "pooled_prompt_embeds", "time_ids")


@dataclass
class Conditioning:
    """What a model is conditioned on, for a batch of ``B`` samples, and how to drop it for CFG.

    Any field may be ``None``; a model wrapper checks that the fields it needs are present.

    Args:
        class_labels: ``[B]`` integer class labels (class-conditional UNets / DiTs).
        prompt_embeds: ``[B, L, D]`` text-encoder hidden states (``encoder_hidden_states``).
        pooled_prompt_embeds: ``[B, D]`` pooled text embeddings (SDXL ``text_embeds``, SD3
            ``pooled_projections``).
        time_ids: ``[B, 6]`` SDXL micro-conditioning (original size, crop, target size).
        null_class_label: The label the model was trained with for "no class" (classifier-free
            guidance drops labels to it). Needed to build the unconditional twin of class labels.
        negative: An explicit unconditional twin (e.g. embeddings of the empty prompt, or a negative
            prompt). When absent, :meth:`unconditional` uses the null class or all-zero embeddings
            (SDXL / DMD2 convention).

    Example:
        >>> cond = Conditioning(class_labels=torch.tensor([3, 7]), null_class_label=10)
        >>> cond.unconditional().class_labels
        tensor([10, 10])
    """

    class_labels: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    null_class_label: int | None = None
    negative: Conditioning | None = None

    def __post_init__(self) -> None:
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None and not torch.is_tensor(value):
                raise TypeError(f"Conditioning.{name} must be a tensor, got {type(value).__name__}.")
            if value is not None and value.ndim == 0:
                raise ValueError(f"Conditioning.{name} must have a batch dimension, got a scalar.")
        sizes = {name: getattr(self, name).shape[0] for name in _TENSOR_FIELDS if getattr(self, name) is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Conditioning fields disagree on the batch size: {sizes}.")
        if self.negative is not None and self.negative.batch_size not in (None, self.batch_size):
            raise ValueError(
                f"The negative conditioning has batch size {self.negative.batch_size}, "
                f"the positive {self.batch_size}; they must match."
            )

    # ------------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int | None:
        """``B``, or ``None`` for an empty (unconditional-model) conditioning."""
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return int(value.shape[0])
        return None

    @property
    def is_empty(self) -> bool:
        """True when no field is set (an unconditional model)."""
        return self.batch_size is None

    def present(self) -> list[str]:
        """Names of the tensor fields that are set."""
        return [name for name in _TENSOR_FIELDS if getattr(self, name) is not None]

    def unconditional(self) -> Conditioning:
        """The unconditional twin used by classifier-free guidance.

        Raises:
            ValueError: for class labels without ``null_class_label`` or ``negative``.
        """
        if self.negative is not None:
            return replace(self.negative, negative=None, null_class_label=self.null_class_label)
        if self.is_empty:
            return self
        labels = None
        if self.class_labels is not None:
            if self.null_class_label is None:
                raise ValueError(
                    "Classifier-free guidance on class labels needs the model's null class: set "
                    "Conditioning(null_class_label=...) (the digits teacher uses 10), or pass negative=..."
                )
            labels = torch.full_like(self.class_labels, self.null_class_label)
        zeros = lambda v: None if v is None else torch.zeros_like(v)  # noqa: E731
        return Conditioning(
            class_labels=labels,
            prompt_embeds=zeros(self.prompt_embeds),
            pooled_prompt_embeds=zeros(self.pooled_prompt_embeds),
            time_ids=self.time_ids,
            null_class_label=self.null_class_label,
        )

    def _map(self, fn) -> Conditioning:
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _TENSOR_FIELDS:
            if kwargs[name] is not None:
                kwargs[name] = fn(name, kwargs[name])
        if self.negative is not None:
            kwargs["negative"] = self.negative._map(fn)
        return Conditioning(**kwargs)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move tensors to ``device``; cast floating tensors (embeddings) to ``dtype``.

        Returns ``self`` when every tensor is already there (a denoiser call re-checks its conditioning on every
        step: nothing is rebuilt then).
        """
        if self._already(torch.device(device) if device is not None else None, dtype):
            return self

        def move(name, v):
            if dtype is not None and torch.is_floating_point(v):
                return v.to(device=device, dtype=dtype)
            return v.to(device=device)

        return self._map(move)

    def _already(self, device: torch.device | None, dtype: torch.dtype | None) -> bool:
        """Whether :meth:`to` would change nothing (every tensor on ``device``, floating ones in ``dtype``)."""
        if device is not None and device.index is None and device.type not in ("cpu", "meta"):
            return False  # "cuda" means the current device: let torch resolve it
        for name in _TENSOR_FIELDS:
            v = getattr(self, name)
            if v is None:
                continue
            if device is not None and v.device != device:
                return False
            if dtype is not None and torch.is_floating_point(v) and v.dtype != dtype:
                return False
        return self.negative is None or self.negative._already(device, dtype)

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> Conditioning:
        """The conditioning of a subset of the batch (index tensor, list or slice)."""
        if isinstance(index, Sequence) and not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return self._map(lambda name, v: v[index.to(v.device) if torch.is_tensor(index) else index])

    def repeat(self, n: int) -> Conditioning:
        """Repeat every sample ``n`` times (``repeat_interleave`` along the batch)."""
        return self._map(lambda name, v: v.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate conditionings along the batch (all must set the same fields)."""
        if not items:
            raise ValueError("Conditioning.cat needs at least one item.")
        first = items[0]
        kinds = {tuple(c.present()) for c in items}
        if len(kinds) > 1:
            raise ValueError(f"Cannot concatenate conditionings with different fields: {sorted(kinds)}.")
        kwargs = {name: None for name in _TENSOR_FIELDS}
        for name in first.present():
            kwargs[name] = torch.cat([getattr(c, name) for c in items], dim=0)
        negative = None
        if all(c.negative is not None for c in items):
            negative = Conditioning.cat([c.negative for c in items])
        return Conditioning(**kwargs, null_class_label=first.null_class_label, negative=negative)

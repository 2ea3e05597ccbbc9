"""Diffusion-target (DT) visualization and sample grids.

The *diffusion target* of a step is the model's x0 estimate at that step (the scheduler's
``pred_original_sample``). Decoding it after every step shows when a sampler commits to the final layout:
Gandikota & Bau (arXiv 2503.10637) observe that distilled students fix the composition at their first step,
while base models spread structural decisions over many steps. Here:

* :func:`diffusion_targets` samples a :class:`~stepdistill.pipelines.HybridDiversityPipeline` in ``"base"``,
  ``"student"`` or ``"hybrid"`` mode and records the decoded x0 after every step (through the samplers'
  step callback), one row per seed;
* :func:`dt_grid` draws them (rows = seeds, columns = steps, each column labelled with its network and
  timestep), :func:`diffusion_target_grid` stacks several modes;
* :func:`diversity_grid` compares base / student / hybrid samples with the same seeds and labels.

The command is ``stepdistill sample dt`` / ``stepdistill sample hybrid`` (:mod:`stepdistill.commands.sample`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from .sampling import make_generators

if TYPE_CHECKING:
    from .pipelines.pipeline_hybrid import HybridDiversityPipeline, HybridPlan

#: Short column tags of the two networks.
PHASE_TAGS = {"base": "B", "student": "S"}
#: Row titles of the three sampling modes.
MODE_TITLES = {"base": "teacher", "student": "student", "hybrid": "hybrid"}


@dataclass
class DiffusionTargets:
    """Decoded x0 estimates after every step of one sampling run.

    Args:
        x0: ``[rows, steps, C, H, W]`` pixels in ``[0, 1]`` (row ``r`` is seed ``seeds[r]``).
        timesteps: The timestep of each step (column).
        phases: ``"base"`` or ``"student"`` for each step.
        seeds: The seed of each row.
        mode: ``"base"``, ``"student"`` or ``"hybrid"``.
        plan: The plan that ran.
        final: ``[rows, C, H, W]`` final images in ``[0, 1]``.
    """

    x0: torch.Tensor
    timesteps: list[float]
    phases: list[str]
    seeds: list[int]
    mode: str
    plan: HybridPlan
    final: torch.Tensor

    @property
    def column_labels(self) -> list[str]:
        """``"B 999"``, ``"S 749"``, ...: network and timestep of every column."""
        return [f"{PHASE_TAGS[p]} {_short(t)}" for p, t in zip(self.phases, self.timesteps)]


def _short(t: float) -> str:
    return f"{t:.0f}" if float(t).is_integer() or t >= 10 else f"{t:.1f}"


def _per_row(values: Any, rows: int, name: str) -> list | None:
    """One value per row: a scalar or a single-element list is repeated, a list must have ``rows`` entries."""
    if values is None:
        return None
    if isinstance(values, (str, int, np.integer)):
        return [values] * rows
    values = list(values)
    if len(values) == 1:
        return values * rows
    if len(values) != rows:
        raise ValueError(f"Got {len(values)} {name} for {rows} seeds: pass one, or one per seed.")
    return values


def _row_call_kwargs(rows: int, class_labels: Any, prompt: Any, call_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``call_kwargs`` plus one class label / prompt per row (or ``batch_size=rows`` for an unconditional call)."""
    kwargs = dict(call_kwargs)
    labels = _per_row(class_labels, rows, "class labels")
    prompts = _per_row(prompt, rows, "prompts")
    if labels is not None:
        kwargs["class_labels"] = labels
    if prompts is not None:
        kwargs["prompt"] = prompts
    if labels is None and prompts is None and kwargs.get("prompt_embeds") is None:
        kwargs.setdefault("batch_size", rows)
    return kwargs


@torch.no_grad()
def diffusion_targets(
    pipe: HybridDiversityPipeline,
    mode: str = "hybrid",
    seeds: Sequence[int] = (0, 1, 2, 3),
    class_labels: int | Sequence[int] | None = None,
    prompt: str | Sequence[str] | None = None,
    **call_kwargs: Any,
) -> DiffusionTargets:
    """Sample ``pipe`` once per seed and decode the x0 estimate after every step.

    Args:
        pipe: A :class:`~stepdistill.pipelines.HybridDiversityPipeline`.
        mode: ``"base"`` (the base alone; ``base_num_inference_steps`` in ``call_kwargs``, default 50),
            ``"student"`` or ``"hybrid"``.
        seeds: One row per seed (one ``torch.Generator`` each).
        class_labels: One label for every row, or one per seed.
        prompt: One prompt for every row, or one per seed.
        **call_kwargs: More arguments of the pipeline call (``base_steps``, ``handover``, ``prompt_embeds``, ...).
    """
    seeds = [int(s) for s in seeds]
    rows = len(seeds)
    kwargs = _row_call_kwargs(rows, class_labels, prompt, call_kwargs)
    steps: list[tuple[int, float, torch.Tensor]] = []

    def record(_pipe, i: int, t: float, tensors: dict) -> None:
        steps.append((i, float(t), tensors["denoised"].detach()))

    out = pipe(
        mode=mode,
        generator=make_generators(seeds),
        output_type="pt",
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["denoised"],
        **kwargs,
    )
    plan = out.plan
    if len(steps) != plan.num_steps:
        raise RuntimeError(f"Recorded {len(steps)} steps for a plan of {plan.num_steps}; the sampler skipped a step.")
    frames = [pipe.postprocess(pipe.decode_latents(x0), output_type="pt").cpu() for _, _, x0 in steps]
    return DiffusionTargets(
        x0=torch.stack(frames, dim=1),
        timesteps=[t for _, t, _ in steps],
        phases=plan.phases,
        seeds=seeds,
        mode=mode,
        plan=plan,
        final=out.images.cpu(),
    )


# ----------------------------------------------------------------------------------------------------
# drawing
def _font(size: int) -> PIL.ImageFont.ImageFont:
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return PIL.ImageFont.load_default()


def _tile(image: torch.Tensor, tile_size: int) -> PIL.Image.Image:
    """``[C, H, W]`` in ``[0, 1]`` -> an RGB tile ``tile_size`` pixels wide (nearest when upscaling)."""
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).convert("RGB")
    scale = tile_size / max(pil.size)
    size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    resample = PIL.Image.NEAREST if scale >= 1 else PIL.Image.BICUBIC
    return pil.resize(size, resample)


def image_grid(
    tiles: Sequence[Sequence[torch.Tensor | None]],
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    title: str | None = None,
    tile_size: int = 64,
    gap: int = 2,
) -> PIL.Image.Image:
    """A labelled grid of ``[C, H, W]`` images in ``[0, 1]`` (``None`` leaves a cell empty).

    Args:
        tiles: ``tiles[r][c]``; rows may have different lengths.
        row_labels: Text left of each row.
        column_labels: Text above each column.
        title: Text above everything.
        tile_size: Width of a tile in pixels (tiles are resized, nearest-neighbour when enlarged).
        gap: Pixels between tiles.
    """
    rows = len(tiles)
    cols = max((len(r) for r in tiles), default=0)
    if rows == 0 or cols == 0:
        raise ValueError("image_grid needs at least one tile.")
    sample = next(t for r in tiles for t in r if t is not None)
    tile_h = _tile(sample, tile_size).height
    font_size = max(10, min(14, tile_size // 4))
    font = _font(font_size)
    measure = PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
    text_w = lambda s: int(measure.textlength(s, font=font))  # noqa: E731
    left = (max(text_w(s) for s in row_labels) + 8) if row_labels else 0
    top = (font_size + 6) if column_labels else 0
    head = (font_size + 8) if title else 0
    width = max(left + cols * (tile_size + gap) + gap, (text_w(title) + 2 * gap) if title else 0)
    height = head + top + rows * (tile_h + gap) + gap
    canvas = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 3), title, fill="black", font=font)
    for c, label in enumerate(column_labels or []):
        x = left + gap + c * (tile_size + gap)
        draw.text((x + max(0, (tile_size - text_w(label)) // 2), head + 2), label, fill="black", font=font)
    for r, row in enumerate(tiles):
        y = head + top + gap + r * (tile_h + gap)
        if row_labels:
            draw.text((4, y + max(0, (tile_h - font_size) // 2)), row_labels[r], fill="black", font=font)
        for c, image in enumerate(row):
            if image is not None:
                canvas.paste(_tile(image, tile_size), (left + gap + c * (tile_size + gap), y))
    return canvas


def dt_grid(
    targets: DiffusionTargets, tile_size: int = 64, title: str | None = None, labels: bool = True
) -> PIL.Image.Image:
    """The DT grid of one run: rows = seeds, columns = steps (labelled ``B t`` / ``S t``).

    Args:
        targets: From :func:`diffusion_targets`.
        tile_size: Tile width in pixels.
        title: Text above the grid (default: the mode and its plan; ``""`` for none).
        labels: Draw the row (seed) and column (network, timestep) labels.
    """
    tiles = [[targets.x0[r, c] for c in range(targets.x0.shape[1])] for r in range(targets.x0.shape[0])]
    return image_grid(
        tiles,
        row_labels=[f"seed {s}" for s in targets.seeds] if labels else None,
        column_labels=targets.column_labels if labels else None,
        title=title if title is not None else f"{MODE_TITLES[targets.mode]}: {targets.plan.describe()}",
        tile_size=tile_size,
    )


def stack_vertically(images: Sequence[PIL.Image.Image], gap: int = 6) -> PIL.Image.Image:
    """Stack images top to bottom on a white canvas, left-aligned."""
    width = max(im.width for im in images)
    height = sum(im.height for im in images) + gap * (len(images) - 1)
    canvas = PIL.Image.new("RGB", (width, height), "white")
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + gap
    return canvas


def diffusion_target_grid(
    pipe: HybridDiversityPipeline,
    modes: Sequence[str] = ("base", "student", "hybrid"),
    seeds: Sequence[int] = (0, 1, 2, 3),
    class_labels: int | Sequence[int] | None = None,
    prompt: str | Sequence[str] | None = None,
    tile_size: int = 64,
    base_num_inference_steps: int = 10,
    **call_kwargs: Any,
) -> tuple[PIL.Image.Image, list[DiffusionTargets]]:
    """DT grids of several modes, stacked: ``(image, [DiffusionTargets per mode])``.

    ``base_num_inference_steps`` applies to ``mode="base"`` only (the hybrid keeps its own base mapping);
    ``call_kwargs`` go to every call.
    """
    runs = []
    for mode in modes:
        extra = dict(call_kwargs)
        if mode == "base":
            extra.setdefault("base_num_inference_steps", base_num_inference_steps)
            for key in ("base_steps", "handover_timestep", "handover", "resume_timestep", "base_timesteps"):
                extra.pop(key, None)
        runs.append(diffusion_targets(pipe, mode, seeds, class_labels, prompt, **extra))
    image = stack_vertically([dt_grid(r, tile_size=tile_size) for r in runs])
    return image, runs


@torch.no_grad()
def diversity_grid(
    pipe: HybridDiversityPipeline,
    seeds: Sequence[int],
    class_labels: int | Sequence[int] | None = None,
    prompt: str | Sequence[str] | None = None,
    teacher_steps: int = 50,
    tile_size: int = 64,
    title: str | None = None,
    **call_kwargs: Any,
) -> tuple[PIL.Image.Image, dict[str, torch.Tensor]]:
    """Rows teacher / student / hybrid, columns = samples with the same seeds and labels in every row.

    Returns:
        ``(grid, {"base": [N, C, H, W], "student": ..., "hybrid": ...})`` with pixels in ``[0, 1]``.
    """
    seeds = [int(s) for s in seeds]
    n = len(seeds)
    kwargs = _row_call_kwargs(n, class_labels, prompt, call_kwargs)
    images: dict[str, torch.Tensor] = {}
    plans = {}
    for mode in ("base", "student", "hybrid"):
        extra = dict(kwargs)
        if mode == "base":
            extra = {k: v for k, v in extra.items() if k not in ("base_steps", "handover_timestep", "handover",
                                                                   "resume_timestep", "base_timesteps")}  # fmt: skip
            extra["base_num_inference_steps"] = teacher_steps
        out = pipe(mode=mode, generator=make_generators(seeds), output_type="pt", **extra)
        images[mode] = out.images.cpu()
        plans[mode] = out.plan
    row_labels = [
        f"teacher ({len(plans['base'].base_timesteps)})",
        f"student ({len(plans['student'].student_timesteps)})",
        f"hybrid ({len(plans['hybrid'].base_timesteps)}+{len(plans['hybrid'].student_timesteps)})",
    ]
    tiles = [[images[m][i] for i in range(n)] for m in ("base", "student", "hybrid")]
    columns = None
    labels = kwargs.get("class_labels")
    if labels is not None and len(set(labels)) > 1:
        columns = [str(c) for c in labels]
    grid = image_grid(
        tiles,
        row_labels=row_labels,
        column_labels=columns,
        title=title if title is not None else f"same seeds per column; hybrid: {plans['hybrid'].describe()}",
        tile_size=tile_size,
    )
    return grid, images


__all__ = [
    "DiffusionTargets",
    "diffusion_target_grid",
    "diffusion_targets",
    "diversity_grid",
    "dt_grid",
    "image_grid",
    "stack_vertically",
]

r"""Control transfer, measured: sample models without a LoRA, with it at several scales, and after removing it.

:func:`transfer` samples every model with the same per-image seeds without the LoRA, with it at each scale,
and again after removing it (the last must equal the first bitwise), and computes ink-mass / ink-fraction
shifts and -- for 8x8 digits models -- the digits classifier's accuracy and margin;
:func:`markdown_table` and :func:`comparison_grid` report them. The command is ``stepdistill sample transfer``
(:mod:`stepdistill.commands.sample`); ``eval/bench_control_transfer.py`` is the benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..control import LoraWeights, load_lora, sweep_lora_scales
from .stroke import paired_shift, stroke_statistics


@dataclass
class TransferResult:
    """Samples and statistics of one model without / with a LoRA.

    Args:
        name: Row name (e.g. ``teacher``, ``dmd2-4step``).
        path: The pipeline folder.
        steps: Sampling steps used (student timesteps or teacher ODE steps).
        images: ``{scale: [B, C, H, W] in [-1, 1]}``; scale ``0.0`` is the model without LoRA.
        stats: ``{scale: stroke_statistics(...)}``.
        shift: ``{scale: paired_shift(without, with)}`` for every scale but 0.
        restored: Whether the outputs after removing the LoRA equal the outputs without it bitwise.
        seconds: Wall time of the sweep.
    """

    name: str
    path: str
    steps: int
    images: dict[float, torch.Tensor] = field(repr=False)
    stats: dict[float, dict]
    shift: dict[float, dict]
    restored: bool
    seconds: float

    def to_json(self) -> dict:
        """JSON-able summary (no images)."""
        return {
            "name": self.name, "path": self.path, "steps": self.steps, "restored_bitwise": self.restored,
            "seconds": self.seconds, "stats": {str(k): v for k, v in self.stats.items()},
            "shift": {str(k): v for k, v in self.shift.items()},
        }


def load_digits_classifier_for(images: torch.Tensor):
    """The shipped digits classifier when ``images`` are ``[B, 1, 8, 8]`` digits, else ``None``."""
    from ..data.digits import RESOLUTION
    from ..data.digits_models import DigitsClassifier, classifier_path

    if tuple(images.shape[1:]) != (1, RESOLUTION, RESOLUTION) or not (classifier_path() / "config.json").is_file():
        return None
    return DigitsClassifier.from_pretrained(classifier_path()).eval()


def transfer(
    lora: LoraWeights | str | Path,
    models: Sequence[tuple[str, str | Path]],
    scales: Sequence[float] = (1.0,),
    class_labels: Sequence[int] | None = None,
    seeds: Sequence[int] = tuple(range(20)),
    num_inference_steps: int | None = None,
    classifier: torch.nn.Module | None | str = "auto",
    device: str | torch.device = "cpu",
    log=print,
) -> list[TransferResult]:
    """Sample every model without the LoRA, with it at each scale, and after removing it.

    Args:
        lora: The LoRA (folder or :class:`LoraWeights`).
        models: ``(name, pipeline folder)`` pairs: teachers and students of the same architecture.
        scales: LoRA scales to sample at (besides 0 = without).
        class_labels: One label per sample (class-conditional models); ``None`` for unconditional ones.
        seeds: One seed per sample (per-image generators: sample k is the same at every scale).
        num_inference_steps: Teacher ODE steps (students use their trained timesteps); ``None``: defaults.
        classifier: Logits model for accuracy / margin; ``"auto"`` = the digits classifier for 8x8 digits.
        device: Where to sample.
        log: Progress printer (``None`` silences it).

    Raises:
        LoraCompatibilityError: when a model lacks the modules / shapes the LoRA needs.
    """
    from ..sampling import make_generators
    from .sources import load_pipeline

    lora = lora if isinstance(lora, LoraWeights) else load_lora(lora)
    labels = torch.as_tensor(list(class_labels)) if class_labels is not None else None
    if labels is not None and len(labels) != len(seeds):
        raise ValueError(f"Got {len(labels)} class labels for {len(seeds)} seeds; pass one label per seed.")
    results = []
    for name, path in models:
        t0 = time.time()
        pipe = load_pipeline(path, device=device)
        kwargs: dict = {"output_type": "latent"}
        if labels is not None:
            kwargs["class_labels"] = labels.tolist()
        else:
            kwargs["batch_size"] = len(seeds)
        if num_inference_steps is not None and not pipe.is_student:
            kwargs["num_inference_steps"] = num_inference_steps
        steps = len(pipe.config.default_timesteps or []) if pipe.is_student else (num_inference_steps or 50)

        def generate(pipe=pipe, kwargs=kwargs) -> torch.Tensor:
            return pipe(generator=make_generators(seeds, device=device), **kwargs).images.float().cpu()

        without, with_lora, restored = sweep_lora_scales(pipe, lora, generate, scales)
        images = {s: x.clamp(-1, 1) for s, x in {**without, **with_lora}.items()}
        if isinstance(classifier, str):
            classifier = load_digits_classifier_for(images[0.0])
        stats = {s: stroke_statistics(x, labels, classifier) for s, x in images.items()}
        shift = {s: paired_shift(images[0.0], x) for s, x in images.items() if s != 0.0}
        results.append(TransferResult(name, str(path), steps, images, stats, shift, restored, time.time() - t0))
        if log is not None:
            log(f"{name}: sampled {len(seeds)} x {1 + len(scales)} in {time.time() - t0:.1f}s, "
                f"restored bitwise after removing the LoRA: {restored}")
    return results


def markdown_table(results: Sequence[TransferResult]) -> str:
    """A markdown table: one row per model and scale (ink mass / fraction, paired shifts, accuracy, margin)."""
    head = ("| model | steps | LoRA scale | ink mass | Δ ink mass (paired) | samples inkier | ink fraction "
            "| Δ ink fraction | class acc. | margin | removed → bitwise |")
    lines = [head, "|" + "---|" * 11]
    for r in results:
        for s, st in r.stats.items():
            sh = r.shift.get(s)
            d_mass = f"{sh['ink_mass_shift']:+.4f} ± {sh['ink_mass_shift_se']:.4f}" if sh else "—"
            d_frac = f"{sh['ink_fraction_shift']:+.4f} ± {sh['ink_fraction_shift_se']:.4f}" if sh else "—"
            inkier = f"{100 * sh['ink_mass_increased']:.1f} %" if sh else "—"
            acc = f"{100 * st['accuracy']:.1f} %" if "accuracy" in st else "n/a"
            margin = f"{st['margin']:.2f} ± {st['margin_se']:.2f}" if "margin" in st else "n/a"
            restored = ("yes" if r.restored else "**NO**") if s == 0.0 else ""
            lines.append(
                f"| {r.name} | {r.steps} | {'none' if s == 0.0 else f'{s:g}'} | {st['ink_mass']:.4f} | {d_mass} "
                f"| {inkier} | {st['ink_fraction']:.4f} | {d_frac} | {acc} | {margin} | {restored} |"
            )
    return "\n".join(lines)


def comparison_grid(rows: Sequence[tuple[str, torch.Tensor]], scale: int = 4, label_width: int = 150):
    """A PIL image: one labelled row of ``[-1, 1]`` images per ``(label, images)`` (nearest-neighbour upscaled)."""
    from PIL import Image, ImageDraw

    from ..data.digits import make_grid_image

    tiles = [make_grid_image(x, nrow=x.shape[0], scale=scale, padding=2).convert("RGB") for _, x in rows]
    width = label_width + max(t.width for t in tiles)
    canvas = Image.new("RGB", (width, sum(t.height for t in tiles)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (label, _), tile in zip(rows, tiles, strict=True):
        canvas.paste(tile, (label_width, y))
        draw.text((4, y + tile.height // 2 - 6), label, fill="black")
        y += tile.height
    return canvas


def grid_rows(
    results: Sequence[TransferResult], indices: Sequence[int] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """Rows for :func:`comparison_grid`: per model, without LoRA then each scale (samples ``indices``, default all)."""
    rows = []
    for r in results:
        for s, x in r.images.items():
            tag = "no LoRA" if s == 0.0 else f"+ LoRA x{s:g}"
            rows.append((f"{r.name} ({r.steps}-step) {tag}", x if indices is None else x[list(indices)]))
    return rows


__all__ = ["TransferResult", "comparison_grid", "grid_rows", "load_digits_classifier_for", "markdown_table",
           "transfer"]

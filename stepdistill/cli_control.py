r"""Control-transfer commands: train a style LoRA on a teacher, apply a LoRA to teachers and students.

Examples::

    # a "bold" (thicker stroke) style LoRA on the shipped digits teacher, ~1-2 min on one CPU thread
    python -m stepdistill.cli_control train-style-lora --output_dir runs/digits_style_lora

    # apply it to the teacher and a DMD2 student at scales 0.5 and 1; grid rows: model x (no LoRA, scales)
    python -m stepdistill.cli_control transfer --lora runs/digits_style_lora \
        --model teacher=stepdistill/assets/digits/teacher --model dmd2-4step=runs/digits_dmd2_4step/student \
        --scales 0.5,1 --output lora_grid.png --json lora_transfer.json

``transfer`` samples every model with the same per-image seeds without the LoRA, with it at each scale,
and again after removing it (the last must equal the first bitwise), prints ink-mass / ink-fraction
shifts and -- for 8x8 digits models -- the digits classifier's accuracy and margin.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .control import LoraCompatibilityError, LoraFolderError, LoraWeights, load_lora, sweep_lora_scales
from .evaluation.sources import PipelineCallError
from .evaluation.stroke import paired_shift, stroke_statistics
from .loading import ModelFolderError

#: Default command name in usage and error messages.
PROG = "stepdistill-control"
#: The subcommands :func:`main` understands (for dispatch from another console script).
SUBCOMMANDS = ("train-style-lora", "transfer")
#: Errors reported as one line (exit status 1) instead of a traceback.
USER_ERRORS = (LoraCompatibilityError, LoraFolderError, ModelFolderError, PipelineCallError, FileNotFoundError)


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


def parse_float_list(text: str) -> list[float]:
    """``"0.5,1"`` -> ``[0.5, 1.0]``."""
    try:
        return [float(p) for p in str(text).split(",") if p.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"Cannot parse {text!r} as comma-separated numbers.") from err


def _named_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if sep:
        return name, path
    folder = Path(text)
    return (folder.parent.name if folder.name in ("student", "pipeline") else folder.name), text


def load_digits_classifier_for(images: torch.Tensor):
    """The shipped digits classifier when ``images`` are ``[B, 1, 8, 8]`` digits, else ``None``."""
    from .data.digits import RESOLUTION
    from .data.digits_models import DigitsClassifier, classifier_path

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
    from .evaluation.sources import load_pipeline
    from .sampling import make_generators

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

    from .data.digits import make_grid_image

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


# ----------------------------------------------------------------------------------------------------
def add_train_style_lora_command(sub: argparse._SubParsersAction) -> None:
    """Add ``train-style-lora`` to a subparser set (also used by ``stepdistill-sample``)."""
    from .trainers.style_lora import StyleLoraConfig

    train = sub.add_parser("train-style-lora", help="Train the 'bold' (thicker stroke) style LoRA on a digits teacher.")
    for f in fields(StyleLoraConfig):
        train.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f.metadata["help"])
    train.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    train.set_defaults(func=run_train)


def add_transfer_command(sub: argparse._SubParsersAction) -> None:
    """Add ``transfer`` to a subparser set (also used by ``stepdistill-sample``)."""
    tr = sub.add_parser("transfer", help="Apply a LoRA folder to teacher / student pipelines; write a comparison grid.")
    tr.add_argument("--lora", required=True, help="LoRA folder (pytorch_lora_weights.safetensors).")
    tr.add_argument("--model", action="append", required=True, metavar="[NAME=]FOLDER",
                    help="Pipeline folder (teacher or student); repeat for several models.")
    tr.add_argument("--scales", type=parse_float_list, default=[1.0], help="LoRA scales, e.g. 0.5,1 (default 1).")
    tr.add_argument("--classes", default="0-9", help="Class labels, e.g. 0-9 (empty: unconditional model).")
    tr.add_argument("--per_class", type=int, default=2, help="Samples per class (unconditional: total samples).")
    tr.add_argument("--seed", type=int, default=0, help="First per-image seed.")
    tr.add_argument("--num_inference_steps", type=int, default=None, help="Teacher ODE steps (default 50).")
    tr.add_argument("--output", default="lora_transfer.png", help="Comparison grid PNG.")
    tr.add_argument("--json", default=None, help="Also write the statistics as JSON here.")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    tr.set_defaults(func=run_transfer)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The argument parser of the control-transfer commands (subcommands ``train-style-lora``, ``transfer``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_style_lora_command(sub)
    add_transfer_command(sub)
    return parser


def run_train(args: argparse.Namespace) -> int:
    """``train-style-lora``: train and save the LoRA, print where it went."""
    torch.set_num_threads(max(1, args.threads))
    from .trainers.style_lora import StyleLoraConfig, train_style_lora

    config = StyleLoraConfig(**{f.name: getattr(args, f.name) for f in fields(StyleLoraConfig)})
    result = train_style_lora(config)
    loss = f"{result.history[-1]['loss']:.4f}" if result.history else "n/a"
    print(f"style LoRA saved to {result.folder} ({config.max_train_steps} steps, final running loss {loss})")
    return 0


def run_transfer(args: argparse.Namespace) -> int:
    """``transfer``: sample without / with the LoRA, print the table, write the grid (and JSON)."""
    torch.set_num_threads(max(1, args.threads))
    from .evaluation.evaluate import parse_int_list

    classes = parse_int_list(args.classes) if args.classes else []
    if classes:
        labels = [c for c in classes for _ in range(args.per_class)]
    else:
        labels = None
    n = len(labels) if labels is not None else args.per_class
    seeds = list(range(args.seed, args.seed + n))
    models = [_named_path(m) for m in args.model]
    results = transfer(args.lora, models, args.scales, labels, seeds, args.num_inference_steps, device=args.device)
    print(markdown_table(results))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    comparison_grid(grid_rows(results)).save(out)
    print(f"grid written to {out}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    if not all(r.restored for r in results):
        print("error: removing the LoRA did not restore the outputs bitwise", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Entry point: ``main(["transfer", ...])``; user errors print one line and exit with status 1.

    ``prog`` is the command name shown in usage and error lines. To wire the subcommands into another
    console script, dispatch ``if argv and argv[0] in SUBCOMMANDS: return main(argv, prog="that-script")``.
    """
    args = build_parser(prog).parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    raise SystemExit(main())

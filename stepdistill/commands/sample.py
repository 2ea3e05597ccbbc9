r"""``stepdistill sample`` (also ``stepdistill-sample``): sampling commands built on the pipelines.

Hybrid diversity sampling, diffusion-target grids, and LoRA control transfer between base and distilled models
(with a digits style LoRA to try it on). Examples::

    # hybrid samples of the digits teacher + 4-step DMD2 student, and a teacher / student / hybrid grid
    stepdistill sample hybrid --base digits --student runs/digits_dmd2_4step/student \
        --class_labels 0-9 --seeds 0-19 --base_steps 1 --out_dir outputs/hybrid

    # the x0 estimate after every step (diffusion targets), rows = seeds, for base / student / hybrid
    stepdistill sample dt --base digits --student runs/digits_dmd2_4step/student \
        --class_labels 3 --seeds 0-3 --out docs/dt_grid.png

    # a saved HybridDiversityPipeline folder instead of --base / --student
    stepdistill sample hybrid --pipeline outputs/hybrid_pipeline --class_labels 7 --seeds 0-7 --out_dir outputs/h

    # a "bold" (thicker stroke) style LoRA on the shipped digits teacher, ~1-2 min on one CPU thread
    stepdistill sample train-style-lora --output_dir runs/digits_style_lora

    # apply it to the teacher and a DMD2 student at scales 0.5 and 1; grid rows: model x (no LoRA, scales)
    stepdistill sample transfer --lora runs/digits_style_lora \
        --model teacher=digits --model dmd2-4step=runs/digits_dmd2_4step/student \
        --scales 0.5,1 --output lora_grid.png --json lora_transfer.json

``transfer`` samples every model with the same per-image seeds without the LoRA, with it at each scale, and
again after removing it (the last must equal the first bitwise), and prints ink-mass / ink-fraction shifts and
-- for 8x8 digits models -- the digits classifier's accuracy and margin (:mod:`stepdistill.evaluation.transfer`).
``train-style-lora`` takes every :class:`~stepdistill.trainers.style_lora.StyleLoraConfig` field as a flag (and
``--config recipe.yaml``).

Adding a subcommand: write ``add_<name>_command(subparsers)`` (which calls ``subparsers.add_parser(...)``, adds
its arguments -- :func:`add_model_arguments` and friends are shared -- and ``set_defaults(func=run_<name>)``) and
``run_<name>(args) -> int``, then append the adder to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..configs import parse_configs
from ..control import LoraCompatibilityError, LoraFolderError
from ..evaluation.sources import PipelineCallError
from ..loading import ModelFolderError, load_pipeline_folder, model_folder
from .common import float_list, int_list, number, number_list, user_errors

if TYPE_CHECKING:
    from ..pipelines import HybridDiversityPipeline

#: Command name in usage and error lines (the back-compatible console script; ``stepdistill sample`` passes its own).
PROG = "stepdistill-sample"
#: Errors reported as one line (exit status 1) instead of a traceback: the pipelines' errors name the fix.
USER_ERRORS = (ValueError, FileNotFoundError, ModelFolderError, LoraCompatibilityError, LoraFolderError,
               PipelineCallError)


# ----------------------------------------------------------------------------------------------------
# shared argument groups
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--pipeline`` or ``--base`` + ``--student`` (local folders), ``--device``, ``--threads``."""
    g = p.add_argument_group("models")
    g.add_argument("--pipeline", default=None, help="A saved HybridDiversityPipeline folder.")
    g.add_argument("--base", default=None,
                   help="Base (teacher) pipeline folder (StepDistillPipeline or stock; 'digits': the shipped teacher).")
    g.add_argument("--student", default=None, help="Student pipeline folder (StepDistillPipeline or stock).")
    g.add_argument(
        "--student_timesteps", type=number_list, default=None,
        help="The student's trained timesteps, e.g. 999,749,499,249 (default: from the student folder).",
    )  # fmt: skip
    g.add_argument("--device", default="cpu", help="Device (default cpu).")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads.")


def add_condition_arguments(p: argparse.ArgumentParser) -> None:
    """``--seeds``, ``--class_labels``, ``--prompt`` (labels / prompts are cycled over the seeds)."""
    g = p.add_argument_group("what to sample")
    g.add_argument("--seeds", type=int_list, default=[0, 1, 2, 3], help="One image per seed, e.g. 0-7 (default 0-3).")
    g.add_argument(
        "--class_labels", type=int_list, default=None,
        help="Class labels, cycled over the seeds, e.g. 3 or 0-9 (class-conditional models).",
    )  # fmt: skip
    g.add_argument("--prompt", action="append", default=None, help="A prompt (repeatable; cycled over the seeds).")


def add_hybrid_arguments(p: argparse.ArgumentParser) -> None:
    """The hand-over options of :meth:`~stepdistill.pipelines.HybridDiversityPipeline.plan`."""
    g = p.add_argument_group("hybrid mapping (defaults: the pipeline's config; see HybridDiversityPipeline.plan)")
    k = g.add_mutually_exclusive_group()
    k.add_argument("--base_steps", type=int, default=None, help="Base steps k >= 1 (default 1).")
    k.add_argument("--handover_timestep", type=number, default=None, help="Base runs its timesteps above this.")
    b = g.add_mutually_exclusive_group()
    b.add_argument(
        "--base_num_inference_steps", type=int, default=None,
        help="Base timesteps = its scheduler's spacing for N steps (default: the student's timesteps).",
    )  # fmt: skip
    b.add_argument("--base_timesteps", type=number_list, default=None, help="Explicit base timesteps.")
    g.add_argument("--base_guidance_scale", type=float, default=None, help="Base CFG weight (applied when > 1).")
    g.add_argument("--handover", choices=("renoise", "transport"), default=None, help="Hand-over (default renoise).")
    g.add_argument(
        "--resume_timestep", type=number, default=None,
        help="One-step students: noise level of the state the student is fed.",
    )  # fmt: skip
    s = g.add_mutually_exclusive_group()
    s.add_argument("--steps", type=int, default=None, help="Student steps (default: its trained timesteps).")
    s.add_argument("--timesteps", type=number_list, default=None, help="Explicit student timesteps.")
    g.add_argument("--guidance_scale", type=float, default=None, help="Student CFG weight (default off).")
    g.add_argument("--tile_size", type=int, default=64, help="Grid tile width in pixels (default 64).")


def load_hybrid_pipeline(args: argparse.Namespace) -> HybridDiversityPipeline:
    """The :class:`~stepdistill.pipelines.HybridDiversityPipeline` of ``--pipeline`` or ``--base`` + ``--student``."""
    from ..pipelines import HybridDiversityPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pipeline is not None:
        if args.base is not None or args.student is not None:
            raise ValueError("Pass --pipeline, or --base and --student, not both.")
        folder = Path(args.pipeline)
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"--pipeline {str(folder)!r} is not a pipeline folder (no model_index.json).")
        pipe = load_pipeline_folder(folder, HybridDiversityPipeline)
        if args.student_timesteps is not None:
            pipe.register_to_config(default_timesteps=list(args.student_timesteps))
    else:
        if args.base is None or args.student is None:
            raise ValueError("Name the models: --base TEACHER_FOLDER --student STUDENT_FOLDER, or --pipeline FOLDER.")
        pipe = HybridDiversityPipeline.from_pipelines(
            model_folder(args.base), model_folder(args.student), student_timesteps=args.student_timesteps
        )
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hybrid_call_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Pipeline call arguments from :func:`add_hybrid_arguments` (unset options are left to the pipeline)."""
    keys = {
        "base_steps": "base_steps",
        "handover_timestep": "handover_timestep",
        "base_num_inference_steps": "base_num_inference_steps",
        "base_timesteps": "base_timesteps",
        "base_guidance_scale": "base_guidance_scale",
        "handover": "handover",
        "resume_timestep": "resume_timestep",
        "steps": "num_inference_steps",
        "timesteps": "timesteps",
        "guidance_scale": "guidance_scale",
    }
    return {call: getattr(args, arg) for arg, call in keys.items() if getattr(args, arg, None) is not None}


def condition_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``class_labels`` / ``prompt`` with one entry per seed (cycled)."""
    n = len(args.seeds)
    out: dict[str, Any] = {}
    if args.class_labels:
        out["class_labels"] = [args.class_labels[i % len(args.class_labels)] for i in range(n)]
    if args.prompt:
        out["prompt"] = [args.prompt[i % len(args.prompt)] for i in range(n)]
    return out


# ----------------------------------------------------------------------------------------------------
# hybrid
def add_hybrid_command(sub: argparse._SubParsersAction) -> None:
    """``hybrid``: hybrid samples (one PNG per seed) and a teacher / student / hybrid comparison grid."""
    p = sub.add_parser(
        "hybrid",
        help="Sample base-then-student hybrids; write the images and a teacher/student/hybrid grid.",
        description="The base runs the first step(s), the student finishes (diversity distillation).",
    )
    add_model_arguments(p)
    add_condition_arguments(p)
    add_hybrid_arguments(p)
    p.add_argument("--out_dir", required=True, help="Folder for the images, samples.json and the grid.")
    p.add_argument("--grid", default=None, help="Grid PNG path (default OUT_DIR/diversity_grid.png).")
    p.add_argument("--no_grid", action="store_true", help="Only the hybrid images.")
    p.add_argument("--teacher_steps", type=int, default=50, help="Teacher steps of the grid's teacher row (50).")
    p.add_argument("--save_pipeline", default=None, help="Also save the HybridDiversityPipeline to this folder.")
    p.set_defaults(func=run_hybrid)


def run_hybrid(args: argparse.Namespace) -> int:
    """Run ``stepdistill sample hybrid``."""
    from ..sampling import make_generators
    from ..visualization import diversity_grid

    pipe = load_hybrid_pipeline(args)
    cond = condition_kwargs(args)
    call = hybrid_call_kwargs(args)
    tile = call_tile(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = pipe(**cond, **call, generator=make_generators(args.seeds), output_type="pil")
    records = []
    for i, (seed, image) in enumerate(zip(args.seeds, out.images)):
        name = f"{i:04d}_seed{seed}.png"
        image.save(out_dir / name)
        record = {"file": name, "seed": seed}
        if "class_labels" in cond:
            record["class_label"] = cond["class_labels"][i]
        if "prompt" in cond:
            record["prompt"] = cond["prompt"][i]
        records.append(record)
    summary = {"plan": out.plan.to_dict(), "call": call, "images": records}
    if not args.no_grid:
        grid, _ = diversity_grid(pipe, args.seeds, teacher_steps=args.teacher_steps, tile_size=tile, **cond, **call)
        grid_path = Path(args.grid) if args.grid else out_dir / "diversity_grid.png"
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(grid_path)
        summary["grid"] = str(grid_path)
    (out_dir / "samples.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.save_pipeline:
        pipe.save_pretrained(args.save_pipeline)
    print(f"{out.plan.describe()}: wrote {len(records)} images to {out_dir}" + (
        f" and the grid {summary['grid']}" if "grid" in summary else ""))  # fmt: skip
    return 0


def call_tile(args: argparse.Namespace) -> int:
    """The grid tile width, checked."""
    if args.tile_size < 8:
        raise ValueError(f"--tile_size must be >= 8 pixels, got {args.tile_size}.")
    return args.tile_size


# ----------------------------------------------------------------------------------------------------
# dt
def add_dt_command(sub: argparse._SubParsersAction) -> None:
    """``dt``: the diffusion-target grid (x0 estimate after every step; rows = seeds, columns = steps)."""
    p = sub.add_parser(
        "dt",
        help="Diffusion-target grid: the decoded x0 estimate after every step, for base / student / hybrid.",
    )
    add_model_arguments(p)
    add_condition_arguments(p)
    add_hybrid_arguments(p)
    p.add_argument("--out", required=True, help="Output PNG.")
    p.add_argument(
        "--modes", default="base,student,hybrid",
        help="Comma-separated sections, from base, student, hybrid (default all three).",
    )  # fmt: skip
    p.add_argument("--dt_base_steps", type=int, default=10, help="Steps of the base-alone section (default 10).")
    p.set_defaults(func=run_dt)


def run_dt(args: argparse.Namespace) -> int:
    """Run ``stepdistill sample dt``."""
    from ..visualization import diffusion_target_grid

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("base", "student", "hybrid")]
    if bad or not modes:
        raise ValueError(f"--modes takes base, student and/or hybrid, got {args.modes!r}.")
    pipe = load_hybrid_pipeline(args)
    cond = condition_kwargs(args)
    image, runs = diffusion_target_grid(
        pipe, modes, args.seeds, tile_size=call_tile(args), base_num_inference_steps=args.dt_base_steps,
        **cond, **hybrid_call_kwargs(args),
    )  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out} ({image.width}x{image.height}): " + "; ".join(r.plan.describe() for r in runs))
    return 0


# ----------------------------------------------------------------------------------------------------
# transfer
def add_transfer_command(sub: argparse._SubParsersAction) -> None:
    """``transfer``: apply a LoRA to teacher / student pipelines; print the statistics, write a comparison grid."""
    tr = sub.add_parser("transfer", help="Apply a LoRA folder to teacher / student pipelines; write a comparison grid.")
    tr.add_argument("--lora", required=True, help="LoRA folder (pytorch_lora_weights.safetensors).")
    tr.add_argument("--model", action="append", required=True, metavar="[NAME=]FOLDER",
                    help="Pipeline folder (teacher or student; 'digits': the shipped teacher); repeat for several.")
    tr.add_argument("--scales", type=float_list, default=[1.0], help="LoRA scales, e.g. 0.5,1 (default 1).")
    tr.add_argument("--classes", type=int_list, default="0-9",
                    help="Class labels, e.g. 0-9 (empty: unconditional model).")
    tr.add_argument("--per_class", type=int, default=2, help="Samples per class (unconditional: total samples).")
    tr.add_argument("--seed", type=int, default=0, help="First per-image seed.")
    tr.add_argument("--num_inference_steps", type=int, default=None, help="Teacher ODE steps (default 50).")
    tr.add_argument("--output", default="lora_transfer.png", help="Comparison grid PNG.")
    tr.add_argument("--json", default=None, help="Also write the statistics as JSON here.")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    tr.set_defaults(func=run_transfer)


def _named_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if sep:
        return name, path
    folder = Path(text)
    return (folder.parent.name if folder.name in ("student", "pipeline") else folder.name), text


def run_transfer(args: argparse.Namespace) -> int:
    """Run ``stepdistill sample transfer``: sample without / with the LoRA, print the table, write the grid."""
    from ..evaluation.transfer import comparison_grid, grid_rows, markdown_table, transfer

    torch.set_num_threads(max(1, args.threads))
    labels = [c for c in args.classes for _ in range(args.per_class)] if args.classes else None
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


# ----------------------------------------------------------------------------------------------------
# train-style-lora (a config-dataclass command: parsed by stepdistill.configs, dispatched before argparse)
@dataclass
class ThreadArguments:
    """CPU settings of a command."""

    threads: int = field(default=1, metadata={"help": "torch CPU threads."})


def add_train_style_lora_command(sub: argparse._SubParsersAction) -> None:
    """List ``train-style-lora`` (its flags are parsed by :func:`run_train_style_lora`, see :func:`main`)."""
    sub.add_parser("train-style-lora", add_help=False,
                   help="Train the 'bold' (thicker stroke) style LoRA on a digits teacher (--help: its flags).")


def run_train_style_lora(argv: Sequence[str], prog: str) -> int:
    """Run ``stepdistill sample train-style-lora``: train and save the LoRA, print where it went."""
    from ..trainers.style_lora import StyleLoraConfig, train_style_lora

    with user_errors(prog, (ValueError, FileNotFoundError, ModelFolderError)):
        config, run = parse_configs((StyleLoraConfig, ThreadArguments), argv, prog=prog)
        torch.set_num_threads(max(1, run.threads))
        result = train_style_lora(config)
    loss = f"{result.history[-1]['loss']:.4f}" if result.history else "n/a"
    print(f"style LoRA saved to {result.folder} ({config.max_train_steps} steps, final running loss {loss})")
    return 0


# ----------------------------------------------------------------------------------------------------
#: Each entry adds one subcommand to the parser (see the module docstring).
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_hybrid_command, add_dt_command, add_transfer_command, add_train_style_lora_command,
]


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The parser of ``stepdistill sample``, one subparser per entry of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Sampling commands: hybrid diversity sampling (base then student), diffusion-target grids, "
                    "LoRA control transfer between base and distilled models (and a digits style LoRA to try it).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Entry point of ``stepdistill sample``; user errors print one line and exit with status 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-style-lora"]:
        return run_train_style_lora(argv[1:], prog=f"{prog} train-style-lora")
    args = build_parser(prog).parse_args(argv)
    with user_errors(f"{prog} {args.command}", USER_ERRORS):
        return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

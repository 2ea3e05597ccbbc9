r"""``stepdistill pairs``: make a DMD1 regression-pairs file from a DMD recipe and / or flags.

    stepdistill pairs --config recipes/digits_dmd_1step.yaml --output runs/pairs/digits_1024.safetensors
    stepdistill pairs --teacher digits --data uniform_labels --num_regression_pairs 4096 --output pairs.safetensors
    accelerate launch --num_processes 2 -m stepdistill pairs --config recipe.yaml --output p.safetensors

Reads the :class:`~stepdistill.trainers.dmd.DMDConfig` fields that decide the pairs -- ``teacher``, ``data`` and
its options, ``real_guidance_scale``, ``num_regression_pairs``, ``regression_teacher_steps``, ``seed``,
``mixed_precision``, ``num_threads``, ``cpu`` -- so training with ``--regression_pairs <file>`` uses exactly the
pairs the trainer would otherwise generate at start. The file format lives in :mod:`stepdistill.trainers.pairs`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..configs import parse_configs
from ..loading import ModelFolderError
from ..utils import precision_dtype, runs_on_cpu
from .common import user_errors

if TYPE_CHECKING:
    from ..trainers.dmd import DMDConfig

_DESCRIPTION = """Make a DMD1 regression-pairs file (teacher ODE samples on fixed noise and data-source conditions).
The recipe fields that decide the pairs: teacher, data (+ prompts / dataset / num_classes / null_class_label ...),
real_guidance_scale, num_regression_pairs, regression_teacher_steps, seed (pair seed = seed + 4242),
mixed_precision, num_threads, cpu; the other DMDConfig fields are accepted (one recipe serves both commands) and
ignored. Multi-process: accelerate launch --num_processes K -m stepdistill pairs ... (each process makes a
contiguous shard next to the output; rank 0 merges them; the processes must share that folder)."""


@dataclass
class PairsArguments:
    """Where the pairs go and how many the teacher makes per call."""

    output: str | None = field(default=None, metadata={"help": "Pairs file to write (default: regression_pairs)."})
    batch_size: int = field(default=256, metadata={"help": "Pairs per teacher call."})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")


def generate_pairs_main(argv: Sequence[str] | None = None, prog: str = "stepdistill pairs") -> Path:
    """Parse a DMD recipe and / or flags plus ``--output`` / ``--batch_size``, and make the pairs file.

    Under ``accelerate launch`` every process makes a contiguous shard, writes it next to the output, and rank 0
    merges them (the processes must share the output folder).

    Returns:
        The written file.
    """
    from ..trainers.dmd import DMDConfig

    pairs_args, cfg = parse_configs((PairsArguments, DMDConfig), argv, prog=prog, description=_DESCRIPTION)
    output = pairs_args.output or cfg.regression_pairs
    if not output:
        raise ValueError("give --output PATH (or set regression_pairs in the recipe).")
    if not cfg.teacher:
        raise ValueError("give --teacher <pipeline folder> (or a recipe that sets it).")
    return generate_pairs(cfg, Path(output), pairs_args.batch_size)


def generate_pairs(cfg: DMDConfig, output: Path, batch_size: int = 256) -> Path:
    """Make the pairs file ``output`` for the DMD config ``cfg`` on this process's share of the indices."""
    from accelerate import PartialState

    from ..data.sources import make_data_source
    from ..loading import load_denoiser
    from ..trainers.pairs import (
        default_pairs_seed,
        generate_regression_pairs,
        load_regression_pairs,
        merge_regression_pairs,
        read_pairs_metadata,
        save_regression_pairs,
    )
    from ..trainers.teacher import infer_sample_shape, resolve_guidance, teacher_root

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    state = PartialState(cpu=runs_on_cpu(cfg.cpu))
    dtype = precision_dtype(cfg.mixed_precision)
    teacher = load_denoiser(cfg.teacher)
    teacher.model.requires_grad_(False).eval().to(state.device)
    if dtype != torch.float32:
        teacher.model.to(dtype=dtype)
    root = teacher_root(cfg.teacher)
    source = make_data_source(cfg, root, teacher.model, state.device, dtype)
    sample_shape = list(infer_sample_shape(teacher.model, cfg.sample_shape))
    count = cfg.num_regression_pairs
    world, rank = state.num_processes, state.process_index
    if count < world:
        raise ValueError(f"num_regression_pairs={count} is smaller than the {world} processes: ask for at least "
                         f"{world} pairs or launch fewer processes.")
    indices = list(range(rank * count // world, (rank + 1) * count // world))  # balanced, never empty
    pairs = generate_regression_pairs(
        teacher, source, count, sample_shape, cfg.regression_teacher_steps,
        resolve_guidance(cfg.real_guidance_scale, cfg.teacher), default_pairs_seed(cfg.seed), indices=indices,
        batch_size=batch_size, device=state.device,
        metadata={"teacher": str(root.resolve()), "data": cfg.data, "num_processes": world},
        progress=state.is_main_process,
    )
    if world == 1:
        save_regression_pairs(pairs, output)
    else:
        save_regression_pairs(pairs, _shard_path(output, rank, world), shard=True)
        state.wait_for_everyone()
        if state.is_main_process:
            shards = [load_regression_pairs(_shard_path(output, r, world)) for r in range(world)]
            save_regression_pairs(merge_regression_pairs(shards), output)
            for r in range(world):
                _shard_path(output, r, world).unlink(missing_ok=True)
        state.wait_for_everyone()
    if state.is_main_process:
        meta = read_pairs_metadata(output)
        keys = ("count", "num_inference_steps", "guidance_scale", "seed", "sample_shape", "conditioning", "teacher")
        print(json.dumps({"output": str(output), **{k: meta[k] for k in keys}}, indent=2))
    return output


def _shard_path(output: Path, rank: int, world: int) -> Path:
    return output.with_name(f".{output.name}.shard-{rank:03d}-of-{world:03d}")


def main(argv: Sequence[str] | None = None, prog: str = "stepdistill pairs") -> int:
    """Entry point of ``stepdistill pairs``; user errors print one line and exit with status 1."""
    with user_errors(prog, (ValueError, FileNotFoundError, ModelFolderError)):
        generate_pairs_main(list(sys.argv[1:] if argv is None else argv), prog=prog)
    return 0


__all__ = ["PairsArguments", "generate_pairs", "generate_pairs_main", "main"]

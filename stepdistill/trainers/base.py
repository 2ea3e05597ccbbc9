"""The base distillation trainer on Accelerate, shared by every method.

What lives here (and nowhere else):

* config handling: :class:`TrainerConfig` (typed fields with ``help``, validated in ``__post_init__``)
  and :func:`parse_config` (``--config recipe.yaml`` first, then ``--key value`` overrides);
* the loop: iterations, gradient accumulation, several named trainable modules each with its own
  optimizer and LR schedule (generator, critic, ... -- later methods add more), gradient clipping,
  an optional generator EMA (diffusers ``EMAModel``), flat-name metrics through ``accelerator.log``,
  a tqdm bar, periodic sample grids and evaluation hooks;
* checkpoints: ``accelerator.save_state`` plus the models as diffusers folders, written atomically
  (a temporary folder renamed into place), keep-last-N, ``--resume_from_checkpoint latest``;
* safety: a non-finite loss stops training with a clear error and never overwrites a checkpoint.

A method subclasses :class:`DistillationTrainer` and implements :meth:`~DistillationTrainer.build`
(models, :meth:`~DistillationTrainer.add_trainable`), :meth:`~DistillationTrainer.training_step`,
:meth:`~DistillationTrainer.save_models` and :meth:`~DistillationTrainer.export`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..conditioning import Conditioning

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
CHECKPOINT_PREFIX = "checkpoint-"


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the loss, the step and the last good checkpoint."""


# --------------------------------------------------------------------------------------------------
# config
@dataclass
class TrainerConfig:
    """Fields every distillation trainer shares (a method's config subclasses this).

    Example:
        >>> cfg = parse_config(DMDConfig, ["--config", "recipes/digits_dmd2_1step.yaml", "--max_train_steps", "10"])
    """

    output_dir: str = field(default="runs/distill", metadata={"help": "Run folder: checkpoints, samples, export."})
    seed: int = field(default=0, metadata={"help": "Random seed (model init and every noise draw)."})
    max_train_steps: int = field(default=1000, metadata={"help": "Training iterations (one critic update each)."})
    train_batch_size: int = field(default=32, metadata={"help": "Micro-batch size per process."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches accumulated into one optimizer step."}
    )
    generator_learning_rate: float = field(default=1e-5, metadata={"help": "Generator AdamW learning rate."})
    critic_learning_rate: float = field(default=1e-5, metadata={"help": "Critic (fake score) AdamW learning rate."})
    critic_updates_per_generator_update: int = field(
        default=5, metadata={"help": "TTUR ratio: the generator steps every N iterations, the critic every one."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (both optimizers)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (both optimizers)."})
    adam_weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": f"One of {list(LR_SCHEDULERS)}."})
    lr_warmup_steps: int = field(default=500, metadata={"help": "LR warm-up iterations (both optimizers)."})
    max_grad_norm: float = field(default=10.0, metadata={"help": "Gradient clipping norm; <= 0 disables clipping."})
    use_ema: bool = field(default=False, metadata={"help": "Keep an EMA of the generator; exported if set."})
    ema_decay: float = field(default=0.99, metadata={"help": "Generator EMA decay."})
    ema_start_step: int = field(default=0, metadata={"help": "Generator updates before the EMA starts averaging."})
    mixed_precision: str = field(
        default="no", metadata={"help": "no | fp16 | bf16: frozen models in this dtype, trainables fp32 + autocast."}
    )
    allow_tf32: bool = field(default=False, metadata={"help": "Allow TF32 matmuls on Ampere+ GPUs."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Gradient checkpointing on trainables."})
    enable_xformers_memory_efficient_attention: bool = field(
        default=False, metadata={"help": "Use xformers attention when installed (PyTorch SDPA otherwise)."}
    )
    cpu: bool = field(default=False, metadata={"help": "Force CPU (multi-process CPU runs use gloo)."})
    num_threads: int = field(
        default=0, metadata={"help": "torch CPU threads per process (0: torch's default; 1 is fastest on shared CPUs)."}
    )
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a checkpoint every N iterations (0: off)."})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "Keep the last N checkpoints (0: keep all)."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' (in output_dir/checkpoints)."}
    )
    log_every: int = field(default=10, metadata={"help": "Log metrics every N iterations."})
    sample_every: int = field(default=0, metadata={"help": "Write a sample grid every N iterations (0: only at end)."})
    eval_every: int = field(default=0, metadata={"help": "Run the evaluation hook every N iterations (0: at end)."})
    report_to: str = field(default="none", metadata={"help": "accelerate tracker (tensorboard, wandb, ...) or none."})
    tracker_project_name: str = field(default="stepdistill", metadata={"help": "Tracker project name."})
    export: bool = field(default=True, metadata={"help": "Export the student as a pipeline folder at the end."})
    # data: conditioning (and real images) -- see stepdistill.trainers.data
    data: str = field(
        default="digits",
        metadata={"help": "Conditions / real images: digits | uniform_labels | unconditional | prompts | dataset."},
    )
    prompts: str | None = field(
        default=None, metadata={"help": "data=prompts: a .txt file (one prompt per line), csv/json/parquet, or a "
                                        "save_to_disk folder."}
    )
    prompt_column: str | None = field(default=None, metadata={"help": "Prompt column (default: prompt/text/caption)."})
    dataset: str | None = field(
        default=None, metadata={"help": "data=dataset: an image folder (imagefolder), csv/json with image paths, or "
                                        "a save_to_disk folder (real images for the GAN / noised inputs)."}
    )
    data_split: str = field(default="train", metadata={"help": "Split of a multi-split dataset."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: image/file_name/...)."})
    caption_column: str | None = field(
        default=None, metadata={"help": "Caption column for text teachers (default: prompt/text/caption)."}
    )
    label_column: str | None = field(default=None, metadata={"help": "Class-label column (default: label/class)."})
    sample_shape: list[int] | None = field(
        default=None, metadata={"help": "[C, H, W] of the teacher's inputs (default: from its config's in_channels "
                                        "and sample_size; needed for custom modules)."}
    )
    num_classes: int = field(default=10, metadata={"help": "Classes for data=uniform_labels."})
    null_class_label: int = field(default=10, metadata={"help": "The teacher's null class (CFG on labels)."})

    def __post_init__(self) -> None:
        positive = ("max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                    "critic_updates_per_generator_update")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("generator_learning_rate", "critic_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        for name in ("lr_warmup_steps", "checkpointing_steps", "checkpoints_total_limit", "log_every",
                     "sample_every", "eval_every", "ema_start_step", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {self.mixed_precision!r}.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {list(LR_SCHEDULERS)}, got {self.lr_scheduler!r}.")
        from .data import DATA_SOURCES

        if self.data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {list(DATA_SOURCES)}, got {self.data!r}.")
        if self.data == "prompts" and not self.prompts:
            raise ValueError("data=prompts needs --prompts <file.txt | csv/json/parquet | save_to_disk folder>.")
        if self.data == "dataset" and not self.dataset:
            raise ValueError("data=dataset needs --dataset <image folder | csv/json | save_to_disk folder>.")
        if self.sample_shape is not None and (len(self.sample_shape) != 3 or min(self.sample_shape) < 1):
            raise ValueError(f"sample_shape must be [C, H, W] with positive entries, got {self.sample_shape}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0):
            raise ValueError(f"Adam betas must be in [0, 1), got ({self.adam_beta1}, {self.adam_beta2}).")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def _converter(tp: Any):
    """A function turning a CLI string or YAML value into the field type ``tp``."""
    base, optional = _unwrap_optional(tp)

    def convert(value: Any) -> Any:
        if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
            return None
        origin = typing.get_origin(base)
        if origin in (list, tuple):
            (elem,) = typing.get_args(base)[:1] or (str,)
            if isinstance(value, str):
                value = [v for v in re.split(r"[,\s]+", value.strip().strip("[]")) if v]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [_converter(elem)(v) for v in value]
        if base is bool:
            return _parse_bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            return float(value)
        return value if base is Any else base(value)

    return convert


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain (YAML/JSON-serialisable) dict of a config dataclass."""
    return dataclasses.asdict(config)


def parse_config(cls: type, argv: Sequence[str] | None = None) -> Any:
    """Build a config dataclass from ``--config recipe.yaml`` and ``--key value`` overrides.

    The YAML file sets defaults; command-line flags override them; ``__post_init__`` validates the
    result. Unknown keys (in YAML or on the command line) are errors. Booleans accept true/false,
    lists accept ``--student_timesteps 999 749`` or ``999,749``.

    Args:
        cls: The config dataclass (e.g. ``DMDConfig``).
        argv: Arguments (``sys.argv[1:]`` when ``None``).
    """
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    hints = typing.get_type_hints(cls)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    values: dict[str, Any] = {}
    names = [f.name for f in dataclasses.fields(cls)]
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise FileNotFoundError(f"Recipe {str(path)!r} does not exist.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"Recipe {str(path)!r} must be a YAML mapping of config fields.")
        unknown = sorted(set(loaded) - set(names))
        if unknown:
            raise ValueError(f"Recipe {str(path)!r} has unknown key(s) {unknown}; valid keys: {names}.")
        for key, value in loaded.items():
            try:
                values[key] = _converter(hints[key])(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"Recipe {str(path)!r}: bad value for {key!r}: {err}") from err
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML recipe; command-line flags override it.")
    for f in dataclasses.fields(cls):
        base, _ = _unwrap_optional(hints[f.name])
        kwargs: dict[str, Any] = {"type": _converter(hints[f.name]), "help": f.metadata.get("help", ""),
                                  "default": argparse.SUPPRESS}
        if typing.get_origin(base) in (list, tuple):
            kwargs["nargs"] = "+"
            kwargs["type"] = str
        parser.add_argument(f"--{f.name}", **kwargs)
    args = vars(parser.parse_args(rest))
    args.pop("config", None)
    for key, value in args.items():
        values[key] = _converter(hints[key])(value if not isinstance(value, list) else " ".join(value))
    return cls(**values)


# --------------------------------------------------------------------------------------------------
# data sources: conditions (and real images) for data-free and data-backed training
class ConditionSource:
    """Where a trainer draws conditioning (and, optionally, real images) from.

    Subclasses implement :meth:`sample`. ``has_images`` says whether real images come with it
    (needed by the GAN and by noised-real-data inputs).
    """

    has_images: bool = False

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Conditioning, torch.Tensor | None]:
        """Return ``(conditioning, images or None)`` for ``batch_size`` samples."""
        raise NotImplementedError

    def sample_conditions(self, batch_size: int, generator: torch.Generator) -> Conditioning:
        """The conditioning :meth:`sample` would return for the same generator state, without loading images."""
        return self.sample(batch_size, generator)[0]

    def grid_conditioning(self, n: int) -> Conditioning:
        """A fixed conditioning for sample grids (class labels in order, when there are classes)."""
        raise NotImplementedError


class DigitsSource(ConditionSource):
    """The digits world's ``train`` split: real 8x8 scans with their class labels (null class 10)."""

    has_images = True

    def __init__(self) -> None:
        from ..data.digits import NULL_CLASS, load_digits_split

        split = load_digits_split("train")
        self.images, self.labels, self.null_class = split.images, split.labels, NULL_CLASS

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Conditioning, torch.Tensor]:
        """Random scans (with replacement) and their labels."""
        idx = torch.randint(0, len(self.labels), (batch_size,), generator=generator)
        cond = Conditioning(class_labels=self.labels[idx].clone(), null_class_label=self.null_class)
        return cond, self.images[idx].clone()

    def grid_conditioning(self, n: int) -> Conditioning:
        """Labels ``0..9`` cycling."""
        return Conditioning(class_labels=torch.arange(n) % 10, null_class_label=self.null_class)


class UniformLabelSource(ConditionSource):
    """Data-free class-conditional training: labels uniform in ``0..num_classes-1``."""

    def __init__(self, num_classes: int, null_class_label: int) -> None:
        self.num_classes, self.null_class = num_classes, null_class_label

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Conditioning, None]:
        """Uniform labels, no images."""
        labels = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        return Conditioning(class_labels=labels, null_class_label=self.null_class), None

    def grid_conditioning(self, n: int) -> Conditioning:
        """Labels in order, cycling."""
        return Conditioning(class_labels=torch.arange(n) % self.num_classes, null_class_label=self.null_class)


class UnconditionalSource(ConditionSource):
    """Data-free training of an unconditional model."""

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Conditioning, None]:
        """An empty conditioning."""
        return Conditioning(), None

    def grid_conditioning(self, n: int) -> Conditioning:
        """An empty conditioning."""
        return Conditioning()


# --------------------------------------------------------------------------------------------------
# checkpoints
def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-NNNNNN``) in ``folder``, oldest first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


@dataclass
class Trainable:
    """One trainable module with its optimizer and LR schedule.

    Args:
        name: Metric / checkpoint name (``generator``, ``critic``, ...).
        module: The module (prepared by Accelerate after :meth:`DistillationTrainer.build`).
        optimizer: Its optimizer.
        lr_scheduler: Its LR schedule (stepped by the trainer every iteration).
    """

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any


class _RNGHolder:
    """State of the trainer's explicit generators, saved per process in checkpoints."""

    def __init__(self, **generators: torch.Generator) -> None:
        self.generators = generators

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: g.get_state() for k, g in self.generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, g in self.generators.items():
            g.set_state(state[k])


def _networks(module: nn.Module) -> list[nn.Module]:
    """``module.modules()`` plus those of a network it wraps without registering it (a shared-LoRA view)."""
    found = list(module.modules())
    inner = module.__dict__.get("model")
    if isinstance(inner, nn.Module):
        found += list(inner.modules())
    return found


class DistillationTrainer:
    """Base trainer: Accelerate setup, the iteration loop, checkpoints, logging, EMA, sample grids.

    Subclasses implement :meth:`build`, :meth:`training_step`, :meth:`save_models` and
    :meth:`export` (and optionally :meth:`sample_grid` and :meth:`evaluate`).

    Randomness: ``self.rng`` is a per-process ``torch.Generator`` (noise, data); ``self.shared_rng``
    is identical on every process (choices that must agree across ranks, e.g. the backward-simulation
    step). Both are checkpointed, so a resumed run continues the same random stream.

    Args:
        config: The method's config (a :class:`TrainerConfig` subclass).
        accelerator: An existing ``Accelerator`` (one is created from ``config`` otherwise).
        teacher: A ready :class:`~stepdistill.denoiser.Denoiser` to distill instead of loading
            ``config.teacher`` from a folder -- the way to bring any custom torch module
            (``Denoiser.from_model(module, schedule)``).
    """

    def __init__(self, config: TrainerConfig, accelerator=None, teacher=None) -> None:
        from accelerate.utils import set_seed

        self.config = config
        self.teacher_override = teacher
        self.accelerator = accelerator if accelerator is not None else self._make_accelerator()
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if config.num_threads > 0:
            torch.set_num_threads(config.num_threads)
        set_seed(config.seed)  # identical model initialisation on every process
        rank = self.accelerator.process_index
        self.rng = torch.Generator().manual_seed(config.seed * 7919 + 1000003 * rank + 1)
        self.shared_rng = torch.Generator().manual_seed(config.seed * 7919 + 17)
        self.global_step = 0
        self.trainables: dict[str, Trainable] = {}
        self.ema = None
        self.ema_target: nn.Module | None = None
        self._rng_holder = _RNGHolder(rng=self.rng, shared=self.shared_rng)
        self.build()
        self._prepare()

    # ----------------------------------------------------------------------------------------------
    # setup
    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.config
        # `accelerate launch --multi_gpu` on a machine without CUDA: run the processes on CPU (gloo).
        cpu = cfg.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
        return Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to in ("none", "", None) else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=f"{cfg.output_dir}/logs"),
            cpu=cpu,
        )

    def build(self) -> None:
        """Create the models, call :meth:`add_trainable` for each trainable one, set up EMA if wanted."""
        raise NotImplementedError

    def add_trainable(self, name: str, module: nn.Module, learning_rate: float) -> None:
        """Register a trainable module: fp32 trainable weights, its own AdamW optimizer and LR schedule."""
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params

        cfg = self.config
        module.train()
        cast_training_params(module, dtype=torch.float32)  # frozen parts (e.g. a shared LoRA base) keep their dtype
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"Trainable module {name!r} has no parameters that require grad.")
        if cfg.gradient_checkpointing:
            for m in _networks(module):
                if hasattr(m, "enable_gradient_checkpointing") and getattr(m, "_supports_gradient_checkpointing", 0):
                    m.enable_gradient_checkpointing()
        if cfg.enable_xformers_memory_efficient_attention:
            self._enable_xformers(module)
        optimizer = torch.optim.AdamW(
            params, lr=learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
        )
        lr_scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_train_steps
        )
        self.trainables[name] = Trainable(name, module, optimizer, lr_scheduler)

    @staticmethod
    def _enable_xformers(module: nn.Module) -> None:
        try:
            import xformers  # noqa: F401
        except ImportError:
            logger.warning("xformers is not installed: keeping PyTorch scaled-dot-product attention.")
            return
        for m in _networks(module):
            if hasattr(m, "enable_xformers_memory_efficient_attention"):
                m.enable_xformers_memory_efficient_attention()
                return

    def enable_ema(self, module: nn.Module) -> None:
        """Keep an EMA of ``module``'s parameters (call from :meth:`build`, on the unprepared module)."""
        from diffusers.training_utils import EMAModel

        self.ema_target = module
        # decay is 0 (a plain copy) for the first `ema_start_step` updates, as diffusers' update_after_step.
        self.ema = EMAModel(module.parameters(), decay=self.config.ema_decay,
                            update_after_step=self.config.ema_start_step)

    def _prepare(self) -> None:
        acc = self.accelerator
        names = list(self.trainables)
        objs = []
        for n in names:
            objs += [self.trainables[n].module, self.trainables[n].optimizer]
        prepared = acc.prepare(*objs)
        for i, n in enumerate(names):
            self.trainables[n].module, self.trainables[n].optimizer = prepared[2 * i], prepared[2 * i + 1]
        # LR schedules are stepped by hand every iteration (Accelerate's wrapper would step them once per
        # process and skip iterations where a generator does not update); register them for checkpoints.
        for n in names:
            acc.register_for_checkpointing(self.trainables[n].lr_scheduler)
        if self.ema is not None:
            self.ema.to(acc.device)
            acc.register_for_checkpointing(self.ema)

    def unwrap(self, name: str) -> nn.Module:
        """The bare module of trainable ``name`` (no DDP / autocast wrapper)."""
        return self.accelerator.unwrap_model(self.trainables[name].module)

    # ----------------------------------------------------------------------------------------------
    # optimisation helpers for subclasses
    def sync_context(self, name: str, micro_step: int):
        """Context for one micro-batch of ``name``: skips the DDP gradient all-reduce except on the last."""
        if micro_step < self.config.gradient_accumulation_steps - 1:
            return self.accelerator.no_sync(self.trainables[name].module)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch loss, scaled by ``1 / gradient_accumulation_steps``."""
        self.accelerator.backward(loss / self.config.gradient_accumulation_steps)

    def optimizer_step(self, name: str) -> float:
        """Clip, step and zero the optimizer of ``name``; return the pre-clip gradient norm."""
        t = self.trainables[name]
        params = [p for p in t.module.parameters() if p.requires_grad]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and self.unwrap(name) is self.ema_target:
            self.ema.step(self.ema_target.parameters())
        return float(norm) if norm is not None else float("nan")

    def zero_grad(self) -> None:
        """Zero the gradients of every trainable (DMD2 zeroes both after each step)."""
        for t in self.trainables.values():
            t.optimizer.zero_grad(set_to_none=True)

    def is_generator_step(self, step: int) -> bool:
        """TTUR: the generator updates on iterations ``0, N, 2N, ...``."""
        return step % self.config.critic_updates_per_generator_update == 0

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily swap the EMA weights into the EMA target (no-op without EMA)."""
        if self.ema is None or self.ema_target is None:
            yield
            return
        params = list(self.ema_target.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    # ----------------------------------------------------------------------------------------------
    # what methods implement
    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        """Run one iteration (all micro-batches, every optimizer that steps); return scalar metrics.

        Metrics use flat names (``loss/dm``, ``grad_norm/generator``); keys starting with ``loss/`` are
        checked for NaN / inf.
        """
        raise NotImplementedError

    def save_models(self, folder: Path) -> None:
        """Write the trainable models as diffusers folders into ``folder`` (main process only)."""
        raise NotImplementedError

    def export(self, folder: Path) -> Path:
        """Write the final student (main process only); return its folder."""
        raise NotImplementedError

    def sample_grid(self, path: Path) -> None:
        """Write a sample grid image to ``path`` (main process only); default: nothing."""

    def evaluate(self) -> dict[str, float]:
        """In-training evaluation metrics (main process only); default: none."""
        return {}

    # ----------------------------------------------------------------------------------------------
    # checkpoints
    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint of this run, if any."""
        found = list_checkpoints(self.checkpoint_dir)
        return found[-1] if found else None

    def save_checkpoint(self) -> Path:
        """Save a checkpoint atomically (every process takes part); prune to ``checkpoints_total_limit``."""
        acc = self.accelerator
        bad = [n for n in self.trainables if not all(torch.isfinite(p).all() for p in self.unwrap(n).parameters())]
        if bad:
            last = self.last_checkpoint()
            raise NonFiniteLossError(
                f"Non-finite weights in {bad} at iteration {self.global_step}: not saving a checkpoint; the last "
                f"good one is {str(last) if last else 'none'}. Lower the learning rate or the clipping norm."
            )
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.global_step:06d}"
        tmp = self.checkpoint_dir / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        torch.save(self._rng_holder.state_dict(), tmp / f"trainer_rng_{acc.process_index}.pt")
        if acc.is_main_process:
            self.save_models(tmp / "models")
            state = {"global_step": self.global_step, "num_processes": acc.num_processes}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            limit = self.config.checkpoints_total_limit
            if limit > 0:
                for old in list_checkpoints(self.checkpoint_dir)[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore models, optimizers, LR schedules, EMA, RNG streams and the step from ``path``."""
        path = Path(path)
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a stepdistill checkpoint (no trainer_state.json).")
        state = json.loads(state_file.read_text())
        self.accelerator.load_state(str(path))
        rng_file = path / f"trainer_rng_{self.accelerator.process_index}.pt"
        if rng_file.is_file():
            self._rng_holder.load_state_dict(torch.load(rng_file, weights_only=True))
        else:
            logger.warning("Checkpoint %s has no RNG state for process %d; noise streams restart.",
                           path, self.accelerator.process_index)
        self.global_step = int(state["global_step"])

    def _resolve_resume(self) -> Path | None:
        spec = self.config.resume_from_checkpoint
        if not spec:
            return None
        if spec == "latest":
            last = self.last_checkpoint()
            if last is None:
                self.accelerator.print(f"No checkpoint in {self.checkpoint_dir}: starting a new run.")
            return last
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint={spec!r}: no such checkpoint folder.")
        return path

    # ----------------------------------------------------------------------------------------------
    # the loop
    def _reduce_metrics(self, metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
        if not metrics:
            return {}
        keys = sorted(metrics)
        vec = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).detach().reshape(()).cpu()
                           for k in keys]).to(self.accelerator.device)
        vec = self.accelerator.reduce(vec, reduction="mean") if self.accelerator.num_processes > 1 else vec
        return dict(zip(keys, vec.cpu().tolist()))

    def _check_finite(self, metrics: dict[str, float]) -> None:
        bad = {k: v for k, v in metrics.items() if k.startswith("loss/") and not math.isfinite(v)}
        if bad:
            last = self.last_checkpoint()
            where = f"the last good checkpoint is {str(last)!r}" if last else "no checkpoint had been written yet"
            raise NonFiniteLossError(
                f"Non-finite loss at iteration {self.global_step}: {bad}. Training stopped without saving; "
                f"{where} (resume with --resume_from_checkpoint latest). Usual causes: a learning rate too "
                "high, fp16 overflow (try bf16), or a teacher/conditioning-timestep pair with ill-conditioned "
                "x0 (e.g. an eps-prediction teacher at t=999)."
            )

    def write_config(self) -> None:
        """Write the resolved config to ``output_dir/config.yaml`` (main process)."""
        import yaml

        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.config), sort_keys=False))

    def train(self) -> dict[str, Any]:
        """Run the loop to ``max_train_steps``; return a summary (final metrics, time, paths)."""
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.config
        self.write_config()
        if acc.log_with:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                    for k, v in config_to_dict(cfg).items()}
            acc.init_trackers(cfg.tracker_project_name, config=flat)
        resume = self._resolve_resume()
        if resume is not None:
            self.load_checkpoint(resume)
            acc.print(f"Resumed from {resume} at iteration {self.global_step}.")
        bar = tqdm(range(self.global_step, cfg.max_train_steps), initial=self.global_step,
                   total=cfg.max_train_steps, desc=type(self).__name__, disable=not acc.is_main_process)
        t0 = time.time()
        metrics: dict[str, float] = {}
        window: dict[str, tuple[float, int]] = {}
        for step in bar:
            raw = self.training_step(step)
            for t in self.trainables.values():
                t.lr_scheduler.step()
            metrics = self._reduce_metrics(raw)
            self._check_finite(metrics)
            self.global_step = step + 1
            bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items() if k.startswith("loss/")})
            for k, v in metrics.items():  # running means over the logging window
                total, count = window.get(k, (0.0, 0))
                window[k] = (total + v, count + 1)
            if cfg.log_every and self.global_step % cfg.log_every == 0:
                logs = {k: total / count for k, (total, count) in window.items()}
                window = {}
                for name, t in self.trainables.items():
                    logs[f"lr/{name}"] = t.lr_scheduler.get_last_lr()[0]
                acc.log(logs, step=self.global_step)
                self._append_jsonl({"step": self.global_step, **logs})
            if cfg.checkpointing_steps and self.global_step % cfg.checkpointing_steps == 0:
                self.save_checkpoint()
            if cfg.sample_every and self.global_step % cfg.sample_every == 0:
                self._sample_and_eval(grid=True, evaluate=False)
            if cfg.eval_every and self.global_step % cfg.eval_every == 0:
                self._sample_and_eval(grid=False, evaluate=True)
        summary: dict[str, Any] = {"final_metrics": metrics, "train_seconds": time.time() - t0,
                                   "global_step": self.global_step}
        summary["eval"] = self._sample_and_eval(grid=True, evaluate=True)
        summary["param_checksums"] = self._param_checksums()
        if cfg.export and acc.is_main_process:
            summary["export"] = str(self.export(self.output_dir / "student"))
        if acc.is_main_process:
            (self.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        acc.wait_for_everyone()
        acc.end_training()
        return summary

    def _sample_and_eval(self, grid: bool, evaluate: bool) -> dict[str, float]:
        acc = self.accelerator
        result: dict[str, float] = {}
        if acc.is_main_process:
            if grid:
                path = self.output_dir / "samples" / f"step-{self.global_step:06d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                self.sample_grid(path)
            if evaluate:
                result = self.evaluate()
                if result:
                    acc.log(result, step=self.global_step)
                    self._append_jsonl({"step": self.global_step, **result})
                    acc.print(f"eval @ {self.global_step}: {result}")
        acc.wait_for_everyone()
        return result

    def _append_jsonl(self, record: dict[str, Any]) -> None:
        """Append a record to ``output_dir/metrics.jsonl`` (main process; a tracker-independent log)."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _param_checksums(self) -> list[dict[str, float]]:
        """Per-process parameter checksums of every trainable (gathered; used to check ranks agree)."""
        acc = self.accelerator
        sums = [sum(float(p.detach().double().sum()) for p in self.unwrap(n).parameters()) for n in self.trainables]
        vec = torch.tensor(sums, dtype=torch.float64, device=acc.device)
        gathered = acc.gather(vec[None]) if acc.num_processes > 1 else vec[None]
        names = list(self.trainables)
        return [dict(zip(names, row.tolist())) for row in gathered.cpu()]


__all__ = [
    "ConditionSource",
    "DigitsSource",
    "DistillationTrainer",
    "NonFiniteLossError",
    "Trainable",
    "TrainerConfig",
    "UniformLabelSource",
    "UnconditionalSource",
    "config_to_dict",
    "list_checkpoints",
    "parse_config",
]

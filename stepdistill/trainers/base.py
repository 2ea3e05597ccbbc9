"""The base distillation trainer on Accelerate, shared by every method. It names no method's roles.

What lives here:

* :class:`TrainerConfig` -- the fields every method shares (loop, optimizer defaults, precision, checkpoints,
  logging, the teacher and its network layout), plus the data fields of :class:`~stepdistill.data.DataConfig`;
* trainables: :meth:`DistillationTrainer.add_trainable` registers a named module with its own
  :class:`OptimizerSettings` (learning rate, betas, weight decay, parameter groups, update interval, clipping),
  its own LR schedule and optionally its own EMA; :meth:`~DistillationTrainer.reset_trainable` re-initialises
  one (fresh weights, optimizer state, schedule, EMA) and :meth:`~DistillationTrainer.freeze_trainable` stops
  it, both recorded in checkpoints (Phased DMD resets each phase's critic and freezes finished experts);
* the loop: iterations, gradient accumulation, flat-name metrics through ``accelerator.log`` (reduced across
  processes only at log steps), a tqdm bar, periodic sample grids and evaluation hooks;
* checkpoints: ``accelerator.save_state`` with a save / load hook that writes each trainable model ONCE
  (:mod:`stepdistill.trainers.checkpointing`), written atomically, keep-last-N, ``--resume_from_checkpoint latest``;
  a non-finite loss stops training with a clear error and never overwrites a checkpoint;
* the teacher-side helpers every method needs (:meth:`~DistillationTrainer.load_teacher`, guidance, input shape,
  the data source with an optional subset, the network layout, init networks) and the output helpers (student
  export, sample-grid pixels, digits evaluation).

A method subclasses :class:`DistillationTrainer` and implements :meth:`~DistillationTrainer.build` (models,
:meth:`~DistillationTrainer.add_trainable`), :meth:`~DistillationTrainer.training_step` and
:meth:`~DistillationTrainer.export` (and optionally :meth:`~DistillationTrainer.sample_grid` /
:meth:`~DistillationTrainer.evaluate`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn

from ..adapters import NetworkLayout, make_layout
from ..conditioning import Conditioning
from ..data.config import DataConfig
from ..data.sources import ConditionSource, Predicate, make_data_source
from ..denoiser import Denoiser
from ..utils import atomic_write_file, precision_dtype, runs_on_cpu
from .checkpointing import (
    CHECKPOINT_PREFIX,
    EMA_FOLDER,
    TRAINER_STATE,
    WRITING_PREFIX,
    CheckpointMismatchError,
    RNGState,
    check_checkpoint_fits,
    commit_checkpoint,
    diffusers_submodules,
    list_checkpoints,
    load_module_weights,
    prune_checkpoints,
    read_module_weights,
    recover_checkpoints,
    save_module_weights,
    unsharded_class,
)

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the loss, the step and the last good checkpoint."""


# --------------------------------------------------------------------------------------------------
# config
@dataclass
class TrainerConfig(DataConfig):
    """Fields every distillation trainer shares (a method's config subclasses this).

    The optimizer fields are the defaults of every trainable; a method gives each of its trainables its own
    :class:`OptimizerSettings` (e.g. DMD's ``generator_learning_rate`` and update ratio).

    Example:
        >>> cfg = parse_config(DMDConfig, ["--config", "recipes/digits_dmd2_1step.yaml", "--max_train_steps", "10"])
    """

    teacher: str = field(default="", metadata={"help": "Teacher pipeline folder (unet/ + scheduler/)."})
    output_dir: str = field(default="runs/distill", metadata={"help": "Run folder: checkpoints, samples, export."})
    seed: int = field(default=0, metadata={"help": "Random seed (model init and every noise draw)."})
    max_train_steps: int = field(default=1000, metadata={"help": "Training iterations."})
    train_batch_size: int = field(default=32, metadata={"help": "Micro-batch size per process."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches accumulated into one optimizer step."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (default of every trainable)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (default of every trainable)."})
    adam_weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay (default of every trainable)."}
    )
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": f"One of {list(LR_SCHEDULERS)}."})
    lr_warmup_steps: int = field(default=500, metadata={"help": "LR warm-up iterations (every trainable)."})
    max_grad_norm: float = field(default=10.0, metadata={"help": "Gradient clipping norm; <= 0 disables clipping."})
    use_ema: bool = field(default=False, metadata={"help": "Keep an EMA of the exported network(s); exported if set."})
    ema_decay: float = field(default=0.99, metadata={"help": "EMA decay."})
    ema_start_step: int = field(default=0, metadata={"help": "Updates before the EMA starts averaging."})
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
    sample_grid_size: int = field(default=20, metadata={"help": "Images per row block of the sample grid."})
    eval_num_samples: int = field(default=500, metadata={"help": "Samples for digits class accuracy / FID (0: off)."})
    report_to: str = field(default="none", metadata={"help": "accelerate tracker (tensorboard, wandb, ...) or none."})
    tracker_project_name: str = field(default="stepdistill", metadata={"help": "Tracker project name."})
    export: bool = field(default=True, metadata={"help": "Export the student as a pipeline folder at the end."})
    sample_shape: list[int] | None = field(
        default=None, metadata={"help": "[C, H, W] of the teacher's inputs (default: from its config's in_channels "
                                        "and sample_size; needed for custom modules)."}
    )
    lora_rank: int = field(
        default=0,
        metadata={"help": "0: trainable networks are full copies of the teacher. > 0: shared-base mode, each is a "
                          "LoRA adapter of this rank on one frozen teacher network."},
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (None: lora_rank)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names that get LoRA layers (None: resnet convs, time projections and "
                          "attention projections)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("lr_warmup_steps", "checkpointing_steps", "checkpoints_total_limit", "log_every",
                     "sample_every", "eval_every", "ema_start_step", "num_threads", "eval_num_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {self.mixed_precision!r}.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {list(LR_SCHEDULERS)}, got {self.lr_scheduler!r}.")
        if self.sample_shape is not None and (len(self.sample_shape) != 3 or min(self.sample_shape) < 1):
            raise ValueError(f"sample_shape must be [C, H, W] with positive entries, got {self.sample_shape}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0):
            raise ValueError(f"Adam betas must be in [0, 1), got ({self.adam_beta1}, {self.adam_beta2}).")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: full copies), got {self.lora_rank}.")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain (YAML/JSON-serialisable) dict of a config dataclass."""
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------------------
# trainables
@dataclass
class ParamGroup:
    """Optimizer settings for some of a trainable's parameters.

    Args:
        match: A parameter-name prefix, or ``fn(name) -> bool``. Parameters go to the first group that matches;
            the rest form the trainable's default group.
        learning_rate: This group's learning rate (``None``: the trainable's).
        weight_decay: This group's weight decay (``None``: the trainable's).
    """

    match: str | Callable[[str], bool]
    learning_rate: float | None = None
    weight_decay: float | None = None

    def matches(self, name: str) -> bool:
        """Whether parameter ``name`` belongs to this group."""
        return self.match(name) if callable(self.match) else name.startswith(self.match)


@dataclass
class OptimizerSettings:
    """How one trainable is optimised (AdamW); ``None`` fields take the :class:`TrainerConfig` defaults.

    Args:
        learning_rate: Peak learning rate.
        betas: AdamW betas (default ``(adam_beta1, adam_beta2)``).
        weight_decay: AdamW weight decay (default ``adam_weight_decay``).
        eps: AdamW epsilon (default ``adam_epsilon``).
        update_interval: Step on iterations ``0, N, 2N, ...`` (DMD's generator under TTUR).
        max_grad_norm: Clipping norm (default ``max_grad_norm``; <= 0 disables clipping).
        param_groups: Per-group learning rates / weight decays (e.g. a token embedding vs attention copies).

    Example:
        >>> OptimizerSettings(learning_rate=1e-5, weight_decay=0.0,
        ...                   param_groups=[ParamGroup("token_embedding.", learning_rate=5e-3)])
    """

    learning_rate: float
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    eps: float | None = None
    update_interval: int = 1
    max_grad_norm: float | None = None
    param_groups: Sequence[ParamGroup] = ()

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.update_interval < 1:
            raise ValueError(f"update_interval must be >= 1, got {self.update_interval}.")


@dataclass
class Trainable:
    """One trainable module with its optimizer, LR schedule, EMA and state.

    Args:
        name: Metric / checkpoint name (a method's role: ``generator``, ``critic``, ``expert_0``, ...).
        module: The module (prepared by Accelerate after :meth:`DistillationTrainer.build`).
        optimizer: Its optimizer.
        lr_scheduler: Its LR schedule (stepped by the trainer every iteration while not frozen).
        settings: Its :class:`OptimizerSettings`.
        activate: Context factory its forward / backward passes run in (an adapter on a shared network).
        ema: Its diffusers ``EMAModel``, or ``None``.
        frozen: Frozen trainables no longer update (recorded in checkpoints).
        resets: Iterations at which it was re-initialised (recorded in checkpoints).
        initial_state: Its weights at registration (CPU), kept when it may be reset to them.
        reshard_after_forward: Under FSDP2, free the gathered weights after each forward (``False``: keep them until
            the backward, for losses that reach the weights other than through the module's outputs).
    """

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    settings: OptimizerSettings
    activate: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    ema: Any = None
    frozen: bool = False
    resets: list[int] = field(default_factory=list)
    initial_state: dict[str, torch.Tensor] | None = None
    reshard_after_forward: bool = True


def _local(p: torch.Tensor) -> torch.Tensor:
    """The local shard of a (possibly FSDP2-sharded) tensor."""
    return p.to_local() if hasattr(p, "to_local") else p


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly FSDP2-sharded) tensor (a collective for sharded ones: every process calls it)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _networks(module: nn.Module) -> list[nn.Module]:
    """``module.modules()`` plus those of networks wrapped without registering them (shared-base views)."""
    found = list(module.modules())
    for m in list(found):
        inner = m.__dict__.get("model")
        if isinstance(inner, nn.Module) and "model" not in m._modules:
            found += list(inner.modules())
    return found


# --------------------------------------------------------------------------------------------------
class DistillationTrainer:
    """Base trainer: Accelerate setup, trainables, the iteration loop, checkpoints, logging, teacher helpers.

    Subclasses implement :meth:`build`, :meth:`training_step` and :meth:`export` (and optionally
    :meth:`sample_grid` and :meth:`evaluate`).

    Randomness: ``self.rng`` is a per-process ``torch.Generator`` (noise, data); ``self.shared_rng``
    is identical on every process (choices that must agree across ranks, e.g. a rollout length). Both are
    checkpointed, so a resumed run continues the same random stream.

    Args:
        config: The method's config (a :class:`TrainerConfig` subclass).
        accelerator: An existing ``Accelerator`` (one is created from ``config`` otherwise).
        teacher: A ready :class:`~stepdistill.denoiser.Denoiser` to distill instead of loading
            ``config.teacher`` from a folder -- the way to bring any custom torch module
            (``Denoiser.from_model(module, schedule)``).
        condition_filter: Keep only the conditions (and real images) this predicate accepts in ``self.data``
            (``fn(Conditioning of N items) -> [N] bool``); ``self.full_data`` stays whole (multi-student
            distillation filters a student's data but not its regression pairs).
    """

    def __init__(
        self,
        config: TrainerConfig,
        accelerator: Any = None,
        teacher: Denoiser | None = None,
        condition_filter: Predicate | None = None,
    ) -> None:
        from accelerate.utils import set_seed

        self.config = config
        self.teacher_override = teacher
        self.condition_filter = condition_filter
        self.accelerator = accelerator if accelerator is not None else self._make_accelerator()
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.weight_dtype = precision_dtype(self.accelerator.mixed_precision)
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
        self._rng_state = RNGState(rng=self.rng, shared=self.shared_rng)
        self._grid_decoder = None
        self._digits_evaluator = None
        self.build()
        self._prepare()

    # ----------------------------------------------------------------------------------------------
    # setup
    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.config
        return Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to in ("none", "", None) else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=f"{cfg.output_dir}/logs"),
            cpu=runs_on_cpu(cfg.cpu),
        )

    def build(self) -> None:
        """Create the models and call :meth:`add_trainable` for each trainable one."""
        raise NotImplementedError

    def optimizer_settings(self, learning_rate: float, **overrides: Any) -> OptimizerSettings:
        """:class:`OptimizerSettings` with ``learning_rate`` and ``overrides`` (the rest: the config's defaults)."""
        return OptimizerSettings(learning_rate=learning_rate, **overrides)

    def add_trainable(
        self,
        name: str,
        module: nn.Module,
        settings: OptimizerSettings,
        activate: Callable[[], contextlib.AbstractContextManager] | None = None,
        ema: bool = False,
        resettable: bool = False,
        reshard_after_forward: bool = True,
    ) -> None:
        """Register a trainable module: fp32 trainable weights, its own AdamW optimizer, LR schedule and EMA.

        Args:
            name: Its name in metrics, checkpoints and :meth:`optimizer_step`.
            module: The module (call from :meth:`build`, before Accelerate prepares it).
            settings: Its :class:`OptimizerSettings` (see :meth:`optimizer_settings`).
            activate: Context factory its forward and backward passes run in (``layout.activate(role)`` for a
                shared-base adapter; backward runs inside it so checkpointed blocks recompute with this adapter).
            ema: Keep an EMA of its parameters (``ema_decay`` / ``ema_start_step`` of the config).
            resettable: Keep a CPU copy of its initial weights for :meth:`reset_trainable`.
            reshard_after_forward: FSDP2 only: ``False`` keeps its gathered weights from each forward to the backward.
                FSDP2 gathers a unit's weights for backward when the gradient reaches the unit's outputs; a loss that
                reads an inner activation (DMD2's GAN head on the critic's bottleneck, via a forward hook) bypasses
                them and needs ``False``.
        """
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel, cast_training_params

        if name in self.trainables:
            raise ValueError(f"A trainable named {name!r} exists already.")
        cfg = self.config
        settings = dataclasses.replace(  # None fields take the config's defaults
            settings,
            betas=settings.betas if settings.betas is not None else (cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=settings.weight_decay if settings.weight_decay is not None else cfg.adam_weight_decay,
            eps=settings.eps if settings.eps is not None else cfg.adam_epsilon,
            max_grad_norm=settings.max_grad_norm if settings.max_grad_norm is not None else cfg.max_grad_norm,
        )
        module.train()
        cast_training_params(module, dtype=torch.float32)  # frozen parts (e.g. a shared LoRA base) keep their dtype
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"Trainable module {name!r} has no parameters that require grad.")
        if cfg.gradient_checkpointing:
            for m in _networks(module):
                if hasattr(m, "enable_gradient_checkpointing") and getattr(m, "_supports_gradient_checkpointing", 0):
                    m.enable_gradient_checkpointing()
        if cfg.enable_xformers_memory_efficient_attention:
            self._enable_xformers(module)
        optimizer = torch.optim.AdamW(
            self._param_groups(named, settings), lr=settings.learning_rate, betas=settings.betas,
            weight_decay=settings.weight_decay, eps=settings.eps,
        )
        lr_scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_train_steps
        )
        # decay is 0 (a plain copy) for the first `ema_start_step` updates, as diffusers' update_after_step.
        ema_model = EMAModel(module.parameters(), decay=cfg.ema_decay, update_after_step=cfg.ema_start_step) \
            if ema else None
        initial = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if resettable else None
        self.trainables[name] = Trainable(name, module, optimizer, lr_scheduler, settings,
                                          activate or contextlib.nullcontext, ema_model, initial_state=initial,
                                          reshard_after_forward=reshard_after_forward)

    @staticmethod
    def _param_groups(named: list[tuple[str, nn.Parameter]], settings: OptimizerSettings) -> list:
        """One AdamW group per :class:`ParamGroup` that matches something, then the rest (a plain list if no groups)."""
        if not settings.param_groups:
            return [p for _, p in named]
        buckets: list[list[nn.Parameter]] = [[] for _ in settings.param_groups]
        rest = []
        for n, p in named:
            for i, group in enumerate(settings.param_groups):
                if group.matches(n):
                    buckets[i].append(p)
                    break
            else:
                rest.append(p)
        groups = []
        for group, params in zip(settings.param_groups, buckets):
            if params:
                entry: dict[str, Any] = {"params": params}
                if group.learning_rate is not None:
                    entry["lr"] = group.learning_rate
                if group.weight_decay is not None:
                    entry["weight_decay"] = group.weight_decay
                groups.append(entry)
        if rest:
            groups.append({"params": rest})
        return groups

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

    @property
    def sharded(self) -> bool:
        """Whether the trainables are sharded over the processes (FSDP2).

        Every process then takes part in each gather: checkpoints, EMA weights, grids, evaluation, export.
        """
        return self.accelerator.distributed_type == DistributedType.FSDP

    def _prepare(self) -> None:
        acc = self.accelerator
        names = list(self.trainables)
        if self.sharded:
            self._check_shardable()
            plugin = acc.state.fsdp_plugin
            wanted = list(plugin.transformer_cls_names_to_wrap or [])
            for n in names:  # FSDP2: one model (with its optimizer) per prepare call
                t = self.trainables[n]
                # each diffusers network its own FSDP unit (methods call them directly: DMD's fake score), plus the
                # configured block classes this module has (accelerate refuses a class a model lacks)
                present = {type(m).__name__ for m in t.module.modules()}
                networks = [type(m).__name__ for m in diffusers_submodules(t.module).values()]
                plugin.transformer_cls_names_to_wrap = [c for c in wanted if c in present] + [
                    c for c in networks if c not in wanted]
                t.module, t.optimizer = acc.prepare(t.module, t.optimizer)
                # make the prepared module the root of its FSDP units now: FSDP2 takes the first module to run
                # forward as the root, and a network called on its own first (DMD's fake score) would take that place
                self.unwrap(n)._get_fsdp_state()._lazy_init()
                if not t.reshard_after_forward:
                    self.unwrap(n).set_reshard_after_forward(False, recurse=True)
                if t.ema is not None:  # the EMA follows the sharded parameters (equal to them at this point)
                    t.ema.shadow_params = [p.detach().clone() for p in t.module.parameters()]
            plugin.transformer_cls_names_to_wrap = wanted
        else:
            objs = []
            for n in names:
                objs += [self.trainables[n].module, self.trainables[n].optimizer]
            prepared = acc.prepare(*objs)
            for i, n in enumerate(names):
                self.trainables[n].module, self.trainables[n].optimizer = prepared[2 * i], prepared[2 * i + 1]
        # LR schedules are stepped by hand every iteration (Accelerate's wrapper would step them once per
        # process and skip iterations where a trainable does not update); register them for checkpoints.
        for n in names:
            acc.register_for_checkpointing(self.trainables[n].lr_scheduler)
            if self.trainables[n].ema is not None:  # saved by the model hooks, as weights (not pickled)
                self.trainables[n].ema.to(acc.device)
        acc.register_save_state_pre_hook(self._save_models_hook)
        acc.register_load_state_pre_hook(self._load_models_hook)

    def unwrap(self, name: str) -> nn.Module:
        """The bare module of trainable ``name`` (no DDP / autocast wrapper)."""
        return self.accelerator.unwrap_model(self.trainables[name].module)

    def _check_shardable(self) -> None:
        """Refuse what FSDP2 cannot shard correctly: version 1, and adapter views of one shared base."""
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        from ..adapters import AdapterDenoiser

        if not self.accelerator.is_fsdp2:
            raise ValueError("FSDP version 1 is not supported: set `fsdp_version: 2` in the accelerate config.")
        policy = self.accelerator.state.fsdp_plugin.auto_wrap_policy
        if getattr(policy, "func", policy) is not transformer_auto_wrap_policy:
            raise ValueError(
                "FSDP needs `fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP` (stepdistill makes each trainable's "
                "diffusers network an FSDP unit; list block classes such as ResnetBlock2D or BasicTransformerBlock in "
                "`fsdp_transformer_layer_cls_to_wrap`): size-based wrapping splits diffusers' ModuleLists, which "
                "fully_shard refuses, and without wrapping a network called on its own would meet sharded weights."
            )
        shared = [n for n, t in self.trainables.items()
                  if any(isinstance(m, AdapterDenoiser) for m in t.module.modules())]
        if shared:
            raise ValueError(
                f"Trainables {shared} are LoRA adapters on one shared base (lora_rank > 0), which FSDP cannot shard: "
                "it shards the parameters a module owns, and an adapter view does not own the shared network's "
                "layers (accelerate's FSDP2 also allows one model per prepare and pairs optimizer i with model i). "
                "Use DDP (`accelerate launch --multi_gpu`) for LoRA mode, or full copies (lora_rank 0) with FSDP."
            )

    def gathered_state_dict(self, name: str, ema: bool = False) -> dict[str, torch.Tensor]:
        """Trainable ``name``'s full ``state_dict`` on CPU (its EMA weights with ``ema``).

        Sharded (FSDP2): every process must call it; the shards are gathered and only the main process gets the
        tensors (the others an empty dict). Otherwise: the module's own ``state_dict``.
        """
        context = self.ema_weights(name) if ema else contextlib.nullcontext()
        with context:
            if self.sharded:
                return self.accelerator.get_state_dict(self.trainables[name].module)
            return {k: v.detach().cpu().clone() for k, v in self.unwrap(name).state_dict().items()}

    def _set_full_state(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Load a full ``state_dict`` into trainable ``name`` (scattered into the shards when sharded)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.trainables[name].module, dict(state),
                                 options=StateDictOptions(full_state_dict=True, strict=True))
        else:
            self.unwrap(name).load_state_dict(state, strict=True)

    @property
    def emas(self) -> dict[str, Any]:
        """The EMA of each trainable that keeps one."""
        return {n: t.ema for n, t in self.trainables.items() if t.ema is not None}

    # ----------------------------------------------------------------------------------------------
    # optimisation helpers for subclasses
    def should_update(self, name: str, step: int) -> bool:
        """Whether trainable ``name`` takes an optimizer step at iteration ``step`` (its interval; not frozen)."""
        t = self.trainables[name]
        return not t.frozen and step % t.settings.update_interval == 0

    def sync_context(self, name: str, micro_step: int) -> contextlib.AbstractContextManager:
        """Context for one micro-batch of ``name``: skips the DDP gradient all-reduce except on the last."""
        if micro_step < self.config.gradient_accumulation_steps - 1:
            return self.accelerator.no_sync(self.trainables[name].module)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, name: str | None = None) -> None:
        """Backward of a micro-batch loss, scaled by ``1 / gradient_accumulation_steps``.

        With ``name``, it runs in that trainable's ``activate`` context (with gradient checkpointing the blocks
        of a shared network are recomputed during backward, and must see the adapter of their forward).
        """
        ctx = self.trainables[name].activate() if name is not None else contextlib.nullcontext()
        with ctx:
            self.accelerator.backward(loss / self.config.gradient_accumulation_steps)

    def optimizer_step(self, name: str) -> float:
        """Clip, step and zero the optimizer of ``name``, update its EMA; return the pre-clip gradient norm.

        The norm comes back as a Python float, which waits for the device; :meth:`optimizer_step_norm` keeps it a
        tensor (what ``training_step`` should return, reduced only at logging steps).
        """
        return float(self.optimizer_step_norm(name))

    def optimizer_step_norm(self, name: str) -> torch.Tensor:
        """:meth:`optimizer_step` without a host sync: the pre-clip gradient norm as a 0-d float32 tensor."""
        t = self.trainables[name]
        if t.frozen:
            raise RuntimeError(f"Trainable {name!r} is frozen: it takes no optimizer steps.")
        acc = self.accelerator
        params = [p for p in t.module.parameters() if p.requires_grad]
        clip = t.settings.max_grad_norm if t.settings.max_grad_norm > 0 else float("inf")
        if acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU,
                                    DistributedType.FSDP):
            # unscale this optimizer only: accelerate's clip_grad_norm_ unscales every optimizer, which would
            # unscale another trainable's fp16 gradients a second time after this one's scaler update (and under
            # FSDP it compares parameter lists with ==, which fails for two models of one shape); torch's
            # clip_grad_norm_ handles FSDP2's DTensor gradients (one mesh) itself
            acc.unscale_gradients(optimizer=t.optimizer)
            norm = _full(torch.nn.utils.clip_grad_norm_(params, clip))
        else:  # DeepSpeed / XLA clip their own way
            norm = acc.clip_grad_norm_(params, clip)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        if t.ema is not None:
            t.ema.step(self.unwrap(name).parameters())
        if norm is None:
            return torch.tensor(float("nan"))
        return norm.detach().float() if torch.is_tensor(norm) else torch.tensor(float(norm))

    def zero_grad(self) -> None:
        """Zero the gradients of every trainable."""
        for t in self.trainables.values():
            t.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def ema_weights(self, name: str) -> Iterator[None]:
        """Temporarily swap trainable ``name``'s EMA weights in (no-op without an EMA)."""
        ema = self.trainables[name].ema
        if ema is None:
            yield
            return
        params = list(self.unwrap(name).parameters())
        ema.store(params)
        ema.copy_to(params)
        try:
            yield
        finally:
            ema.restore(params)

    @torch.no_grad()
    def reset_trainable(self, name: str, state: Mapping[str, torch.Tensor] | None = None) -> None:
        """Re-initialise trainable ``name``: weights, optimizer state, LR schedule (warm-up again) and EMA.

        Args:
            name: The trainable.
            state: Its new weights (a full ``state_dict``); default: its weights at registration (needs
                ``resettable=True`` in :meth:`add_trainable`).
        """
        t = self.trainables[name]
        if state is None:
            if t.initial_state is None:
                raise ValueError(f"reset_trainable({name!r}) without a state needs add_trainable(..., "
                                 "resettable=True).")
            state = t.initial_state
        module = self.unwrap(name)
        self._set_full_state(name, state)
        t.optimizer.zero_grad(set_to_none=True)
        t.optimizer.state.clear()
        self._restart_schedule(t, self.config.max_train_steps - self.global_step)
        if t.ema is not None:
            t.ema.shadow_params = [p.detach().clone() for p in module.parameters()]
            t.ema.optimization_step = 0
        t.resets.append(self.global_step)

    def _restart_schedule(self, t: Trainable, num_steps: int, keep_step: bool = False) -> None:
        """Give ``t`` a fresh LR schedule (warm-up again) over ``num_steps`` iterations.

        The schedule object stays the one registered for checkpoints; only its LR function and step change.
        With ``keep_step`` (resume) its restored step and learning rates are kept.
        """
        from diffusers.optimization import get_scheduler

        cfg, sched = self.config, t.lr_scheduler
        lrs = [g["lr"] for g in sched.optimizer.param_groups]
        fresh = get_scheduler(cfg.lr_scheduler, sched.optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=max(1, num_steps))
        sched.lr_lambdas = fresh.lr_lambdas
        if keep_step:
            for group, lr in zip(sched.optimizer.param_groups, lrs):
                group["lr"] = lr
        else:
            sched.last_epoch, sched._last_lr = fresh.last_epoch, fresh.get_last_lr()

    def freeze_trainable(self, name: str) -> None:
        """Freeze trainable ``name`` for the rest of the run: no gradients, no optimizer / schedule / EMA steps.

        Methods run a frozen trainable through ``unwrap(name)`` (under ``no_grad``), never through its DDP
        wrapper ``trainables[name].module``, whose reducer expects gradients for every parameter it holds.
        """
        t = self.trainables[name]
        t.frozen = True
        t.optimizer.zero_grad(set_to_none=True)
        self.unwrap(name).requires_grad_(False)

    # ----------------------------------------------------------------------------------------------
    # teacher-side helpers for build()
    def load_teacher(self) -> Denoiser:
        """The teacher denoiser (``teacher=`` given to the constructor, else ``config.teacher``).

        Sets ``self.schedule`` and ``self.sample_shape``.
        """
        from ..loading import load_denoiser
        from .teacher import infer_sample_shape

        if self.teacher_override is not None:
            teacher = self.teacher_override
        elif not self.config.teacher:
            raise ValueError("No teacher: pass --teacher <pipeline folder> (e.g. stepdistill/assets/digits/teacher).")
        else:
            teacher = load_denoiser(self.config.teacher)
        self.schedule = teacher.schedule
        self.sample_shape = infer_sample_shape(teacher.model, self.config.sample_shape)
        return teacher

    @property
    def teacher_spec(self) -> str | None:
        """The teacher folder (``None`` for a teacher passed as a module)."""
        return None if self.teacher_override is not None or not self.config.teacher else self.config.teacher

    def resolve_guidance(self, override: float | None) -> float:
        """The teacher's CFG weight: ``override``, else its folder's recommendation, else 1."""
        from .teacher import resolve_guidance

        return resolve_guidance(override, self.teacher_spec)

    def make_layout(self, teacher: Denoiser, roles: Sequence[str]) -> NetworkLayout:
        """The network layout of the config (full copies, or ``lora_rank`` adapters named ``roles`` on one base)."""
        from .teacher import fp32_weights

        cfg, spec = self.config, self.teacher_spec
        base_weights = None
        if spec is not None:  # the fp32 weights on disk, read only when an export needs them
            base_weights = lambda: fp32_weights(spec)  # noqa: E731
        elif cfg.lora_rank > 0 and self.weight_dtype != torch.float32:  # a module: keep its weights before the cast
            snapshot = {k: v.detach().float().cpu().clone() for k, v in teacher.model.named_parameters()}
            base_weights = lambda: snapshot  # noqa: E731
        return make_layout(teacher, cfg.lora_rank, roles, cfg.lora_alpha, cfg.lora_target_modules,
                           base_dtype=self.weight_dtype, base_weights=base_weights)

    def build_data(self, network: nn.Module) -> ConditionSource:
        """Make ``self.full_data`` from the config and ``self.data`` (its subset under ``condition_filter``).

        Real images are checked against the teacher's input shape. Returns ``self.data``.
        """
        from .teacher import teacher_root

        self.full_data = make_data_source(self.config, teacher_root(self.teacher_spec), network,
                                          self.accelerator.device, self.weight_dtype)
        teacher = getattr(self, "teacher", None)
        if isinstance(teacher, Denoiser):  # the conditions must be what the teacher takes, before any training
            try:
                teacher.check_conditioning(self.full_data.grid_conditioning(1), 1)
            except ValueError as err:
                raise ValueError(
                    f"data={self.config.data!r} does not fit this teacher: {err} Use a data source that gives what "
                    "it takes (class labels: digits / uniform_labels / dataset with labels; text: prompts / dataset "
                    "with captions; nothing: unconditional)."
                ) from None
        if self.full_data.has_images:
            _, imgs = self.full_data.sample(1, torch.Generator().manual_seed(0))
            if tuple(imgs.shape[1:]) != self.sample_shape:
                raise ValueError(
                    f"Real images have shape {tuple(imgs.shape[1:])} but the teacher works on {self.sample_shape}: "
                    f"data={self.config.data!r} does not fit this teacher."
                )
        self.data = self.full_data if self.condition_filter is None else self.full_data.subset(self.condition_filter)
        return self.data

    def load_init_network(self, path: str | Path, like: nn.Module, role: str, what: str) -> nn.Module:
        """A trainable network with ``like``'s architecture from a model / student / run / checkpoint folder.

        In a checkpoint, trainable ``role``'s EMA weights are preferred to its raw weights. ``what`` names the
        setting in errors (e.g. ``init_generator``).
        """
        from .teacher import load_init_network

        return load_init_network(path, like, role, what)

    # ----------------------------------------------------------------------------------------------
    # output helpers
    @property
    def null_class_label(self) -> int | None:
        """The null class of the data's conditions (``None`` for unconditional or text data)."""
        return None if self.config.data == "unconditional" else self.data.grid_conditioning(1).null_class_label

    def standalone_network(self, name: str) -> nn.Module | None:
        """A standalone fp32 copy of trainable ``name``'s network (EMA weights when it keeps one; adapters merged).

        Sharded (FSDP2): every process must call it; the weights are gathered and the main process gets the copy,
        the others ``None``.
        """
        if not self.sharded:
            with self.ema_weights(name):
                return self.layout.standalone(name, self.unwrap(name))
        state = self.gathered_state_dict(name, ema=self.trainables[name].ema is not None)
        if not self.accelerator.is_main_process:
            return None
        network = self.unwrap(name).model
        plain = unsharded_class(network).from_config(network.config)
        plain.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, strict=True)
        return plain.float().eval()

    def export_student(
        self, network: nn.Module | None, folder: Path, timesteps: Sequence[float], metadata: dict
    ) -> Path:
        """Write ``network`` as a student pipeline folder (:func:`~.outputs.export_student_folder`).

        ``None`` (a non-main process of a sharded run, see :meth:`standalone_network`) writes nothing.
        """
        from .outputs import export_student_folder

        if network is None:
            return folder

        return export_student_folder(network, folder, timesteps, metadata, self.teacher_spec, self.schedule,
                                     self.null_class_label)

    @torch.no_grad()
    def sample_images(
        self, name: str, timesteps: Sequence[float], cond: Conditioning, seeds: Sequence[int]
    ) -> torch.Tensor:
        """Few-step samples of trainable ``name`` (a denoiser; EMA weights if it keeps one), one seed per image."""
        from ..sampling import initial_noise, make_generators, sample_student

        device = self.accelerator.device
        gens = make_generators(seeds)
        den = self.unwrap(name)
        with self.ema_weights(name):
            den.eval()
            z = initial_noise((len(seeds), *self.sample_shape), gens)
            out = sample_student(den, z.to(device), cond.to(device), list(timesteps), generator=gens)
        den.train()
        return out.float().cpu()

    def student_inputs(
        self, denoiser: Denoiser, timesteps: Sequence[float], cond: Conditioning, backward_simulation: bool
    ) -> tuple[torch.Tensor, float]:
        """The input ``(x_t, t)`` of a k-step student for one training iteration (DMD2 Sec. 4.5).

        A one-step student gets pure noise at ``timesteps[0]``. For k-step lists a step index ``k`` is drawn
        from ``shared_rng`` (the same on every process, so all ranks run the same number of forwards); with
        ``backward_simulation`` the student runs steps ``0..k-1`` itself from pure noise (:func:`rollout` to
        ``timesteps[k]``, without gradient); without it, real images from ``self.data`` are noised to ``t_k``.
        """
        from ..sampling import rollout

        device = self.accelerator.device
        ts = list(timesteps)
        batch = cond.batch_size or self.config.train_batch_size
        cond = cond.to(device)
        x = torch.randn(batch, *self.sample_shape, generator=self.rng).to(device)
        k = int(torch.randint(0, len(ts), (1,), generator=self.shared_rng)) if len(ts) > 1 else 0
        if k > 0 and backward_simulation:
            x = rollout(denoiser, x, cond, ts, generator=self.rng, stop=ts[k])
        elif k > 0:
            _, real = self.data.sample(batch, self.rng)
            x = self.schedule.add_noise(real.to(device), x, ts[k])
        return x, ts[k]

    @torch.no_grad()
    def score_rows(
        self,
        x: torch.Tensor,
        cond: Conditioning,
        scores: Sequence[tuple[Denoiser, float | None]],
        levels: Sequence[float] = (0.25, 0.5, 0.75),
    ) -> list[torch.Tensor]:
        """Diagnostic grid rows: for each noise level, each score's x0 prediction from ``x`` noised to it.

        ``scores`` are ``(denoiser, guidance scale or None)`` pairs, e.g. the teacher with its CFG and a fake
        score: where their rows differ is what a distribution-matching gradient pushes on. The noise is fixed
        (seed 0), so grids of successive steps compare.
        """
        from ..denoiser import guided_denoise

        device, n = self.accelerator.device, x.shape[0]
        c = cond.to(device)
        rows = []
        for level in levels:
            t = torch.full((n,), float(int(self.schedule.max_timestep * level)), dtype=torch.float64)
            eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
            x_t = self.schedule.add_noise(x, eps, t).to(device)
            rows += [guided_denoise(den, x_t, t, c, w).x0.float().cpu() for den, w in scores]
        return rows

    def write_grid(self, rows: Sequence[torch.Tensor], path: Path) -> None:
        """Save rows of samples (pixels or latents) as one image (nothing for latents without a VAE)."""
        from ..data.digits import make_grid_image

        pixels = self.grid_pixels(torch.cat(list(rows)))
        if pixels is not None and self.accelerator.is_main_process:
            make_grid_image(pixels, nrow=rows[0].shape[0], scale=4 if pixels.shape[-1] <= 64 else 1).save(path)

    def grid_pixels(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[-1, 1]`` pixels of samples for a grid (latents decoded by the teacher's VAE; ``None`` without one)."""
        from .outputs import GridDecoder

        if self._grid_decoder is None:
            vae = getattr(self.data, "vae", None)  # the data source's VAE, when it loaded one
            self._grid_decoder = GridDecoder(self.teacher_spec, self.accelerator.device, vae)
        return self._grid_decoder(x)

    def evaluate_digits(self, sample: Callable[[Conditioning, Sequence[int]], torch.Tensor]) -> dict[str, float]:
        """Digits class accuracy and FID of ``sample(cond, seeds)`` (``{}`` off the digits world)."""
        from .outputs import DigitsEvaluator

        if self.config.data != "digits" or self.config.eval_num_samples == 0:
            return {}
        if self._digits_evaluator is None:
            self._digits_evaluator = DigitsEvaluator(self.config.eval_num_samples, self.null_class_label)
        return self._digits_evaluator(sample)

    # ----------------------------------------------------------------------------------------------
    # what methods implement
    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        """Run one iteration (all micro-batches, every optimizer that steps); return scalar metrics.

        Metrics use flat names (``loss/dm``, ``grad_norm/generator``); keys starting with ``loss/`` are
        checked for NaN / inf.
        """
        raise NotImplementedError

    def export(self, folder: Path) -> Path:
        """Write the final student (main process only; every process when :attr:`sharded`); return its folder."""
        raise NotImplementedError

    def sample_grid(self, path: Path) -> None:
        """Write a sample grid image to ``path`` (main process; every process when :attr:`sharded`); default none."""

    def evaluate(self) -> dict[str, float]:
        """In-training evaluation metrics (main process; every process when :attr:`sharded`); default: none."""
        return {}

    # ----------------------------------------------------------------------------------------------
    # checkpoints
    def _trainable_name(self, model: nn.Module) -> str:
        bare = self.accelerator.unwrap_model(model)
        for n in self.trainables:
            if self.unwrap(n) is bare:
                return n
        raise RuntimeError(f"A {type(bare).__name__} prepared by Accelerate is not a registered trainable.")

    def _save_models_hook(self, models: list, weights: list, output_dir: str) -> None:
        """Accelerate save hook: each trainable into ``<checkpoint>/<name>/`` once, its EMA into ``<name>/ema/``.

        Sharded (FSDP2), accelerate writes the models and optimizers itself (its FSDP files); the hook gathers
        and writes the EMA weights, which accelerate does not know.
        """
        if self.sharded:
            for name, t in self.trainables.items():
                if t.ema is not None:
                    state = self.gathered_state_dict(name, ema=True)  # every process takes part
                    if self.accelerator.is_main_process:
                        save_module_weights(self.unwrap(name), Path(output_dir) / name / EMA_FOLDER, state=state)
            return
        if len(weights) != len(models):  # DeepSpeed wrote the models itself
            return
        if self.accelerator.is_main_process:
            for model in models:
                name = self._trainable_name(model)
                module, folder = self.accelerator.unwrap_model(model), Path(output_dir) / name
                save_module_weights(module, folder)
                if self.trainables[name].ema is not None:
                    with self.ema_weights(name):
                        save_module_weights(module, folder / EMA_FOLDER)
        weights.clear()  # accelerate must not write them a second time

    def _load_models_hook(self, models: list, input_dir: str) -> None:
        """Accelerate load hook: read each trainable (and its EMA weights) back from ``<checkpoint>/<name>/``."""
        for model in list(models):
            name = self._trainable_name(model)
            module, folder = self.accelerator.unwrap_model(model), Path(input_dir) / name
            if not folder.is_dir():
                continue
            ema = self.trainables[name].ema
            if ema is not None and (folder / EMA_FOLDER).is_dir():
                load_module_weights(module, folder / EMA_FOLDER)
                ema.shadow_params = [p.detach().clone() for p in module.parameters()]
            load_module_weights(module, folder)
            models.remove(model)

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint of this run, if any."""
        found = list_checkpoints(self.checkpoint_dir)
        return found[-1] if found else None

    def _trainer_state(self) -> dict[str, Any]:
        trainables = {}
        for n, t in self.trainables.items():
            trainables[n] = {"frozen": t.frozen, "resets": list(t.resets)}
            if t.ema is not None:  # the EMA's counters (its weights are in <name>/ema/)
                trainables[n]["ema"] = {k: v for k, v in t.ema.state_dict().items() if k != "shadow_params"}
        return {"global_step": self.global_step, "num_processes": self.accelerator.num_processes,
                "trainables": trainables}

    def save_checkpoint(self) -> Path:
        """Save a checkpoint atomically (every process takes part); prune to ``checkpoints_total_limit``."""
        acc = self.accelerator
        bad = [n for n in self.trainables if not self._finite(n)]
        if bad:
            last = self.last_checkpoint()
            raise NonFiniteLossError(
                f"Non-finite weights in {bad} at iteration {self.global_step}: not saving a checkpoint; the last "
                f"good one is {str(last) if last else 'none'}. Lower the learning rate or the clipping norm."
            )
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.global_step:06d}"
        tmp = self.checkpoint_dir / f"{WRITING_PREFIX}{final.name}"
        if acc.is_main_process:
            recover_checkpoints(self.checkpoint_dir)  # also removes a half-written tmp of a killed run
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        # 1. every process writes its part into the hidden folder (a crash here leaves no listed checkpoint)
        acc.save_state(str(tmp))
        torch.save(self._rng_state.state_dict(), tmp / f"trainer_rng_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            # 2. the trainer state last (it marks a checkpoint complete), fsync, rename over any old one (kept
            #    until the new one is in place), 3. prune by rename-then-delete
            commit_checkpoint(tmp, final, self._trainer_state())
            prune_checkpoints(self.checkpoint_dir, self.config.checkpoints_total_limit)
        acc.wait_for_everyone()
        return final

    def _finite(self, name: str) -> bool:
        """Whether every weight of trainable ``name`` is finite (on every process's shard when sharded)."""
        if not self.sharded:
            return all(torch.isfinite(p).all() for p in self.unwrap(name).parameters())
        local = all(bool(torch.isfinite(_local(p)).all()) for p in self.unwrap(name).parameters())
        flag = torch.tensor([0.0 if local else 1.0], device=self.accelerator.device)
        return float(self.accelerator.reduce(flag, reduction="sum")) == 0

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore models, optimizers, LR schedules, EMAs, frozen / reset records, RNG streams and the step."""
        path = Path(path)
        state_file = path / TRAINER_STATE
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is not a complete stepdistill checkpoint (no {TRAINER_STATE}, which is written last); "
                "pass a complete one, or --resume_from_checkpoint latest."
            )
        state = check_checkpoint_fits(path, {n: self.unwrap(n) for n in self.trainables}, self.sharded)
        try:
            self.accelerator.load_state(str(path))
        except (ValueError, RuntimeError, KeyError) as err:  # e.g. optimizer groups of another configuration
            raise CheckpointMismatchError(
                f"Checkpoint {str(path)!r} does not fit this run: {' '.join(str(err).split())[:400]} Resume with the "
                "recipe and flags that wrote it (its run folder's config.yaml)."
            ) from err
        if self.sharded:  # accelerate loaded the shards of models and optimizers; the EMA weights are ours
            self._load_sharded_emas(path)
        rng_file = path / f"trainer_rng_{self.accelerator.process_index}.pt"
        if rng_file.is_file():
            self._rng_state.load_state_dict(torch.load(rng_file, weights_only=True))
        else:
            logger.warning("Checkpoint %s has no RNG state for process %d; noise streams restart.",
                           path, self.accelerator.process_index)
        self.global_step = int(state["global_step"])
        for name, record in state.get("trainables", {}).items():
            t = self.trainables.get(name)
            if t is None:
                continue
            t.resets = list(record.get("resets", []))
            if t.resets:  # the schedule restarted at the last reset, sized for the steps left then
                self._restart_schedule(t, self.config.max_train_steps - t.resets[-1], keep_step=True)
            if t.ema is not None and "ema" in record:
                t.ema.load_state_dict({**record["ema"], "shadow_params": t.ema.shadow_params})
                t.ema.to(self.accelerator.device)
            if record.get("frozen"):
                self.freeze_trainable(name)

    @torch.no_grad()
    def _load_sharded_emas(self, path: Path) -> None:
        """Read each EMA's full weights from ``<checkpoint>/<name>/ema/`` into its (sharded) shadow parameters."""
        for name, t in self.trainables.items():
            folder = path / name / EMA_FOLDER
            if t.ema is None or not folder.is_dir():
                continue
            params = list(self.unwrap(name).parameters())
            trained = [p.detach().clone() for p in params]
            self._set_full_state(name, read_module_weights(self.unwrap(name), folder))
            t.ema.shadow_params = [p.detach().clone() for p in params]
            for p, value in zip(params, trained):
                p.copy_(value)

    def _resolve_resume(self) -> Path | None:
        spec = self.config.resume_from_checkpoint
        if not spec:
            return None
        if spec == "latest":
            if self.accelerator.is_main_process:
                recover_checkpoints(self.checkpoint_dir)  # finish or undo what a killed run left half-done
            self.accelerator.wait_for_everyone()
            last = self.last_checkpoint()
            if last is None:
                self.accelerator.print(f"No checkpoint in {self.checkpoint_dir}: starting a new run.")
            else:
                check_checkpoint_fits(last, {n: self.unwrap(n) for n in self.trainables}, self.sharded)
            return last
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint={spec!r}: no such checkpoint folder.")
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is not a complete stepdistill checkpoint (no {TRAINER_STATE}, which is written last); "
                "pass a complete one, or --resume_from_checkpoint latest."
            )
        check_checkpoint_fits(path, {n: self.unwrap(n) for n in self.trainables}, self.sharded)
        return path

    # ----------------------------------------------------------------------------------------------
    # the loop
    def _reduce_metrics(self, metrics: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
        if not metrics:
            return {}
        keys = sorted(metrics)
        vec = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).detach().reshape(()).cpu()
                           for k in keys]).to(self.accelerator.device)
        vec = self.accelerator.reduce(vec, reduction="mean") if self.accelerator.num_processes > 1 else vec
        return dict(zip(keys, vec.cpu().tolist()))

    def _check_finite(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        bad = {k: v for k, v in metrics.items() if k.startswith("loss/") and not math.isfinite(v)}
        if bad:
            last = self.last_checkpoint()
            where = f"the last good checkpoint is {str(last)!r}" if last else "no checkpoint had been written yet"
            raise NonFiniteLossError(
                f"Non-finite loss at iteration {self.global_step if step is None else step}: {bad}. Training "
                "stopped without saving; "
                f"{where} (resume with --resume_from_checkpoint latest). Usual causes: a learning rate too "
                "high, fp16 overflow (try bf16), or a teacher/conditioning-timestep pair with ill-conditioned "
                "x0 (e.g. an eps-prediction teacher at t=999)."
            )

    def write_config(self) -> None:
        """Write the resolved config to ``output_dir/config.yaml`` (main process)."""
        import yaml

        if self.accelerator.is_main_process:
            text = yaml.safe_dump(config_to_dict(self.config), sort_keys=False)
            atomic_write_file(self.output_dir / "config.yaml", lambda tmp: tmp.write_text(text))

    def train(self) -> dict[str, Any]:
        """Run the loop to ``max_train_steps``; return a summary (final metrics, time, paths)."""
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.config
        resume = self._resolve_resume()  # a checkpoint that does not fit fails here, before anything is written
        self.write_config()
        if acc.log_with:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                    for k, v in config_to_dict(cfg).items()}
            acc.init_trackers(cfg.tracker_project_name, config=flat)
        if resume is not None:
            self.load_checkpoint(resume)
            acc.print(f"Resumed from {resume} at iteration {self.global_step}.")
        bar = tqdm(range(self.global_step, cfg.max_train_steps), initial=self.global_step,
                   total=cfg.max_train_steps, desc=type(self).__name__, disable=not acc.is_main_process)
        t0 = time.time()
        metrics: dict[str, float] = {}
        window: dict[str, tuple[float, int]] = {}
        pending: list[tuple[int, Mapping[str, torch.Tensor | float]]] = []  # iterations not yet read back
        for step in bar:
            raw = self.training_step(step)
            for t in self.trainables.values():
                if not t.frozen:
                    t.lr_scheduler.step()
            self.global_step = step + 1
            pending.append((step, raw))
            # Metrics stay on the device until a step that needs them (a log line, a checkpoint, samples, an
            # evaluation, the end; every step without logging): one host sync per window instead of one per
            # iteration, and the same values, reduced and checked iteration by iteration in order. A non-finite
            # loss therefore stops training before any checkpoint is written after it, naming its iteration.
            g = self.global_step
            if (not cfg.log_every or g % cfg.log_every == 0 or g == cfg.max_train_steps
                    or (cfg.checkpointing_steps and g % cfg.checkpointing_steps == 0)
                    or (cfg.sample_every and g % cfg.sample_every == 0)
                    or (cfg.eval_every and g % cfg.eval_every == 0)):
                for done, values in pending:
                    metrics = self._reduce_metrics(values)
                    self._check_finite(metrics, done)
                    for k, v in metrics.items():  # running means over the logging window
                        total, count = window.get(k, (0.0, 0))
                        window[k] = (total + v, count + 1)
                pending = []
                bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items() if k.startswith("loss/")})
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
        if cfg.export and (acc.is_main_process or self.sharded):  # sharded: every process gathers the student
            summary["export"] = str(self.export(self.output_dir / "student"))
        if acc.is_main_process:
            (self.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        acc.wait_for_everyone()
        acc.end_training()
        return summary

    def _sample_and_eval(self, grid: bool, evaluate: bool) -> dict[str, float]:
        acc = self.accelerator
        result: dict[str, float] = {}
        if acc.is_main_process or self.sharded:  # sharded networks need every process in each forward
            if grid:
                path = self.output_dir / "samples" / f"step-{self.global_step:06d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                self.sample_grid(path)
            if evaluate:
                result = self.evaluate()
                if result and acc.is_main_process:
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
        sums = [sum(float(_full(p).detach().double().sum()) for p in self.unwrap(n).parameters())
                for n in self.trainables]
        vec = torch.tensor(sums, dtype=torch.float64, device=acc.device)
        gathered = acc.gather(vec[None]) if acc.num_processes > 1 else vec[None]
        names = list(self.trainables)
        return [dict(zip(names, row.tolist())) for row in gathered.cpu()]


__all__ = [
    "DistillationTrainer",
    "NonFiniteLossError",
    "OptimizerSettings",
    "ParamGroup",
    "Trainable",
    "TrainerConfig",
    "config_to_dict",
    "list_checkpoints",
]

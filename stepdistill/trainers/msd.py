"""Multi-student distillation (MSD) on the base trainer: a partition, K DMD students, TSM for smaller ones.

MSD: Song, Lorraine, Nie, Kreis, Lucas, "Multi-student Diffusion Distillation for Better One-step Generators",
ICML 2025 (arXiv 2410.23274). Each student is a DMD / DMD2 student (:class:`~stepdistill.trainers.DMDTrainer`,
reused by subclassing) restricted to one part of the conditioning space:

1. A :class:`~stepdistill.data.partition.ConditionPartition` splits the conditions into ``K`` parts (saved in
   ``<output_dir>/partition``, checked when a later run or the routed pipeline reads it).
2. Student ``k`` (:class:`MSDStudentTrainer`) draws its generator conditions, its fake-score inputs and its real
   images (GAN / noised inputs) from part ``k`` only (``condition_filter``), but regresses on the *whole* set of
   teacher ODE pairs (DMD1 regression; the paper's Fig. 8 ablation: partitioning them hurts).
3. Smaller students (``student_block_out_channels`` / ``student_layers_per_block``) cannot start from the teacher:
   a teacher-score-matching stage (:class:`TSMTrainer`, the paper's Eq. for L_TSM) first trains the small network
   to reproduce the teacher's denoiser output on noised real images of its part at all noise levels; DMD then
   starts from it. The fake score stays teacher-sized and teacher-initialised, as in DMD.
4. :class:`MSDTrainer` runs the students one after another in one process (or only ``student_index``, for K
   separate runs of one command), then assembles ``<output_dir>/student``: a
   :class:`~stepdistill.pipelines.RoutedStudentsPipeline` with the partition.

Equal total compute (``split_total_steps``): ``max_train_steps`` (and ``tsm_steps``) are the budget of the whole
run; each student gets ``1/K`` of the iterations at the same batch size, and its schedules are scaled with it
(warm-up, checkpoint / sample / eval intervals, and the EMA horizon ``1 / (1 - decay)``), so one student and K
students see the same number of samples and their EMAs average over the same fraction of training.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import FullCopies
from ..data.partition import PARTITION_KINDS, ConditionPartition, PartitionError, network_fingerprint
from ..denoiser import Denoiser
from ..losses._common import per_sample_mean
from .base import DistillationTrainer
from .dmd import DMDConfig, DMDTrainer


@dataclass
class MSDConfig(DMDConfig):
    """MSD settings: the DMD / DMD2 fields of every student, plus the partition, student size and TSM stage.

    Example:
        >>> cfg = MSDConfig(teacher="stepdistill/assets/digits/teacher", num_students=4, max_train_steps=800)
    """

    num_students: int = field(default=4, metadata={"help": "K: students, one per part of the conditions (1..8)."})
    partition: str = field(default="class_ranges", metadata={"help": f"How to split the conditions: "
                                                                      f"{list(PARTITION_KINDS)}."})
    partition_seed: int = field(default=0, metadata={"help": "Seed of the k-means partitions."})
    partition_dir: str | None = field(
        default=None,
        metadata={"help": "Use the partition saved in this folder (partition.json + .safetensors) instead of building "
                          "one; checked against the teacher."},
    )
    student_index: int | None = field(
        default=None,
        metadata={"help": "Train only student k (K separate runs of one command into one output_dir; the routed "
                          "pipeline is assembled when the last one finishes). None: all, one after another."},
    )
    split_total_steps: bool = field(
        default=True,
        metadata={"help": "max_train_steps / tsm_steps are the whole run's budget, each student gets 1/K of it with "
                          "its warm-up, intervals and EMA horizon scaled by 1/K (equal total compute vs one student)."},
    )
    student_block_out_channels: list[int] | None = field(
        default=None, metadata={"help": "A smaller student: these UNet channels instead of the teacher's (needs TSM)."}
    )
    student_layers_per_block: int | None = field(
        default=None, metadata={"help": "A smaller student: this many layers per UNet block instead of the teacher's."}
    )
    student_norm_num_groups: int | None = field(
        default=None, metadata={"help": "GroupNorm groups of the smaller student (default: the teacher's)."}
    )
    tsm_steps: int = field(
        default=0,
        metadata={"help": "Teacher-score-matching iterations before DMD (0: none; a smaller student starts random)."},
    )
    tsm_learning_rate: float = field(default=1e-3, metadata={"help": "TSM AdamW learning rate."})
    assemble_only: bool = field(
        default=False, metadata={"help": "Only assemble <output_dir>/student from the students already trained."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.num_students <= 8:
            raise ValueError(f"num_students must be in 1..8 (the routed pipeline's slots), got {self.num_students}.")
        if self.partition not in PARTITION_KINDS:
            raise ValueError(f"partition must be one of {list(PARTITION_KINDS)}, got {self.partition!r}.")
        if self.student_index is not None and not 0 <= self.student_index < self.num_students:
            raise ValueError(f"student_index must be in 0..{self.num_students - 1}, got {self.student_index}.")
        if self.tsm_steps < 0:
            raise ValueError(f"tsm_steps must be >= 0, got {self.tsm_steps}.")
        if not self.tsm_learning_rate > 0:
            raise ValueError(f"tsm_learning_rate must be > 0, got {self.tsm_learning_rate}.")
        if self.smaller_student and self.lora_rank > 0:
            raise ValueError("A smaller student is its own network; it cannot be a LoRA adapter on the teacher: "
                             "use lora_rank=0 with student_block_out_channels / student_layers_per_block.")
        if self.smaller_student and self.init_generator:
            raise ValueError("init_generator starts a teacher-sized generator; a smaller student starts from TSM "
                             "(tsm_steps > 0) or random weights. Drop one of them.")
        if self.tsm_steps > 0 and not self.has_images:
            raise ValueError(f"TSM noises real images, but data={self.data!r} has none: use data=digits or "
                             "data=dataset, or tsm_steps=0.")
        if self.tsm_steps > 0 and not self.smaller_student:
            raise ValueError("tsm_steps is for smaller students (same-size students start from the teacher): set "
                             "student_block_out_channels / student_layers_per_block, or tsm_steps=0.")
        steps = self.max_train_steps // self.num_students if self.split_total_steps else self.max_train_steps
        if steps < 1:
            raise ValueError(f"max_train_steps={self.max_train_steps} split among {self.num_students} students leaves "
                             "none per student: raise it or set split_total_steps=false.")

    @property
    def smaller_student(self) -> bool:
        """Whether the students have their own (smaller) architecture."""
        return self.student_block_out_channels is not None or self.student_layers_per_block is not None

    def student_config(self, index: int) -> MSDConfig:
        """Student ``index``'s config: its output folder, seed, and (``split_total_steps``) 1/K of the budget."""
        k = self.num_students if self.split_total_steps else 1
        scale = lambda n: max(1, n // k) if n > 0 else 0  # noqa: E731
        ema_decay = max(0.0, 1.0 - (1.0 - self.ema_decay) * k) if self.use_ema else self.ema_decay
        return dataclasses.replace(
            self, output_dir=str(Path(self.output_dir) / "students" / f"student_{index}"), seed=self.seed + index,
            max_train_steps=self.max_train_steps // k, tsm_steps=self.tsm_steps // k,
            lr_warmup_steps=self.lr_warmup_steps // k, ema_decay=ema_decay,
            ema_start_step=self.ema_start_step // k, checkpointing_steps=scale(self.checkpointing_steps),
            sample_every=scale(self.sample_every), eval_every=scale(self.eval_every), student_index=index,
            split_total_steps=False,
        )


def smaller_network(teacher: nn.Module, cfg: MSDConfig) -> nn.Module:
    """A fresh network of the teacher's class with the student's channels / layers (fp32, random weights)."""
    config = {k: v for k, v in dict(teacher.config).items() if not str(k).startswith("_")}
    if cfg.student_block_out_channels is not None:
        if len(cfg.student_block_out_channels) != len(config["block_out_channels"]):
            raise ValueError(f"student_block_out_channels needs {len(config['block_out_channels'])} entries (one per "
                             f"teacher block), got {cfg.student_block_out_channels}.")
        config["block_out_channels"] = list(cfg.student_block_out_channels)
    if cfg.student_layers_per_block is not None:
        config["layers_per_block"] = cfg.student_layers_per_block
    if cfg.student_norm_num_groups is not None:
        config["norm_num_groups"] = cfg.student_norm_num_groups
    groups = config.get("norm_num_groups")
    if groups and any(c % groups for c in config["block_out_channels"]):
        raise ValueError(f"student_block_out_channels {config['block_out_channels']} are not all divisible by "
                         f"norm_num_groups={groups}: set student_norm_num_groups.")
    return type(teacher).from_config(config).float()


class _SmallGeneratorLayout(FullCopies):
    """Full copies of the teacher for every role but the generator, which is the given (smaller) network."""

    def __init__(self, teacher: Denoiser, generator: nn.Module) -> None:
        super().__init__(teacher)
        self.generator = generator

    def network(self, role: str, init: nn.Module | None = None) -> Denoiser:
        """The generator: ``init`` or the smaller network; other roles: copies of the teacher."""
        if role == "generator" and init is None:
            init = self.generator
        return super().network(role, init)


def _teacher_identity(teacher: Denoiser) -> dict[str, Any]:
    return network_fingerprint(teacher.model)


# --------------------------------------------------------------------------------------------------
class TSMTrainer(DistillationTrainer):
    """Teacher score matching (MSD Sec. 3.3): a smaller network learns the teacher's denoiser outputs.

    ``L_TSM = E_t || D_small(x_t, t, c) - D_teacher(x_t, t, c) ||^2`` in the network's own parameterization (v for
    the digits teacher), with ``x_t`` real images of the student's part noised at ``t ~ U[0, T)`` -- every noise
    level, so that the result is a denoiser the DMD stage (and its one-step use at the student timestep) can start
    from. Trainable: ``student`` (EMA when ``use_ema``).

    Args:
        config: Student ``k``'s :class:`MSDConfig` (``tsm_steps`` iterations).
        network: The smaller network to train.
        condition_filter: Its part's predicate.

    Example:
        >>> tsm = TSMTrainer(cfg.student_config(0), smaller_network(teacher.model, cfg), partition.predicate(0))
        >>> tsm.train(); small = tsm.standalone_network("student")
    """

    config: MSDConfig

    def __init__(self, config: MSDConfig, network: nn.Module, condition_filter: Any = None, **kw: Any) -> None:
        self._network = network
        config = dataclasses.replace(config, max_train_steps=config.tsm_steps,
                                     output_dir=str(Path(config.output_dir) / "tsm"), export=False,
                                     lr_warmup_steps=min(config.lr_warmup_steps, config.tsm_steps // 10))
        super().__init__(config, condition_filter=condition_filter, **kw)

    def build(self) -> None:
        """The frozen teacher, the data of the part, the small trainable network."""
        cfg = self.config
        self.teacher = self.load_teacher()
        self.teacher.model.requires_grad_(False).eval().to(self.accelerator.device, self.weight_dtype)
        self.build_data(self.teacher.model)
        self.layout = FullCopies(self.teacher)
        self.student = Denoiser.from_model(self._network.float().train().requires_grad_(True), self.schedule)
        self.student.to(self.accelerator.device)
        self.add_trainable("student", self.student, self.optimizer_settings(cfg.tsm_learning_rate), ema=cfg.use_ema)

    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        """One TSM step: noise real images of the part, regress the student's output onto the teacher's."""
        cfg, device = self.config, self.accelerator.device
        total = torch.zeros(())
        for micro in range(cfg.gradient_accumulation_steps):
            cond, real = self.data.sample(cfg.train_batch_size, self.rng)
            cond = cond.to(device)
            t = self.schedule.sample_timesteps(real.shape[0], 0.0, 1.0, self.rng)
            eps = torch.randn(real.shape, generator=self.rng)
            x_t = self.schedule.add_noise(real, eps, t).to(device)
            with torch.no_grad():
                target = self.teacher(x_t, t, cond).model_output.float()
            with self.sync_context("student", micro):
                out = self.trainables["student"].module(x_t, t, cond).model_output
                loss = per_sample_mean((out.float() - target) ** 2).mean()
                self.backward(loss, "student")
            total = total + loss.detach().cpu() / cfg.gradient_accumulation_steps
        return {"loss/tsm": total, "grad_norm/student": self.optimizer_step_norm("student")}

    def export(self, folder: Path) -> Path:
        """TSM exports nothing on its own: its network initialises the DMD stage."""
        return folder


# --------------------------------------------------------------------------------------------------
class MSDStudentTrainer(DMDTrainer):
    """One MSD student: DMD / DMD2 on part ``student_index`` of the partition (subclass of :class:`DMDTrainer`).

    The part filters ``self.data`` (generator conditions, fake-score inputs, real images); ``self.full_data`` keeps
    every condition, and DMD1's regression pairs are drawn from it (not filtered). A smaller student's generator is
    ``init_network`` (TSM's result, or a random small network); its fake score is a copy of the teacher.

    Args:
        config: Student ``k``'s :class:`MSDConfig` (:meth:`MSDConfig.student_config`).
        partition: The partition.
        init_network: The smaller generator to start from (``None``: a copy of the teacher).

    Example:
        >>> MSDStudentTrainer(cfg.student_config(2), partition).train()
    """

    config: MSDConfig

    def __init__(self, config: MSDConfig, partition: ConditionPartition, init_network: nn.Module | None = None,
                 **kw: Any) -> None:
        if config.student_index is None:
            raise ValueError("MSDStudentTrainer needs config.student_index (use MSDConfig.student_config(k)).")
        self.partition, self.init_network = partition, init_network
        super().__init__(config, condition_filter=partition.predicate(config.student_index), **kw)

    def make_layout(self, teacher: Denoiser, roles: Any) -> Any:
        """The DMD layout, with the smaller generator when there is one."""
        if self.init_network is None:
            return super().make_layout(teacher, roles)
        return _SmallGeneratorLayout(teacher, self.init_network)

    def critic_loss(
        self, x: torch.Tensor, cond: Any, real: torch.Tensor | None, real_cond: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DMD's critic loss on the samples of this student's part only.

        DMD1 also trains the critic on the generator's outputs for the (unfiltered) regression pairs; MSD's fake
        score models the student's own part, so samples of other parts are dropped here (with as many real images).
        """
        keep = self.condition_filter(cond.to("cpu"))
        if not bool(keep.all()):
            idx = keep.nonzero().flatten()
            x, cond = x[idx.to(x.device)], cond.select(idx.to(x.device))
            if real is not None and real_cond is not None:
                real, real_cond = real[: len(idx)], real_cond.select(torch.arange(len(idx)))
        return super().critic_loss(x, cond, real, real_cond)

    def student_metadata(self) -> dict:
        """DMD's record plus the part and the partition kind."""
        meta = super().student_metadata()
        meta.update(method="msd", student_index=self.config.student_index, num_students=self.partition.num_parts,
                    partition=self.partition.kind,
                    parameters=sum(p.numel() for p in self.unwrap("generator").parameters()))
        return meta


# --------------------------------------------------------------------------------------------------
class MSDTrainer:
    """Multi-student distillation: the partition, then each student (TSM, then DMD), then the routed pipeline.

    ``train()`` returns a summary (partition balance, each student's summary, the routed pipeline's folder).
    Every student is an :class:`MSDStudentTrainer` run with its own Accelerator, output folder
    ``<output_dir>/students/student_<k>`` (checkpoints, resume, export) and ``1/K`` of the budget.

    Args:
        config: An :class:`MSDConfig`.
        teacher: Optional teacher :class:`~stepdistill.Denoiser` instead of ``config.teacher``.

    Example:
        >>> cfg = parse_config(MSDConfig, ["--config", "recipes/digits_msd4_1step.yaml"])
        >>> MSDTrainer(cfg).train()["student"]
        'runs/digits_msd4_1step/student'
    """

    def __init__(self, config: MSDConfig, teacher: Denoiser | None = None) -> None:
        from accelerate import PartialState

        from ..loading import load_denoiser
        from ..utils import runs_on_cpu

        self.config = config
        self.output_dir = Path(config.output_dir)
        if teacher is None and not config.teacher:
            raise ValueError("No teacher: pass --teacher <pipeline folder> (e.g. stepdistill/assets/digits/teacher).")
        self.teacher_override = teacher
        self.teacher = teacher if teacher is not None else load_denoiser(config.teacher)
        self.identity = {"teacher": _teacher_identity(self.teacher)}
        self.state = PartialState(cpu=runs_on_cpu(config.cpu))  # processes of `accelerate launch` (DDP per student)
        self.partition = self.make_partition()

    # ------------------------------------------------------------------------------------------------
    def make_partition(self) -> ConditionPartition:
        """The configured partition: loaded (``partition_dir``, or this run's saved one) or built, then saved."""
        cfg = self.config
        saved = self.output_dir / "partition"
        source = Path(cfg.partition_dir) if cfg.partition_dir else saved if (saved / "partition.json").is_file() \
            else None
        if source is not None:
            part = ConditionPartition.load(source, self.identity)
            if part.num_parts != cfg.num_students or part.kind != cfg.partition:
                raise PartitionError(f"The partition in {str(source)!r} is {part.kind} with {part.num_parts} "
                                     f"parts, but this run asks for {cfg.partition} with {cfg.num_students}: use "
                                     "another output_dir or matching settings.")
            self._check_covers(part)
        else:
            part = self.build_partition()
        if not (saved / "partition.json").is_file() and self.state.is_main_process:
            part.save(saved)
        self.state.wait_for_everyone()
        return part

    def _class_count(self) -> tuple[int, int | None]:
        model = self.teacher.model
        n = getattr(getattr(model, "config", None), "num_class_embeds", None)
        if n is None:
            raise PartitionError(f"A class partition needs a class-conditional teacher (num_class_embeds); "
                                 f"{type(model).__name__} has none: use text_kmeans / text_quadrants.")
        return int(n) - 1, self.config.null_class_label

    def _check_covers(self, part: ConditionPartition) -> None:
        if part.is_class_partition:
            n, _ = self._class_count()
            if len(part.assignment) != n:
                raise PartitionError(f"The partition covers {len(part.assignment)} classes but the teacher has {n}: "
                                     "it was made for another teacher; rebuild it.")

    def build_partition(self) -> ConditionPartition:
        """Build the configured partition from the teacher (class kinds) or the training prompts (text kinds)."""
        cfg = self.config
        if cfg.partition == "class_ranges":
            n, null = self._class_count()
            return ConditionPartition.class_ranges(n, cfg.num_students, null, self.identity)
        if cfg.partition == "class_kmeans":
            n, null = self._class_count()
            emb = getattr(self.teacher.model, "class_embedding", None)
            if emb is None:
                raise PartitionError("class_kmeans needs the teacher's class_embedding table; use class_ranges.")
            return ConditionPartition.class_kmeans(emb.weight.detach()[:n], cfg.num_students, null, self.identity,
                                                   cfg.partition_seed)
        from ..data.sources import make_data_source
        from .teacher import teacher_root

        data = make_data_source(cfg, teacher_root(cfg.teacher or None), self.teacher.model, "cpu")
        encoder = getattr(data, "encoder", None)
        if encoder is None:
            raise PartitionError(f"A text partition needs prompts (data=prompts or a captioned dataset), got "
                                 f"data={cfg.data!r}.")
        from ..data.partition import pooled_text_embedding

        prompts = getattr(data, "prompts", None)
        if prompts is None:
            raise PartitionError("A text partition is built from the prompt list: use data=prompts.")
        pooled = torch.cat([pooled_text_embedding(encoder(prompts[i:i + 256])) for i in range(0, len(prompts), 256)])
        identity = {**self.identity, "encoder": network_fingerprint(encoder.pipeline.text_encoder)}
        if cfg.partition == "text_kmeans":
            return ConditionPartition.text_kmeans(pooled, cfg.num_students, identity, cfg.partition_seed)
        return ConditionPartition.text_quadrants(pooled, identity)

    # ------------------------------------------------------------------------------------------------
    def student_dir(self, index: int) -> Path:
        """Student ``index``'s run folder."""
        return self.output_dir / "students" / f"student_{index}"

    def train_student(self, index: int) -> dict[str, Any]:
        """TSM (smaller students with ``tsm_steps``), then DMD on part ``index``; returns the DMD summary."""
        cfg = self.config.student_config(index)
        predicate = self.partition.predicate(index)
        init, tsm_summary = None, None
        if cfg.smaller_student:
            init = smaller_network(self.teacher.model, cfg)
            if cfg.tsm_steps > 0:
                tsm = TSMTrainer(cfg, init, predicate, teacher=self._fresh_teacher())
                tsm.keep_process_group = True
                tsm_summary = tsm.train()
                init = tsm.standalone_network("student")
        student = MSDStudentTrainer(cfg, self.partition, init, teacher=self._fresh_teacher())
        student.keep_process_group = True
        summary = student.train()
        if tsm_summary is not None:
            summary["tsm"] = {k: tsm_summary[k] for k in ("final_metrics", "train_seconds", "global_step")}
        return summary

    def _fresh_teacher(self) -> Denoiser | None:
        """The teacher for one trainer: reloaded from its folder (trainers cast / move it), or the given module."""
        return self.teacher_override

    def train(self) -> dict[str, Any]:
        """Train the students (all, or ``student_index``), then assemble the routed pipeline when all exist."""
        cfg = self.config
        indices = [] if cfg.assemble_only else (
            [cfg.student_index] if cfg.student_index is not None else list(range(cfg.num_students)))
        summary: dict[str, Any] = {"partition": {"kind": self.partition.kind, "num_parts": self.partition.num_parts,
                                                 "balance": self.partition.balance}, "students": {}}
        for k in indices:
            summary["students"][k] = self.train_student(k)
        self.state.wait_for_everyone()
        ready = [(self.student_dir(k) / "student" / "model_index.json").is_file() for k in range(cfg.num_students)]
        self.state.destroy_process_group()
        if not self.state.is_main_process:
            return summary
        if cfg.export and all(ready):
            summary["student"] = str(assemble_routed_pipeline(self.output_dir, self.partition,
                                                              self.identity["teacher"]))
        elif cfg.assemble_only:
            missing = [k for k, r in enumerate(ready) if not r]
            raise FileNotFoundError(f"Students {missing} of {str(self.output_dir)!r} are not trained yet (no "
                                    f"students/student_<k>/student): run with --student_index k for each.")
        summary["global_step"] = sum(s.get("global_step", 0) for s in summary["students"].values())
        summary["train_seconds"] = sum(s.get("train_seconds", 0.0) for s in summary["students"].values())
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "msd_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return summary


def assemble_routed_pipeline(run_dir: str | Path, partition: ConditionPartition | None = None,
                             teacher_identity: dict[str, Any] | None = None) -> Path:
    """Build ``<run_dir>/student`` (a :class:`~stepdistill.pipelines.RoutedStudentsPipeline`) from the students.

    Args:
        run_dir: An MSD run folder (``partition/`` and ``students/student_<k>/student``).
        partition: The partition (default: ``<run_dir>/partition``).
        teacher_identity: Recorded in the pipeline and checked against the partition.
    """
    from ..pipelines import RoutedStudentsPipeline, StepDistillPipeline
    from ..utils import atomic_write_dir

    run_dir = Path(run_dir)
    if partition is None:
        partition = ConditionPartition.load(run_dir / "partition")
    nets, scheduler, meta = {}, None, None
    for k in range(partition.num_parts):
        folder = run_dir / "students" / f"student_{k}" / "student"
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"Student folder {str(folder)!r} is missing: train it (--student_index {k}) "
                                    "before assembling the routed pipeline.")
        pipe = StepDistillPipeline.from_pretrained(folder)
        nets[f"unet_{k}"], scheduler = pipe.unet, scheduler or pipe.scheduler
        meta = meta or dict(pipe.config)
    routed = RoutedStudentsPipeline(scheduler=scheduler, null_class_label=meta.get("null_class_label"),
                                    default_timesteps=meta.get("default_timesteps"),
                                    teacher_identity=teacher_identity or partition.identity.get("teacher"), **nets)
    routed.set_partition(partition)
    return atomic_write_dir(run_dir / "student", lambda tmp: routed.save_pretrained(tmp))


__all__ = ["MSDConfig", "MSDStudentTrainer", "MSDTrainer", "TSMTrainer", "assemble_routed_pipeline",
           "smaller_network"]

"""BOOT on the base trainer: data-free one-step distillation by bootstrapping on the signal ODE.

Gu, Zhai, Zhang, Liu, Susskind, "BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping",
arXiv 2306.05544 (2023); ICML 2024 as "Data-free Distillation of Diffusion Models with Bootstrapping".

The student ``g(eps, t, c)`` reads the same Gaussian noise ``eps`` at every time ``t`` and predicts the signal
``y_t = (x_t - sigma_t eps) / alpha_t`` of the teacher's probability-flow ODE trajectory through ``x_T = eps``;
``y_0`` is the sample. In signal space one teacher DDIM step (Euler for rectified flow) is
``y_s = y_t + delta (f(x_t, t) - y_t)`` with ``delta = 1 - (sigma_s alpha_t) / (alpha_s sigma_t)``
(:meth:`~stepdistill.NoiseSchedule.signal_step_size`). One iteration:

1. Draw conditions (no images: BOOT is data-free), ``eps``, and neighbours ``s < t`` of an evenly spaced grid of
   ``bootstrap_steps`` intervals up to the noise end ``T``.
2. ``y_t = SG[g(eps, t, c)]`` and ``x_t = alpha_t y_t + sigma_t eps`` (no gradient on either).
3. The teacher's x-prediction at ``(x_t, t)`` with CFG ``uncond + w (cond - uncond)`` on x (two evaluations when
   ``w != 1``), and, for the first ``boundary_fraction`` of the batch, at ``(eps, T)``.
4. ``L = mean (1/delta^2) ||g(eps, s, c) - SG[y_t + delta (f - y_t)]||^2
   + boundary_loss_weight * mean ||g(eps, T, c) - f(eps, T, c)||^2``; gradient only through ``g(eps, s)`` and
   ``g(eps, T)`` (one student forward).

**The student network** is a copy of the teacher's whose timestep input runs backwards
(:func:`~stepdistill.networks.time_reversal.reverse_timestep_input`, an exact weight rewrite), and whose output is
always read in the teacher's parameterization *at the noise end*: ``g(eps, t) = x0 of student(eps, T - t)`` converted
at ``(eps, T)``. So ``g(eps, T) = f(eps, T)`` holds at initialisation (the boundary), and the sample ``y_0`` is one
call ``student(eps, T)`` on pure noise at the noise-end timestep: the standard one-step student pipeline and export.

**Eps teachers.** Their x-prediction divides by ``alpha_t``; at the noise end (``alpha_T = 0.068`` for SD's
schedule, 15x) the teacher's boundary value and the student's read-out both carry that amplification. The
conversions run in float64 and the student is trained against it (its output error is scaled the same way at
every ``t``); a noise end where ``1 / alpha_T`` exceeds ``max_x0_amplification`` (zero-terminal-SNR schedules) is
refused, naming the fix (an earlier ``noise_end``, or a v / x0 / flow teacher). v-prediction and flow teachers need
no division there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..conditioning import Conditioning
from ..denoiser import guided_denoise
from ..losses import SignalBootstrapLoss, SignalBoundaryLoss
from ..networks.time_reversal import reverse_timestep_input
from .base import DistillationTrainer, TrainerConfig


@dataclass
class BOOTConfig(TrainerConfig):
    """BOOT settings (data-free: the data source gives conditions only).

    Example:
        >>> cfg = BOOTConfig(teacher="stepdistill/assets/digits/teacher", data="uniform_labels")
    """

    data: str = field(
        default="uniform_labels",
        metadata={"help": "Condition source, without images (BOOT is data-free): uniform_labels | prompts | "
                          "unconditional."},
    )
    guidance_scale: float | None = field(
        default=None,
        metadata={"help": "Teacher CFG w on its x-prediction (uncond + w(cond - uncond)) before the target; None: the "
                          "teacher's stepdistill_teacher.json guidance_scale, else 1."},
    )
    student_learning_rate: float = field(default=1e-4, metadata={"help": "Student AdamW learning rate."})
    bootstrap_steps: int = field(
        default=32,
        metadata={"help": "Intervals of the evenly spaced time grid from 0 to the noise end; each iteration "
                          "bootstraps s = grid[k-1] from t = grid[k], k uniform (BOOT's step size Delta = T / N)."},
    )
    noise_end: float | None = field(
        default=None,
        metadata={"help": "The noise-end timestep T (boundary, and the exported one-step timestep); None: the "
                          "schedule's last (999 VP, 1000 flow)."},
    )
    boundary_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the boundary loss at T."})
    boundary_fraction: float = field(
        default=0.25, metadata={"help": "Fraction of each batch whose noise also enters the boundary loss."}
    )
    min_step_coefficient: float = field(
        default=1e-3,
        metadata={"help": "Refuse time grids whose smallest delta is below this (the loss divides by delta)."},
    )
    max_x0_amplification: float = field(
        default=100.0,
        metadata={"help": "Refuse eps-prediction teachers whose x0 at the noise end divides by alpha_T < 1 / this."},
    )
    digits_eval: bool = field(
        default=False,
        metadata={"help": "In-training digits metrics (class accuracy, FID vs the held-out split; reference images "
                          "only, never for training). For the digits teacher."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.has_images:
            raise ValueError(
                f"data={self.data!r} comes with real images, but BOOT is data-free and takes conditions only: use "
                "data=uniform_labels (class teachers), prompts (text teachers) or unconditional."
            )
        if self.data == "prompts" and self.prompts and Path(self.prompts).is_dir():
            from ..data.datasets import is_saved_dataset

            if not is_saved_dataset(self.prompts):  # the imagefolder builder would read every image in it
                raise ValueError(
                    f"prompts={self.prompts!r} is a folder but not a save_to_disk dataset (an image folder?); BOOT is "
                    "data-free and reads no images: give a .txt / csv / json / parquet file of prompts."
                )
        if self.lora_rank > 0:
            raise ValueError("BOOT trains a full copy of the teacher (its timestep input is reversed, a weight the "
                             "teacher shares in LoRA mode): use lora_rank=0.")
        if not self.student_learning_rate > 0:
            raise ValueError(f"student_learning_rate must be > 0, got {self.student_learning_rate}.")
        if self.bootstrap_steps < 1:
            raise ValueError(f"bootstrap_steps must be >= 1, got {self.bootstrap_steps}.")
        if not 0.0 < self.boundary_fraction <= 1.0:
            raise ValueError(f"boundary_fraction must be in (0, 1], got {self.boundary_fraction}.")
        if self.boundary_loss_weight < 0:
            raise ValueError(f"boundary_loss_weight must be >= 0, got {self.boundary_loss_weight}.")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}.")
        if self.noise_end is not None and not self.noise_end > 0:
            raise ValueError(f"noise_end must be > 0, got {self.noise_end}.")
        if not (self.min_step_coefficient > 0 and self.max_x0_amplification > 1):
            raise ValueError("min_step_coefficient must be > 0 and max_x0_amplification > 1.")


class BOOTTrainer(DistillationTrainer):
    """BOOT on the base trainer: one trainable, ``student`` (EMA with ``use_ema``), a full copy of the teacher.

    Args:
        config: A :class:`BOOTConfig`.
        accelerator: Optional existing ``Accelerator``.
        teacher: Optional teacher :class:`~stepdistill.Denoiser` instead of ``config.teacher``.
        condition_filter: Optional predicate keeping a subset of the conditions.

    Example:
        >>> cfg = parse_config(BOOTConfig, ["--config", "recipes/digits_boot_1step.yaml"])
        >>> BOOTTrainer(cfg).train()
    """

    config: BOOTConfig

    def build(self) -> None:
        """Load the teacher, check the settings against it, make the time-reversed student, the grid and losses."""
        cfg, device = self.config, self.accelerator.device
        teacher = self.load_teacher()
        schedule = self.schedule
        self.noise_end = float(schedule.max_timestep if cfg.noise_end is None else cfg.noise_end)
        schedule.validate_timesteps([self.noise_end])
        alpha_end = float(schedule.alpha_sigma(self.noise_end)[0])
        if schedule.prediction_type == "epsilon" and alpha_end * cfg.max_x0_amplification < 1:
            raise ValueError(
                f"An epsilon-prediction teacher's x0 = (x - sigma eps) / alpha divides by alpha_T = {alpha_end:.3g} at "
                f"the noise end t={self.noise_end:g} (over {cfg.max_x0_amplification:g}x amplification): set "
                "noise_end to an earlier timestep, or distill a v-prediction / x0 / flow teacher."
            )
        self.grid = schedule.signal_grid(cfg.bootstrap_steps, self.noise_end)
        self.deltas = schedule.signal_step_size(self.grid[1:], self.grid[:-1])
        if float(self.deltas.min()) < cfg.min_step_coefficient:
            raise ValueError(
                f"bootstrap_steps={cfg.bootstrap_steps} makes the smallest step coefficient delta = "
                f"{float(self.deltas.min()):.2g} (< min_step_coefficient {cfg.min_step_coefficient:g}); the loss "
                "divides by delta^2: use fewer bootstrap_steps."
            )
        self.guidance_scale = self.resolve_guidance(cfg.guidance_scale)
        self.layout = self.make_layout(teacher, roles=("student",))
        self.teacher = self.layout.teacher
        self.build_data(self.teacher.model)
        if self.full_data.has_images:  # the config refuses image sources; a data source must not bring any
            raise ValueError("BOOT is data-free: its data source must give conditions only.")
        self._check_guidance()
        self.student = self.layout.network("student")
        center = float(schedule.model_timestep(torch.tensor(self.noise_end, dtype=torch.float64)))
        reverse_timestep_input(self.student.model, center)
        self.layout.finalize(device, self.weight_dtype)
        self.student.to(device)
        self.add_trainable("student", self.student, self.optimizer_settings(cfg.student_learning_rate),
                           ema=cfg.use_ema)
        self.bootstrap_loss = SignalBootstrapLoss()
        self.boundary_loss = SignalBoundaryLoss()

    def _check_guidance(self) -> None:
        """Refuse CFG on a teacher without an unconditional branch (one line naming the fix)."""
        if self.guidance_scale == 1.0:
            return
        cond = self.data.grid_conditioning(1)
        fix = "set guidance_scale 1 (no CFG)"
        if cond.is_empty:
            raise ValueError(f"guidance_scale={self.guidance_scale:g} asks for CFG, but data={self.config.data!r} "
                             f"gives no conditions, so there is no unconditional branch to contrast: {fix}.")
        embedding = getattr(self.teacher.model, "class_embedding", None)
        null = cond.null_class_label
        if cond.class_labels is not None and (null is None or (embedding is not None and hasattr(
                embedding, "num_embeddings") and null >= embedding.num_embeddings)):
            size = getattr(embedding, "num_embeddings", "?")
            raise ValueError(f"guidance_scale={self.guidance_scale:g} asks for CFG, but the teacher has no "
                             f"unconditional branch (null class {null} is not among its {size} class embeddings): "
                             f"{fix}, or set null_class_label to the class it was trained to drop to.")

    # ----------------------------------------------------------------------------------------------
    def signal(self, student: nn.Module, eps: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``g(eps, t, c)``: the student network at ``T - t`` on ``eps``, read as x0 at the noise end ``(eps, T)``.

        Args:
            student: The student denoiser (its DDP wrapper for a forward with gradient).
            eps: The noise ``[B, ...]``.
            t: ``[B]`` BOOT times (0: data, ``T``: noise).
            cond: Conditioning.
        """
        tau = self.noise_end - t.to(torch.float64)
        raw = student(eps, tau.clamp_min(0.0), cond).model_output
        return self.schedule.to_x0_eps(raw, eps, self.noise_end)[0]

    def teacher_x0(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The teacher's x-prediction with CFG on x (:func:`~stepdistill.denoiser.guided_denoise`)."""
        with torch.no_grad():
            return guided_denoise(self.teacher, x, t, cond, self.guidance_scale).x0

    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        """One BOOT iteration (all micro-batches, one student step)."""
        cfg, device = self.config, self.accelerator.device
        metrics: dict[str, list[torch.Tensor]] = {}
        for micro in range(cfg.gradient_accumulation_steps):
            # 1. conditions only, the noise, and grid neighbours s < t
            cond, images = self.data.sample(cfg.train_batch_size, self.rng)
            if images is not None:
                raise RuntimeError("BOOT is data-free, but its data source returned images.")
            b = cfg.train_batch_size
            eps = torch.randn(b, *self.sample_shape, generator=self.rng).to(device)
            k = torch.randint(1, len(self.grid), (b,), generator=self.rng)
            t, s, delta = self.grid[k], self.grid[k - 1], self.deltas[k - 1]
            nb = max(1, round(b * cfg.boundary_fraction)) if cfg.boundary_loss_weight > 0 else 0
            cond = cond.to(device)
            both = Conditioning.cat([cond, cond.select(slice(0, nb))]) if nb else cond
            end = torch.full((nb,), self.noise_end, dtype=torch.float64)
            # 2. y_t = SG[g(eps, t)] and the trajectory point it implies (no gradient on either)
            with torch.no_grad():
                y_t = self.signal(self.unwrap("student"), eps, t, cond)
                x_t = self.schedule.signal_to_x(y_t, eps, t)
                # 3. the teacher at (x_t, t), and at (eps, T) for the boundary, CFG on x
                f = self.teacher_x0(torch.cat([x_t, eps[:nb]]), torch.cat([t, end]), both)
            # 4. one student forward with gradient at s (and T)
            with self.sync_context("student", micro):
                g = self.signal(self.trainables["student"].module, torch.cat([eps, eps[:nb]]), torch.cat([s, end]),
                                both)
                l_bs = self.bootstrap_loss(g[:b], y_t, f[:b], delta)
                loss = l_bs.mean()
                parts = {"loss/bootstrap": l_bs.mean().detach()}
                if nb:
                    l_bc = self.boundary_loss(g[b:], f[b:])
                    loss = loss + cfg.boundary_loss_weight * l_bc.mean()
                    parts["loss/boundary"] = l_bc.mean().detach()
                self.backward(loss, "student")
            parts["boot/delta"] = delta.float().mean()
            for key, value in parts.items():
                metrics.setdefault(key, []).append(value.float().cpu())
        out = {k: torch.stack(v).mean() for k, v in metrics.items()}
        out["grad_norm/student"] = self.optimizer_step_norm("student")
        self.zero_grad()
        return out

    # ----------------------------------------------------------------------------------------------
    # outputs
    @property
    def student_timesteps(self) -> list[float]:
        """The exported one-step timestep list: ``[T]`` (one call on pure noise gives ``y_0``)."""
        return [self.noise_end]

    @torch.no_grad()
    def signal_trajectory(self, cond: Conditioning, seeds: Sequence[int], times: Sequence[float]) -> torch.Tensor:
        """The student's signals ``y_t = g(eps, t, c)`` for each time, one seeded ``eps`` per sample (EMA weights).

        Returns ``[len(times), B, C, H, W]``; ``times[i] = 0`` is the sample, ``T`` the boundary. The trajectory
        points are ``x_t = alpha_t y_t + sigma_t eps`` (:meth:`~stepdistill.NoiseSchedule.signal_to_x`).
        """
        from ..sampling import initial_noise, make_generators

        device = self.accelerator.device
        eps = initial_noise((len(seeds), *self.sample_shape), make_generators(seeds)).to(device)
        den = self.unwrap("student")
        rows = []
        with self.ema_weights("student"):
            den.eval()
            for time in times:
                t = torch.full((len(seeds),), float(time), dtype=torch.float64)
                rows.append(self.signal(den, eps, t, cond.to(device)).float().cpu())
            den.train()
        return torch.stack(rows)

    def student_network(self) -> nn.Module | None:
        """A standalone fp32 copy of the student network (EMA weights when EMA is on)."""
        return self.standalone_network("student")

    def student_metadata(self) -> dict:
        """What the exported student folder records about its training."""
        cfg = self.config
        return {"method": "boot", "timesteps": self.student_timesteps, "guidance_scale": 0.0,
                "teacher_guidance_scale": self.guidance_scale, "teacher": str(cfg.teacher),
                "bootstrap_steps": cfg.bootstrap_steps, "data": cfg.data, "training_images": 0,
                "ema": bool(cfg.use_ema), "global_step": self.global_step}

    def export(self, folder: Path) -> Path:
        """Write the student as a pipeline folder whose ``LCMScheduler`` holds ``[T]``: one call on pure noise."""
        return self.export_student(self.student_network(), folder, self.student_timesteps, self.student_metadata())

    def sample_student_images(self, cond: Conditioning, seeds: Sequence[int]) -> torch.Tensor:
        """One-step student samples (the standard sampler at ``[T]``), one seeded generator per sample."""
        return self.sample_images("student", self.student_timesteps, cond, seeds)

    def sample_grid(self, path: Path) -> None:
        """Write the BOOT grid: rows are the signals ``y_t`` at ``t = 0`` (the samples), T/4, T/2, 3T/4 and ``T``."""
        n = self.config.sample_grid_size
        times = [self.noise_end * f for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
        self.write_grid(list(self.signal_trajectory(self.data.grid_conditioning(n), range(n), times)), path)

    def evaluate(self) -> dict[str, float]:
        """With ``digits_eval``: class accuracy and FID of the one-step samples (held-out reference)."""
        from .outputs import DigitsEvaluator

        if not self.config.digits_eval or self.config.eval_num_samples == 0:
            return {}
        if self._digits_evaluator is None:
            self._digits_evaluator = DigitsEvaluator(self.config.eval_num_samples, self.null_class_label)
        return self._digits_evaluator(self.sample_student_images)


__all__ = ["BOOTConfig", "BOOTTrainer"]

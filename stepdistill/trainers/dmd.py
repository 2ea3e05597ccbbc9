"""DMD and DMD2 on the base trainer: config and trainer.

DMD: Yin et al., "One-step Diffusion with Distribution Matching Distillation", CVPR 2024. DMD2: Yin et al.,
"Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS 2024.

One iteration, with ``N = critic_updates_per_generator_update`` (DMD2's two time-scale update rule):

1. The generator produces x0 samples from noise (backward simulation for k-step students, DMD2 Sec. 4.5).
   On iterations ``0, N, 2N, ...`` it does so with gradient and takes a step on
   ``dm_loss_weight * L_DM (+ gan_generator_loss_weight * L_G_gan) (+ regression_loss_weight * L_reg)``;
   otherwise its forward runs under ``no_grad``.
2. The fake-score critic takes one step of denoising score matching on those (detached) samples
   (+ ``gan_critic_loss_weight * L_D`` with the GAN head).

``L_DM``: noise the sample at ``t ~ U[0.02T, 0.98T]``, compare the teacher's CFG x0 prediction
(``uncond + w (cond - uncond)``) with the fake score's, normalise per sample, and push the result through the
stop-gradient surrogate (:class:`~stepdistill.losses.DistributionMatchingLoss`).

The generator and the fake score start as the teacher: full copies, or (``lora_rank > 0``) two LoRA adapters
on one frozen copy (:mod:`stepdistill.adapters`). The GAN head reads the fake score's bottleneck through a
forward hook (:class:`~stepdistill.networks.FakeScore`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..conditioning import Conditioning
from ..losses import (
    REGRESSION_DISTANCES,
    DistributionMatchingLoss,
    FakeScoreLoss,
    GANGeneratorLoss,
    GANInputNoise,
    build_regression_distance,
)
from ..networks import FakeScore, build_gan_head
from .base import DistillationTrainer, TrainerConfig


@dataclass
class DMDConfig(TrainerConfig):
    """DMD / DMD2 settings (defaults: DMD2's reference values where they apply).

    Example:
        >>> cfg = DMDConfig(teacher="stepdistill/assets/digits/teacher", student_timesteps=[399])
    """

    real_guidance_scale: float | None = field(
        default=None,
        metadata={"help": "Real-score CFG w (uncond + w(cond - uncond)); None: the teacher's "
                          "stepdistill_teacher.json guidance_scale, else 1."},
    )
    student_timesteps: list[float] = field(
        default_factory=lambda: [999.0],
        metadata={"help": "Student timestep list, noisiest first: [999] or [399] (one-step conditioning "
                          "timestep), [999, 749, 499, 249] (4 steps). The first entry is fed pure noise."},
    )
    backward_simulation: bool | None = field(
        default=None,
        metadata={"help": "k-step inputs from the student's own rollout (DMD2 Sec. 4.5). None: on for k > 1."},
    )
    generator_learning_rate: float = field(default=1e-5, metadata={"help": "Generator AdamW learning rate."})
    critic_learning_rate: float = field(default=1e-5, metadata={"help": "Critic (fake score) AdamW learning rate."})
    critic_updates_per_generator_update: int = field(
        default=5, metadata={"help": "TTUR ratio: the generator steps every N iterations, the critic every one."}
    )
    dm_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the distribution-matching loss."})
    min_step_percent: float = field(default=0.02, metadata={"help": "DM loss t range start, fraction of T."})
    max_step_percent: float = field(default=0.98, metadata={"help": "DM loss t range end, fraction of T."})
    use_gan: bool = field(default=False, metadata={"help": "DMD2 GAN head on the fake score's bottleneck."})
    gan_generator_loss_weight: float = field(default=1e-3, metadata={"help": "Generator GAN loss weight."})
    gan_critic_loss_weight: float = field(default=1e-2, metadata={"help": "Critic (discriminator) GAN weight."})
    gan_feature_module: str = field(
        default="mid_block", metadata={"help": "Submodule of the fake-score network whose output feeds the head."}
    )
    gan_noisy_inputs: bool = field(
        default=True, metadata={"help": "Diffusion-GAN: noise real/fake GAN inputs at t ~ U[0, T)."}
    )
    regression_loss_weight: float = field(
        default=0.0, metadata={"help": "DMD1 regression weight on teacher ODE pairs (0: off; paper 0.25)."}
    )
    num_regression_pairs: int = field(
        default=1024,
        metadata={"help": "Teacher ODE pairs generated at start when regression is on (not with regression_pairs: "
                          "the file's count is used)."},
    )
    regression_teacher_steps: int = field(default=50, metadata={"help": "Teacher sampler steps for the pairs."})
    regression_pairs: str | None = field(
        default=None,
        metadata={"help": "A pairs file from `stepdistill pairs` (training_scripts/generate_pairs.py), loaded instead "
                          "of generating pairs at start (checked against the teacher)."},
    )
    regression_pairs_verify: int = field(
        default=1,
        metadata={"help": "Pairs of the regression_pairs file re-generated at start to check that this teacher "
                          "made them (0: skip)."},
    )
    regression_distance: str = field(
        default="mse", metadata={"help": f"DMD1 regression distance: {list(REGRESSION_DISTANCES)}."}
    )
    regression_lpips_weights: str | None = field(
        default=None,
        metadata={"help": "Local LPIPS state dict (backbone + linear layers) for regression_distance=lpips; "
                          "nothing is downloaded."},
    )
    regression_pixel_weight: float = field(
        default=0.0, metadata={"help": "Pixel MSE added to a perceptual regression distance (0: none)."}
    )
    init_generator: str | None = field(
        default=None,
        metadata={"help": "Start the generator from this network / student / run / checkpoint folder instead of the "
                          "teacher (DMD2 SD1.5 stage 2 from stage 1; SDXL 1-step from a regression-pretrained one)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        ts = [float(t) for t in self.student_timesteps]
        self.student_timesteps = ts
        if not ts:
            raise ValueError("student_timesteps is empty: give at least one timestep, e.g. [999].")
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"student_timesteps must be strictly decreasing (noisiest first), got {ts}.")
        if self.backward_simulation and len(ts) == 1:
            raise ValueError(
                f"backward_simulation=True needs a multi-step student, but student_timesteps={ts} has one "
                "entry: a one-step student is always fed pure noise. Drop backward_simulation or give a "
                "k-step list such as [999, 749, 499, 249]."
            )
        if self.critic_updates_per_generator_update < 1:
            raise ValueError(f"critic_updates_per_generator_update must be >= 1, got "
                             f"{self.critic_updates_per_generator_update}.")
        for name in ("generator_learning_rate", "critic_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        if not 0.0 <= self.min_step_percent < self.max_step_percent <= 1.0:
            raise ValueError(
                f"Need 0 <= min_step_percent < max_step_percent <= 1, got {self.min_step_percent}, "
                f"{self.max_step_percent}."
            )
        if len(ts) > 1 and self.backward_simulation is False and not self.has_images:
            raise ValueError(
                f"A {len(ts)}-step student without backward simulation is trained on noised real images, but "
                f"data={self.data!r} has none: use data=dataset (or digits), or drop backward_simulation=false."
            )
        if self.use_gan and not self.has_images:
            raise ValueError(
                f"use_gan needs real images; data={self.data!r} has none (use data=digits, or data=dataset "
                "with --dataset <image folder>)."
            )
        for name in ("dm_loss_weight", "gan_generator_loss_weight", "gan_critic_loss_weight",
                     "regression_loss_weight", "regression_pixel_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.regression_loss_weight > 0 and len(ts) != 1:
            raise ValueError("The DMD1 regression loss is defined for one-step students; use one timestep.")
        if self.regression_distance not in REGRESSION_DISTANCES:
            raise ValueError(f"regression_distance must be one of {list(REGRESSION_DISTANCES)}, "
                             f"got {self.regression_distance!r}.")
        if self.regression_pixel_weight > 0 and self.regression_distance == "mse":
            raise ValueError("regression_pixel_weight adds a pixel MSE to a perceptual distance; with "
                             "regression_distance=mse set it to 0.")
        if self.regression_distance == "lpips" and not self.regression_lpips_weights:
            raise ValueError("regression_distance=lpips needs --regression_lpips_weights <local LPIPS state dict> "
                             "(see stepdistill.losses.LPIPSDistance for how to make one).")
        if self.regression_pairs and self.regression_loss_weight == 0:
            raise ValueError("regression_pairs is set but regression_loss_weight is 0, so the pairs would be unused: "
                             "set --regression_loss_weight (DMD1: 0.25) or drop regression_pairs.")
        if self.regression_pairs_verify < 0:
            raise ValueError(f"regression_pairs_verify must be >= 0, got {self.regression_pairs_verify}.")
        if self.lora_rank > 0 and self.init_generator:
            raise ValueError("init_generator is for full mode (lora_rank=0); a LoRA generator starts at the teacher.")
        if self.lora_rank > 0 and self.use_gan:
            raise ValueError(
                "use_gan is not supported with lora_rank > 0 (shared-base LoRA mode): the GAN head's feature "
                "hook would sit on the network shared with the teacher and generator. Use lora_rank=0 for DMD2 "
                "with the GAN head, or drop use_gan."
            )
        if self.real_guidance_scale is not None and self.real_guidance_scale < 0:
            raise ValueError(f"real_guidance_scale must be >= 0, got {self.real_guidance_scale}.")

    @property
    def uses_backward_simulation(self) -> bool:
        """Resolved backward-simulation flag (``None`` means on for k > 1)."""
        if self.backward_simulation is None:
            return len(self.student_timesteps) > 1
        return bool(self.backward_simulation)


class DMDTrainer(DistillationTrainer):
    """DMD2 (and DMD1 with ``regression_loss_weight > 0``) on the base trainer.

    Trainables: ``generator`` (EMA with ``use_ema``; steps every ``critic_updates_per_generator_update``
    iterations) and ``critic`` (a :class:`~stepdistill.networks.FakeScore`, with the GAN head under ``use_gan``).

    Args:
        config: A :class:`DMDConfig`.
        accelerator: Optional existing ``Accelerator``.
        teacher: Optional teacher :class:`~stepdistill.Denoiser` instead of ``config.teacher``.
        condition_filter: Optional predicate keeping a subset of the data (see :class:`DistillationTrainer`).

    Example:
        >>> cfg = parse_config(DMDConfig, ["--config", "recipes/digits_dmd2_1step.yaml"])
        >>> DMDTrainer(cfg).train()
    """

    config: DMDConfig

    def build(self) -> None:
        """Load the teacher, lay out generator and fake score, set up data, losses and DMD1 pairs."""
        cfg, device = self.config, self.accelerator.device
        teacher = self.load_teacher()
        self.student_timesteps = self.schedule.validate_timesteps(cfg.student_timesteps)
        self.guidance_scale = self.resolve_guidance(cfg.real_guidance_scale)
        # the layout first: shared-base adapters copy the teacher network before anything else holds it
        self.layout = self.make_layout(teacher, roles=("generator", "fake_score"))
        self.teacher = self.layout.teacher
        self.build_data(self.teacher.model)
        init = None
        if cfg.init_generator:
            init = self.load_init_network(cfg.init_generator, teacher.model, "generator", "init_generator")
        self.generator = self.layout.network("generator", init=init)
        fake = self.layout.network("fake_score")
        head = None
        if cfg.use_gan:
            example, _ = self.data.sample(1, torch.Generator().manual_seed(0))
            head = build_gan_head(fake, cfg.gan_feature_module, self.sample_shape, example)
        self.critic = FakeScore(fake, head, cfg.gan_feature_module)
        self.layout.finalize(device, self.weight_dtype)
        self.generator.to(device)
        self.critic.to(device)
        generator_settings = self.optimizer_settings(cfg.generator_learning_rate,
                                                     update_interval=cfg.critic_updates_per_generator_update)
        self.add_trainable("generator", self.generator, generator_settings,
                           activate=lambda: self.layout.activate("generator"), ema=cfg.use_ema)
        # the GAN head reads the critic's bottleneck through a forward hook: under FSDP2 its weights stay gathered
        # from forward to backward (the GAN gradient does not pass the critic's outputs, where FSDP re-gathers)
        self.add_trainable("critic", self.critic, self.optimizer_settings(cfg.critic_learning_rate),
                           activate=lambda: self.layout.activate("fake_score"), reshard_after_forward=not cfg.use_gan)
        self.dm_loss = DistributionMatchingLoss(self.schedule, cfg.min_step_percent, cfg.max_step_percent,
                                                self.guidance_scale)
        self.gan_inputs = GANInputNoise(self.schedule, cfg.gan_noisy_inputs)
        self.critic_objective = FakeScoreLoss(self.schedule, self.gan_inputs if cfg.use_gan else None)
        self.gan_g_loss = GANGeneratorLoss()
        self.regression_pairs = None
        if cfg.regression_loss_weight > 0:
            from .pairs import regression_pairs_for_training

            self.regression_distance = build_regression_distance(
                cfg.regression_distance, cfg.regression_lpips_weights, cfg.regression_pixel_weight
            ).to(device)
            self.regression_distance.check_sample_shape(self.sample_shape)
            # the whole data source: a subset of the conditions must not filter the pairs (MSD's ablation)
            pairs = regression_pairs_for_training(cfg, self.teacher, self.full_data, self.sample_shape,
                                                  self.guidance_scale, device)
            self.regression_pairs_metadata = pairs.metadata
            self.regression_pairs = pairs.trainer_pairs()

    # ----------------------------------------------------------------------------------------------
    # generator side
    def generator_inputs(self, cond: Conditioning) -> tuple[torch.Tensor, float]:
        """The generator's input ``(x_t, t)`` this iteration (:meth:`student_inputs` on its timesteps)."""
        return self.student_inputs(self.generator, self.student_timesteps, cond, self.config.uses_backward_simulation)

    def generate(self, cond: Conditioning, grad: bool) -> torch.Tensor:
        """Student x0 samples for ``cond``; with ``grad`` the last step runs through the DDP-wrapped module."""
        x, t = self.generator_inputs(cond)
        cond = cond.to(self.accelerator.device)
        if grad:
            return self.trainables["generator"].module(x, t, cond).x0
        with torch.no_grad():
            return self.generator(x, t, cond).x0

    def generate_with_regression(
        self, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Conditioning]:
        """DMD1: one forward on ``[noise ; paired noise]`` (one DDP forward per backward).

        Returns ``(x, x_reg, y, reg_cond)``: samples for the DM loss, the student's outputs on the
        paired noise, the teacher's ODE outputs for that noise, and its conditioning.
        """
        device = self.accelerator.device
        x_in, t = self.generator_inputs(cond)
        pairs = self.regression_pairs
        idx = torch.randint(0, pairs["z"].shape[0], (x_in.shape[0],), generator=self.rng)
        reg_cond = pairs["cond"].select(idx)
        both = Conditioning.cat([cond.to(device), reg_cond.to(device)])  # prompt embeddings live on the device
        out = self.trainables["generator"].module(torch.cat([x_in, pairs["z"][idx].to(device)]), t, both).x0
        b = x_in.shape[0]
        return out[:b], out[b:], pairs["y"][idx].to(device), reg_cond

    def generator_loss(
        self,
        x: torch.Tensor,
        cond: Conditioning,
        regression: tuple[torch.Tensor, torch.Tensor] | None = None,
        diagnostics: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator objective on samples ``x`` (mean over the batch) and its logged parts.

        Args:
            x: Generator samples with their graph.
            cond: Their conditioning.
            regression: DMD1 ``(student outputs on paired noise, teacher ODE outputs)``.
            diagnostics: Also log the gradient norm each term sends into ``x`` (``grad_norm/dm_at_x``,
                ``grad_norm/gan_at_x``; the latter not under FSDP), the probe DMD2's author uses to balance the
                GAN weight.
        """
        cfg = self.config
        critic = self.unwrap("critic")
        cond = cond.to(self.accelerator.device)
        dm = self.dm_loss(x, cond, self.teacher, critic.denoiser, generator=self.rng)
        loss = cfg.dm_loss_weight * dm.loss.mean()
        parts = {"loss/dm": dm.loss.mean().detach(), "dm/x0_gap": (dm.real.x0 - dm.fake.x0).abs().mean().detach()}
        if diagnostics:
            (g,) = torch.autograd.grad(loss, x, retain_graph=True)
            parts["grad_norm/dm_at_x"] = g.norm().detach()
        if cfg.use_gan:
            x_gan, t_gan = self.gan_inputs(x, self.rng)
            with self.accelerator.autocast():
                logits = critic(x_gan, t_gan, cond)[3]
            loss_g = cfg.gan_generator_loss_weight * self.gan_g_loss(logits).mean()
            if diagnostics and not self.sharded:  # FSDP2 runs one backward per forward through a sharded critic
                (g,) = torch.autograd.grad(loss_g, x, retain_graph=True)
                parts["grad_norm/gan_at_x"] = g.norm().detach()
            loss = loss + loss_g
            parts["loss/gan_generator"] = (loss_g / max(cfg.gan_generator_loss_weight, 1e-12)).detach()
        if regression is not None:
            loss_reg = self.regression_distance(*regression).mean()
            loss = loss + cfg.regression_loss_weight * loss_reg
            parts["loss/regression"] = loss_reg.detach()
        return loss, parts

    # ----------------------------------------------------------------------------------------------
    # critic side
    def critic_loss(
        self, x: torch.Tensor, cond: Conditioning, real: torch.Tensor | None, real_cond: Conditioning | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Denoising score matching on detached generator samples (+ the discriminator loss), one forward."""
        terms = self.critic_objective(self.trainables["critic"].module, x.to(self.accelerator.device), cond, real,
                                      real_cond, generator=self.rng)
        loss = loss_dsm = terms.score_matching.mean()
        parts = {"loss/fake_score": loss_dsm.detach()}
        if terms.discriminator is not None:
            loss_d = terms.discriminator.mean()
            loss = loss + self.config.gan_critic_loss_weight * loss_d
            parts["loss/gan_critic"] = loss_d.detach()
        return loss, parts

    # ----------------------------------------------------------------------------------------------
    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        """One DMD2 iteration: (maybe) a generator step, then one critic step on the same samples."""
        cfg = self.config
        metrics: dict[str, list[torch.Tensor]] = {}

        def add(parts: dict[str, torch.Tensor]) -> None:  # kept on the device: the loop reads them at log steps
            for k, v in parts.items():
                metrics.setdefault(k, []).append(v.detach().float())

        gen_turn = self.should_update("generator", step)
        samples = []
        # 1. generator turn (critic frozen so the GAN term only reaches the generator)
        if gen_turn:
            self.critic.requires_grad_(False)
        try:
            for micro in range(cfg.gradient_accumulation_steps):
                cond, real = self.data.sample(cfg.train_batch_size, self.rng)
                real_cond = None
                if cfg.use_gan:
                    real_cond, real = self.data.sample(cfg.train_batch_size, self.rng)
                if gen_turn:
                    diagnostics = cfg.log_every > 0 and step % cfg.log_every == 0
                    with self.sync_context("generator", micro):
                        if self.regression_pairs is not None:
                            x, x_reg, y, reg_cond = self.generate_with_regression(cond)
                            loss, parts = self.generator_loss(x, cond, (x_reg, y), diagnostics)
                            # DMD1 trains the critic on both sets of generated samples
                            device = self.accelerator.device
                            x, cond = torch.cat([x, x_reg]), Conditioning.cat([cond.to(device), reg_cond.to(device)])
                            if real is not None and cfg.use_gan:
                                real_cond, real = self.data.sample(x.shape[0], self.rng)
                        else:
                            x = self.generate(cond, grad=True)
                            loss, parts = self.generator_loss(x, cond, None, diagnostics)
                        self.backward(loss, "generator")
                    add(parts)
                else:
                    x = self.generate(cond, grad=False)
                samples.append((x.detach(), cond, real, real_cond))
        finally:
            self.critic.requires_grad_(True)
        if gen_turn:
            add({"grad_norm/generator": self.optimizer_step_norm("generator")})
        self.zero_grad()
        # 2. critic turn on the freshest samples
        for micro, (x, cond, real, real_cond) in enumerate(samples):
            with self.sync_context("critic", micro):
                loss, parts = self.critic_loss(x, cond, real, real_cond)
                self.backward(loss, "critic")
            add(parts)
        add({"grad_norm/critic": self.optimizer_step_norm("critic")})
        self.zero_grad()
        return {k: torch.stack(v).mean() for k, v in metrics.items()}

    # ----------------------------------------------------------------------------------------------
    # outputs
    def student_network(self) -> nn.Module | None:
        """A standalone fp32 copy of the student network (EMA weights when EMA is on; adapters merged)."""
        return self.standalone_network("generator")

    def student_metadata(self) -> dict:
        """What the exported student folder records about its training."""
        cfg = self.config
        return {"method": "dmd2" if cfg.regression_loss_weight == 0 else "dmd", "timesteps": self.student_timesteps,
                "guidance_scale": 0.0, "real_guidance_scale": self.guidance_scale, "teacher": str(cfg.teacher),
                "ema": bool(cfg.use_ema), "global_step": self.global_step}

    def export(self, folder: Path) -> Path:
        """Write the student as a pipeline folder with an ``LCMScheduler`` holding the trained timesteps."""
        return self.export_student(self.student_network(), folder, self.student_timesteps, self.student_metadata())

    def sample_student_images(self, cond: Conditioning, seeds: Sequence[int]) -> torch.Tensor:
        """Student samples for ``cond``, one seeded generator per sample (EMA weights if on)."""
        return self.sample_images("generator", self.student_timesteps, cond, seeds)

    def sample_grid(self, path: Path) -> None:
        """Write the DMD diagnostic grid.

        Row 1: the generator's samples. Then, at 0.25 / 0.5 / 0.75 T, the teacher's (real, with CFG) and the fake
        score's x0 predictions from those samples noised to that level; where real and fake rows differ is what
        the DM gradient pushes on. Latent teachers are decoded with their VAE (no grid without one).
        """
        cond = self.data.grid_conditioning(self.config.sample_grid_size)
        x = self.sample_student_images(cond, range(self.config.sample_grid_size))
        scores = [(self.teacher, self.guidance_scale), (self.unwrap("critic").denoiser, None)]
        self.write_grid([x, *self.score_rows(x, cond, scores)], path)

    def evaluate(self) -> dict[str, float]:
        """Digits only: class accuracy and FID (digits-classifier features vs the held-out split)."""
        return self.evaluate_digits(self.sample_student_images)


__all__ = ["DMDConfig", "DMDTrainer"]

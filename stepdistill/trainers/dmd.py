"""DMD and DMD2 (Yin et al. 2024) on the base trainer: config, critic module, DM loss, trainer.

One iteration (``dmd.md`` §4.2), with ``N = critic_updates_per_generator_update``:

1. The generator produces x0 samples from noise (backward simulation for k-step students, §8). On
   iterations ``0, N, 2N, ...`` it does so with gradient and takes a step on
   ``dm_loss_weight * L_DM (+ gan_generator_loss_weight * L_G_gan) (+ regression_loss_weight * L_reg)``;
   otherwise its forward runs under ``no_grad``.
2. The fake-score critic takes one step of denoising score matching on those (detached) samples
   (+ ``gan_critic_loss_weight * L_D`` with the GAN head).

``L_DM`` (§2.1): noise the sample at ``t ~ U[0.02T, 0.98T]``, compare the teacher's CFG x0 prediction
(``uncond + w (cond - uncond)``) with the fake score's, normalise per sample, and push the result
through the stop-gradient surrogate (:class:`~stepdistill.trainers.losses.DistributionMatchingLoss`).

The generator and the fake score start as copies of the teacher (:meth:`DMDTrainer.init_from_teacher`);
with ``lora_rank > 0`` they are instead two LoRA adapters on one frozen copy of the teacher (see
:mod:`stepdistill.trainers.lora`). The GAN head reads the fake score's bottleneck through a forward hook
(no patched ``forward``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..conditioning import Conditioning
from ..denoiser import Denoiser, DenoiserOutput, guided_denoise
from ..loading import load_denoiser, resolve_model_folder, teacher_guidance_scale
from ..sampling import initial_noise, make_generators, sample_student
from ..schedules import NoiseSchedule, VPSchedule
from ..utils import atomic_write_dir
from .base import (
    ConditionSource,
    DistillationTrainer,
    TrainerConfig,
)
from .losses import (
    REGRESSION_DISTANCES,
    DenoisingScoreMatchingLoss,
    DistributionMatchingLoss,
    GANDiscriminatorLoss,
    GANGeneratorLoss,
    MSEDistance,
    build_regression_distance,
)


@dataclass
class DMDConfig(TrainerConfig):
    """DMD / DMD2 settings (defaults: DMD2's reference values, ``dmd.md`` §11, where they apply).

    Example:
        >>> cfg = DMDConfig(teacher="stepdistill/assets/digits/teacher", student_timesteps=[399])
    """

    teacher: str = field(default="", metadata={"help": "Teacher pipeline folder (unet/ + scheduler/)."})
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
        metadata={"help": "k-step inputs from the student's own rollout (DMD2 §8). None: on for k > 1."},
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
        metadata={"help": "A pairs file from training_scripts/generate_pairs.py, loaded instead of generating pairs "
                          "at start (checked against the teacher)."},
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
    sample_grid_size: int = field(default=20, metadata={"help": "Images per row block of the sample grid."})
    eval_num_samples: int = field(default=500, metadata={"help": "Samples for digits class accuracy (0: off)."})
    lora_rank: int = field(
        default=0,
        metadata={"help": "0: generator and fake score are full copies of the teacher. > 0: shared-base mode, "
                          "both are LoRA adapters of this rank on one frozen teacher network."},
    )
    init_generator: str | None = field(
        default=None,
        metadata={"help": "Start the generator from this network / student folder instead of the teacher (DMD2 "
                          "SD1.5 stage 2 from stage 1; SDXL 1-step from a regression-pretrained generator)."},
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (None: lora_rank)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names that get LoRA layers (None: resnet convs, time projections and "
                          "attention projections)."},
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
        if not 0.0 <= self.min_step_percent < self.max_step_percent <= 1.0:
            raise ValueError(
                f"Need 0 <= min_step_percent < max_step_percent <= 1, got {self.min_step_percent}, "
                f"{self.max_step_percent}."
            )
        if len(ts) > 1 and self.backward_simulation is False and self.data not in ("digits", "dataset"):
            raise ValueError(
                f"A {len(ts)}-step student without backward simulation is trained on noised real images, but "
                f"data={self.data!r} has none: use data=dataset (or digits), or drop backward_simulation=false."
            )
        if self.use_gan and self.data not in ("digits", "dataset"):
            raise ValueError(
                f"use_gan needs real images; data={self.data!r} has none (use data=digits, or data=dataset "
                "with --dataset <image folder>)."
            )
        for name in ("dm_loss_weight", "gan_generator_loss_weight", "gan_critic_loss_weight",
                     "regression_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.regression_loss_weight > 0 and len(ts) != 1:
            raise ValueError("The DMD1 regression loss is defined for one-step students; use one timestep.")
        if self.regression_distance not in REGRESSION_DISTANCES:
            raise ValueError(f"regression_distance must be one of {list(REGRESSION_DISTANCES)}, "
                             f"got {self.regression_distance!r}.")
        if self.regression_pixel_weight < 0:
            raise ValueError(f"regression_pixel_weight must be >= 0, got {self.regression_pixel_weight}.")
        if self.regression_pixel_weight > 0 and self.regression_distance == "mse":
            raise ValueError("regression_pixel_weight adds a pixel MSE to a perceptual distance; with "
                             "regression_distance=mse set it to 0.")
        if self.regression_distance == "lpips" and not self.regression_lpips_weights:
            raise ValueError("regression_distance=lpips needs --regression_lpips_weights <local LPIPS state dict> "
                             "(see stepdistill.trainers.losses.LPIPSDistance for how to make one).")
        if self.regression_pairs and self.regression_loss_weight == 0:
            raise ValueError("regression_pairs is set but regression_loss_weight is 0, so the pairs would be unused: "
                             "set --regression_loss_weight (DMD1: 0.25) or drop regression_pairs.")
        if self.regression_pairs_verify < 0:
            raise ValueError(f"regression_pairs_verify must be >= 0, got {self.regression_pairs_verify}.")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: full copies), got {self.lora_rank}.")
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


# --------------------------------------------------------------------------------------------------
# networks
def gan_head_groups(channels: int) -> int:
    """GroupNorm groups for the GAN head: up to 32, with at least 16 channels per group.

    The head's last GroupNorm sees 1x1 maps, where a group of 2 channels normalises to +-1 and erases
    the features (a digits-size bottleneck of 64 channels with 32 groups could not tell blurry from real
    digits); SD's 1280 channels keep DMD2's 32 groups.
    """
    for groups in (32, 16, 8, 4, 2):
        if channels % groups == 0 and channels // groups >= 16:
            return groups
    return 1


class GANHead(nn.Module):
    """DMD2's classifier branch (``dmd.md`` §7): stride-2 conv blocks down to <= 4x4, a conv to 1x1, a logit.

    Args:
        channels: Channels of the bottleneck features.
        size: Their spatial size (square).
    """

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        groups = gan_head_groups(channels)
        layers: list[nn.Module] = []
        while size > 4:
            layers += [nn.Conv2d(channels, channels, 4, 2, 1), nn.GroupNorm(groups, channels), nn.SiLU()]
            size //= 2
        layers += [nn.Conv2d(channels, channels, size, size), nn.GroupNorm(groups, channels), nn.SiLU(),
                   nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` from features ``[B, C, S, S]``."""
        return self.net(features).reshape(features.shape[0])


class FakeScore(nn.Module):
    """The DMD critic: a fake-score denoiser and (optionally) a GAN head on its bottleneck features.

    The features are captured by a forward hook on ``feature_module`` of the network, so a single
    forward gives both the denoising prediction and the logits (one DDP forward per critic step).

    Args:
        denoiser: The fake-score denoiser (a copy of the teacher).
        head: The GAN head, or ``None``.
        feature_module: Name of the submodule whose output feeds the head (``mid_block`` for UNets).
    """

    def __init__(self, denoiser: Denoiser, head: GANHead | None = None, feature_module: str = "mid_block") -> None:
        super().__init__()
        self.denoiser = denoiser
        self.head = head
        self._features: torch.Tensor | None = None
        self._hook = None
        if head is not None:
            self._hook = find_submodule(denoiser.model, feature_module).register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs, output) -> None:
        self._features = output[0] if isinstance(output, tuple) else output

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None):
        """Return ``(x0, eps, model_output, logits or None)`` for ``x_t`` at ``t``."""
        self._features = None
        out = self.denoiser(x_t, t, cond)
        logits = None
        if self.head is not None:
            if self._features is None:
                raise RuntimeError("The GAN feature hook did not fire: check gan_feature_module.")
            logits = self.head(self._features.float())
            self._features = None
        return out.x0, out.eps, out.model_output, logits


def find_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model``'s submodule called ``name``, or a ``ValueError`` listing the top-level choices."""
    modules = dict(model.named_modules())
    if name not in modules:
        top = [n for n, _ in model.named_children()]
        raise ValueError(
            f"{type(model).__name__} has no submodule {name!r} for the GAN head; choose one of {top} "
            "(set gan_feature_module)."
        )
    return modules[name]


# --------------------------------------------------------------------------------------------------
# the math (no Accelerate)
def sample_timesteps(
    schedule: NoiseSchedule, batch_size: int, low: float, high: float, generator: torch.Generator
) -> torch.Tensor:
    """Per-sample timesteps in ``[low, high]`` (fractions of T): integer indices for VP, uniform for flow.

    For VP, ``UniformInt[int(low*T), int(high*T)]`` inclusive, so the default 0.02 / 0.98 gives 20..980
    (``dmd.md`` §2.1), clipped to ``T - 1``.
    """
    T = schedule.num_train_timesteps
    if isinstance(schedule, VPSchedule):
        lo, hi = int(low * T), min(int(high * T), T - 1)
        return torch.randint(lo, hi + 1, (batch_size,), generator=generator).double()
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    return (low + (high - low) * u) * schedule.max_timestep


def compute_distribution_matching_loss(
    x: torch.Tensor,
    cond: Conditioning | None,
    real_score: Denoiser,
    fake_score: Denoiser,
    t: torch.Tensor,
    noise: torch.Tensor,
    real_guidance_scale: float = 1.0,
    loss_fn: DistributionMatchingLoss | None = None,
) -> tuple[torch.Tensor, DenoiserOutput, DenoiserOutput]:
    """DMD's generator loss for samples ``x`` (``dmd.md`` §2.1), per sample.

    1. ``x_t = alpha_t x + sigma_t noise`` (no gradient);
    2. ``x0_real``: the teacher with CFG ``uncond + w (cond - uncond)``; ``x0_fake``: the fake score,
       conditional only;
    3. the stop-gradient surrogate, whose gradient w.r.t. ``x`` is
       ``(x0_fake - x0_real) / mean|x - x0_real| / numel``.

    Args:
        x: Generator samples (x0 space) that keep their graph.
        cond: Their conditioning.
        real_score: The frozen teacher.
        fake_score: The fake-score denoiser (its weights are not updated by this loss).
        t: Per-sample timesteps ``[B]``.
        noise: Gaussian noise like ``x``.
        real_guidance_scale: CFG weight ``w`` of the real score.
        loss_fn: The surrogate (default :class:`DistributionMatchingLoss`).

    Returns:
        ``(loss [B], real_output, fake_output)``.
    """
    loss_fn = loss_fn or DistributionMatchingLoss()
    with torch.no_grad():
        x_t = real_score.schedule.add_noise(x.detach().float(), noise.float(), t)
        real = guided_denoise(real_score, x_t, t, cond, real_guidance_scale)
        fake = fake_score(x_t, t, cond)
    return loss_fn(x, real.x0, fake.x0), real, fake


# --------------------------------------------------------------------------------------------------
# the trainer
class DMDTrainer(DistillationTrainer):
    """DMD2 (and DMD1 with ``regression_loss_weight > 0``) on the base trainer.

    Args:
        config: A :class:`DMDConfig`.
        accelerator: Optional existing ``Accelerator``.

    Example:
        >>> cfg = parse_config(DMDConfig, ["--config", "recipes/digits_dmd2_1step.yaml"])
        >>> DMDTrainer(cfg).train()
    """

    config: DMDConfig

    # ----------------------------------------------------------------------------------------------
    # setup
    def build(self) -> None:
        """Load the teacher, copy it into generator and fake score, set up data, EMA and DMD1 pairs."""
        cfg, device = self.config, self.accelerator.device
        if self.teacher_override is not None:
            teacher = self.teacher_override
        elif not cfg.teacher:
            raise ValueError("No teacher: pass --teacher <pipeline folder> (e.g. stepdistill/assets/digits/teacher).")
        else:
            teacher = load_denoiser(cfg.teacher)
        self.schedule = teacher.schedule
        self.student_timesteps = self.schedule.validate_timesteps(cfg.student_timesteps)
        self.guidance_scale = self._resolve_guidance(cfg)
        self.sample_shape = self._sample_shape(teacher.model)
        if cfg.lora_rank > 0:  # before the data source, so no reference to the original network outlives this
            teacher = self._init_shared_lora(teacher)
        self.data = self._make_data_source(cfg, teacher.model)
        if self.data.has_images:
            _, imgs = self.data.sample(1, torch.Generator().manual_seed(0))
            if tuple(imgs.shape[1:]) != self.sample_shape:
                raise ValueError(
                    f"Real images have shape {tuple(imgs.shape[1:])} but the teacher works on {self.sample_shape}: "
                    f"data={cfg.data!r} does not fit this teacher."
                )
        if cfg.lora_rank == 0:
            generator_net, fake_net = self.init_from_teacher(teacher)
            self.generator = Denoiser.from_model(generator_net, self.schedule)
            head = self._make_gan_head(Denoiser.from_model(fake_net, self.schedule)) if cfg.use_gan else None
            self.critic = FakeScore(Denoiser.from_model(fake_net, self.schedule), head, cfg.gan_feature_module)
            teacher.model.requires_grad_(False).eval().to(device=device, dtype=self.weight_dtype)
        self.teacher = teacher
        self.generator.to(device)
        self.critic.to(device)
        self.add_trainable("generator", self.generator, cfg.generator_learning_rate)
        self.add_trainable("critic", self.critic, cfg.critic_learning_rate)
        if cfg.use_ema:
            self.enable_ema(self.generator)
        self.dm_loss = DistributionMatchingLoss()
        self.dsm_loss = DenoisingScoreMatchingLoss()
        self.gan_g_loss, self.gan_d_loss = GANGeneratorLoss(), GANDiscriminatorLoss()
        self.regression_distance = MSEDistance()
        self.regression_pairs = None
        if cfg.regression_loss_weight > 0:
            self.regression_distance = build_regression_distance(
                cfg.regression_distance, cfg.regression_lpips_weights, cfg.regression_pixel_weight
            ).to(device)
            self.regression_distance.check_sample_shape(self.sample_shape)
            self.regression_pairs = self._make_regression_pairs()

    def init_from_teacher(self, teacher: Denoiser) -> tuple[nn.Module, nn.Module]:
        """Return fp32 ``(generator network, fake-score network)`` initialised from the teacher.

        Full mode (``lora_rank == 0``): two deep copies. The shared-base LoRA mode does not use this; it
        goes through :meth:`_init_shared_lora` (:mod:`stepdistill.trainers.lora`).
        """
        gen = copy.deepcopy(teacher.model).float().train().requires_grad_(True)
        fake = copy.deepcopy(teacher.model).float().train().requires_grad_(True)
        if self.config.init_generator:
            gen = self._load_init_generator(gen)
        return gen, fake

    def _load_init_generator(self, like: nn.Module) -> nn.Module:
        """Weights of ``config.init_generator`` (a model folder, or a pipeline / student / run folder)."""
        from ..loading import load_network

        path = Path(self.config.init_generator)
        for candidate in (path, path / "student", path / "generator_ema", path / "generator"):
            try:
                folder, _ = resolve_model_folder(candidate)
            except ValueError:
                continue
            net = load_network(folder)
            arch = lambda m: {k: v for k, v in dict(m.config).items() if not k.startswith("_")}  # noqa: E731
            if type(net) is not type(like) or arch(net) != arch(like):
                raise ValueError(
                    f"init_generator {str(folder)!r} holds a {type(net).__name__} whose config differs from the "
                    f"teacher's {type(like).__name__}: the generator must have the teacher's architecture."
                )
            return net.float().train().requires_grad_(True)
        raise ValueError(
            f"init_generator {str(path)!r} holds no diffusers network (looked in it and in student/, "
            "generator_ema/, generator/). Pass an exported student folder or a checkpoint's models/generator."
        )

    def _init_shared_lora(self, teacher: Denoiser) -> Denoiser:
        """Shared-base mode: generator, fake score and teacher are views of ONE frozen network.

        Its base weights are in the mixed-precision dtype (like the full-mode teacher), the adapters in fp32.

        Sets ``self.generator`` / ``self.critic`` (LoRA-only parameters each) and returns the teacher view
        (adapters disabled). See :mod:`stepdistill.trainers.lora`.
        """
        from .lora import make_shared_lora_denoisers

        cfg = self.config
        teacher_view, gen, fake = make_shared_lora_denoisers(
            teacher, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules, base_dtype=self.weight_dtype
        )
        teacher_view.model.to(self.accelerator.device)
        self.generator = gen
        self.critic = FakeScore(fake, None, cfg.gan_feature_module)
        return teacher_view

    def role(self, name: str) -> contextlib.AbstractContextManager:
        """Context with ``name``'s adapter active on the shared network (no-op in full mode).

        Backward passes run inside it: with gradient checkpointing the shared network's blocks are
        recomputed during backward, and must be recomputed with the adapter that ran the forward.
        """
        if not self.shared_lora:
            return contextlib.nullcontext()
        from .lora import FAKE_SCORE_ADAPTER, GENERATOR_ADAPTER, active_adapter

        adapter = {"generator": GENERATOR_ADAPTER, "critic": FAKE_SCORE_ADAPTER}[name]
        return active_adapter(self.generator.model, adapter)

    @property
    def shared_lora(self) -> bool:
        """Whether generator and fake score are LoRA adapters on the teacher network."""
        return self.config.lora_rank > 0

    def _sample_shape(self, network: nn.Module) -> tuple[int, int, int]:
        if self.config.sample_shape is not None:
            return tuple(int(v) for v in self.config.sample_shape)
        model_cfg = getattr(network, "config", None)
        channels, size = getattr(model_cfg, "in_channels", None), getattr(model_cfg, "sample_size", None)
        if channels is None or size is None:
            raise ValueError(
                f"Cannot tell the input shape of the teacher network {type(network).__name__} (no config with "
                "in_channels and sample_size): set sample_shape: [C, H, W] in the config."
            )
        h, w = (size, size) if isinstance(size, int) else size
        return int(channels), int(h), int(w)

    def _teacher_root(self) -> Path | None:
        """The teacher's pipeline folder (None for a teacher passed as a module)."""
        if self.teacher_override is not None or not self.config.teacher:
            return None
        folder, _ = resolve_model_folder(self.config.teacher)
        return folder.parent if (folder.parent / "model_index.json").is_file() else Path(self.config.teacher)

    def _resolve_guidance(self, cfg: DMDConfig) -> float:
        if cfg.real_guidance_scale is not None:
            return float(cfg.real_guidance_scale)
        value = teacher_guidance_scale(cfg.teacher) if self.teacher_override is None else None
        return 1.0 if value is None else value

    def _make_data_source(self, cfg: DMDConfig, network: nn.Module) -> ConditionSource:
        from .data import make_data_source

        root = self._teacher_root()
        if root is None and cfg.data in ("prompts", "dataset"):
            raise ValueError(f"data={cfg.data!r} needs a teacher pipeline folder (--teacher) for its text encoder "
                             "/ VAE; a teacher passed as a module works with digits, uniform_labels, unconditional.")
        return make_data_source(cfg, root, network, self.accelerator.device, self.weight_dtype)

    def _make_gan_head(self, fake: Denoiser) -> GANHead:
        """Size the head from one dry-run forward of the fake-score network."""
        captured: list[torch.Tensor] = []
        module = find_submodule(fake.model, self.config.gan_feature_module)
        hook = module.register_forward_hook(
            lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o)
        )
        try:
            cond, _ = self.data.sample(1, torch.Generator().manual_seed(0))
            with torch.no_grad():
                fake(torch.zeros(1, *self.sample_shape), self.schedule.max_timestep, cond)
        finally:
            hook.remove()
        feats = captured[-1]
        if feats.ndim != 4 or feats.shape[2] != feats.shape[3]:
            raise ValueError(
                f"gan_feature_module={self.config.gan_feature_module!r} gives features of shape "
                f"{tuple(feats.shape)}; the GAN head needs square [B, C, S, S] maps."
            )
        return GANHead(int(feats.shape[1]), int(feats.shape[2]))

    def _make_regression_pairs(self) -> dict[str, torch.Tensor | Conditioning]:
        """DMD1 (``dmd.md`` §6): teacher ODE pairs ``{"z", "cond", "y"}``, identical on all ranks.

        With ``regression_pairs`` they are read from that file and checked against this teacher and data
        source (:func:`~stepdistill.trainers.pairs.check_pairs_match_teacher`); otherwise the same
        :func:`~stepdistill.trainers.pairs.generate_regression_pairs` that ``generate_pairs.py`` runs makes
        ``num_regression_pairs`` of them here (seed ``seed + 4242``), so a file made from the same recipe
        holds exactly these pairs.
        """
        from .pairs import (
            check_pairs_match_teacher,
            default_pairs_seed,
            generate_regression_pairs,
            load_regression_pairs,
        )

        cfg = self.config
        if cfg.regression_pairs:
            pairs = load_regression_pairs(cfg.regression_pairs)
            example, _ = self.data.sample(1, torch.Generator().manual_seed(0))
            check_pairs_match_teacher(pairs, self.teacher, self.sample_shape, example, cfg.regression_pairs_verify,
                                      where=f"regression_pairs={cfg.regression_pairs!r}")
            import warnings

            made_with = pairs.metadata.get("guidance_scale")
            if made_with is not None and not math.isclose(float(made_with), self.guidance_scale):
                warnings.warn(f"regression_pairs were made with teacher guidance {made_with} but the real score "
                              f"uses {self.guidance_scale}.", stacklevel=2)
            if pairs.metadata.get("data") not in (None, cfg.data):
                warnings.warn(f"regression_pairs were made with data={pairs.metadata['data']!r} conditions but this "
                              f"run uses data={cfg.data!r}.", stacklevel=2)
        else:
            pairs = generate_regression_pairs(
                self.teacher, self.data, cfg.num_regression_pairs, self.sample_shape, cfg.regression_teacher_steps,
                self.guidance_scale, default_pairs_seed(cfg.seed), device=self.accelerator.device,
                metadata={"teacher": str(cfg.teacher), "data": cfg.data},
            )
        self.regression_pairs_metadata = pairs.metadata
        return pairs.trainer_pairs()

    # ----------------------------------------------------------------------------------------------
    # generator side
    def generator_inputs(self, cond: Conditioning) -> tuple[torch.Tensor, float]:
        """The student's input ``(x_t, t)`` for this iteration (``dmd.md`` §8).

        One-step students get pure noise at ``student_timesteps[0]``. For k-step lists a step index
        ``k`` is drawn from ``shared_rng`` (identical on every process, so all ranks run the same number
        of forwards); with backward simulation the student itself runs steps ``0..k-1`` under
        ``no_grad`` from pure noise, re-noising its x0 with fresh noise each time; without it, real
        images are noised to ``t_k``.
        """
        device = self.accelerator.device
        ts = self.student_timesteps
        batch = cond.batch_size or self.config.train_batch_size
        cond = cond.to(device)
        x = torch.randn(batch, *self.sample_shape, generator=self.rng).to(device)
        k = int(torch.randint(0, len(ts), (1,), generator=self.shared_rng)) if len(ts) > 1 else 0
        if k > 0 and self.config.uses_backward_simulation:
            with torch.no_grad():
                for i in range(k):
                    x0 = self.generator(x, ts[i], cond).x0
                    eps = torch.randn(x0.shape, generator=self.rng).to(device)
                    x = self.schedule.add_noise(x0, eps, ts[i + 1])
        elif k > 0:
            _, real = self.data.sample(batch, self.rng)
            if real is None:
                raise ValueError("A k-step student without backward simulation needs real images: use data=digits "
                                 "or data=dataset, or turn backward_simulation on.")
            x = self.schedule.add_noise(real.to(device), x, ts[k])
        return x, ts[k]

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

    def _gan_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffusion-GAN input noise: ``t ~ U[0, T)`` per sample (``t = 0``, clean, when disabled)."""
        b = x.shape[0]
        if not self.config.gan_noisy_inputs:
            return x, torch.zeros(b, dtype=torch.float64)
        t = sample_timesteps(self.schedule, b, 0.0, 1.0, self.rng)
        eps = torch.randn(x.shape, generator=self.rng).to(x.device)
        return self.schedule.add_noise(x, eps, t), t

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
                ``grad_norm/gan_at_x``), the probe DMD2's author uses to balance the GAN weight.
        """
        cfg, device = self.config, self.accelerator.device
        critic = self.unwrap("critic")
        cond = cond.to(device)
        t = sample_timesteps(self.schedule, x.shape[0], cfg.min_step_percent, cfg.max_step_percent, self.rng)
        noise = torch.randn(x.shape, generator=self.rng).to(device)
        loss_dm, real, fake = compute_distribution_matching_loss(
            x, cond, self.teacher, critic.denoiser, t, noise, self.guidance_scale, self.dm_loss
        )
        loss = cfg.dm_loss_weight * loss_dm.mean()
        parts = {"loss/dm": loss_dm.mean().detach(),
                 "dm/x0_gap": (real.x0 - fake.x0).abs().mean().detach()}
        if diagnostics:
            (g,) = torch.autograd.grad(loss, x, retain_graph=True)
            parts["grad_norm/dm_at_x"] = g.norm().detach()
        if cfg.use_gan:
            x_gan, t_gan = self._gan_inputs(x)
            with self.accelerator.autocast():
                logits = critic(x_gan, t_gan, cond)[3]
            loss_g = cfg.gan_generator_loss_weight * self.gan_g_loss(logits).mean()
            if diagnostics:
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
        cfg, device = self.config, self.accelerator.device
        x = x.detach().float()
        b = x.shape[0]
        t = sample_timesteps(self.schedule, b, 0.0, 1.0, self.rng)
        eps = torch.randn(x.shape, generator=self.rng).to(device)
        x_t = self.schedule.add_noise(x, eps, t)
        target = self.schedule.target(x, eps, t)
        inputs, times, conds = [x_t], [t], [cond.to(device)]
        if cfg.use_gan:
            fake_gan, t_fake = self._gan_inputs(x)
            real_gan, t_real = self._gan_inputs(real.to(device))
            inputs += [fake_gan, real_gan]
            times += [t_fake, t_real]
            conds += [cond.to(device), real_cond.to(device)]
        all_cond = Conditioning.cat(conds) if not conds[0].is_empty else None
        _, _, model_output, logits = self.trainables["critic"].module(
            torch.cat(inputs), torch.cat(times).to(device), all_cond
        )
        loss_dsm = self.dsm_loss(model_output[:b], target).mean()
        loss = loss_dsm
        parts = {"loss/fake_score": loss_dsm.detach()}
        if cfg.use_gan:
            loss_d = self.gan_d_loss(logits[b:2 * b], logits[2 * b:]).mean()
            loss = loss + cfg.gan_critic_loss_weight * loss_d
            parts["loss/gan_critic"] = loss_d.detach()
        return loss, parts

    # ----------------------------------------------------------------------------------------------
    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        """One DMD2 iteration: (maybe) a generator step, then one critic step on the same samples."""
        cfg = self.config
        metrics: dict[str, list[torch.Tensor]] = {}

        def add(parts: dict[str, torch.Tensor]) -> None:
            for k, v in parts.items():
                metrics.setdefault(k, []).append(v.float().cpu())

        gen_turn = self.is_generator_step(step)
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
                        with self.role("generator"):
                            self.backward(loss)
                    add(parts)
                else:
                    x = self.generate(cond, grad=False)
                samples.append((x.detach(), cond, real, real_cond))
        finally:
            self.critic.requires_grad_(True)
        if gen_turn:
            add({"grad_norm/generator": torch.tensor(self.optimizer_step("generator"))})
        self.zero_grad()
        # 2. critic turn on the freshest samples
        for micro, (x, cond, real, real_cond) in enumerate(samples):
            with self.sync_context("critic", micro):
                loss, parts = self.critic_loss(x, cond, real, real_cond)
                with self.role("critic"):
                    self.backward(loss)
            add(parts)
        add({"grad_norm/critic": torch.tensor(self.optimizer_step("critic"))})
        self.zero_grad()
        return {k: torch.stack(v).mean() for k, v in metrics.items()}

    # ----------------------------------------------------------------------------------------------
    # outputs
    def student_network(self) -> nn.Module:
        """A standalone copy of the student network (EMA weights when EMA is on)."""
        with self.ema_weights():
            if self.shared_lora:
                from .lora import GENERATOR_ADAPTER, merged_network

                net = merged_network(self.generator.model, GENERATOR_ADAPTER).eval()
                return self._restore_fp32_base(net)
            return copy.deepcopy(self.unwrap("generator").model).eval()

    @torch.no_grad()
    def _restore_fp32_base(self, merged: nn.Module) -> nn.Module:
        """Undo the rounding of the shared base to the mixed-precision dtype in a merged student.

        ``merged = round(W) + delta``; adding ``W - round(W)`` from the fp32 teacher on disk gives
        ``W + delta`` exactly (a no-op in fp32 training or for a teacher passed as a module).
        """
        root = self._teacher_root()
        if self.weight_dtype == torch.float32 or root is None:
            return merged
        from ..loading import load_network

        folder, _ = resolve_model_folder(self.config.teacher)
        original = dict(load_network(folder).named_parameters())
        for name, p in merged.named_parameters():
            w = original[name].to(p.device, torch.float32)
            p.add_(w - w.to(self.weight_dtype).float())
        return merged

    def save_models(self, folder: Path) -> None:
        """``generator/``, ``generator_ema/`` (with EMA), ``fake_score/`` and ``gan_head.safetensors``."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        if self.shared_lora:  # merged plain networks (the LoRA weights themselves live in the Accelerate state)
            from .lora import FAKE_SCORE_ADAPTER, GENERATOR_ADAPTER, merged_network

            merged_network(self.generator.model, GENERATOR_ADAPTER).save_pretrained(folder / "generator")
            if self.ema is not None:
                self.student_network().save_pretrained(folder / "generator_ema")
            merged_network(self.generator.model, FAKE_SCORE_ADAPTER).save_pretrained(folder / "fake_score")
            return
        self.unwrap("generator").model.save_pretrained(folder / "generator")
        if self.ema is not None:
            self.student_network().save_pretrained(folder / "generator_ema")
        critic = self.unwrap("critic")
        critic.denoiser.model.save_pretrained(folder / "fake_score")
        if critic.head is not None:
            save_file({k: v.contiguous() for k, v in critic.head.state_dict().items()}, folder / "gan_head.safetensors")

    def student_metadata(self) -> dict:
        """What the exported student folder records about its training."""
        cfg = self.config
        return {
            "method": "dmd2" if cfg.regression_loss_weight == 0 else "dmd",
            "timesteps": self.student_timesteps,
            "guidance_scale": 0.0,
            "real_guidance_scale": self.guidance_scale,
            "teacher": str(cfg.teacher),
            "ema": bool(cfg.use_ema),
            "global_step": self.global_step,
        }

    def export(self, folder: Path) -> Path:
        """Write the student as a pipeline folder with an ``LCMScheduler`` holding the trained timesteps.

        Uses :func:`stepdistill.pipelines.export_student` (a ``StepDistillPipeline`` folder, or a stock
        diffusers pipeline for SD-family teachers) when the pipelines module is installed, else writes
        ``unet/`` + ``scheduler/`` + ``model_index.json``. Either way ``stepdistill_student.json``
        records the timesteps and how the student was trained. Written atomically.
        """
        from diffusers import LCMScheduler, ModelMixin

        from ..pipelines import export_stepdistill_pipeline, export_student, teacher_kind

        net = self.student_network()
        meta = self.student_metadata()
        root = self._teacher_root()
        if not isinstance(net, ModelMixin):  # a custom torch module: weights + metadata, no pipeline
            from safetensors.torch import save_file

            def write_custom(tmp: Path) -> None:
                tmp.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp / "student.safetensors")
                (tmp / "stepdistill_student.json").write_text(json.dumps(meta, indent=2) + "\n")

            return atomic_write_dir(folder, write_custom)
        if root is not None:
            _, sched_folder = resolve_model_folder(self.config.teacher)
            scheduler_config = dict(LCMScheduler.load_config(sched_folder))
        else:
            scheduler_config = dict(self.schedule.config().get("scheduler_config", {}))
            scheduler_config["_class_name"] = "LCMScheduler"
        null_class = None
        if self.config.data != "unconditional":
            null_class = self.data.grid_conditioning(1).null_class_label
        # SD-family teachers with their VAE and text encoders become stock diffusers pipelines.
        stock = teacher_kind(net) != "stepdistill" and root is not None and (root / "vae").is_dir()

        def write(tmp: Path) -> None:
            if stock:
                export_student(net, root, self.student_timesteps, tmp)
            else:  # any network (also SD-family ones without a VAE folder) as a StepDistillPipeline
                export_stepdistill_pipeline(net, scheduler_config, self.student_timesteps, tmp,
                                            null_class_label=null_class)
            (tmp / "stepdistill_student.json").write_text(json.dumps(meta, indent=2) + "\n")

        return atomic_write_dir(folder, write)

    # ----------------------------------------------------------------------------------------------
    # diagnostics
    @torch.no_grad()
    def sample_student_images(self, cond: Conditioning, seeds: Sequence[int]) -> torch.Tensor:
        """Student samples for ``cond`` with one seeded generator per sample (EMA weights if on)."""
        device = self.accelerator.device
        gens = make_generators(seeds)
        with self.ema_weights():
            if self.shared_lora:
                den = self.generator
            else:
                den = Denoiser.from_model(self.unwrap("generator").model, self.schedule).eval()
            z = initial_noise((len(seeds), *self.sample_shape), gens)
            out = sample_student(den, z.to(device), cond.to(device), self.student_timesteps, generator=gens)
        self.unwrap("generator").train()
        return out.float().cpu()

    #: Noise levels (fractions of T) of the real / fake x0 rows in the sample grid.
    GRID_NOISE_LEVELS = (0.25, 0.5, 0.75)

    def _grid_pixels(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[-1, 1]`` pixels for the grid: pixel teachers as they are, latent teachers through their VAE."""
        if self.sample_shape[0] in (1, 3):
            return x
        root = self._teacher_root()
        if root is None or not (root / "vae" / "config.json").is_file():
            return None
        if getattr(self, "_grid_vae", None) is None:
            vae = getattr(self.data, "vae", None)
            if vae is None:
                from diffusers import AutoencoderKL

                vae = AutoencoderKL.from_pretrained(root / "vae").eval().to(self.accelerator.device)
            self._grid_vae = vae
        vae = self._grid_vae
        dev = next(vae.parameters()).device
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        out = [vae.decode(chunk.to(dev, vae.dtype) / vae.config.scaling_factor + shift).sample.float().cpu()
               for chunk in x.split(8)]
        return torch.cat(out).clamp(-1, 1)

    @torch.no_grad()
    def sample_grid(self, path: Path) -> None:
        """Write the DMD diagnostic grid (``dmd.md`` §14).

        Row 1: the generator's samples. Then, for each noise level in :attr:`GRID_NOISE_LEVELS`, the
        teacher's (real, with CFG) and the fake score's x0 predictions from those samples noised to that
        level; where real and fake rows differ is what the DM gradient pushes on. Latent teachers are
        decoded with their VAE (no grid without one).
        """
        from ..data.digits import make_grid_image

        n = self.config.sample_grid_size
        cond = self.data.grid_conditioning(n)
        x = self.sample_student_images(cond, range(n))
        device = self.accelerator.device
        c = cond.to(device)
        rows = [x]
        for level in self.GRID_NOISE_LEVELS:
            t = torch.full((n,), float(int(self.schedule.max_timestep * level)), dtype=torch.float64)
            eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
            x_t = self.schedule.add_noise(x, eps, t).to(device)
            rows.append(guided_denoise(self.teacher, x_t, t, c, self.guidance_scale).x0.float().cpu())
            rows.append(self.unwrap("critic").denoiser(x_t, t, c).x0.float().cpu())
        pixels = self._grid_pixels(torch.cat(rows))
        if pixels is not None:
            make_grid_image(pixels, nrow=n, scale=4 if pixels.shape[-1] <= 64 else 1).save(path)

    def evaluate(self) -> dict[str, float]:
        """Digits only: FID (digits-classifier features vs the held-out split) and class accuracy.

        FID comes from :mod:`stepdistill.evaluation` when it is installed; class accuracy needs only the
        shipped classifier. ``eval_num_samples`` student samples, labels in the held-out class mix.
        """
        if self.config.data != "digits" or self.config.eval_num_samples == 0:
            return {}
        from ..data.digits import class_labels_like_reference, load_digits_split
        from ..data.digits_models import DigitsClassifier, classifier_path

        if not (classifier_path() / "config.json").is_file():
            return {}
        n = self.config.eval_num_samples
        labels = class_labels_like_reference(n)
        cond = Conditioning(class_labels=labels, null_class_label=self.data.grid_conditioning(1).null_class_label)
        x = self.sample_student_images(cond, range(10_000, 10_000 + n))
        clf = DigitsClassifier.from_pretrained(classifier_path()).eval()
        with torch.no_grad():
            out = {"eval/class_accuracy": float((clf(x).argmax(-1) == labels).float().mean())}
        try:
            from ..evaluation import DigitsClassifierFeatures, fid_from_features
        except ImportError:
            return out
        extractor = DigitsClassifierFeatures(clf, path=classifier_path())
        if n <= extractor.dim:  # FID undefined: the covariance of n samples has rank < n
            return out
        if getattr(self, "_heldout_features", None) is None:
            self._heldout_features = extractor(load_digits_split("heldout").images)
        out["eval/fid"] = float(fid_from_features(extractor(x), self._heldout_features))
        return out


__all__ = [
    "DMDConfig",
    "DMDTrainer",
    "FakeScore",
    "GANHead",
    "compute_distribution_matching_loss",
    "find_submodule",
    "sample_timesteps",
]

"""EchoDistill / OPAD on the base trainer: one-step personalization with a jointly trained teacher and student.

Yang et al., "EchoDistill: Bidirectional Concept Distillation for One-Step Diffusion Personalization" (arXiv
2510.20512; retitled "Adversarial Concept Distillation for One-Step Diffusion Personalization", OPAD). A one-step
student learns a new concept from 3-5 images together with its multi-step teacher; both read one shared text
encoder, in which only the new token's embedding row trains.

Trainables (each its own optimizer, learning rate and weight decay):

* ``teacher`` -- the teacher's cross-attention K/V (Custom Diffusion copies, or LoRA on them) and the new token's
  row (:class:`~stepdistill.networks.NewTokenEmbedding`, its own parameter group);
* ``student`` -- the student's cross-attention K/V;
* ``discriminator`` -- one small MLP head per frozen feature extractor
  (:class:`~stepdistill.networks.DiscriminatorSet`).

One iteration, with one shared noise ``eps`` per micro-batch:

1. Teacher (personalization): augmented concept images ``x`` (flip, rescale with a valid-region mask),
   ``z0 = E(x)``, ``t ~ U{0..T-1}``, ``z_t = alpha_t z0 + sigma_t eps``; masked MSE of the teacher's prediction
   against its target (v for v-models) with the prompt encoded *with* gradient: the only loss on the token row.
   With ``echo_loss_weight > 0`` (off by default) the student's one-step samples join the teacher's denoising
   data: the echo stage, a reconstruction (the paper's collaborative stage; the public code has none).
2. Student: ``z_S = G(eps, t_max, sg(e))``. Teacher refinement: ``t' ~ U{0..T-1}``,
   ``z' = alpha_t' sg(z_S) + sigma_t' eps`` (the same ``eps``), ``z_T = D_teacher^CFG(z', t')`` without gradient.
   Loss, with per-sample weight ``w = alpha_bar_t'``:
   ``mean(w * (1.0 * 0.5 |z_S - z_T|^2 + 1.0 * (1 - cos(phi(x_S), phi(x_T))) + 0.1 * MSSWD(x_S, x_T)))
   + 1.0 * sum_k softplus(-D_k(x_S))``, images ``x = VAE.dec(z)`` (with gradient for the student's).
3. Discriminator heads: ``0.5 [softplus(-D_k(x_real)) + softplus(D_k(sg x_S))]`` per head, real = augmented
   concept images.

Differences from the reference code: heads are ``Linear-LeakyReLU-Linear`` with one logit (binary cross-entropy,
equivalent to its two-class softmax); prompts are the given templates (no "far away" / "zoomed in" words added
for rescaled images); feature extractors are any frozen differentiable modules passed by the caller.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.concepts import ConceptAugment, load_concept_captions, load_concept_images
from ..losses import CosineIdentityLoss, GANDiscriminatorLoss, GANGeneratorLoss, MultiScaleSWDLoss
from ..losses._common import per_sample_mean
from ..networks import CrossAttentionKV, DiscriminatorSet, NewTokenEmbedding, check_differentiable
from .base import DistillationTrainer, OptimizerSettings, ParamGroup, TrainerConfig

#: The reference code's CFG weight for the teacher's refinement target.
REFERENCE_GUIDANCE_SCALE = 7.5

#: Training schedules: EchoDistill and the two baselines of the benchmark (see ``EchoDistillConfig.schedule``).
SCHEDULES = ("joint", "sequential", "student_token")


@dataclass
class EchoDistillConfig(TrainerConfig):
    """EchoDistill / OPAD settings (defaults: the reference recipe where it applies).

    Example:
        >>> cfg = EchoDistillConfig(teacher="worlds/text_digits/teacher", student="worlds/text_digits/student",
        ...                         concept_images="concepts/slant", initializer_token="slanted",
        ...                         concept_prompts="a handwritten seven, {}")
    """

    student: str = field(
        default="", metadata={"help": "One-step student pipeline folder (unet/ + scheduler/, e.g. a DMD2 student "
                                      "export); its UNet reads the teacher's text embeddings."})
    student_timestep: float = field(default=999.0, metadata={"help": "The student's one-step timestep."})
    concept_images: str = field(
        default="", metadata={"help": "Folder with the 3-5 .png/.jpg images of the concept (optional captions.json: "
                                      "each image's own '|'-separated templates, replacing concept_prompts)."})
    heldout_concept_images: str | None = field(
        default=None, metadata={"help": "Held-out concept images for the concept-fidelity evaluation (default: the "
                                        "training ones)."})
    placeholder_token: str = field(default="<new1>", metadata={"help": "The new token (not in the vocabulary)."})
    initializer_token: str = field(default="", metadata={"help": "A related word initialising the token's row."})
    concept_prompts: str = field(
        default="a photo of {}",
        metadata={"help": "Prompt templates of the concept images, separated by '|'; '{}' marks where the "
                          "placeholder token goes (e.g. 'a handwritten seven, {}|the digit 7 in {} style')."})
    student_prompts: str | None = field(
        default=None, metadata={"help": "Prompt templates of the student's samples, as concept_prompts (default: "
                                        "concept_prompts)."})
    feature_extractor: str = field(
        default="digits",
        metadata={"help": "Frozen extractors when the caller passes none: 'digits' (the shipped digits classifier's "
                          "penultimate and pooled pre-activations) or 'digits:PATH'."})
    identity_extractor: int = field(default=0, metadata={"help": "Index of the extractor of the identity loss."})
    teacher_guidance_scale: float | None = field(
        default=None, metadata={"help": "CFG of the teacher's refinement target (None: the teacher folder's "
                                        "stepdistill_teacher.json, else 7.5 as in the reference code)."})
    kv_lora_rank: int = field(default=0, metadata={"help": "0: full K/V copies (Custom Diffusion); > 0: LoRA rank."})
    kv_lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha on K/V (None: the rank)."})
    token_learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate of the new token's row."})
    token_weight_decay: float = field(default=1e-2, metadata={"help": "Weight decay of the new token's row."})
    teacher_learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate of the teacher's K/V."})
    teacher_weight_decay: float = field(default=1e-2, metadata={"help": "Weight decay of the teacher's K/V."})
    student_learning_rate: float = field(
        default=2e-5, metadata={"help": "Learning rate of the student's K/V (the reference's effective 2e-5)."})
    student_weight_decay: float = field(default=1e-2, metadata={"help": "Weight decay of the student's K/V."})
    head_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the discriminator heads."})
    head_weight_decay: float = field(default=1e-2, metadata={"help": "Weight decay of the discriminator heads."})
    head_hidden: int = field(default=512, metadata={"help": "Hidden width of each discriminator head."})
    latent_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the latent MSE to the teacher."})
    identity_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the 1 - cos identity loss."})
    ms_swd_loss_weight: float = field(default=0.1, metadata={"help": "Weight of the MS-SWD loss."})
    adversarial_loss_weight: float = field(default=1.0, metadata={"help": "Weight of each head's adversarial loss."})
    ms_swd_scales: int = field(default=5, metadata={"help": "MS-SWD pyramid scales (fewer on small images)."})
    ms_swd_patch_size: int = field(default=11, metadata={"help": "MS-SWD patch side (smaller on small images)."})
    ms_swd_projections: int = field(default=128, metadata={"help": "MS-SWD random projections per scale."})
    hflip: bool = field(default=True, metadata={"help": "Flip concept images horizontally at random."})
    shrink_probability: float = field(
        default=0.66, metadata={"help": "Probability of shrinking a concept image onto a canvas (else zoom in)."})
    augment_fill: float = field(
        default=0.0, metadata={"help": "Canvas value of shrunk images in [-1, 1] (0: grey as the reference; -1 for "
                                       "digits' black background)."})
    echo_loss_weight: float = field(
        default=0.0, metadata={"help": "Echo stage (a reconstruction): weight of the teacher's denoising loss on the "
                                       "student's samples (0: off, as the public code)."})
    echo_start_step: int = field(default=0, metadata={"help": "Iteration from which the echo stage runs."})
    schedule: str = field(
        default="joint",
        metadata={"help": "'joint': EchoDistill (each iteration: teacher, student, heads). The baselines of the "
                          "benchmark: 'sequential' = personalize the teacher, then distill, at EchoDistill's compute "
                          "for half the iterations -- the teacher step alone for the first max_train_steps // 2 "
                          "iterations, then the student and head steps alone from the frozen personalized teacher; "
                          "'student_token' = textual inversion on the student alone -- only the token row trains, "
                          "through the student's own denoising loss on the concept images (no teacher, no heads)."})
    # the base fields with this method's defaults
    data: str = field(default="unconditional", metadata={"help": "Unused: EchoDistill reads --concept_images."})
    max_train_steps: int = field(default=1000, metadata={"help": "Training iterations."})
    train_batch_size: int = field(default=2, metadata={"help": "Micro-batch size per process."})
    lr_scheduler: str = field(default="constant", metadata={"help": "LR schedule of every trainable."})
    lr_warmup_steps: int = field(default=0, metadata={"help": "LR warm-up iterations."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; <= 0 disables clipping."})
    eval_num_samples: int = field(default=64, metadata={"help": "Student samples for concept fidelity (0: off)."})
    sample_grid_size: int = field(default=8, metadata={"help": "Seeds per row of the sample grid."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data != "unconditional":
            raise ValueError("EchoDistill reads its images from --concept_images; drop --data / --dataset.")
        if self.lora_rank > 0:
            raise ValueError("EchoDistill trains K/V copies; for LoRA on them use --kv_lora_rank, not --lora_rank.")
        if not self.initializer_token.strip():
            raise ValueError("initializer_token is empty: pass a word related to the concept, e.g. 'slanted'.")
        if not self.placeholder_token.strip() or " " in self.placeholder_token:
            raise ValueError(f"placeholder_token must be one word without spaces, got {self.placeholder_token!r}.")
        for name in ("concept_prompts", "student_prompts"):
            text = getattr(self, name)
            templates = _templates(text) if text is not None else None
            if templates is not None and (not templates or any("{}" not in t for t in templates)):
                raise ValueError(f"{name} must be '|'-separated templates that each contain '{{}}' (where the "
                                 f"placeholder token goes), got {text!r}.")
        for name in ("token_learning_rate", "teacher_learning_rate", "student_learning_rate", "head_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        for name in ("token_weight_decay", "teacher_weight_decay", "student_weight_decay", "head_weight_decay",
                     "latent_loss_weight", "identity_loss_weight", "ms_swd_loss_weight", "adversarial_loss_weight",
                     "echo_loss_weight", "echo_start_step", "kv_lora_rank", "identity_extractor"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("head_hidden", "ms_swd_scales", "ms_swd_patch_size", "ms_swd_projections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 <= self.shrink_probability <= 1.0:
            raise ValueError(f"shrink_probability must be in [0, 1], got {self.shrink_probability}.")
        if not -1.0 <= self.augment_fill <= 1.0:
            raise ValueError(f"augment_fill must be in [-1, 1], got {self.augment_fill}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}.")
        if self.schedule != "joint" and self.echo_loss_weight > 0:
            raise ValueError("The echo stage needs the joint schedule: drop --echo_loss_weight or use --schedule "
                             "joint.")
        if self.teacher_guidance_scale is not None and self.teacher_guidance_scale < 0:
            raise ValueError(f"teacher_guidance_scale must be >= 0, got {self.teacher_guidance_scale}.")

    @property
    def concept_templates(self) -> list[str]:
        """The concept images' prompt templates."""
        return _templates(self.concept_prompts)

    @property
    def student_templates(self) -> list[str]:
        """The student's prompt templates (``concept_prompts`` unless ``student_prompts`` is set)."""
        return _templates(self.student_prompts or self.concept_prompts)


def _templates(text: str) -> list[str]:
    return [t.strip() for t in text.split("|") if t.strip()]


class PersonalizedTeacher(nn.Module):
    """The teacher's trainables: its cross-attention K/V (``kv``) and the new token's row (``token``).

    Args:
        kv: The teacher's :class:`~stepdistill.networks.CrossAttentionKV`.
        token: The :class:`~stepdistill.networks.NewTokenEmbedding` of the shared text encoder.
    """

    def __init__(self, kv: CrossAttentionKV, token: NewTokenEmbedding) -> None:
        super().__init__()
        self.kv, self.token = kv, token

    def forward(self, x_t: torch.Tensor, t, cond=None):
        """The teacher denoiser's output (the prompt was encoded through ``token`` beforehand)."""
        return self.kv(x_t, t, cond)


class EchoDistillTrainer(DistillationTrainer):
    """EchoDistill / OPAD: personalize a one-step student and its teacher together (see the module docstring).

    Args:
        config: An :class:`EchoDistillConfig`.
        accelerator: Optional existing ``Accelerator``.
        extractors: Frozen differentiable feature extractors (``images in [-1, 1] -> [B, D]`` or ``[B, N, D]``):
            one discriminator head each, and the identity loss on ``extractors[config.identity_extractor]``.
            Default: from ``config.feature_extractor`` (the digits classifier).
        eval_extractor: The extractor of the in-training concept-fidelity evaluation (default: the identity
            loss's, which the student is trained on, so the number is optimistic; pass one not used in training).

    Example:
        >>> trainer = EchoDistillTrainer(cfg, extractors=[DigitsFeatures(classifier)])
        >>> trainer.train()  # writes output_dir/student (one step) and output_dir/teacher, stock SD folders
    """

    config: EchoDistillConfig

    def __init__(
        self,
        config: EchoDistillConfig,
        accelerator=None,
        extractors: Sequence[nn.Module] | None = None,
        eval_extractor: nn.Module | None = None,
    ) -> None:
        self.extractors = list(extractors) if extractors is not None else None
        self.eval_extractor = eval_extractor
        super().__init__(config, accelerator)

    # ----------------------------------------------------------------------------------------------
    def build(self) -> None:
        """Load the networks, text encoder (+ new token), VAE, concept images and extractors; add the trainables."""
        from ..data.prompts import PromptEncoder
        from ..loading import load_denoiser, teacher_guidance_scale
        from .teacher import teacher_root

        cfg, device, dtype = self.config, self.accelerator.device, self.weight_dtype
        if self.sharded:
            raise ValueError("EchoDistill trains a few K/V layers, a token row and small heads: run it with DDP "
                             "(`accelerate launch --multi_gpu`), not FSDP.")
        if not cfg.teacher or not cfg.student:
            raise ValueError("EchoDistill needs --teacher <SD-like pipeline folder> and --student <one-step student "
                             "folder>.")
        teacher = self.load_teacher()
        root = teacher_root(cfg.teacher)
        student = load_denoiser(cfg.student)
        self._check_pair(teacher, student)
        self.student_timestep = student.schedule.validate_timesteps([cfg.student_timestep])[0]
        # 1. the shared text encoder with the new token (its table frozen; the row is a parameter)
        self.encoder = PromptEncoder.from_pretrained(root, teacher.model, device, dtype)
        if self.encoder.kind != "sd":
            raise ValueError(f"EchoDistill supports SD1.5 / SD2.1-like teachers (one text encoder); {cfg.teacher!r} "
                             f"is {self.encoder.kind}.")
        (self.text_encoder,) = self.encoder.text_encoders
        self.tokenizer = self.encoder.pipeline.tokenizer
        self.new_token = NewTokenEmbedding(self.text_encoder, self.tokenizer, cfg.placeholder_token,
                                           cfg.initializer_token).to(device)
        self.text_encoder.requires_grad_(False)
        # 2. the VAE (frozen; gradients pass through its decoder) and the concept images in its pixel space
        self.vae = self._load_vae(Path(root), device, dtype)
        self.pixel_shape = self._pixel_shape()
        self.concept = load_concept_images(cfg.concept_images, self.pixel_shape)
        self.concept_captions = load_concept_captions(cfg.concept_images)
        self.heldout = None
        if cfg.heldout_concept_images:
            self.heldout = load_concept_images(cfg.heldout_concept_images, self.pixel_shape, "heldout_concept_images")
        # 3. frozen differentiable feature extractors
        if self.extractors is None:
            from ..networks import digits_feature_extractors

            spec = cfg.feature_extractor
            if spec != "digits" and not spec.startswith("digits:"):
                raise ValueError(f"feature_extractor must be 'digits' or 'digits:PATH', got {spec!r}; pass other "
                                 "extractors to EchoDistillTrainer(extractors=[...]).")
            self.extractors = digits_feature_extractors(spec.partition(":")[2] or None)
        if not self.extractors:
            raise ValueError("extractors is empty: pass at least one frozen feature extractor.")
        if cfg.identity_extractor >= len(self.extractors):
            raise ValueError(f"identity_extractor={cfg.identity_extractor} but there are {len(self.extractors)} "
                             "extractors.")
        dims = []
        if self.eval_extractor is not None:
            self.eval_extractor.requires_grad_(False).eval().to(device)
        for k, extractor in enumerate(self.extractors):
            extractor.requires_grad_(False).eval().to(device)
            dims.append(check_differentiable(extractor, self.concept[:2].to(device), f"feature extractor #{k}"))
        # 4. trainables: K/V copies (teacher + student), the token row, the heads
        teacher.model.to(device, dtype)
        student.model.to(device, dtype)
        if cfg.gradient_checkpointing:  # the networks sit inside the trainables unregistered: enable it here
            for network in (teacher.model, student.model):
                network.enable_gradient_checkpointing()
        teacher_kv = CrossAttentionKV(teacher, cfg.kv_lora_rank, cfg.kv_lora_alpha)
        self.teacher = PersonalizedTeacher(teacher_kv, self.new_token)
        self.student = CrossAttentionKV(student, cfg.kv_lora_rank, cfg.kv_lora_alpha)
        self.discriminator = DiscriminatorSet(self.extractors, dims, cfg.head_hidden).to(device)
        token_group = ParamGroup("token.", learning_rate=cfg.token_learning_rate, weight_decay=cfg.token_weight_decay)
        self.add_trainable("teacher", self.teacher, OptimizerSettings(
            cfg.teacher_learning_rate, weight_decay=cfg.teacher_weight_decay, param_groups=[token_group]))
        self.add_trainable("student", self.student, OptimizerSettings(
            cfg.student_learning_rate, weight_decay=cfg.student_weight_decay), ema=cfg.use_ema)
        self.add_trainable("discriminator", self.discriminator, OptimizerSettings(
            cfg.head_learning_rate, weight_decay=cfg.head_weight_decay))
        # 5. losses and augmentation
        guidance = cfg.teacher_guidance_scale
        self.guidance_scale = guidance if guidance is not None else (
            teacher_guidance_scale(root) or REFERENCE_GUIDANCE_SCALE)
        self.augment = ConceptAugment(cfg.hflip, cfg.shrink_probability, cfg.augment_fill)
        self.identity_loss = CosineIdentityLoss(self.extractors[cfg.identity_extractor])
        self.ms_swd = MultiScaleSWDLoss(cfg.ms_swd_scales, cfg.ms_swd_patch_size, cfg.ms_swd_projections)
        self.gan_generator_loss, self.gan_discriminator_loss = GANGeneratorLoss(), GANDiscriminatorLoss()

    def _check_pair(self, teacher, student) -> None:
        names = (type(teacher.model).__name__, type(student.model).__name__)
        if names != ("UNet2DConditionModel", "UNet2DConditionModel"):
            raise ValueError(f"EchoDistill needs text UNets (UNet2DConditionModel) for teacher and student, got "
                             f"{names}.")
        t_cfg, s_cfg = teacher.model.config, student.model.config
        if t_cfg.cross_attention_dim != s_cfg.cross_attention_dim or t_cfg.in_channels != s_cfg.in_channels or \
                t_cfg.sample_size != s_cfg.sample_size:
            raise ValueError(f"The student {self.config.student!r} does not fit the teacher: it must read the same "
                             "text embeddings (cross_attention_dim) and latents (in_channels, sample_size).")
        if teacher.schedule.family != "vp" or student.schedule.family != "vp":
            raise ValueError("EchoDistill is defined on VP (DDPM-type) schedules; both folders must have one.")

    @staticmethod
    def _load_vae(root: Path, device, dtype) -> nn.Module | None:
        from diffusers import AutoencoderKL

        if not (root / "vae" / "config.json").is_file():
            return None  # a pixel-space teacher: the samples are the images
        return AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype).requires_grad_(False).eval().to(device)

    def _pixel_shape(self) -> tuple[int, int, int]:
        c, h, w = self.sample_shape
        if self.vae is None:
            return c, h, w
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.vae.config.in_channels), h * factor, w * factor

    # ----------------------------------------------------------------------------------------------
    # images <-> latents, prompts
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents of ``[-1, 1]`` pixels (a posterior sample drawn from ``self.rng``); pixels without a VAE."""
        device = self.accelerator.device
        if self.vae is None:
            return pixels.to(device).float()
        dist = self.vae.encode(pixels.to(device, self.vae.dtype)).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=self.rng).to(device, dist.mean.dtype)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((z.float() - shift) * self.vae.config.scaling_factor).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` pixels of scaled latents (differentiable; the latents themselves without a VAE)."""
        if self.vae is None:
            return latents.float()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents / self.vae.config.scaling_factor + shift
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()

    def prompts(self, templates: Sequence[str], n: int) -> list[str]:
        """``n`` prompts: templates drawn from ``self.rng`` with the placeholder token in place of ``{}``."""
        idx = torch.randint(0, len(templates), (n,), generator=self.rng).tolist()
        return [templates[i].replace("{}", self.config.placeholder_token) for i in idx]

    def concept_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """``n`` augmented concept images, their valid-region masks and prompts (drawn from ``self.rng``).

        The prompts come from the folder's ``captions.json`` (each image its own templates) when it has one, else
        from ``concept_prompts``.
        """
        idx = torch.randint(0, self.concept.shape[0], (n,), generator=self.rng)
        pixels, mask = self.augment(self.concept[idx], self.rng)
        if self.concept_captions is None:
            return pixels, mask, self.prompts(self.config.concept_templates, n)
        return pixels, mask, [self.prompts(self.concept_captions[i], 1)[0] for i in idx.tolist()]

    # ----------------------------------------------------------------------------------------------
    # 1. teacher
    def teacher_loss(self, eps: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Masked denoising loss on the concept images (+ the echo term); reaches the K/V and the token row."""
        cfg, device, schedule = self.config, self.accelerator.device, self.schedule
        b = eps.shape[0]
        pixels, mask, prompts = self.concept_batch(b)
        z0 = self.encode_images(pixels)
        mask = F.interpolate(mask, size=z0.shape[-2:], mode="area").to(device)
        cond = self.encoder.encode(prompts, grad=True)
        t = schedule.sample_timesteps(b, 0.0, 1.0, self.rng)
        x_t, target, ts = schedule.add_noise(z0, eps, t), schedule.target(z0, eps, t), t
        echo = cfg.echo_loss_weight > 0 and step >= cfg.echo_start_step
        if echo:  # the echo stage: the student's one-step samples join the teacher's denoising data
            x_e, t_e, target_e, cond_e = self.echo_batch(eps)
            x_t, ts = torch.cat([x_t, x_e]), torch.cat([t, t_e])
            target, cond = torch.cat([target, target_e]), _cat_conditioning(cond, cond_e)
        # textual inversion on the student: the same loss through the (frozen) student network
        network = self.unwrap("student") if cfg.schedule == "student_token" else self.trainables["teacher"].module
        with self.accelerator.autocast():
            pred = network(x_t, ts, cond).model_output.float()
        err = (pred - target.float()) ** 2
        m = mask.expand_as(err[:b])
        loss_t = (err[:b] * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
        loss = loss_t.mean()
        parts = {"loss/teacher": loss_t.mean().detach()}
        if echo:
            loss_e = per_sample_mean(err[b:]).mean()
            loss = loss + cfg.echo_loss_weight * loss_e
            parts["loss/echo"] = loss_e.detach()
        return loss, parts

    @torch.no_grad()
    def echo_batch(self, eps: torch.Tensor):
        """The echo stage's data: the student's samples from ``eps`` (detached prompts), noised afresh.

        Returns ``(x_t, t, target, cond)``; ``cond`` is detached, so the echo term trains the teacher's K/V only.
        """
        b, schedule = eps.shape[0], self.schedule
        cond = self.encoder.encode(self.prompts(self.config.student_templates, b), grad=False)
        with self.accelerator.autocast():
            z = self.unwrap("student")(eps, self.student_timestep, cond).x0.float()
        t = schedule.sample_timesteps(b, 0.0, 1.0, self.rng)
        noise = torch.randn(z.shape, generator=self.rng).to(z.device)
        return schedule.add_noise(z, noise, t), t, schedule.target(z, noise, t), cond

    # ----------------------------------------------------------------------------------------------
    # 2. student
    def student_loss(self, eps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Alignment to the teacher's refinement of the student's own sample, plus the adversarial terms.

        Returns ``(loss, metrics, student images)``; the images (detached) feed the discriminator step.
        """
        from ..denoiser import guided_denoise

        cfg, device, schedule = self.config, self.accelerator.device, self.schedule
        b = eps.shape[0]
        cond = self.encoder.encode(self.prompts(cfg.student_templates, b), grad=False)  # sg(e)
        with self.accelerator.autocast():
            z_s = self.trainables["student"].module(eps, self.student_timestep, cond).x0.float()
        # the teacher refines the student's sample: noise it to t' with the same eps, predict x0, no gradient
        t_ref = schedule.sample_timesteps(b, 0.0, 1.0, self.rng)
        with torch.no_grad(), self.accelerator.autocast():
            z_ref = schedule.add_noise(z_s.detach(), eps, t_ref)
            z_t = guided_denoise(self.teacher.kv.denoiser, z_ref, t_ref, cond, self.guidance_scale).x0.float()
            x_t = self.decode_latents(z_t)
        w = (schedule.alpha_sigma(t_ref, device=device)[0] ** 2).float()  # alpha_bar_t'
        x_s = self.decode_latents(z_s)
        latent = 0.5 * per_sample_mean((z_s - z_t) ** 2)
        identity = self.identity_loss(x_s, x_t)
        swd = self.ms_swd(x_s, x_t, generator=self.rng)
        logits = self.unwrap("discriminator")(x_s)  # [K, B]; the heads are frozen during this step
        adversarial = torch.stack([self.gan_generator_loss(row) for row in logits])  # [K, B]
        aligned = cfg.latent_loss_weight * latent + cfg.identity_loss_weight * identity + cfg.ms_swd_loss_weight * swd
        loss = (w * aligned).mean() + cfg.adversarial_loss_weight * adversarial.mean(dim=1).sum()
        parts = {"loss/latent": latent.mean().detach(), "loss/identity": identity.mean().detach(),
                 "loss/ms_swd": swd.mean().detach(), "loss/adversarial": adversarial.mean(dim=1).sum().detach(),
                 "student/refine_weight": w.mean().detach()}
        return loss, parts, x_s.detach()

    # ----------------------------------------------------------------------------------------------
    # 3. discriminator heads
    def discriminator_loss(self, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each head: ``0.5 [softplus(-D(real)) + softplus(D(fake))]``, real = augmented concept images; summed."""
        b = fake.shape[0]
        real, _, _ = self.concept_batch(b)
        logits = self.trainables["discriminator"].module(torch.cat([real.to(fake.device, fake.dtype), fake]))
        real_logits, fake_logits = logits[:, :b], logits[:, b:]
        per_head = torch.stack([0.5 * self.gan_discriminator_loss(f, r).mean()
                                for f, r in zip(fake_logits, real_logits)])
        accuracy = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
        return per_head.sum(), {"loss/discriminator": per_head.sum().detach(), "discriminator/accuracy": accuracy}

    # ----------------------------------------------------------------------------------------------
    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        """One iteration: teacher step, student step, discriminator step (one shared eps per micro-batch)."""
        cfg, device = self.config, self.accelerator.device
        metrics: dict[str, list[torch.Tensor]] = {}

        def add(parts: dict[str, torch.Tensor]) -> None:
            for k, v in parts.items():
                metrics.setdefault(k, []).append(v.detach().float())

        micro_steps = range(cfg.gradient_accumulation_steps)
        noise = [torch.randn(cfg.train_batch_size, *self.sample_shape, generator=self.rng).to(device)
                 for _ in micro_steps]
        run_teacher, run_student = self.stages(step)
        if run_teacher:  # 1. teacher: K/V and the token row, through its denoising loss only
            self.teacher_update(step, noise, add)
        if run_student:  # 2.-3. student and heads
            self.student_and_heads_update(noise, add)
        return {k: torch.stack(v).mean() for k, v in metrics.items()}

    def stages(self, step: int) -> tuple[bool, bool]:
        """``(teacher step, student + head steps)`` of iteration ``step`` under ``config.schedule``.

        Freezes what a baseline no longer trains: the student and heads for ``student_token`` (and the teacher's
        K/V, so only the token row moves), the personalized teacher from the second half of ``sequential``.
        """
        cfg = self.config
        if cfg.schedule == "joint":
            return True, True
        if cfg.schedule == "student_token":
            for name in ("student", "discriminator"):
                if not self.trainables[name].frozen:
                    self.freeze_trainable(name)
            self.teacher.kv.requires_grad_(False)
            return True, False
        second_half = step >= cfg.max_train_steps // 2
        if second_half and not self.trainables["teacher"].frozen:
            self.freeze_trainable("teacher")
        return not second_half, second_half

    def teacher_update(self, step: int, noise: list[torch.Tensor], add) -> None:
        """The teacher step (K/V and token row; the token row alone for ``student_token``)."""
        for micro in range(len(noise)):
            with self.sync_context("teacher", micro):
                loss, parts = self.teacher_loss(noise[micro], step)
                self.backward(loss, "teacher")
            add(parts)
        add({"grad_norm/teacher": self.optimizer_step_norm("teacher")})
        self.new_token.write_to_table()

    def student_and_heads_update(self, noise: list[torch.Tensor], add) -> None:
        """The student step (alignment + adversarial, heads frozen), then the heads' step on its images."""
        micro_steps = range(len(noise))
        fakes = []
        self.discriminator.requires_grad_(False)
        try:
            for micro in micro_steps:
                with self.sync_context("student", micro):
                    loss, parts, fake = self.student_loss(noise[micro])
                    self.backward(loss, "student")
                add(parts)
                fakes.append(fake)
        finally:
            self.discriminator.requires_grad_(True)
        add({"grad_norm/student": self.optimizer_step_norm("student")})
        self.zero_grad()
        # 3. discriminator heads on real concept images vs the student's (detached) images
        for micro, fake in enumerate(fakes):
            with self.sync_context("discriminator", micro):
                loss, parts = self.discriminator_loss(fake)
                self.backward(loss, "discriminator")
            add(parts)
        add({"grad_norm/discriminator": self.optimizer_step_norm("discriminator")})
        self.zero_grad()

    # ----------------------------------------------------------------------------------------------
    # outputs
    @torch.no_grad()
    def sample_student_images(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """One-step student images ``[N, C, H, W]`` in ``[-1, 1]`` (CPU), one seeded generator per prompt.

        The same latents, network call and decoding as the exported pipeline's
        ``pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], ...)``.
        """
        from ..sampling import initial_noise, make_generators, sample_student

        if len(prompts) != len(seeds):
            raise ValueError(f"Got {len(prompts)} prompts for {len(seeds)} seeds: pass one seed per prompt.")
        device = self.accelerator.device
        gens = make_generators(seeds)
        cond = self.encoder(list(prompts))
        with self.ema_weights("student"):
            z = initial_noise((len(seeds), *self.sample_shape), gens).to(device)
            with self.accelerator.autocast():
                x0 = sample_student(self.student.denoiser, z, cond, [self.student_timestep], generator=gens)
            return self.decode_latents(x0.float()).clamp(-1, 1).cpu()

    def eval_prompts(self, n: int) -> list[str]:
        """``n`` student prompts cycling through the student templates (fixed, for comparable evaluations)."""
        templates = self.config.student_templates
        return [templates[i % len(templates)].replace("{}", self.config.placeholder_token) for i in range(n)]

    def sample_grid(self, path: Path) -> None:
        """Row 1: concept images; then one row of student samples per student prompt template."""
        from ..data.digits import make_grid_image

        n = self.config.sample_grid_size
        templates = self.config.student_templates
        rows = [self.concept[:n]]
        if rows[0].shape[0] < n:
            rows[0] = torch.cat([rows[0], -torch.ones(n - rows[0].shape[0], *self.pixel_shape)])
        for template in templates:
            prompt = template.replace("{}", self.config.placeholder_token)
            rows.append(self.sample_student_images([prompt] * n, range(n)))
        pixels = torch.cat(rows)
        if self.accelerator.is_main_process:
            make_grid_image(pixels, nrow=n, scale=4 if pixels.shape[-1] <= 64 else 1).save(path)

    def evaluate(self) -> dict[str, float]:
        """Concept fidelity of the student's samples (``eval_extractor``; held-out concept images when given)."""
        from ..evaluation.personalization import concept_fidelity

        n = self.config.eval_num_samples
        if n == 0:
            return {}
        samples = self.sample_student_images(self.eval_prompts(n), range(n))
        reference = self.heldout if self.heldout is not None else self.concept
        extractor = self.eval_extractor or self.extractors[self.config.identity_extractor]
        device = self.accelerator.device
        with torch.no_grad():
            score = concept_fidelity(samples.to(device), reference.to(device), extractor)
        return {"eval/concept_fidelity": score}

    def personalized_text_encoder(self) -> tuple[nn.Module, object]:
        """A standalone fp32 text encoder with the trained row in its table, and the tokenizer with the new token."""
        self.new_token.write_to_table()
        te = self.text_encoder
        plain = type(te)(te.config)
        plain.load_state_dict(te.state_dict())
        return plain.float().eval(), self.tokenizer

    def _plain_vae(self) -> nn.Module | None:
        if self.vae is None:
            return None
        vae = type(self.vae).from_config(self.vae.config)
        vae.load_state_dict(self.vae.state_dict())
        return vae.float().eval()

    def export(self, folder: Path) -> Path:
        """Write the personalized student (stock ``StableDiffusionPipeline``, one step) and, beside it, the teacher.

        Both folders hold the new token in their tokenizer and its trained row in their text encoder; the K/V
        (LoRA merged) are in the UNets. The teacher keeps its own scheduler (``folder.parent / "teacher"``).
        """
        from ..denoiser import Denoiser
        from ..pipelines.export import export_stable_diffusion

        folder = Path(folder)
        if self.vae is None:
            raise ValueError("Exporting a stock StableDiffusionPipeline needs a VAE; this teacher has none.")
        text_encoder, tokenizer = self.personalized_text_encoder()
        vae = self._plain_vae()
        with self.ema_weights("student"):
            student_net = self.unwrap("student").standalone_network()
        student = Denoiser.from_model(student_net, self.student.schedule)
        scheduler = self.student.schedule.scheduler_config if getattr(self.student.schedule, "scheduler_config", None) \
            else _scheduler_config_of(self.config.student)
        base = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        export_stable_diffusion(student, base, [int(self.student_timestep)], folder,
                                title=f"EchoDistill student ({self.config.placeholder_token})")
        self._write_teacher(folder.parent / "teacher", vae, text_encoder, tokenizer)
        info = {"method": "echodistill", "placeholder_token": self.config.placeholder_token,
                "initializer_token": self.config.initializer_token, "global_step": self.global_step,
                "teacher": str(self.config.teacher), "student": str(self.config.student)}
        for out in (folder, folder.parent / "teacher"):
            (out / "stepdistill_personalization.json").write_text(json.dumps(info, indent=2) + "\n")
        return folder

    def _write_teacher(self, folder: Path, vae, text_encoder, tokenizer) -> None:
        from diffusers import StableDiffusionPipeline

        from ..utils import atomic_write_dir

        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=self.teacher.kv.standalone_network(),
            scheduler=_load_scheduler(self.config.teacher), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        atomic_write_dir(folder, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def _cat_conditioning(a, b):
    from ..conditioning import Conditioning

    return Conditioning.cat([a, b])


def _scheduler_config_of(folder: str) -> dict:
    from ..loading import resolve_model_folder

    _, sched = resolve_model_folder(folder)
    return json.loads((Path(sched) / "scheduler_config.json").read_text())


def _load_scheduler(folder: str):
    """The diffusers scheduler of a pipeline folder (only diffusers' own scheduler classes)."""
    import diffusers

    config = _scheduler_config_of(folder)
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"The scheduler of {folder!r} names {config.get('_class_name')!r}, not a diffusers scheduler.")
    return cls.from_config(config)


__all__ = ["SCHEDULES", "EchoDistillConfig", "EchoDistillTrainer", "PersonalizedTeacher"]

"""Training of the text-conditioned digits world: a Stable-Diffusion-family mini pipeline trained from scratch.

Three parts, all from configs (no downloaded weights), shipped as one stock ``StableDiffusionPipeline`` folder:

1. a tiny ``AutoencoderKL`` (scale factor 1: 1-channel 8x8 pixels <-> 4-channel 8x8 latents), trained to
   reconstruct the ``train`` split (MSE plus a small KL term, Kingma & Welling 2014; Rombach et al. 2022);
   its ``scaling_factor`` makes the latents unit-variance, as in latent diffusion;
2. a tiny ``CLIPTextModel`` (Radford et al. 2021) over the generated caption tokenizer and
3. a ``UNet2DConditionModel``, trained *jointly* from scratch by denoising score matching on the latents
   with the digits teacher's schedule (SD's scaled-linear betas, v-prediction), captions from
   :data:`~stepdistill.data.digits_text.TRAIN_TEMPLATES` (``HELDOUT_TEMPLATES`` stay out), the empty caption
   with probability ``caption_drop_prob`` for classifier-free guidance (Ho & Salimans 2022).

Run through ``stepdistill train-teacher --only text_teacher``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from ..data.digits import load_digits_split
from ..data.digits_models import digits_text_encoder, digits_vae, teacher_scheduler, text_teacher_unet
from ..data.digits_text import (
    HELDOUT_TEMPLATES,
    TOKENIZER_MAX_LENGTH,
    TRAIN_TEMPLATES,
    random_captions,
    write_bpe_files,
    write_digits_tokenizer,
)
from ..schedules import NoiseSchedule
from .digits_world import warmup_cosine


@dataclass
class TextTeacherConfig:
    """Hyperparameters of the text-conditioned digits teacher (tiny VAE, CLIP text encoder and UNet)."""

    max_train_steps: int = field(default=5000, metadata={"help": "Optimizer steps of the UNet + text encoder."})
    batch_size: int = field(default=128, metadata={"help": "Batch size per process."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate of the UNet."})
    text_encoder_learning_rate: float = field(default=5e-4, metadata={"help": "AdamW peak LR of the text encoder."})
    lr_warmup_steps: int = field(default=200, metadata={"help": "Linear warm-up steps."})
    caption_drop_prob: float = field(default=0.1, metadata={"help": "Probability of the empty caption (for CFG)."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the shipped UNet and text encoder."})
    vae_steps: int = field(default=1500, metadata={"help": "Optimizer steps of the VAE (trained first, then frozen)."})
    vae_learning_rate: float = field(default=2e-3, metadata={"help": "AdamW peak learning rate of the VAE."})
    vae_kl_weight: float = field(default=1e-3, metadata={"help": "Weight of the per-element KL term of the VAE."})
    snapshot_every: int = field(default=0, metadata={
        "help": "Write the EMA pipeline every this many steps to <output_dir>/text_teacher_snapshots/ (0: never)."})
    guidance_scale: float = field(default=1.0, metadata={
        "help": "Guidance scale recorded as the teacher's default (1: prompt fidelity >= 0.95 without CFG)."})
    seed: int = field(default=0, metadata={"help": "Random seed."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_drop_prob < 1.0:
            raise ValueError(f"caption_drop_prob must be in [0, 1), got {self.caption_drop_prob}.")
        for name in ("max_train_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")


def train_vae(config: TextTeacherConfig, accelerator: Accelerator, log_every: int = 100):
    """Train the tiny VAE on ``train``; returns ``(vae, report)`` with held-out reconstruction MSE and scaling factor.

    Loss per step: pixel MSE of the decoded posterior sample plus ``vae_kl_weight`` times the KL divergence per
    latent element. ``scaling_factor`` is set to ``1 / std`` of posterior samples of the ``train`` split.
    """
    set_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed + 7)
    train = load_digits_split("train")
    vae = digits_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(100, config.vae_steps))
    vae, opt, sched = accelerator.prepare(vae, opt, sched)
    dev = accelerator.device
    for step in tqdm(range(config.vae_steps), desc="vae", disable=not accelerator.is_main_process):
        x = train.images[torch.randint(0, len(train), (config.batch_size,), generator=gen)].to(dev)
        posterior = accelerator.unwrap_model(vae).encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(dev)
        recon = accelerator.unwrap_model(vae).decode(z).sample
        kl = posterior.kl().sum() / posterior.mean.numel()
        loss = F.mse_loss(recon, x) + config.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0:
            accelerator.log({"loss/vae": loss.item(), "loss/vae_kl": kl.item()}, step=step + 1)
    vae = accelerator.unwrap_model(vae).eval().requires_grad_(False)
    with torch.no_grad():
        posterior = vae.encode(train.images.to(dev)).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(dev)
        scaling = 1.0 / float(z.std())
    vae.register_to_config(scaling_factor=scaling)
    return vae, {"scaling_factor": scaling, **reconstruction_report(vae)}


@torch.no_grad()
def reconstruction_report(vae, split: str = "heldout") -> dict:
    """Reconstruction MSE of ``split`` (posterior mean, pixels in [-1, 1]) and the classifier's accuracy on it."""
    from ..data.digits_models import DigitsClassifier, classifier_path

    data = load_digits_split(split)
    x = data.images.to(vae.device)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    clf = DigitsClassifier.from_pretrained(classifier_path()).eval().to(vae.device)
    return {
        f"{split}_reconstruction_mse": float(F.mse_loss(recon, x)),
        f"{split}_classifier_accuracy_on_reconstructions": float((clf(recon).argmax(-1).cpu() == data.labels)
                                                                 .float().mean()),
        f"{split}_classifier_accuracy_on_originals": float((clf(x).argmax(-1).cpu() == data.labels).float().mean()),
    }


def encode_captions(tokenizer, text_encoder, captions: list[str], device: torch.device) -> torch.Tensor:
    """``[B, max_length, hidden]`` embeddings as ``StableDiffusionPipeline.encode_prompt`` makes them.

    Padded to ``model_max_length``, no attention mask, last hidden state. Each distinct caption is encoded once.
    """
    unique = sorted(set(captions))
    ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    emb = text_encoder(ids)[0]
    where = torch.tensor([unique.index(c) for c in captions], device=device)
    return emb[where]


def train_text_teacher(
    config: TextTeacherConfig,
    accelerator: Accelerator,
    tokenizer_dir: str | Path,
    log_every: int = 100,
    vae: AutoencoderKL | None = None,
    text_encoder: CLIPTextModel | None = None,
    unet: UNet2DConditionModel | None = None,
    snapshot: Callable[[dict, int], None] | None = None,
):
    """Train the VAE, then the text encoder and UNet jointly; returns ``(parts, report, history)``.

    ``parts`` holds ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` (EMA weights) and ``scheduler``: the
    components of a stock ``StableDiffusionPipeline``. The tokenizer is written to ``tokenizer_dir``.

    Args:
        config: Hyperparameters.
        accelerator: The run's accelerator.
        tokenizer_dir: Where the generated tokenizer is written.
        log_every: Steps between logged losses.
        vae: A trained VAE to use as is (its ``scaling_factor`` set); default: train :func:`digits_vae` first.
        text_encoder: The text encoder to train (default: a fresh :func:`digits_text_encoder` for the tokenizer).
        unet: The UNet to train (default: a fresh :func:`text_teacher_unet`); tests pass tiny ones.
        snapshot: Called as ``snapshot(parts, step)`` with the EMA parts every ``config.snapshot_every`` steps.
    """
    t0 = time.time()
    report = {}
    if vae is None:
        vae, report = train_vae(config, accelerator)
        report["vae_seconds"] = time.time() - t0
        if accelerator.is_main_process:
            print(f"vae: {json.dumps(report)}")
    vae = vae.eval().requires_grad_(False).to(accelerator.device)
    tokenizer = write_digits_tokenizer(tokenizer_dir, TRAIN_TEMPLATES + HELDOUT_TEMPLATES, TOKENIZER_MAX_LENGTH)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if text_encoder is not None and text_encoder.config.vocab_size < len(tokenizer):
        raise ValueError(f"text_encoder has {text_encoder.config.vocab_size} token embeddings but the digits "
                         f"tokenizer has {len(tokenizer)} tokens; build it with digits_text_encoder(vocab_size=...).")

    set_seed(config.seed + accelerator.process_index)
    train = load_digits_split("train")
    dev = accelerator.device
    with torch.no_grad():
        posterior = vae.encode(train.images.to(dev)).latent_dist
        z_mean, z_std = posterior.mean.cpu(), posterior.std.cpu()
    scaling = vae.config.scaling_factor
    scheduler = teacher_scheduler("vp")
    schedule = NoiseSchedule.from_scheduler_config(scheduler.config)
    text_encoder = (text_encoder if text_encoder is not None else digits_text_encoder(**ids)).train()
    if unet is None:
        unet = text_teacher_unet(cross_attention_dim=text_encoder.config.hidden_size)
    unet = unet.train()
    trainable = list(unet.parameters()) + list(text_encoder.parameters())
    ema = EMAModel(trainable, decay=config.ema_decay, use_ema_warmup=True, power=0.75)
    opt = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr": config.learning_rate},
        {"params": list(text_encoder.parameters()), "lr": config.text_encoder_learning_rate},
    ], weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(config.lr_warmup_steps, config.max_train_steps))
    unet, text_encoder, opt, lr_sched = accelerator.prepare(unet, text_encoder, opt, lr_sched)
    gen = torch.Generator().manual_seed(config.seed + 1000 * accelerator.process_index)
    history, running, t1 = [], 0.0, time.time()
    bar = tqdm(range(config.max_train_steps), desc="text teacher", disable=not accelerator.is_main_process)
    for step in bar:
        # 1. a batch of latents (fresh posterior samples), captions (empty with caption_drop_prob), noise, times
        idx = torch.randint(0, len(train), (config.batch_size,), generator=gen)
        captions = random_captions(train.labels[idx], TRAIN_TEMPLATES, config.caption_drop_prob, gen)
        z0 = (z_mean[idx] + z_std[idx] * torch.randn(z_mean[idx].shape, generator=gen)) * scaling
        eps = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, schedule.num_train_timesteps, (config.batch_size,), generator=gen)
        x_t, target = schedule.add_noise(z0, eps, t), schedule.target(z0, eps, t)
        # 2. v-prediction loss through the UNet and the text encoder together
        with accelerator.autocast():
            emb = encode_captions(tokenizer, text_encoder, captions, dev)
            pred = unet(x_t.to(dev), schedule.model_timestep(t).to(dev), encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred.float(), target.to(dev))
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, 1.0)
        opt.step()
        lr_sched.step()
        ema.step(trainable)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % log_every == 0:
            accelerator.log({"loss/denoise": running, "lr": lr_sched.get_last_lr()[0]}, step=step + 1)
            history.append({"step": step + 1, "loss": running, "seconds": time.time() - t1})
        if snapshot is not None and config.snapshot_every and (step + 1) % config.snapshot_every == 0:
            snapshot(_ema_parts(accelerator, ema, unet, text_encoder, vae, tokenizer, scheduler), step + 1)
    parts = _ema_parts(accelerator, ema, unet, text_encoder, vae, tokenizer, scheduler)
    report["teacher_seconds"] = time.time() - t1
    return parts, report, history


def _ema_parts(accelerator, ema, unet, text_encoder, vae, tokenizer, scheduler) -> dict:
    final_unet = copy.deepcopy(accelerator.unwrap_model(unet))
    final_text = copy.deepcopy(accelerator.unwrap_model(text_encoder))
    ema.copy_to(list(final_unet.parameters()) + list(final_text.parameters()))
    return {"vae": copy.deepcopy(vae).cpu(), "text_encoder": final_text.cpu().eval(), "tokenizer": tokenizer,
            "unet": final_unet.cpu().eval(), "scheduler": scheduler}


def text_pipeline(parts: dict):
    """A stock ``StableDiffusionPipeline`` of the parts (no safety checker, no feature extractor)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_text_teacher(parts: dict, out_dir: str | Path, metadata: dict) -> Path:
    """Write the text teacher as a stock ``StableDiffusionPipeline`` folder plus ``stepdistill_teacher.json``."""
    out = Path(out_dir)
    text_pipeline(parts).save_pretrained(out)
    write_bpe_files(parts["tokenizer"], out / "tokenizer")
    (out / "stepdistill_teacher.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return out


def folder_megabytes(folder: str | Path) -> float:
    """Total size of the files under ``folder`` in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6


__all__ = [
    "TextTeacherConfig",
    "encode_captions",
    "folder_megabytes",
    "reconstruction_report",
    "save_text_teacher",
    "text_pipeline",
    "train_text_teacher",
    "train_vae",
]

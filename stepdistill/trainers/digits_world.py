"""Training of the digits world's two shipped networks: the feature classifier and the teacher.

Both train on the ``train`` split only (1,397 scans); the ``heldout`` split (400) is the FID
reference and the classifier's test set. Run through ``training_scripts/train_teacher.py``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..data.digits import NULL_CLASS, load_digits_split
from ..data.digits_models import DigitsClassifier, check_teacher_kind, teacher_scheduler, teacher_unet
from ..schedules import NoiseSchedule
from ..utils import atomic_save_pretrained


@dataclass
class ClassifierConfig:
    """Hyperparameters of the digits feature classifier."""

    epochs: int = field(default=60, metadata={"help": "Passes over the train split."})
    batch_size: int = field(default=64, metadata={"help": "Batch size."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate (cosine decay)."})
    feature_dim: int = field(default=64, metadata={"help": "Width of the penultimate feature layer."})
    seed: int = field(default=0, metadata={"help": "Random seed."})


@dataclass
class TeacherConfig:
    """Hyperparameters of the digits teacher (class-conditional UNet2DModel, v-prediction or rectified flow)."""

    kind: str = field(default="vp", metadata={"help": "vp (v-prediction DDPM) | flow (rectified flow)."})
    max_train_steps: int = field(default=8000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=128, metadata={"help": "Batch size per process."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate."})
    lr_warmup_steps: int = field(default=200, metadata={"help": "Linear warm-up steps."})
    cond_drop_prob: float = field(default=0.1, metadata={"help": "Probability of the null class (for CFG)."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the shipped weights."})
    seed: int = field(default=0, metadata={"help": "Random seed."})

    def __post_init__(self) -> None:
        check_teacher_kind(self.kind)


def _shift_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (pad with background -1, then crop)."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (b,), generator=generator)
    dy = torch.randint(0, 3, (b,), generator=generator)
    out = torch.empty_like(x)
    for i in range(b):
        out[i] = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
    return out


def train_classifier(config: ClassifierConfig, accelerator: Accelerator) -> tuple[DigitsClassifier, float]:
    """Train the feature classifier on ``train``; return it and its accuracy on ``heldout``."""
    set_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    train = load_digits_split("train")
    model = DigitsClassifier(feature_dim=config.feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.learning_rate, total_steps=total)
    model, opt = accelerator.prepare(model, opt)
    model.train()
    for _ in tqdm(range(config.epochs), desc="classifier", disable=not accelerator.is_main_process):
        perm = torch.randperm(len(train), generator=gen)
        for k in range(steps_per_epoch):
            idx = perm[k * config.batch_size : (k + 1) * config.batch_size]
            x = _shift_augment(train.images[idx], gen)
            x = x + 0.05 * torch.randn(x.shape, generator=gen)
            loss = F.cross_entropy(model(x.to(accelerator.device)), train.labels[idx].to(accelerator.device))
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
            sched.step()
    model = accelerator.unwrap_model(model).eval()
    return model, classifier_accuracy(model, "heldout")


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, split: str = "heldout") -> float:
    """Top-1 accuracy of ``model`` on a digits split."""
    data = load_digits_split(split)
    logits = model(data.images.to(model.device))
    return float((logits.argmax(-1).cpu() == data.labels).float().mean())


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier for ``LambdaLR``: linear warm-up over ``(step + 1) / warmup_steps``, then cosine to 0."""

    def lr_lambda(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return lr_lambda


def denoising_batch(
    images: torch.Tensor, labels: torch.Tensor, schedule: NoiseSchedule, batch_size: int, cond_drop_prob: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One class-conditional denoising batch ``(x_t, t, labels, target)`` with label dropout to the null class.

    Draws, in this order: indices, dropout, noise, timesteps (the teacher and the style LoRA share it).
    """
    idx = torch.randint(0, len(images), (batch_size,), generator=generator)
    x0 = images[idx]
    dropped = labels[idx].clone()
    dropped[torch.rand(batch_size, generator=generator) < cond_drop_prob] = NULL_CLASS
    eps = torch.randn(x0.shape, generator=generator)
    if schedule.family == "flow":  # continuous sigma in [0, 1)
        t = schedule.sample_timesteps(batch_size, generator=generator)
    else:
        t = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=generator)
    return schedule.add_noise(x0, eps, t), t, dropped, schedule.target(x0, eps, t)


def train_teacher(config: TeacherConfig, accelerator: Accelerator, log_every: int = 100):
    """Train the class-conditional digits teacher; returns ``(ema_unet, schedule, history)``.

    Denoising score matching in the teacher's own parameterization (v-prediction for ``vp``, velocity
    ``eps - x0`` for ``flow``): uniform timesteps, labels dropped to the null class with probability
    ``cond_drop_prob``.
    """
    set_seed(config.seed + accelerator.process_index)
    train = load_digits_split("train")
    scheduler = teacher_scheduler(config.kind)
    schedule = NoiseSchedule.from_scheduler_config(scheduler.config)
    unet = teacher_unet()
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=0.75)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0)

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(config.lr_warmup_steps, config.max_train_steps))
    unet, opt, lr_sched = accelerator.prepare(unet, opt, lr_sched)
    gen = torch.Generator().manual_seed(config.seed + 1000 * accelerator.process_index)
    history = []
    t0 = time.time()
    bar = tqdm(range(config.max_train_steps), desc="teacher", disable=not accelerator.is_main_process)
    running = 0.0
    for step in bar:
        x_t, t, labels, target = denoising_batch(train.images, train.labels, schedule, config.batch_size,
                                                 config.cond_drop_prob, gen)
        dev = accelerator.device
        with accelerator.autocast():
            pred = unet(x_t.to(dev), schedule.model_timestep(t).to(dev), class_labels=labels.to(dev)).sample
        loss = F.mse_loss(pred.float(), target.to(dev))
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(accelerator.unwrap_model(unet).parameters())
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % log_every == 0:
            accelerator.log({"loss/denoise": running, "lr": lr_sched.get_last_lr()[0]}, step=step + 1)
            history.append({"step": step + 1, "loss": running, "seconds": time.time() - t0})
    final = teacher_unet()
    ema.copy_to(final.parameters())
    return final.eval(), schedule, history


def save_teacher(unet, out_dir: str | Path, metadata: dict, kind: str = "vp") -> Path:
    """Write the teacher as a pipeline folder (``unet/``, ``scheduler/``, ``model_index.json``)."""
    out = Path(out_dir)
    scheduler = teacher_scheduler(kind)
    atomic_save_pretrained(unet, out / "unet")
    atomic_save_pretrained(scheduler, out / "scheduler")
    import diffusers

    index = {
        "_class_name": "StepDistillPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", type(scheduler).__name__],
        "unet": ["diffusers", "UNet2DModel"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "stepdistill_teacher.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return out


__all__ = [
    "ClassifierConfig",
    "TeacherConfig",
    "asdict",
    "classifier_accuracy",
    "save_teacher",
    "train_classifier",
    "train_teacher",
]

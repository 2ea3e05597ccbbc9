"""Train a small style LoRA on the digits teacher: the "bold" style (thicker strokes).

The style data is the digits ``train`` split with every stroke made one pixel wider
(:func:`thicken_strokes`: a grey-scale dilation with a 1x``width`` window, on the ink ``(x+1)/2``).
On the held-out split that raises the mean ink mass from 0.30 to 0.44 while the digits classifier still
reads 95.5 % of them correctly (a full 3x3 dilation fills the 8x8 digits and drops it to 23 %).

The LoRA is trained with the teacher's own objective (v-prediction denoising score matching, uniform
timesteps, labels dropped to the null class with ``cond_drop_prob``) on a frozen copy of the teacher,
and saved as a diffusers LoRA folder with :func:`stepdistill.control.save_lora`.

Example:
    >>> result = train_style_lora(StyleLoraConfig(output_dir="runs/digits_style_lora"))
    >>> result.folder
    PosixPath('runs/digits_style_lora')
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..conditioning import Conditioning
from ..control import add_lora, save_lora
from ..data.digits import NULL_CLASS, load_digits_split
from ..loading import load_denoiser
from .digits_world import denoising_batch, warmup_cosine

STYLE_ADAPTER_NAME = "style"


@dataclass
class StyleLoraConfig:
    """Hyperparameters of the digits style LoRA (defaults: about 1-2 minutes on one CPU thread)."""

    teacher: str = field(
        default="",
        metadata={"help": "Pipeline folder the LoRA is trained on (default: the shipped digits teacher; a student "
                          "folder gives the reverse direction)."},
    )
    output_dir: str = field(default="runs/digits_style_lora", metadata={"help": "Where to write the LoRA folder."})
    stroke_width: int = field(default=2, metadata={"help": "Dilation window width in pixels (2: strokes 1 px wider)."})
    max_train_steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=64, metadata={"help": "Batch size."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW peak learning rate (cosine decay)."})
    lr_warmup_steps: int = field(default=20, metadata={"help": "Linear warm-up steps."})
    rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha (scaling alpha / rank)."})
    target_modules: str = field(
        default="conv1,conv2,time_emb_proj",
        metadata={"help": "Comma-separated module names to adapt (UNet resnet convs and time projections)."},
    )
    cond_drop_prob: float = field(default=0.1, metadata={"help": "Probability of the null class (keeps CFG working)."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    log_every: int = field(default=25, metadata={"help": "Record the running loss every N steps."})


def thicken_strokes(images: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Make every stroke ``width - 1`` pixels wider to the right (grey-scale dilation with a 1 x ``width`` window).

    Args:
        images: ``[B, C, H, W]`` in ``[-1, 1]`` (background ``-1``).
        width: Window width; ``1`` returns the images unchanged.

    Returns:
        Images of the same shape and range.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}.")
    ink = ((images + 1) / 2).clamp(0, 1)
    padded = F.pad(ink, (width - 1, 0), value=0.0)
    return F.max_pool2d(padded, kernel_size=(1, width), stride=1) * 2 - 1


@dataclass
class StyleLoraResult:
    """What :func:`train_style_lora` returns.

    Args:
        folder: The saved LoRA folder.
        history: One ``{"step", "loss", "seconds"}`` entry per ``log_every`` steps.
        network: The teacher network with the trained adapter ``"style"`` still injected (in ``eval()`` mode).
    """

    folder: Path
    history: list[dict]
    network: torch.nn.Module


def train_style_lora(config: StyleLoraConfig, accelerator=None) -> StyleLoraResult:
    """Train the "bold" style LoRA on the teacher and save it to ``config.output_dir``.

    Only the LoRA parameters are optimized; the teacher's weights stay frozen (and on disk untouched).

    Args:
        config: Hyperparameters.
        accelerator: An ``accelerate.Accelerator`` (device, mixed precision); a default one when ``None``.

    Returns:
        A :class:`StyleLoraResult` (folder, loss history, the trained network).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..data.digits_models import teacher_path

    accelerator = accelerator or Accelerator()
    set_seed(config.seed)
    teacher_folder = config.teacher or str(teacher_path())
    denoiser = load_denoiser(teacher_folder).float()
    targets = [m.strip() for m in config.target_modules.split(",") if m.strip()]
    params = add_lora(denoiser, rank=config.rank, alpha=config.lora_alpha, target_modules=targets,
                      adapter_name=STYLE_ADAPTER_NAME)
    denoiser.model.train()
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(config.lr_warmup_steps, config.max_train_steps))
    denoiser, opt, sched = accelerator.prepare(denoiser, opt, sched)
    schedule = accelerator.unwrap_model(denoiser).schedule
    data = load_digits_split("train")
    styled = thicken_strokes(data.images, config.stroke_width)
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    running, t0 = 0.0, time.time()
    dev = accelerator.device
    bar = tqdm(range(config.max_train_steps), desc="style lora", disable=not accelerator.is_main_process)
    for step in bar:
        x_t, t, labels, target = denoising_batch(styled, data.labels, schedule, config.batch_size,
                                                 config.cond_drop_prob, gen)
        target = target.float()
        cond = Conditioning(class_labels=labels.to(dev), null_class_label=NULL_CLASS)
        with accelerator.autocast():
            pred = denoiser(x_t.to(dev), t.to(dev), cond).model_output
        loss = F.mse_loss(pred.float(), target.to(dev))
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        running = 0.95 * running + 0.05 * loss.item() if step else loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % config.log_every == 0 or step + 1 == config.max_train_steps:
            history.append({"step": step + 1, "loss": running, "seconds": time.time() - t0})
    model = accelerator.unwrap_model(denoiser).model.eval()
    seconds = time.time() - t0
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        info = {
            "base_model": str(teacher_folder),
            "base_model_class": type(model).__name__,
            "style": f"bold: strokes dilated with a 1x{config.stroke_width} window (thicken_strokes)",
            "train_config": asdict(config),
            "train_seconds": seconds,
            "final_loss": history[-1]["loss"] if history else None,
            "history": history,
        }
        save_lora(model, out, STYLE_ADAPTER_NAME, info=info)
    accelerator.wait_for_everyone()
    return StyleLoraResult(out, history, model)


__all__ = ["STYLE_ADAPTER_NAME", "StyleLoraConfig", "StyleLoraResult", "thicken_strokes", "train_style_lora"]

"""GPU check: one EchoDistill iteration on SD1.5-size random networks at 512 px (time, peak memory).

Teacher and student are random SD1.5-architecture UNets (860 M parameters each; weights do not change the cost)
with a CLIP-L-shaped text encoder (the new token's row trains through it) and an SD-shaped VAE (512 px <-> 64x64x4;
the student's image losses back-propagate through its decoder). The feature extractors stand in for the
reference's: random ViTs of DINO ViT-S/16's and DINOv2 ViT-L/14's shapes (transformers), at 224 px. One
iteration = teacher step (K/V + token row) + student step (one-step sample, teacher CFG refinement, two decodes,
identity, MS-SWD, two heads) + discriminator step, the reference batch of 2.

    python eval/gpu_echodistill_step.py --batch_size 2 --steps 5 --out gpu_echodistill.json     # on a GPU
    python eval/gpu_echodistill_step.py --tiny --steps 2                                        # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))


def build_world(folder: Path, tiny: bool, images: int = 4) -> tuple[Path, Path]:
    """The SD1.5-shaped random teacher folder of ``gpu_dmd_step`` plus an SD VAE, and random concept images."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from gpu_dmd_step import build_teacher
    from PIL import Image

    teacher = build_teacher(folder / "sd15_random", tiny)
    if not (teacher / "vae" / "config.json").is_file():
        torch.manual_seed(0)
        blocks = (8, 8) if tiny else (128, 256, 512, 512)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=blocks,
                            down_block_types=("DownEncoderBlock2D",) * len(blocks),
                            up_block_types=("UpDecoderBlock2D",) * len(blocks), layers_per_block=1 if tiny else 2,
                            norm_num_groups=4 if tiny else 32, sample_size=16 if tiny else 512)
        vae.save_pretrained(teacher / "vae")
        index = json.loads((teacher / "model_index.json").read_text())
        index["vae"] = ["diffusers", "AutoencoderKL"]
        (teacher / "model_index.json").write_text(json.dumps(index, indent=2))
    concept = folder / "concept"
    concept.mkdir(exist_ok=True)
    size = 16 if tiny else 512
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(concept / f"{i}.png")
    return teacher, concept


def vit_extractor(kind: str, tiny: bool):
    """A random ViT as a frozen differentiable extractor (CLS token), 224 px, ImageNet normalisation.

    ``dino``: DINO ViT-S/16's shape (22 M); ``dinov2``: DINOv2 ViT-L/14's (304 M) -- the reference's backbones.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(0)
    if tiny:
        net, size = ViTModel(ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64)), 32
    elif kind == "dino":
        net, size = ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12,
                                       num_attention_heads=6, intermediate_size=1536)), 224
    else:
        net, size = Dinov2Model(Dinov2Config(image_size=224, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                                             num_attention_heads=16)), 224

    class Extractor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
            x = (((x + 1) / 2 - self.mean) / self.std).to(next(self.net.parameters()).dtype)
            return self.net(pixel_values=x).last_hidden_state[:, 0].float()

    return Extractor()


def measure(args: argparse.Namespace) -> dict:
    """Build the trainer and time ``args.steps`` iterations after ``args.warmup``."""
    import torch

    from stepdistill.trainers import EchoDistillConfig, EchoDistillTrainer

    cuda = torch.cuda.is_available()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_echo_"))
    teacher, concept = build_world(workdir, args.tiny)
    cfg = EchoDistillConfig(
        teacher=str(teacher), student=str(teacher), concept_images=str(concept), initializer_token="dog",
        output_dir=str(workdir / "run"), train_batch_size=args.batch_size, kv_lora_rank=args.kv_lora_rank,
        mixed_precision=args.mixed_precision or ("bf16" if cuda else "no"), allow_tf32=True,
        gradient_checkpointing=args.gradient_checkpointing, checkpointing_steps=0, log_every=0,
        eval_num_samples=0, export=False, cpu=not cuda,
    )
    extractors = [vit_extractor("dino", args.tiny), vit_extractor("dinov2", args.tiny)]
    t0 = time.time()
    trainer = EchoDistillTrainer(cfg, extractors=extractors)
    build_s = time.time() - t0
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, metrics = [], {}
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.time()
        metrics = trainer.training_step(step)
        sync()
        if step >= args.warmup:
            times.append(time.time() - t0)
    trainable = {n: sum(p.numel() for p in t.module.parameters() if p.requires_grad) / 1e6
                 for n, t in trainer.trainables.items()}
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "batch_size": args.batch_size, "kv_lora_rank": args.kv_lora_rank, "mixed_precision": cfg.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing, "build_s": round(build_s, 1),
        "step_s_mean": sum(times) / len(times), "step_s_min": min(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "unet_params_M": sum(p.numel() for p in trainer.student.denoiser.model.parameters()) / 1e6,
        "trainable_M": trainable, "losses": {k: float(v) for k, v in metrics.items() if k.startswith("loss/")},
    }


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, measure, print (and optionally write) the result."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--kv_lora_rank", type=int, default=0)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--mixed_precision", default=None, help="Default: bf16 on CUDA, no on CPU.")
    p.add_argument("--tiny", action="store_true", help="Tiny networks (CPU smoke test of this script).")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="Write the JSON result here.")
    args = p.parse_args(argv)
    result = measure(args)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

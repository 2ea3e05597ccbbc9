"""GPU check: one DMD2 iteration of an SD1.5-architecture UNet at 512 px, full vs shared-base LoRA mode.

Step time and peak memory of full mode (generator + fake score as full fp32 copies, teacher in bf16) and
of the shared-base LoRA mode (one frozen network, two adapters).

The UNet is randomly initialised from SD1.5's architecture (860 M parameters; weights do not change the
cost), the text encoder is CLIP ViT-L-shaped (random, used only to encode prompts), latents are 64x64x4.
One iteration = generator update (DM loss: generator forward + backward, teacher CFG forward, fake-score
forward) + fake-score update (denoising loss), i.e. ``critic_updates_per_generator_update=1``.
Each mode runs in its own process so peak-memory numbers are clean.

    python eval/gpu_dmd_step.py --batch_size 4 --steps 6 --out gpu_dmd.json     # on a GPU
    python eval/gpu_dmd_step.py --tiny --steps 2                               # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_teacher(folder: Path, tiny: bool) -> Path:
    """Write a random SD1.5-architecture teacher pipeline folder (unet, scheduler, text encoder, tokenizer)."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    if tiny:
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2,
        )
        te_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    else:  # Stable Diffusion 1.5's UNet config
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        te_cfg = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    # a byte-level CLIP tokenizer (no merges): real vocab files need the hub
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(256, 512)]
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({chr(c): 1000 + c for c in range(33, 127)})
    vocab.update({chr(c) + "</w>": 1200 + c for c in range(33, 127)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 49406, 49407
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77).save_pretrained(tok_dir)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=49407, **te_cfg))
    unet.save_pretrained(folder / "unet")
    te.save_pretrained(folder / "text_encoder")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "vae": [None, None], "safety_checker": [None, None], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "prompts.txt").write_text("a photo of a cat\na red car on a street\nan oil painting of a harbour\n")
    return folder


def measure(args: argparse.Namespace) -> dict:
    """Build the trainer in one mode and time ``args.steps`` iterations after ``args.warmup``."""
    import torch

    from stepdistill.trainers.dmd import DMDConfig, DMDTrainer

    cuda = torch.cuda.is_available()
    folder = Path(args.teacher)
    cfg = DMDConfig(
        teacher=str(folder), output_dir=str(Path(args.workdir) / f"run_{args.mode}"), data="prompts",
        prompts=str(folder / "prompts.txt"), student_timesteps=[999], real_guidance_scale=1.75,
        mixed_precision=args.mixed_precision or ("bf16" if cuda else "no"), allow_tf32=True,
        train_batch_size=args.batch_size,
        critic_updates_per_generator_update=1, max_train_steps=1000, lr_warmup_steps=0,
        generator_learning_rate=1e-5, critic_learning_rate=1e-5, checkpointing_steps=0, log_every=0,
        eval_num_samples=0, export=False, gradient_checkpointing=args.gradient_checkpointing,
        lora_rank=args.lora_rank if args.mode == "lora" else 0, cpu=not cuda,
    )
    t_build = time.time()
    trainer = DMDTrainer(cfg)
    build_s = time.time() - t_build
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    times = []
    metrics = {}
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.time()
        metrics = trainer.training_step(step)
        sync()
        if step >= args.warmup:
            times.append(time.time() - t0)
    trainable = sum(p.numel() for t in trainer.trainables.values() for p in t.module.parameters() if p.requires_grad)
    params = {id(p): p for p in trainer.teacher.model.parameters()}  # in LoRA mode: the shared network + adapters
    for t in trainer.trainables.values():
        params.update({id(p): p for p in t.module.parameters()})
    total = sum(p.numel() for p in params.values())
    return {
        "mode": args.mode, "batch_size": args.batch_size, "gradient_checkpointing": args.gradient_checkpointing,
        "lora_rank": cfg.lora_rank, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "build_s": round(build_s, 1),
        "step_s_mean": sum(times) / len(times), "step_s_min": min(times),
        "resident_gib_before_steps": resident,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "params_total_M": total / 1e6, "params_trainable_M": trainable / 1e6,
        "losses": {k: float(v) for k, v in metrics.items() if k.startswith("loss/")},
    }


def main(argv: list[str] | None = None) -> None:
    """Run each mode in a subprocess (or one mode with ``--mode``) and print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["full", "lora"], default=None, help="Run one mode in this process.")
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--mixed_precision", default=None, help="Default: bf16 on CUDA, no on CPU.")
    p.add_argument("--tiny", action="store_true", help="Tiny UNet (CPU smoke test of this script).")
    p.add_argument("--teacher", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="Write the JSON results here.")
    args = p.parse_args(argv)
    if args.mode is not None:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_dmd_"))
    teacher = build_teacher(Path(args.teacher or workdir / "sd15_random"), args.tiny)
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--mode", mode, "--batch_size", str(args.batch_size),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--lora_rank", str(args.lora_rank),
               "--teacher", str(teacher), "--workdir", str(workdir)]
        cmd += ["--gradient_checkpointing"] if args.gradient_checkpointing else []
        cmd += ["--mixed_precision", args.mixed_precision] if args.mixed_precision else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
            results.append({"mode": mode, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        results.append(json.loads(lines[-1][7:]))
    print("| mode | batch | grad ckpt | params total (M) | trainable (M) | resident GiB | peak GiB | step s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['mode']} | error: {r['error']} |")
            continue
        print(f"| {r['mode']} | {r['batch_size']} | {r['gradient_checkpointing']} | {r['params_total_M']:.0f} | "
              f"{r['params_trainable_M']:.1f} | {r['resident_gib_before_steps']:.2f} | {r['peak_gib']:.2f} | "
              f"{r['step_s_mean']:.3f} |")
    ok = [r for r in results if "error" not in r]
    if len(ok) == 2:
        full, lora = ok
        print(f"lora/full: peak memory {lora['peak_gib'] / full['peak_gib']:.2f}x, "
              f"step time {lora['step_s_mean'] / full['step_s_mean']:.2f}x  ({full['device']}, torch {full['torch']})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

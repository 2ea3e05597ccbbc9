"""Checkpoint size and write time of the DMD trainer, per mode, on the digits teacher and a small SD pipeline.

    python eval/bench_checkpoint.py --out eval/results/checkpoint_bench.json

For each case a trainer is built and takes two iterations (so both optimizers hold their Adam state), then
``save_checkpoint()`` is timed ``--repeats`` times; the JSON gives the folder size, the median write time and
the files. Cases: the shipped digits teacher in full mode and in shared-base LoRA mode (rank 16), and an
SD1.5-shaped text-to-image pipeline with random weights (built here from configs: UNet with cross-attention,
VAE, CLIP text encoder; about 12 M UNet parameters) in LoRA mode (rank 16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def build_sd_pipeline(folder: Path, width: int = 64) -> Path:
    """Write an SD1.5-shaped pipeline with random weights (no hub) to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = folder.parent / "tokenizer_src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    from stepdistill.data.digits_text import clip_byte_alphabet

    chars = clip_byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1,
    ))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width, 4 * width),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=32, sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    (folder.parent / "prompts.txt").write_text("a red cube\ntwo cats\na house on a hill\n")
    return folder


def folder_size(path: Path) -> tuple[int, list[str]]:
    """Total bytes of the files under ``path`` and their relative names."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files), [str(p.relative_to(path)) for p in files]


def measure(name: str, argv: list[str], repeats: int) -> dict:
    """Build a trainer from ``argv`` and time ``save_checkpoint()``."""
    from stepdistill.trainers import DMDConfig, DMDTrainer, parse_config

    trainer = DMDTrainer(parse_config(DMDConfig, argv))
    for step in range(2):  # generator + critic step, then a critic step: every optimizer has its state
        trainer.training_step(step)
    times = []
    for i in range(repeats):
        trainer.global_step = i + 1
        t0 = time.perf_counter()
        path = trainer.save_checkpoint()
        times.append(time.perf_counter() - t0)
    size, files = folder_size(path)
    trainable = sum(p.numel() for n in trainer.trainables for p in trainer.unwrap(n).parameters())
    result = {"case": name, "bytes": size, "mb": size / 2**20, "seconds_median": statistics.median(times),
              "seconds": times, "trainable_params": trainable, "files": files}
    print(f"{name}: {size / 2**20:.2f} MB, {statistics.median(times) * 1000:.0f} ms per checkpoint, "
          f"{len(files)} files", flush=True)
    return result


def main() -> None:
    """Run the cases and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="eval/results/checkpoint_bench.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="", help="Free text stored in the JSON (e.g. the commit).")
    args = parser.parse_args()
    torch.set_num_threads(1)
    common = ["--max_train_steps", "10", "--checkpoints_total_limit", "0", "--eval_num_samples", "0",
              "--num_threads", "1", "--train_batch_size", "2"]
    digits = ["--config", str(ROOT / "recipes/digits_dmd2_1step.yaml"),
              "--teacher", str(ROOT / "stepdistill/assets/digits/teacher")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sd = build_sd_pipeline(tmp / "sd_small" / "pipeline")
        sd_args = ["--teacher", str(sd), "--data", "prompts", "--prompts", str(sd.parent / "prompts.txt"),
                   "--student_timesteps", "999", "--use_ema", "true"]
        cases = {
            "digits_full": digits,
            "digits_lora16": [*digits, "--lora_rank", "16"],
            "sd_small_lora16": [*sd_args, "--lora_rank", "16"],
        }
        for name, argv in cases.items():
            results.append(measure(name, [*argv, *common, "--output_dir", str(tmp / name)], args.repeats))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"label": args.label, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

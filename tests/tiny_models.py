"""Tiny diffusers networks built from configs (no hub), shared by the core tests.

Every builder seeds torch so the weights are the same in every test, and returns the model in
``eval()`` mode (DiT's label embedding drops labels at random in training mode).
Sizes are the smallest the diffusers blocks accept: 2 channels, 8x8, one layer per block.
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel, Transformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

C, H, W = 2, 8, 8
TEXT_LEN, TEXT_DIM, POOLED_DIM = 5, 12, 10
NUM_CLASSES = 4  # UNet labels 0..3, null class 4
NULL_CLASS = NUM_CLASSES
DIT_CLASSES = 6  # DiT labels 0..5; its LabelEmbedding adds the null class 6


def _seeded(fn):
    def wrapped(*args, **kwargs):
        torch.manual_seed(0)
        model = fn(*args, **kwargs)
        # Break diffusers' zero-initialised output layers so outputs actually depend on the inputs.
        with torch.no_grad():
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.1)
        return model.eval()

    return wrapped


@_seeded
def unet2d(class_conditional: bool = False) -> UNet2DModel:
    """``UNet2DModel``; with ``class_conditional`` it has ``NUM_CLASSES + 1`` class embeddings."""
    return UNet2DModel(
        sample_size=H,
        in_channels=C,
        out_channels=C,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=NUM_CLASSES + 1 if class_conditional else None,
    )


@_seeded
def unet2d_condition(sdxl: bool = False) -> UNet2DConditionModel:
    """SD1.5-like text UNet, or SDXL-like with ``addition_embed_type="text_time"``."""
    extra = {}
    if sdxl:
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + POOLED_DIM,
        )
    return UNet2DConditionModel(
        sample_size=H,
        in_channels=C,
        out_channels=C,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        norm_num_groups=4,
        attention_head_dim=2,
        **extra,
    )


@_seeded
def sd3_transformer() -> SD3Transformer2DModel:
    """SD3-style MMDiT (rectified flow)."""
    return SD3Transformer2DModel(
        sample_size=H,
        patch_size=2,
        in_channels=C,
        out_channels=C,
        num_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=8,
        pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=8,
    )


@_seeded
def dit() -> Transformer2DModel:
    """DiT-like ``Transformer2DModel``: class labels, ada_norm_zero, learned sigma (``2C`` outputs)."""
    return Transformer2DModel(
        sample_size=H,
        patch_size=2,
        in_channels=C,
        out_channels=2 * C,
        num_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=DIT_CLASSES,
        norm_num_groups=1,
    )


class TinyCustom(nn.Module):
    """A custom denoiser ``fn(x_t, timestep, cond)``: a conv plus a timestep- and label-dependent shift."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.label = nn.Embedding(NUM_CLASSES + 1, C)

    def forward(self, x, timestep, cond):
        shift = torch.sin(timestep.float() / 100.0)[:, None, None, None]
        out = self.conv(x) + shift
        if cond.class_labels is not None:
            out = out + self.label(cond.class_labels)[:, :, None, None]
        return out


def text_cond(batch: int, sdxl: bool = False, pooled: bool = False, seed: int = 1):
    """Random text conditioning: prompt embeds, plus pooled embeds (SDXL / SD3) and time ids (SDXL)."""
    from stepdistill import Conditioning

    g = torch.Generator().manual_seed(seed)
    kwargs = {"prompt_embeds": torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)}
    if sdxl or pooled:
        kwargs["pooled_prompt_embeds"] = torch.randn(batch, POOLED_DIM, generator=g)
    if sdxl:
        kwargs["time_ids"] = torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]).repeat(batch, 1)
    return Conditioning(**kwargs)


# --------------------------------------------------------------------------------------------------
# text and latent components for SD-family pipeline folders (random weights, no hub)
TOKENIZER_MAX_LEN = 16


def write_clip_tokenizer(folder):
    """Write a CLIP BPE tokenizer (byte-level alphabet, no merges, CLIP's two special tokens) to ``folder``."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from stepdistill.data.digits_text import clip_byte_alphabet

    chars = clip_byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def clip_tokenizer(folder, max_len: int = TOKENIZER_MAX_LEN):
    """Load the tokenizer written by :func:`write_clip_tokenizer`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, model_max_length=max_len)


def clip_text_encoder(seed: int, projection: bool = False, hidden: int = 16, max_len: int = TOKENIZER_MAX_LEN):
    """A 2-layer CLIP text encoder (with a projection for SDXL's second / SD3's encoders)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_len, projection_dim=8,
        bos_token_id=512, eos_token_id=513, pad_token_id=513,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def randomize(model):
    """Seeded weights for diffusers' zero-initialised output layers (else tests would be vacuous)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return model.eval()


def tiny_vae(**extra):
    """A 2-block ``AutoencoderKL``: 3-channel 16x16 pixels <-> 4-channel 8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return randomize(AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
        **extra,
    ))


def latent_unet(cross_attention_dim: int, **extra):
    """SD1.5-shaped ``UNet2DConditionModel`` on 4-channel 8x8 latents (SDXL-shaped with ``addition_embed_type``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(2)
    return randomize(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=2, **extra,
    ))


def latent_sd3_transformer():
    """SD3-shaped ``SD3Transformer2DModel`` on 4-channel 8x8 latents (text dim 32, pooled 16)."""
    torch.manual_seed(3)
    return randomize(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=8, pooled_projection_dim=16,
        pos_embed_max_size=8,
    ))


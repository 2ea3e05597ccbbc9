"""The two networks of the digits world: the class-conditional teacher and the feature classifier.

Both are shipped inside the package (``stepdistill/assets/digits``) in diffusers / safetensors format
and are reproduced by ``accelerate launch training_scripts/train_teacher.py``.

Teacher design decisions (see the README):

* **Noise schedule = Stable Diffusion's** ``scaled_linear`` betas 0.00085 -> 0.012, 1000 steps, so
  timesteps mean on digits what they mean in SD recipes (``abar_999 = 0.0047``, ``abar_399 = 0.43``).
* **v-prediction**, so x0 is well conditioned at every timestep: an eps-predictor must divide by
  ``alpha_999 = 0.068`` (15x error amplification) to give x0, which is what a one-step student
  conditioned at t=999 is made of.
* ``UNet2DModel`` at 8x8, 1 channel, ``(32, 64, 64)`` channels, 11 class embeddings (10 = null class).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ConfigMixin,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    ModelMixin,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.configuration_utils import register_to_config
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from .digits import NULL_CLASS, NUM_CLASSES, RESOLUTION


def assets_dir() -> Path:
    """Folder of the shipped digits models (inside the installed package)."""
    return Path(str(resources.files("stepdistill"))) / "assets" / "digits"


#: The digits teachers, by kind: ``vp`` (SD's scaled-linear betas, v-prediction) and ``flow`` (rectified flow,
#: velocity ``eps - x0``, diffusers' ``FlowMatchEulerDiscreteScheduler``). Same network, same data, same budget.
TEACHER_KINDS = ("vp", "flow")


def check_teacher_kind(kind: str) -> str:
    """Return ``kind`` if it names a digits teacher kind, else raise a one-line ``ValueError``."""
    if kind not in TEACHER_KINDS:
        raise ValueError(f"teacher kind must be one of {list(TEACHER_KINDS)}, got {kind!r}.")
    return kind


def teacher_path(kind: str = "vp") -> Path:
    """Path of a shipped digits teacher (a pipeline folder with ``unet/`` and ``scheduler/``).

    Args:
        kind: ``vp`` (``assets/digits/teacher``) or ``flow`` (``assets/digits/teacher_flow``).
    """
    return assets_dir() / ("teacher" if check_teacher_kind(kind) == "vp" else "teacher_flow")


def text_teacher_path() -> Path:
    """Path of the shipped text-conditioned digits teacher (a stock ``StableDiffusionPipeline`` folder)."""
    return assets_dir() / "text_teacher"


def classifier_path() -> Path:
    """Path of the shipped digits feature classifier."""
    return assets_dir() / "classifier"


def teacher_scheduler(kind: str = "vp") -> DDIMScheduler | FlowMatchEulerDiscreteScheduler:
    """A digits teacher's scheduler.

    ``vp``: SD's scaled-linear betas, v-prediction, trailing spacing, clean end. ``flow``: rectified flow
    (``x_t = (1 - sigma) x0 + sigma eps``, velocity target ``eps - x0``, Liu et al. 2023; Esser et al. 2024),
    1000 training timesteps, no shift (8x8 images need no resolution shift).
    """
    if check_teacher_kind(kind) == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )


def teacher_unet(**overrides) -> UNet2DModel:
    """A fresh (random) digits teacher UNet; ``overrides`` change config entries (tests use tiny ones)."""
    config = dict(
        sample_size=RESOLUTION,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        num_class_embeds=NUM_CLASSES + 1,
    )
    config.update(overrides)
    return UNet2DModel(**config)


def digits_vae(**overrides) -> AutoencoderKL:
    """A fresh tiny ``AutoencoderKL`` of the text digits world: 1-channel 8x8 pixels <-> 4-channel 8x8 latents.

    One encoder / decoder block, so the VAE scale factor is 1 and the stock pipeline's 8x8 default holds.
    """
    config = dict(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(32,), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=RESOLUTION,
    )
    config.update(overrides)
    return AutoencoderKL(**config)


def digits_text_encoder(vocab_size: int, bos_token_id: int, eos_token_id: int, **overrides) -> CLIPTextModel:
    """A fresh tiny ``CLIPTextModel`` (hidden 64, 3 layers, 16 positions) for the digits tokenizer's ids."""
    config = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=64, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    config.update(overrides)
    return CLIPTextModel(CLIPTextConfig(**config))


def text_teacher_unet(cross_attention_dim: int = 64, **overrides) -> UNet2DConditionModel:
    """A fresh text-conditioned digits teacher UNet on 4-channel 8x8 latents (SD1.5-shaped).

    Cross-attention to the caption at 4x4 (down, mid and up blocks); the 8x8 level is convolutional (1.4 M
    parameters; cross-attention at 8x8 too cost 20 % more time per step on CPU for the same width).
    """
    config = dict(
        sample_size=RESOLUTION, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=16, attention_head_dim=4,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config)


class DigitsClassifier(ModelMixin, ConfigMixin):
    """A small CNN digit classifier whose penultimate activations are the offline FID feature space.

    ``forward`` returns logits; :meth:`features` returns the ``feature_dim``-d penultimate
    activations. Inputs are ``[B, 1, 8, 8]`` in ``[-1, 1]`` (the digits world's range).

    Args:
        feature_dim: Width of the penultimate (feature) layer.
        num_classes: Number of classes.

    Example:
        >>> clf = DigitsClassifier.from_pretrained(classifier_path())
        >>> feats = clf.features(images)  # [B, 64]
    """

    @register_to_config
    def __init__(self, feature_dim: int = 64, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(64, 128, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 2x2
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(128 * 4, feature_dim),
            nn.GELU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, feature_dim]``."""
        return self.body(x.to(self.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.features(x))


__all__ = [
    "NULL_CLASS",
    "DigitsClassifier",
    "assets_dir",
    "classifier_path",
    "digits_text_encoder",
    "digits_vae",
    "teacher_path",
    "text_teacher_path",
    "text_teacher_unet",
    "teacher_scheduler",
    "teacher_unet",
]

"""stepdistill: distill multi-step diffusion teachers into one-step and few-step generators."""

from .conditioning import Conditioning
from .denoiser import (
    CallableDenoiser,
    Denoiser,
    DenoiserOutput,
    DiTDenoiser,
    SD3TransformerDenoiser,
    UNet2DConditionDenoiser,
    UNet2DDenoiser,
    cfg,
    guided_denoise,
)
from .sampling import initial_noise, make_generators, sample_student, sample_teacher
from .schedules import FlowSchedule, NoiseSchedule, VPSchedule, check_prediction_type

__version__ = "0.1.0"

__all__ = [
    "CallableDenoiser",
    "Conditioning",
    "Denoiser",
    "DenoiserOutput",
    "DiTDenoiser",
    "FlowSchedule",
    "NoiseSchedule",
    "SD3TransformerDenoiser",
    "UNet2DConditionDenoiser",
    "UNet2DDenoiser",
    "VPSchedule",
    "cfg",
    "check_prediction_type",
    "guided_denoise",
    "initial_noise",
    "make_generators",
    "sample_student",
    "sample_teacher",
]

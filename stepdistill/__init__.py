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
from .sampling import (
    PlanSegment,
    StepPlan,
    initial_noise,
    make_generators,
    rollout,
    run_step_plan,
    sample_student,
    sample_teacher,
)
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
    "PlanSegment",
    "SD3TransformerDenoiser",
    "StepPlan",
    "UNet2DConditionDenoiser",
    "UNet2DDenoiser",
    "VPSchedule",
    "cfg",
    "check_prediction_type",
    "guided_denoise",
    "initial_noise",
    "make_generators",
    "rollout",
    "run_step_plan",
    "sample_student",
    "sample_teacher",
]

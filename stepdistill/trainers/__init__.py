"""Trainers on Accelerate: the role-neutral base trainer and one config + trainer pair per method."""

from ..configs import parse_config
from .base import DistillationTrainer, NonFiniteLossError, OptimizerSettings, ParamGroup, TrainerConfig
from .boot import BOOTConfig, BOOTTrainer
from .dmd import DMDConfig, DMDTrainer
from .echodistill import EchoDistillConfig, EchoDistillTrainer
from .msd import MSDConfig, MSDStudentTrainer, MSDTrainer, TSMTrainer
from .phased_dmd import PhasedDMDConfig, PhasedDMDTrainer

__all__ = [
    "BOOTConfig",
    "BOOTTrainer",
    "DMDConfig",
    "DMDTrainer",
    "DistillationTrainer",
    "EchoDistillConfig",
    "EchoDistillTrainer",
    "MSDConfig",
    "MSDStudentTrainer",
    "MSDTrainer",
    "TSMTrainer",
    "NonFiniteLossError",
    "OptimizerSettings",
    "ParamGroup",
    "PhasedDMDConfig",
    "PhasedDMDTrainer",
    "TrainerConfig",
    "parse_config",
]

"""Trainers on Accelerate: the base distillation trainer and one config + trainer pair per method."""

from .base import DistillationTrainer, NonFiniteLossError, TrainerConfig, parse_config
from .dmd import DMDConfig, DMDTrainer

__all__ = ["DMDConfig", "DMDTrainer", "DistillationTrainer", "NonFiniteLossError", "TrainerConfig", "parse_config"]

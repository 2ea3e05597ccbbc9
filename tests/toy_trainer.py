"""A minimal method on the base trainer, for testing the trainer core itself (not a distillation method).

``ToyTrainer`` trains one denoiser per role (full copies of the teacher, or named adapters on one shared base
with ``lora_rank > 0``) by denoising score matching on real digits, each role with its own update interval,
and resets / freezes roles at configured iterations, the way Phased DMD resets its critic and freezes
finished experts. ``python toy_trainer.py --teacher ... --output_dir ...`` runs it (for ``accelerate launch``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stepdistill.losses import DenoisingScoreMatchingLoss
from stepdistill.trainers.base import DistillationTrainer, ParamGroup, TrainerConfig


@dataclass
class ToyConfig(TrainerConfig):
    """Roles, their intervals, and when to reset / freeze which role."""

    roles: list[str] = field(default_factory=lambda: ["a", "b"])
    learning_rate: float = 1e-3
    intervals: list[int] | None = None
    reset_role: str | None = None
    reset_at: int = -1
    freeze_role: str | None = None
    freeze_at: int = -1
    group_prefix: str | None = None  # a ParamGroup for parameters starting with this (role "a" only)
    group_learning_rate: float = 1e-1
    group_weight_decay: float = 0.5
    interrupt_at: int = -1  # raise KeyboardInterrupt at this iteration (a killed run)
    stall_in_checkpoint_at: int = -1  # stop inside the checkpoint of this iteration (models written, rest not)


class ToyTrainer(DistillationTrainer):
    """Denoising score matching per role; reset / freeze at the configured iterations."""

    config: ToyConfig

    def build(self) -> None:
        cfg, device = self.config, self.accelerator.device
        teacher = self.load_teacher()
        self.layout = self.make_layout(teacher, roles=cfg.roles)
        self.teacher = self.layout.teacher
        self.build_data(self.teacher.model)
        self.dsm = DenoisingScoreMatchingLoss(self.schedule)
        intervals = cfg.intervals or [1] * len(cfg.roles)
        for i, role in enumerate(cfg.roles):
            den = self.layout.network(role).to(device)
            groups = [ParamGroup(cfg.group_prefix, cfg.group_learning_rate, cfg.group_weight_decay)] \
                if cfg.group_prefix and i == 0 else []
            settings = self.optimizer_settings(cfg.learning_rate, update_interval=intervals[i], param_groups=groups)
            self.add_trainable(role, den, settings, activate=lambda r=role: self.layout.activate(r),
                               ema=cfg.use_ema, resettable=True)
        self.layout.finalize(device, self.weight_dtype)

    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        cfg, device = self.config, self.accelerator.device
        if step == cfg.interrupt_at:
            raise KeyboardInterrupt(f"interrupted at iteration {step}")
        if step == cfg.reset_at:
            self.reset_trainable(cfg.reset_role)
        if step == cfg.freeze_at:
            self.freeze_trainable(cfg.freeze_role)
        metrics = {}
        for role in cfg.roles:
            if not self.should_update(role, step):
                continue
            losses = []
            for micro in range(cfg.gradient_accumulation_steps):
                cond, x0 = self.data.sample(cfg.train_batch_size, self.rng)
                noised = self.dsm.noise(x0.to(device), self.rng)
                with self.sync_context(role, micro):
                    out = self.trainables[role].module(noised.x_t, noised.t.to(device), cond.to(device))
                    loss = self.dsm(out.model_output, noised.target).mean()
                    self.backward(loss, role)
                losses.append(loss.detach())
            metrics[f"loss/{role}"] = torch.stack(losses).mean()
            metrics[f"grad_norm/{role}"] = torch.tensor(self.optimizer_step(role))
        return metrics

    def export(self, folder: Path) -> Path:
        return folder

    def _save_models_hook(self, models: list, weights: list, output_dir: str) -> None:
        super()._save_models_hook(models, weights, output_dir)
        if self.global_step == self.config.stall_in_checkpoint_at:  # a test SIGKILLs the run here, mid-write
            (Path(self.config.output_dir) / "stalled").write_text(output_dir)
            time.sleep(600)


def toy_config(teacher: Path | str, out: Path | str, **overrides) -> ToyConfig:
    """The tests' small toy run: 8 iterations at batch 4, every value logged, no export; ``overrides`` win."""
    base = dict(teacher=str(teacher), output_dir=str(out), max_train_steps=8, train_batch_size=4, lr_warmup_steps=2,
                checkpointing_steps=0, log_every=1, eval_num_samples=0, sample_grid_size=4, seed=5, export=False)
    base.update(overrides)
    return ToyConfig(**base)


def trained_tensors(trainer: DistillationTrainer) -> dict[str, torch.Tensor]:
    """Copies of every trainable's weights and EMA weights, by name (for bitwise comparisons of runs)."""
    out = {}
    for name in trainer.trainables:
        out.update({f"{name}.{k}": v.detach().clone() for k, v in trainer.unwrap(name).state_dict().items()})
    for name, ema in trainer.emas.items():
        out.update({f"{name}.ema.{i}": p.detach().clone() for i, p in enumerate(ema.shadow_params)})
    return out


if __name__ == "__main__":
    from stepdistill.configs import parse_config

    trainer = ToyTrainer(parse_config(ToyConfig, sys.argv[1:]))
    summary = trainer.train()
    if trainer.accelerator.is_main_process:
        shared = getattr(trainer.layout, "adapters", None)
        info = {"gradient_checkpointing": bool(shared and shared.network.is_gradient_checkpointing),
                "adapter_b_norms": {r: sum(float(p.norm()) for n, p in shared.network.named_parameters()
                                           if f"lora_B.{r}." in n) for r in trainer.config.roles} if shared else {}}
        (Path(trainer.config.output_dir) / "toy_info.json").write_text(json.dumps(info) + "\n")

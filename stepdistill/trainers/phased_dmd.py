"""Phased DMD on the DMD trainer: SNR phases, one expert per phase, subinterval score matching.

Fan et al., "Phased DMD: Few-step Distribution Matching Distillation via Score Matching within Subintervals",
CVPR 2026 (arXiv 2510.27684).

The student timesteps ``t_0 > t_1 > ... > t_{N-1}`` are split at ``phase_boundaries`` (each one of them) into
``K`` phases; phase ``k`` runs its steps with expert ``k`` and ends at the boundary ``b_k`` (the next phase's first
timestep; ``b_{K-1}``: clean data). Phases train one after the other (``phase_steps`` iterations each):

1. Entering phase ``k > 0``: expert ``k-1`` is frozen (its EMA weights, when kept, become its weights), the fake
   score is re-initialised from the teacher and expert ``k``'s optimizer / LR schedule start afresh.
2. Rollout (Sec. 4.1): the frozen experts ``0..k-1`` run their phases without gradient (deterministic DDIM /
   Euler steps, the paper's back-simulation solver), then expert ``k`` runs its own steps; only its last step
   carries gradient and moves to ``b_k`` (an intermediate phase never produces x0). With ``truncation`` a step
   ``j`` of the phase is drawn, steps before it run without gradient and step ``j`` jumps straight to ``b_k``
   (SGTS inside a phase, Fig. 1d).
3. Generator step (every ``critic_updates_per_generator_update`` iterations): re-noise ``x_{b_k}`` to
   ``t in (b_k, T]`` with the conditional kernel ("reverse nested"; ``renoise_intervals="disjoint"``:
   ``(b_k, t_{first of phase}]``), DMD's normalised gradient between the teacher (CFG) and the fake score,
   :class:`~stepdistill.losses.SubintervalDistributionMatchingLoss`.
4. Fake-score step (every iteration): subinterval score matching on the detached ``x_{b_k}``
   (:class:`~stepdistill.losses.SubintervalScoreMatchingLoss`, Eq. 11-13; the clamp or a margin;
   ``fake_score_target="naive"`` for the biased ablation). In the last phase it is ordinary score matching.

The phase index is stored in checkpoints, so a resumed run continues the right phase.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..conditioning import Conditioning
from ..losses import (
    NaiveSubintervalScoreMatchingLoss,
    SubintervalDistributionMatchingLoss,
    SubintervalScoreMatchingLoss,
)
from ..networks import FakeScore
from ..pipelines.pipeline_phased import phases_plan
from ..sampling import ddim_step, run_step_plan
from .dmd import DMDConfig, DMDTrainer

RENOISE_INTERVALS = ("reverse_nested", "disjoint")
FAKE_SCORE_TARGETS = ("subinterval", "naive")


def split_phases(timesteps: Sequence[float], boundaries: Sequence[float]) -> list[list[float]]:
    """Split a student timestep list at ``boundaries`` (each one of the timesteps, not the first).

    Example:
        >>> split_phases([999, 749, 499, 249], [499])
        [[999.0, 749.0], [499.0, 249.0]]

    Raises:
        ValueError: a boundary that is not a student timestep, the first timestep (a phase with no step),
            or boundaries that are not strictly decreasing.
    """
    ts = [float(t) for t in timesteps]
    bs = [float(b) for b in boundaries]
    for b in bs:
        if b not in ts:
            raise ValueError(f"Phase boundary {b:g} is not one of student_timesteps {ts}: a phase ends where the "
                             "next one starts, so pick boundaries from that list (e.g. phase_boundaries: [499]).")
        if b == ts[0]:
            raise ValueError(f"Phase boundary {b:g} is the first student timestep, which leaves phase 1 with no "
                             "step: drop it, or pick a later timestep.")
    if any(b >= a for a, b in zip(bs, bs[1:])):
        raise ValueError(f"phase_boundaries must be strictly decreasing and distinct (a repeated one leaves a phase "
                         f"with no step), got {bs}.")
    cuts = [0, *(ts.index(b) for b in bs), len(ts)]
    return [ts[a:b] for a, b in zip(cuts, cuts[1:])]


@dataclass
class PhasedDMDConfig(DMDConfig):
    """Phased DMD settings on top of :class:`~stepdistill.trainers.DMDConfig` (data-free: no GAN, no regression).

    Example:
        >>> cfg = PhasedDMDConfig(teacher="stepdistill/assets/digits/teacher",
        ...                       student_timesteps=[999, 749, 499, 249], phase_boundaries=[499])
    """

    lora_rank: int = field(
        default=16,
        metadata={"help": "> 0 (default): experts and fake score are LoRA adapters of this rank on one frozen "
                          "teacher network. 0: full copies of the teacher."},
    )
    phase_boundaries: list[float] = field(
        default_factory=lambda: [499.0],
        metadata={"help": "Student timesteps where a phase ends and the next begins (noisiest first); "
                          "[499] with student_timesteps [999, 749, 499, 249]: 4 steps in 2 phases."},
    )
    phase_steps: list[int] | None = field(
        default=None,
        metadata={"help": "Training iterations of each phase, summing to max_train_steps (0 leaves that expert at "
                          "the teacher, e.g. [0, N] trains phase 2 only). None: max_train_steps split evenly."},
    )
    renoise_intervals: str = field(
        default="reverse_nested",
        metadata={"help": "Re-noise t for phase k: 'reverse_nested' (b_k, T] (the paper) or 'disjoint' "
                          "(b_k, first timestep of the phase] (the ablation)."},
    )
    fake_score_target: str = field(
        default="subinterval",
        metadata={"help": "Fake-score target in intermediate phases: 'subinterval' (Eq. 11-12, unbiased) or "
                          "'naive' (x_s taken for clean data; biased ablation)."},
    )
    fake_score_clamp: float | None = field(
        default=10.0,
        metadata={"help": "Eq. 13 weight clamp(1/sigma_{t|s}^2, 0, c): c (paper: 10); None: no clamp."},
    )
    renoise_margin: float = field(
        default=0.0,
        metadata={"help": "Draw re-noise t at least this many timesteps above the boundary (LightX2V: 20, used "
                          "with fake_score_clamp none)."},
    )
    truncation: bool = field(
        default=False,
        metadata={"help": "SGTS inside a phase: a random step of the phase carries the gradient and jumps to the "
                          "phase boundary (never to 0 in an intermediate phase)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_gan or self.regression_loss_weight > 0 or self.init_generator:
            raise ValueError("Phased DMD is data-free here: use_gan, regression_loss_weight and init_generator are "
                             "DMD2 / DMD1 options; drop them.")
        if self.backward_simulation is False:
            raise ValueError("Phased DMD rolls its experts out from noise; backward_simulation=false does not apply.")
        self.phase_boundaries = [float(b) for b in self.phase_boundaries]
        phases = split_phases(self.student_timesteps, self.phase_boundaries)
        if self.phase_steps is None:
            k = len(phases)
            self.phase_steps = [self.max_train_steps // k + (i < self.max_train_steps % k) for i in range(k)]
        self.phase_steps = [int(n) for n in self.phase_steps]
        if len(self.phase_steps) != len(phases):
            raise ValueError(f"phase_steps {self.phase_steps} has {len(self.phase_steps)} entries for {len(phases)} "
                             f"phases {phases}: give one iteration count per phase.")
        if min(self.phase_steps) < 0 or sum(self.phase_steps) != self.max_train_steps:
            raise ValueError(f"phase_steps {self.phase_steps} must be >= 0 and sum to max_train_steps="
                             f"{self.max_train_steps}: set max_train_steps to their sum or change them.")
        if self.renoise_intervals not in RENOISE_INTERVALS:
            raise ValueError(f"renoise_intervals must be one of {list(RENOISE_INTERVALS)}, "
                             f"got {self.renoise_intervals!r}.")
        if self.fake_score_target not in FAKE_SCORE_TARGETS:
            raise ValueError(f"fake_score_target must be one of {list(FAKE_SCORE_TARGETS)}, "
                             f"got {self.fake_score_target!r}.")
        if self.fake_score_clamp is not None and not self.fake_score_clamp > 0:
            raise ValueError(f"fake_score_clamp must be > 0 or none, got {self.fake_score_clamp}.")
        if self.renoise_margin < 0:
            raise ValueError(f"renoise_margin must be >= 0, got {self.renoise_margin}.")

    @property
    def phases(self) -> list[list[float]]:
        """The student timesteps of each phase."""
        return split_phases(self.student_timesteps, self.phase_boundaries)

    @property
    def uses_backward_simulation(self) -> bool:
        """Always: experts are rolled out from noise."""
        return True


def expert_name(k: int) -> str:
    """The trainable / pipeline component name of phase ``k``'s expert."""
    return f"expert_{k}"


class PhasedDMDTrainer(DMDTrainer):
    """Phased DMD: progressive phases, one expert per phase, a fake score re-initialised per phase.

    Trainables: ``expert_0 .. expert_{K-1}`` (LoRA adapters on the shared teacher by default; full copies with
    ``lora_rank=0``) and ``critic`` (the fake score, reset at each phase). Reuses DMD's data, guidance, critic,
    checkpointing and evaluation; replaces the generator with the experts and the losses with their subinterval
    forms (see the module docstring for one iteration).

    Args:
        config: A :class:`PhasedDMDConfig`.
        accelerator: Optional existing ``Accelerator``.
        teacher: Optional teacher :class:`~stepdistill.Denoiser` instead of ``config.teacher``.
        condition_filter: Optional predicate keeping a subset of the data.

    Example:
        >>> cfg = parse_config(PhasedDMDConfig, ["--config", "recipes/digits_phased_dmd_4step.yaml"])
        >>> PhasedDMDTrainer(cfg).train()
    """

    config: PhasedDMDConfig

    def build(self) -> None:
        """Teacher, experts and fake score on one layout, the subinterval losses, phase 0."""
        cfg, device = self.config, self.accelerator.device
        teacher = self.load_teacher()
        self.student_timesteps = self.schedule.validate_timesteps(cfg.student_timesteps)
        self.phases = cfg.phases
        self.guidance_scale = self.resolve_guidance(cfg.real_guidance_scale)
        self.expert_names = [expert_name(k) for k in range(len(self.phases))]
        self.plan = phases_plan(self.phases, self.expert_names)
        self.layout = self.make_layout(teacher, roles=(*self.expert_names, "fake_score"))
        self.teacher = self.layout.teacher
        self.build_data(self.teacher.model)
        self.experts = {name: self.layout.network(name) for name in self.expert_names}
        self.critic = FakeScore(self.layout.network("fake_score"))
        self.layout.finalize(device, self.weight_dtype)
        self.critic.to(device)
        for name, expert in self.experts.items():
            expert.to(device)
            settings = self.optimizer_settings(cfg.generator_learning_rate,
                                               update_interval=cfg.critic_updates_per_generator_update)
            self.add_trainable(name, expert, settings, activate=lambda n=name: self.layout.activate(n),
                               ema=cfg.use_ema, resettable=True)
        self.add_trainable("critic", self.critic, self.optimizer_settings(cfg.critic_learning_rate),
                           activate=lambda: self.layout.activate("fake_score"), resettable=True)
        self.dm_loss = SubintervalDistributionMatchingLoss(self.schedule, self.guidance_scale, cfg.renoise_margin)
        loss_cls = NaiveSubintervalScoreMatchingLoss if cfg.fake_score_target == "naive" \
            else SubintervalScoreMatchingLoss
        self.fake_score_loss = loss_cls(self.schedule, cfg.fake_score_clamp, cfg.renoise_margin)
        self.phase_starts = [sum(cfg.phase_steps[:k]) for k in range(len(self.phases))]
        self.phase = 0
        self.regression_pairs = None

    # ----------------------------------------------------------------------------------------------
    # phases
    def phase_of(self, step: int) -> int:
        """The phase iteration ``step`` belongs to (phases with 0 iterations are skipped)."""
        return max(k for k, start in enumerate(self.phase_starts) if start <= step)

    def boundary(self, phase: int) -> float | None:
        """Where phase ``phase`` ends: the next phase's first timestep, ``None`` (clean data) for the last."""
        return self.phases[phase + 1][0] if phase + 1 < len(self.phases) else None

    def renoise_high(self, phase: int) -> float | None:
        """Upper end of the re-noise draw: ``None`` (= T, reverse nested) or the phase's first timestep (disjoint)."""
        return self.phases[phase][0] if self.config.renoise_intervals == "disjoint" and phase > 0 else None

    @torch.no_grad()
    def enter_phase(self, phase: int) -> None:
        """Freeze the previous experts (EMA weights kept), reset the fake score and the new expert's optimizer."""
        for k in range(self.phase, phase):
            name = self.expert_names[k]
            t = self.trainables[name]
            if t.ema is not None:
                t.ema.copy_to(self.unwrap(name).parameters())
            self.freeze_trainable(name)
        self.reset_trainable(self.expert_names[phase], self.gathered_state_dict(self.expert_names[phase]))
        self.reset_trainable("critic")
        self.phase = phase

    def _trainer_state(self) -> dict:
        return {**super()._trainer_state(), "phase": self.phase}

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore as the base trainer does, and the phase index."""
        import json

        from .checkpointing import TRAINER_STATE

        super().load_checkpoint(path)
        self.phase = int(json.loads((Path(path) / TRAINER_STATE).read_text()).get("phase", 0))
        if self.phase != self.phase_of(max(self.global_step - 1, 0)) and self.global_step > 0:
            raise ValueError(f"Checkpoint {str(path)!r} is in phase {self.phase}, but phase_steps "
                             f"{self.config.phase_steps} put iteration {self.global_step} in another: resume with "
                             "the phase_steps that wrote it.")

    # ----------------------------------------------------------------------------------------------
    # rollout
    def denoisers(self) -> dict[str, nn.Module]:
        """The experts by plan name (unwrapped)."""
        return {name: self.unwrap(name) for name in self.expert_names}

    def phase_samples(
        self, cond: Conditioning, phase: int, grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """Expert ``phase``'s output at its boundary: ``(x_b, x0_estimate, b)``; ``b = None`` means x0.

        Earlier experts run their phases without gradient; with ``grad`` the expert's last step (or, with
        ``truncation``, a random step jumping to the boundary) runs through its DDP-wrapped module.
        """
        device = self.accelerator.device
        cond = cond.to(device)
        batch = cond.batch_size or self.config.train_batch_size
        ts = self.phases[phase]
        x = torch.randn(batch, *self.sample_shape, generator=self.rng).to(device)
        x = run_step_plan(self.plan, self.denoisers(), x, cond, self.rng, stop=ts[0])
        last = len(ts) - 1
        if self.config.truncation and len(ts) > 1:
            last = int(torch.randint(0, len(ts), (1,), generator=self.shared_rng))
        name, b = self.expert_names[phase], self.boundary(phase)
        expert = self.unwrap(name)
        with torch.no_grad():
            for i in range(last):
                x = ddim_step(self.schedule, expert(x, ts[i], cond), ts[i + 1])
        module = self.trainables[name].module if grad else expert
        with torch.set_grad_enabled(grad):
            out = module(x, ts[last], cond)
            x_b = ddim_step(self.schedule, out, b)
        return x_b, out.x0.detach(), b

    # ----------------------------------------------------------------------------------------------
    def training_step(self, step: int) -> dict[str, torch.Tensor]:
        """One iteration of the current phase: (maybe) an expert step, then a fake-score step."""
        cfg = self.config
        phase = self.phase_of(step)
        if phase != self.phase:
            self.enter_phase(phase)
        name, b, high = self.expert_names[phase], self.boundary(phase), self.renoise_high(phase)
        metrics: dict[str, list[torch.Tensor]] = {}

        def add(parts: dict[str, torch.Tensor]) -> None:
            for k, v in parts.items():
                metrics.setdefault(k, []).append(v.float().cpu())

        gen_turn = self.should_update(name, step)
        samples = []
        for micro in range(cfg.gradient_accumulation_steps):
            cond, _ = self.data.sample(cfg.train_batch_size, self.rng)
            if gen_turn:
                with self.sync_context(name, micro):
                    x_b, x0_ref, _ = self.phase_samples(cond, phase, grad=True)
                    dm = self.dm_loss(x_b, x0_ref, b, cond.to(x_b.device), self.teacher, self.critic.denoiser,
                                      high=high, generator=self.rng)
                    loss = cfg.dm_loss_weight * dm.loss.mean()
                    self.backward(loss, name)
                add({"loss/dm": dm.loss.mean().detach(),
                     "dm/x0_gap": (dm.real.x0 - dm.fake.x0).abs().mean().detach()})
            else:
                x_b, _, _ = self.phase_samples(cond, phase, grad=False)
            samples.append((x_b.detach(), cond))
        if gen_turn:
            add({"grad_norm/generator": self.optimizer_step_norm(name)})
        self.zero_grad()
        for micro, (x_b, cond) in enumerate(samples):
            with self.sync_context("critic", micro):
                batch = self.fake_score_loss.noise(x_b.float(), b, high=high, generator=self.rng)
                device = x_b.device
                _, _, model_output, _ = self.trainables["critic"].module(batch.x_t, batch.t.to(device),
                                                                         cond.to(device))
                loss = self.fake_score_loss(model_output, batch).mean()
                self.backward(loss, "critic")
            add({"loss/fake_score": loss.detach()})
        add({"grad_norm/critic": self.optimizer_step_norm("critic"),
             "phase": torch.tensor(float(phase))})
        self.zero_grad()
        return {k: torch.stack(v).mean() for k, v in metrics.items()}

    # ----------------------------------------------------------------------------------------------
    # outputs
    @torch.no_grad()
    def sample_student_images(self, cond: Conditioning, seeds: Sequence[int]) -> torch.Tensor:
        """Samples of the phased experts (the current expert's EMA weights if kept), one generator per image."""
        from contextlib import ExitStack

        from ..sampling import initial_noise, make_generators

        device = self.accelerator.device
        gens = make_generators(seeds)
        dens = self.denoisers()
        with ExitStack() as stack:
            for name in self.expert_names:
                if not self.trainables[name].frozen:
                    stack.enter_context(self.ema_weights(name))
            for d in dens.values():
                d.eval()
            z = initial_noise((len(seeds), *self.sample_shape), gens)
            out = run_step_plan(self.plan, dens, z.to(device), cond.to(device), gens)
        for d in dens.values():
            d.train()
        return out.float().cpu()

    def sample_grid(self, path: Path) -> None:
        """Row 1: the experts' samples; then the teacher's and the fake score's x0 predictions from them."""
        cond = self.data.grid_conditioning(self.config.sample_grid_size)
        x = self.sample_student_images(cond, range(self.config.sample_grid_size))
        scores = [(self.teacher, self.guidance_scale), (self.unwrap("critic").denoiser, None)]
        self.write_grid([x, *self.score_rows(x, cond, scores)], path)

    def expert_networks(self) -> dict[str, nn.Module | None]:
        """Standalone fp32 copies of every expert (EMA weights when kept; adapters merged)."""
        return {name: self.standalone_network(name) for name in self.expert_names}

    def student_metadata(self) -> dict:
        """What the exported experts folder records about its training."""
        cfg = self.config
        return {"method": "phased_dmd", "timesteps": self.student_timesteps, "phases": self.phases,
                "phase_steps": cfg.phase_steps, "real_guidance_scale": self.guidance_scale,
                "teacher": str(cfg.teacher), "ema": bool(cfg.use_ema), "global_step": self.global_step}

    def export(self, folder: Path) -> Path:
        """Write the experts as one :class:`~stepdistill.pipelines.PhasedExpertsPipeline` folder."""
        from ..pipelines.pipeline_phased import save_phased_experts

        networks = self.expert_networks()
        if any(n is None for n in networks.values()):
            return folder
        return save_phased_experts(folder, networks, self.phases, self.schedule, self.teacher_spec,
                                   self.student_metadata(), self.null_class_label)

    def student_network(self) -> nn.Module | None:
        """Not one network: see :meth:`expert_networks`."""
        raise NotImplementedError("A Phased DMD student is several experts: use expert_networks() or export().")


__all__ = ["PhasedDMDConfig", "PhasedDMDTrainer", "expert_name", "split_phases"]

"""``PhasedExpertsPipeline``: a few-step sampler whose steps are routed to per-phase experts (Phased DMD).

Fan et al., "Phased DMD", CVPR 2026, Sec. 4.4: the expert of phase ``k`` handles the steps of phase ``k``; every
phase but the last ends at its boundary (the next phase's first timestep), reached by a deterministic DDIM /
Euler move. The pipeline runs that :class:`~stepdistill.StepPlan` (:func:`~stepdistill.trainers.phased_dmd.
phased_plan` form) with :func:`~stepdistill.run_step_plan`.

One folder holds every expert as its own network (``unet`` for phase 0, ``expert_1`` .. ``expert_3``), the
scheduler (its config gives the noise schedule), ``model_index.json`` and a manifest ``phased_experts.json``
(expert count, phases, boundaries) that :meth:`PhasedExpertsPipeline.from_pretrained` checks against the folder.

What needs stepdistill: the routing itself. A stock diffusers pipeline has one network, so the experts cannot be
sampled as one stock pipeline; each merged expert is an ordinary network folder that diffusers' ``from_pretrained``
of its model class loads (``UNet2DModel.from_pretrained(folder, subfolder="expert_1")``), and a stock pipeline
built on one expert samples only that expert's phase correctly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..denoiser import Denoiser
from ..sampling import PlanSegment, StepPlan
from .mixin import StepDistillPipelineMixin

#: Experts one folder can hold (Phased DMD uses 2 to 4 phases).
MAX_EXPERTS = 4
MANIFEST = "phased_experts.json"


def expert_component(k: int) -> str:
    """Pipeline component name of phase ``k``'s expert: ``unet`` (it sees the noise), then ``expert_k``."""
    return "unet" if k == 0 else f"expert_{k}"


def phases_plan(phases: Sequence[Sequence[float]], names: Sequence[str] | None = None) -> StepPlan:
    """One ODE segment per phase, each handed the previous phase's DDIM / Euler move to its first timestep.

    Args:
        phases: The timesteps of each phase, noisiest first.
        names: Segment (network) names; default :func:`expert_component`.
    """
    names = list(names) if names is not None else [expert_component(k) for k in range(len(phases))]
    return StepPlan(tuple(
        PlanSegment(names[k], tuple(ts), sampler="ode", handover="noise" if k == 0 else "transport")
        for k, ts in enumerate(phases)
    ))


def boundaries_of(phases: Sequence[Sequence[float]]) -> list[float]:
    """The phase boundaries: each later phase's first timestep."""
    return [float(ts[0]) for ts in phases[1:]]


@dataclass
class PhasedExpertsPipelineOutput(BaseOutput):
    """Output of :class:`PhasedExpertsPipeline`.

    Args:
        images: PIL images, a ``[B, H, W, C]`` array (``"np"``), a ``[B, C, H, W]`` tensor (``"pt"``) or the raw x0
            latents (``"latent"``).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class PhasedExpertsPipeline(DiffusionPipeline, StepDistillPipelineMixin):
    r"""Few-step sampling with one expert network per phase (Phased DMD students).

    Args:
        unet: Phase 0's expert (fed the starting noise).
        scheduler: A diffusers scheduler whose config gives the noise schedule (sampling is always the
            deterministic DDIM / Euler move of the plan, whatever its class).
        expert_1: Phase 1's expert; ``expert_2`` and ``expert_3`` likewise (``None`` beyond the phase count).
        expert_2: Phase 2's expert.
        expert_3: Phase 3's expert.
        vae: Optional autoencoder of latent models.
        text_encoder: Optional CLIP-style text encoder.
        tokenizer: Its tokenizer.
        null_class_label: The null class of class-conditional experts.
        phases: The trained timesteps of each phase, e.g. ``[[999, 749], [499, 249]]``.

    Example:
        >>> pipe = PhasedExpertsPipeline.from_pretrained("runs/digits_phased_dmd_4step/student")
        >>> images = pipe(class_labels=[3, 7], generator=make_generators([0, 1]), output_type="pt").images
    """

    model_cpu_offload_seq = "text_encoder->unet->expert_1->expert_2->expert_3->vae"
    _optional_components = ["expert_1", "expert_2", "expert_3", "vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        unet: nn.Module,
        scheduler: SchedulerMixin,
        expert_1: nn.Module | None = None,
        expert_2: nn.Module | None = None,
        expert_3: nn.Module | None = None,
        vae: ModelMixin | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any | None = None,
        null_class_label: int | None = None,
        phases: Optional[list[list[float]]] = None,  # noqa: UP045 (diffusers type-checks typing forms)
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, expert_1=expert_1, expert_2=expert_2,
                              expert_3=expert_3, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        phases = [[float(t) for t in ts] for ts in (phases or [])]
        self.register_to_config(null_class_label=None if null_class_label is None else int(null_class_label),
                                phases=phases)
        self._check_experts()

    # ------------------------------------------------------------------------------------------------
    @property
    def guidance_scale(self) -> float:
        """Always 1: guidance is distilled into the experts."""
        return 1.0

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Always ``False``."""
        return False

    @property
    def experts(self) -> list[nn.Module]:
        """The expert networks present, in phase order."""
        out = []
        for k in range(MAX_EXPERTS):
            net = getattr(self, expert_component(k), None)
            if net is None:
                break
            out.append(net)
        return out

    def _check_experts(self) -> None:
        phases = self.config.phases
        if not phases:
            raise ValueError("PhasedExpertsPipeline needs phases=[[t, ...], ...] (the timesteps of each phase).")
        if len(phases) > MAX_EXPERTS:
            raise ValueError(f"{len(phases)} phases: a PhasedExpertsPipeline holds at most {MAX_EXPERTS} experts.")
        if len(self.experts) != len(phases):
            raise ValueError(f"{len(phases)} phases {phases} but {len(self.experts)} experts: give one expert per "
                             "phase (unet, expert_1, ...).")
        flat = [t for ts in phases for t in ts]
        if any(not ts for ts in phases):
            raise ValueError(f"A phase with no step in {phases}: every phase needs at least one timestep.")
        self.schedule.validate_timesteps(flat)

    @property
    def plan(self) -> StepPlan:
        """The sampling plan: each phase's steps on its expert."""
        return phases_plan(self.config.phases)

    def manifest(self) -> dict[str, Any]:
        """The facts the folder's manifest records (and :meth:`from_pretrained` checks)."""
        return {"format": "stepdistill.phased_experts/1", "num_experts": len(self.experts),
                "phases": [list(map(float, ts)) for ts in self.config.phases],
                "boundaries": boundaries_of(self.config.phases),
                "components": [expert_component(k) for k in range(len(self.experts))]}

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Save as diffusers does, plus the manifest ``phased_experts.json``."""
        super().save_pretrained(save_directory, **kwargs)
        (Path(save_directory) / MANIFEST).write_text(json.dumps(self.manifest(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> PhasedExpertsPipeline:
        """Load a folder written by :meth:`save_pretrained` and check it against its manifest.

        Raises:
            ValueError: no manifest, or an expert count / phases / boundaries that disagree with it.
        """
        folder = Path(pretrained_model_name_or_path)
        manifest_file = folder / MANIFEST
        if not manifest_file.is_file():
            raise ValueError(f"{str(folder)!r} has no {MANIFEST}: it was not saved by PhasedExpertsPipeline "
                             "(re-export it with PhasedExpertsPipeline.save_pretrained).")
        manifest = json.loads(manifest_file.read_text())
        pipe = super().from_pretrained(folder, **kwargs)
        found = pipe.manifest()
        for key in ("num_experts", "phases", "boundaries"):
            if manifest.get(key) != found[key]:
                raise ValueError(f"{str(folder)!r}: {key} {found[key]} of the folder disagrees with its manifest's "
                                 f"{manifest.get(key)}; the folder was edited or mixed: re-export it.")
        return pipe

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        batch_size: int | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> PhasedExpertsPipelineOutput | tuple:
        r"""Generate images: each step on its phase's expert, no guidance (distilled in).

        Args:
            class_labels: Class label(s) of class-conditional experts.
            prompt: Prompt(s) of text-conditional experts (needs ``text_encoder`` and ``tokenizer``).
            prompt_embeds: Precomputed ``encoder_hidden_states`` instead of ``prompt``.
            num_images_per_prompt: Images per label / prompt.
            batch_size: Images of an unconditional model.
            height: Image height in pixels.
            width: Image width in pixels.
            generator: One ``torch.Generator``, or one per image.
            latents: Starting noise instead of drawing it.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: Return a :class:`PhasedExpertsPipelineOutput` instead of a tuple.
        """
        # 0. No guidance; one denoiser per expert on the shared schedule
        self._cross_attention_kwargs = None
        schedule = self.schedule
        denoisers: Mapping[str, Denoiser] = {expert_component(k): self.denoiser_of(net, schedule)
                                             for k, net in enumerate(self.experts)}
        # 1-3. Check inputs, encode the conditioning, starting latents (the phase-0 expert sees them)
        cond, x_T = self._prepare_call(
            denoisers["unet"], class_labels, prompt, prompt_embeds, None, None, None, None, num_images_per_prompt,
            batch_size, height, width, generator, latents, output_type, ("latents",),
        )  # fmt: skip
        # 4. Sample: per-step routing by the plan
        x0 = self._sample(self.plan, denoisers, x_T, cond, generator, None, ("latents",))
        # 5. Decode, post-process
        images = self._finish(x0, output_type)
        if not return_dict:
            return (images,)
        return PhasedExpertsPipelineOutput(images=images)


def save_phased_experts(
    folder: str | Path,
    networks: Mapping[str, nn.Module],
    phases: Sequence[Sequence[float]],
    schedule: Any,
    teacher_spec: str | Path | None = None,
    metadata: Mapping[str, Any] | None = None,
    null_class_label: int | None = None,
) -> Path:
    """Write standalone expert networks (phase order) as one :class:`PhasedExpertsPipeline` folder, atomically.

    Args:
        folder: Output folder (replaced atomically).
        networks: The experts, in phase order (names are ignored).
        phases: The timesteps of each phase.
        schedule: The teacher's :class:`~stepdistill.schedules.NoiseSchedule` (its scheduler config is saved).
        teacher_spec: The teacher folder, recorded in the metadata.
        metadata: JSON-able facts about the training (``stepdistill_student.json``).
        null_class_label: The null class of class-conditional experts.
    """
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from ..trainers.outputs import STUDENT_METADATA
    from ..utils import atomic_write_dir

    config = dict(schedule.config().get("scheduler_config", {}))
    scheduler_cls = FlowMatchEulerDiscreteScheduler if schedule.family == "flow" else DDIMScheduler
    config.pop("_class_name", None)
    scheduler = scheduler_cls.from_config(config)
    nets = list(networks.values())
    components = {expert_component(k): net for k, net in enumerate(nets)}
    pipe = PhasedExpertsPipeline(scheduler=scheduler, null_class_label=null_class_label,
                                 phases=[list(ts) for ts in phases], **components)
    meta = {**dict(metadata or {}), "teacher": None if teacher_spec is None else str(teacher_spec)}

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp)
        (tmp / STUDENT_METADATA).write_text(json.dumps(meta, indent=2) + "\n")

    return atomic_write_dir(folder, write)


__all__ = [
    "MANIFEST",
    "MAX_EXPERTS",
    "PhasedExpertsPipeline",
    "PhasedExpertsPipelineOutput",
    "boundaries_of",
    "expert_component",
    "phases_plan",
    "save_phased_experts",
]

"""Inference artifacts, diffusers-style: :class:`StepDistillPipeline` and the export to stock diffusers pipelines.

Every pipeline here is a ``DiffusionPipeline`` with :class:`StepDistillPipelineMixin` (checks, conditioning, latents,
decoding) whose ``__call__`` runs a :class:`~stepdistill.StepPlan`.

Importing this package also makes ``diffusers.DiffusionPipeline.from_pretrained(folder)`` able to load
folders saved by :class:`StepDistillPipeline` (see :func:`register_with_diffusers`).
"""

from .export import (
    ExportResult,
    export_stable_diffusion,
    export_stable_diffusion_3,
    export_stable_diffusion_xl,
    export_stepdistill_pipeline,
    export_student,
    flow_scheduler_for_student,
    lcm_original_inference_steps,
    lcm_scheduler_for_student,
    teacher_kind,
    write_model_card,
)
from .mixin import StepDistillPipelineMixin
from .pipeline_hybrid import HybridDiversityPipeline, HybridDiversityPipelineOutput, HybridPlan, sample_hybrid
from .pipeline_phased import PhasedExpertsPipeline, PhasedExpertsPipelineOutput, save_phased_experts
from .pipeline_stepdistill import (
    StepDistillPipeline,
    StepDistillPipelineOutput,
    is_student_scheduler,
)


def register_with_diffusers() -> None:
    """Expose :class:`StepDistillPipeline` (and :class:`HybridDiversityPipeline`) as attributes of ``diffusers``.

    ``DiffusionPipeline.from_pretrained(folder)`` resolves the ``_class_name`` of ``model_index.json`` as an
    attribute of the ``diffusers`` module (custom classes otherwise need ``custom_pipeline=`` and
    ``trust_remote_code=True``, i.e. code stored next to the weights). Registering the name once, at
    import time, lets stock diffusers load StepDistillPipeline folders whenever stepdistill is imported.
    ``StepDistillPipeline.from_pretrained(folder)`` works without it.
    """
    import diffusers

    for cls in (StepDistillPipeline, HybridDiversityPipeline, PhasedExpertsPipeline):
        if getattr(diffusers, cls.__name__, None) is None:
            setattr(diffusers, cls.__name__, cls)


register_with_diffusers()

__all__ = [
    "ExportResult",
    "HybridDiversityPipeline",
    "HybridDiversityPipelineOutput",
    "HybridPlan",
    "PhasedExpertsPipeline",
    "PhasedExpertsPipelineOutput",
    "StepDistillPipeline",
    "StepDistillPipelineMixin",
    "StepDistillPipelineOutput",
    "export_stable_diffusion",
    "export_stable_diffusion_3",
    "export_stable_diffusion_xl",
    "export_stepdistill_pipeline",
    "export_student",
    "flow_scheduler_for_student",
    "is_student_scheduler",
    "lcm_original_inference_steps",
    "lcm_scheduler_for_student",
    "register_with_diffusers",
    "sample_hybrid",
    "save_phased_experts",
    "teacher_kind",
    "write_model_card",
]

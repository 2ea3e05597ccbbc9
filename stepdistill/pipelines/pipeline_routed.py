"""``RoutedStudentsPipeline``: K one-step students, each condition routed to the student of its part (MSD).

Multi-student distillation (Song et al., ICML 2025) trains one student per part of the conditioning space; at
inference a batch is split by :meth:`ConditionPartition.route <stepdistill.data.partition.ConditionPartition.route>`,
each part runs through its own student (one network call per sample for one-step students), and the outputs go
back in input order. The starting noise is drawn for the whole batch first, with one generator per image, so
image ``k`` is the same at any batch size and in any batch order; each part's re-noising draws (few-step students)
come from its images' own generators.

The folder holds stock diffusers components only (``unet_0``..``unet_{K-1}``: each student's network, one
``scheduler``) plus the partition (``partition.json`` + ``partition.safetensors``), checked against the students
on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, SchedulerMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..data.partition import PARTITION_JSON, ConditionPartition, PartitionError
from ..sampling import StepPlan
from .mixin import StepDistillPipelineMixin, _plain_number

#: Student slots a routed pipeline has (``unet_0`` .. ``unet_7``).
MAX_STUDENTS = 8
STUDENT_SLOTS = tuple(f"unet_{k}" for k in range(MAX_STUDENTS))


@dataclass
class RoutedPipelineOutput(BaseOutput):
    """Output of :class:`RoutedStudentsPipeline`.

    Args:
        images: As :class:`~stepdistill.pipelines.StepDistillPipelineOutput` (PIL, ``np``, ``pt`` or latents).
        routes: ``[B]`` the student each image came from.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    routes: torch.Tensor


class RoutedStudentsPipeline(DiffusionPipeline, StepDistillPipelineMixin):
    r"""K students and the partition that routes each condition to one of them.

    Args:
        scheduler: The students' ``LCMScheduler`` (its config gives the noise schedule; one for all).
        unet_0: Student 0's network (any network :meth:`Denoiser.from_model <stepdistill.Denoiser.from_model>`
            wraps); ``unet_1`` .. ``unet_7`` the others (``None`` beyond ``K``).
        null_class_label: The null class of class-conditional students.
        default_timesteps: The students' trained timesteps (the same for all).
        teacher_identity: The teacher the students (and the partition) were made from; checked against the
            partition on load.
        default_guidance_scale: Kept at 1 (distilled students are sampled without guidance).

    Example:
        >>> pipe = RoutedStudentsPipeline.from_pretrained("runs/digits_msd4/student")
        >>> out = pipe(class_labels=[0, 5, 9], generator=make_generators([0, 1, 2]))
        >>> out.routes
        tensor([0, 2, 3])
    """

    _optional_components = list(STUDENT_SLOTS[1:])

    def __init__(
        self,
        scheduler: SchedulerMixin,
        unet_0: nn.Module,
        unet_1: Optional[nn.Module] = None,  # noqa: UP007, UP045 (diffusers type-checks typing.Optional only)
        unet_2: Optional[nn.Module] = None,  # noqa: UP007, UP045
        unet_3: Optional[nn.Module] = None,  # noqa: UP007, UP045
        unet_4: Optional[nn.Module] = None,  # noqa: UP007, UP045
        unet_5: Optional[nn.Module] = None,  # noqa: UP007, UP045
        unet_6: Optional[nn.Module] = None,  # noqa: UP007, UP045
        unet_7: Optional[nn.Module] = None,  # noqa: UP007, UP045
        null_class_label: Optional[int] = None,  # noqa: UP007, UP045
        default_timesteps: Optional[list[Union[int, float]]] = None,  # noqa: UP007, UP045
        teacher_identity: Optional[dict] = None,  # noqa: UP007, UP045
        default_guidance_scale: float = 1.0,
    ) -> None:
        super().__init__()
        nets = [unet_0, unet_1, unet_2, unet_3, unet_4, unet_5, unet_6, unet_7]
        k = sum(n is not None for n in nets)
        if any(n is None for n in nets[:k]):
            raise ValueError("Students must fill the slots unet_0 .. unet_{K-1} without gaps.")
        self.register_modules(scheduler=scheduler, **dict(zip(STUDENT_SLOTS, nets)))
        self.register_to_config(
            null_class_label=None if null_class_label is None else int(null_class_label),
            default_timesteps=None if default_timesteps is None else [_plain_number(t) for t in default_timesteps],
            teacher_identity=teacher_identity,
            default_guidance_scale=float(default_guidance_scale),
        )
        self.partition: ConditionPartition | None = None

    # the mixin's single-network helpers look at `unet`: student 0 stands for all (same latent space)
    @property
    def unet(self) -> nn.Module:
        """Student 0's network (the mixin reads shapes and class counts from it)."""
        return self.unet_0

    @property
    def num_students(self) -> int:
        """``K``: the filled slots."""
        return sum(getattr(self, s, None) is not None for s in STUDENT_SLOTS)

    @property
    def students(self) -> list[nn.Module]:
        """The K student networks, in part order."""
        return [getattr(self, s) for s in STUDENT_SLOTS[: self.num_students]]

    @property
    def vae(self) -> None:
        """No VAE: routed pipelines hold pixel-space (or latent-output) students."""
        return None

    @property
    def text_encoder(self) -> None:
        """No text encoder: text students take ``prompt_embeds``."""
        return None

    @property
    def tokenizer(self) -> None:
        """No tokenizer (see :attr:`text_encoder`)."""
        return None

    # ------------------------------------------------------------------------------------------------
    def set_partition(self, partition: ConditionPartition) -> None:
        """Attach the partition, checked against the students (:meth:`check_partition`)."""
        self.check_partition(partition)
        self.partition = partition

    def check_partition(self, partition: ConditionPartition) -> None:
        """Refuse a partition that does not fit these students: part count, class count, teacher identity."""
        if partition.num_parts != self.num_students:
            raise PartitionError(f"The partition has {partition.num_parts} parts but the pipeline holds "
                                 f"{self.num_students} students: use the partition the students were trained with.")
        if partition.is_class_partition:
            classes = self.num_class_labels(self.unet_0)
            if classes is not None and len(partition.assignment) != classes - 1:
                raise PartitionError(f"The partition covers {len(partition.assignment)} classes but the students "
                                     f"embed {classes - 1} (+ the null class): it was made for another teacher.")
        if self.config.teacher_identity:
            partition.check_identity({"teacher": self.config.teacher_identity}, "The partition")

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Save the students, the scheduler and the partition into one folder."""
        if self.partition is None:
            raise PartitionError("This pipeline has no partition: call set_partition(...) before saving.")
        super().save_pretrained(save_directory, **kwargs)
        self.partition.save(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> RoutedStudentsPipeline:
        """Load a folder written by :meth:`save_pretrained` (local folders only); the partition is checked."""
        folder = Path(pretrained_model_name_or_path)
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{str(folder)!r} has no model_index.json: pass the folder a routed MSD pipeline "
                                    "was saved to (<run>/student).")
        index = json.loads(index_path.read_text())
        missing = [s for s in STUDENT_SLOTS if isinstance(index.get(s), list) and index[s][0] is not None
                   and not (folder / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"Student folder(s) {missing} missing from {str(folder)!r}: copy the whole "
                                    "pipeline folder, or re-assemble it from the run (stepdistill train msd ... "
                                    "--assemble_only true).")
        if not (folder / PARTITION_JSON).is_file():
            raise PartitionError(f"{str(folder)!r} has no {PARTITION_JSON}: a routed pipeline cannot route without "
                                 "the partition its students were trained with.")
        pipe = super().from_pretrained(folder, **kwargs)
        pipe.set_partition(ConditionPartition.load(folder))
        return pipe

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        timesteps: list[float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> RoutedPipelineOutput | tuple:
        r"""Generate images, each through the student of its condition's part.

        Args:
            class_labels: Class label(s) (class partitions).
            prompt_embeds: ``[N, L, D]`` text embeddings (text partitions route on their pooled form).
            pooled_prompt_embeds: ``[N, D]`` pooled embeddings (SDXL / SD3-like students).
            num_images_per_prompt: Images per condition (adjacent in the output).
            timesteps: Student timesteps (default: ``default_timesteps``).
            generator: One generator per image (image ``k`` then does not depend on the batch size or order), or one.
            latents: Starting noise instead of drawing it.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: Return a :class:`RoutedPipelineOutput` instead of ``(images, routes)``.
        """
        if self.partition is None:  # loaded by DiffusionPipeline.from_pretrained: the partition is in the folder
            folder = Path(str(getattr(self.config, "_name_or_path", "") or "."))
            if not (folder / PARTITION_JSON).is_file():
                raise PartitionError("This pipeline has no partition: load it with RoutedStudentsPipeline."
                                     "from_pretrained(folder) or call set_partition(...).")
            self.set_partition(ConditionPartition.load(folder))
        self._guidance_scale, self._do_classifier_free_guidance, self._cross_attention_kwargs = 1.0, False, None
        dens = [self.denoiser_of(net, self.schedule) for net in self.students]
        ts = self._resolve_timesteps(None, timesteps, 1)
        plan = StepPlan.single("unet", ts, "renoise", None)

        # 1-3. Check inputs, conditioning and the whole batch's starting noise (per-image generators)
        cond, x_T = self._prepare_call(
            dens[0], class_labels, None, prompt_embeds, pooled_prompt_embeds, None, None, None,
            num_images_per_prompt, None, None, None, generator, latents, output_type, ("latents",),
        )  # fmt: skip

        # 4. Route, run each part through its student, put the outputs back in input order
        routes = self.partition.route(cond)
        x0 = torch.empty_like(x_T, dtype=torch.float32)
        gens = generator if isinstance(generator, list) else None
        for k, den in enumerate(dens):
            idx = (routes == k).nonzero().flatten()
            if len(idx) == 0:
                continue
            sub_gen = [gens[i] for i in idx.tolist()] if gens is not None else generator
            dev_idx = idx.to(x_T.device)
            x0[dev_idx] = self._sample(plan, {"unet": den}, x_T[dev_idx], cond.select(dev_idx), sub_gen, None,
                                       ("latents",)).float()

        # 5. Post-process
        images = self._finish(x0, output_type)
        if not return_dict:
            return images, routes
        return RoutedPipelineOutput(images=images, routes=routes)


__all__ = ["MAX_STUDENTS", "RoutedPipelineOutput", "RoutedStudentsPipeline"]

"""What a trainer hands out: the exported student folder, pixels for sample grids, in-training digits metrics.

Plain functions shared by every method (the base trainer calls them); no Accelerate in here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..conditioning import Conditioning
from ..loading import resolve_model_folder
from ..schedules import NoiseSchedule
from ..utils import atomic_write_dir

#: File with how the exported student was trained (timesteps, method, teacher, ...).
STUDENT_METADATA = "stepdistill_student.json"


def export_student_folder(
    network: nn.Module,
    folder: str | Path,
    timesteps: Sequence[float],
    metadata: Mapping[str, Any],
    teacher_spec: str | Path | None,
    schedule: NoiseSchedule,
    null_class_label: int | None = None,
) -> Path:
    """Write a student network as a pipeline folder with an ``LCMScheduler`` holding its timesteps, atomically.

    SD-family teachers with a VAE become stock diffusers pipelines (:func:`stepdistill.pipelines.export_student`);
    other diffusers networks a :class:`~stepdistill.pipelines.StepDistillPipeline` folder; a custom torch module
    its weights (``student.safetensors``). ``stepdistill_student.json`` records ``metadata`` in every case.

    Args:
        network: The standalone student network.
        folder: Output folder (replaced atomically).
        timesteps: The student's trained timesteps.
        metadata: JSON-able facts about the training.
        teacher_spec: The teacher folder (``None`` for a teacher passed as a module).
        schedule: The teacher's schedule (its scheduler config when there is no folder).
        null_class_label: The null class of class-conditional students.
    """
    from diffusers import LCMScheduler, ModelMixin

    from ..pipelines import export_stepdistill_pipeline, export_student, teacher_kind
    from .teacher import teacher_root

    meta_text = json.dumps(dict(metadata), indent=2) + "\n"
    if not isinstance(network, ModelMixin):  # a custom torch module: weights + metadata, no pipeline
        from safetensors.torch import save_file

        def write_custom(tmp: Path) -> None:
            tmp.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in network.state_dict().items()}, tmp / "student.safetensors")
            (tmp / STUDENT_METADATA).write_text(meta_text)

        return atomic_write_dir(folder, write_custom)
    root = teacher_root(teacher_spec)
    if root is not None:
        _, sched_folder = resolve_model_folder(teacher_spec)
        scheduler_config = dict(LCMScheduler.load_config(sched_folder))
    else:
        scheduler_config = dict(schedule.config().get("scheduler_config", {}))
        scheduler_config["_class_name"] = "LCMScheduler"
    # SD-family teachers with their VAE and text encoders become stock diffusers pipelines.
    stock = teacher_kind(network) != "stepdistill" and root is not None and (root / "vae").is_dir()

    def write(tmp: Path) -> None:
        if stock:  # the model card names the final folder, not the temporary one
            export_student(network, root, list(timesteps), tmp, card_path=folder)
        else:  # any network (also SD-family ones without a VAE folder) as a StepDistillPipeline
            export_stepdistill_pipeline(network, scheduler_config, list(timesteps), tmp,
                                        null_class_label=null_class_label, card_path=folder)
        (tmp / STUDENT_METADATA).write_text(meta_text)

    return atomic_write_dir(folder, write)


class GridDecoder:
    """``[-1, 1]`` pixels for sample grids: pixel teachers as they are, latent teachers through their VAE.

    Args:
        teacher_spec: The teacher folder (its ``vae/`` decodes latents).
        device: Where the VAE runs.
        vae: A VAE already loaded (e.g. by the data source) to reuse.
    """

    def __init__(self, teacher_spec: str | Path | None, device: torch.device | str, vae: nn.Module | None = None):
        self.teacher_spec, self.device, self._vae = teacher_spec, device, vae

    def _load_vae(self) -> nn.Module | None:
        from .teacher import teacher_root

        if self._vae is None:
            root = teacher_root(self.teacher_spec)
            if root is None or not (root / "vae" / "config.json").is_file():
                return None
            from diffusers import AutoencoderKL

            self._vae = AutoencoderKL.from_pretrained(root / "vae").eval().to(self.device)
        return self._vae

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """Pixels for ``x``, or ``None`` for latents without a VAE to decode them."""
        if x.shape[1] in (1, 3):
            return x
        vae = self._load_vae()
        if vae is None:
            return None
        dev = next(vae.parameters()).device
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        out = [vae.decode(chunk.to(dev, vae.dtype) / vae.config.scaling_factor + shift).sample.float().cpu()
               for chunk in x.split(8)]
        return torch.cat(out).clamp(-1, 1)


class DigitsEvaluator:
    """In-training digits metrics of a sampler: class accuracy and FID (digits-classifier features).

    ``n`` samples with labels in the held-out split's class mix and seeds ``10_000 + i``; FID against the
    held-out split (only when ``n`` exceeds the feature dimension).

    Args:
        num_samples: Samples per evaluation.
        null_class_label: The teacher's null class.
    """

    def __init__(self, num_samples: int, null_class_label: int | None) -> None:
        self.num_samples, self.null_class_label = num_samples, null_class_label
        self._heldout_features = None

    def __call__(self, sample: Callable[[Conditioning, Sequence[int]], torch.Tensor]) -> dict[str, float]:
        """Metrics of ``sample(cond, seeds) -> images [-1, 1]``; empty when the classifier is not installed."""
        from ..data.digits import class_labels_like_reference, load_digits_split
        from ..data.digits_models import DigitsClassifier, classifier_path

        if not (classifier_path() / "config.json").is_file():
            return {}
        n = self.num_samples
        labels = class_labels_like_reference(n)
        cond = Conditioning(class_labels=labels, null_class_label=self.null_class_label)
        x = sample(cond, range(10_000, 10_000 + n))
        clf = DigitsClassifier.from_pretrained(classifier_path()).eval()
        with torch.no_grad():
            out = {"eval/class_accuracy": float((clf(x).argmax(-1) == labels).float().mean())}
        from ..evaluation import DigitsClassifierFeatures, fid_from_features

        extractor = DigitsClassifierFeatures(clf, path=classifier_path())
        if n <= extractor.dim:  # FID undefined: the covariance of n samples has rank < n
            return out
        if self._heldout_features is None:
            self._heldout_features = extractor(load_digits_split("heldout").images)
        out["eval/fid"] = float(fid_from_features(extractor(x), self._heldout_features))
        return out


__all__ = ["STUDENT_METADATA", "DigitsEvaluator", "GridDecoder", "export_student_folder"]

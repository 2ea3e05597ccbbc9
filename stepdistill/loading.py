"""Load teachers and students from local diffusers folders (never from a hub), with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .denoiser import Denoiser
from .schedules import NoiseSchedule

#: Sub-folders in which a pipeline folder keeps its denoising network, in lookup order.
DENOISER_SUBFOLDERS = ("unet", "transformer", "prior")

_MODEL_CLASSES = {
    "UNet2DModel",
    "UNet2DConditionModel",
    "SD3Transformer2DModel",
    "Transformer2DModel",
    "DiTTransformer2DModel",
}


#: Names that stand for a shipped model folder wherever a teacher or pipeline folder is expected, so that a
#: pip-installed package can be used without knowing its site-packages path (``--teacher digits``).
MODEL_ALIASES = {
    "digits": "the digits teacher shipped in the package (stepdistill/assets/digits/teacher)",
    "digits-flow": "the rectified-flow digits teacher shipped in the package (stepdistill/assets/digits/teacher_flow)",
    "digits-text": "the text-conditioned digits teacher shipped in the package, a stock StableDiffusionPipeline "
                   "folder (stepdistill/assets/digits/text_teacher)",
}


class ModelFolderError(ValueError):
    """A path that should hold a diffusers model or pipeline does not."""


def model_folder(path: str | Path) -> Path:
    """The folder that ``path`` names: a :data:`MODEL_ALIASES` name is its shipped folder, anything else the path.

    The alias wins over a local folder of the same name; write ``./digits`` for that one.

    Example:
        >>> model_folder("digits") == teacher_path()
        True
    """
    if str(path) in MODEL_ALIASES:
        from .data.digits_models import teacher_path, text_teacher_path

        if str(path) == "digits-text":
            return text_teacher_path()
        return teacher_path("vp" if str(path) == "digits" else "flow")
    return Path(path).expanduser()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path} is not valid JSON ({err}); the folder looks damaged.") from err


def resolve_model_folder(path: str | Path) -> tuple[Path, Path | None]:
    """Find ``(network folder, scheduler folder or None)`` inside a pipeline or model folder.

    Accepts a pipeline folder (``model_index.json`` with ``unet/`` or ``transformer/``), or a model
    folder (``config.json``) optionally next to a ``scheduler/`` folder, or a :data:`MODEL_ALIASES` name.

    Raises:
        ModelFolderError: when the path is missing or holds no diffusers model.
    """
    root = model_folder(path)
    if not root.exists():
        raise ModelFolderError(
            f"Model folder {str(root)!r} does not exist. stepdistill loads models from local folders only "
            "(no hub downloads): pass the path of a diffusers pipeline or model folder."
        )
    if not root.is_dir():
        raise ModelFolderError(f"{str(root)!r} is a file; pass the diffusers folder that contains it.")
    if (root / "model_index.json").is_file():
        for sub in DENOISER_SUBFOLDERS:
            if (root / sub / "config.json").is_file():
                sched = root / "scheduler"
                return root / sub, sched if (sched / "scheduler_config.json").is_file() else None
        raise ModelFolderError(
            f"{str(root)!r} is a pipeline folder but has none of {list(DENOISER_SUBFOLDERS)} with a config.json."
        )
    if (root / "config.json").is_file():
        sched = root.parent / "scheduler"
        return root, sched if (sched / "scheduler_config.json").is_file() else None
    raise ModelFolderError(
        f"{str(root)!r} is not a diffusers folder: it has neither model_index.json (pipeline) nor config.json "
        "(model). Save models with `save_pretrained(folder)`."
    )


#: Libraries whose classes a pipeline folder's ``model_index.json`` may name (and diffusers' pipeline sub-packages,
#: e.g. ``["stable_diffusion", "StableDiffusionSafetyChecker"]``).
COMPONENT_LIBRARIES = ("diffusers", "transformers")


def component_class(folder: str | Path, name: str, spec: object) -> type | None:
    """The class component ``name`` of a pipeline folder names, if it is diffusers' or transformers' own.

    ``spec`` is the ``[library, class]`` entry of ``model_index.json``; ``[null, null]`` (an absent component)
    gives ``None``. Nothing is imported that the file names: only attributes of the already-known libraries.

    Raises:
        ModelFolderError: naming the component, for any other library or class.
    """
    import diffusers
    import transformers

    if not (isinstance(spec, (list, tuple)) and len(spec) == 2):
        raise ModelFolderError(
            f"{str(folder)!r}: component {name!r} in model_index.json is {spec!r}, not [library, class]."
        )
    library, class_name = spec
    if library is None and class_name is None:
        return None
    module = {"diffusers": diffusers, "transformers": transformers}.get(str(library))
    if module is None and isinstance(library, str) and library.isidentifier() and not library.startswith("_"):
        module = getattr(diffusers.pipelines, library, None)  # a diffusers pipeline sub-package (lazy, diffusers' own)
    cls = None
    if module is not None and isinstance(class_name, str) and not class_name.startswith("_"):
        cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise ModelFolderError(
            f"{str(folder)!r}: component {name!r} is {library}.{class_name}, which is not a class of "
            f"{' / '.join(COMPONENT_LIBRARIES)}; stepdistill loads no other code named by a file (for a pipeline "
            "with custom components, load it yourself with code you trust and pass the object)."
        )
    return cls


def check_pipeline_index(folder: str | Path) -> dict:
    """Read a pipeline folder's ``model_index.json`` and refuse any class it names outside diffusers / transformers.

    The pipeline class (``_class_name``) must be a diffusers pipeline or one of stepdistill's own; every component
    a diffusers / transformers class (:func:`component_class`).

    Returns:
        The parsed ``model_index.json``.

    Raises:
        ModelFolderError: for a missing or damaged file, or a class from anywhere else (the error names it).
    """
    import diffusers

    from . import pipelines as own

    root = model_folder(folder)
    path = root / "model_index.json"
    if not path.is_file():
        raise ModelFolderError(f"{str(root)!r} is not a diffusers pipeline folder (no model_index.json).")
    index = _read_json(path)
    if not isinstance(index, dict):
        raise ModelFolderError(f"{path} is not a JSON object; the folder looks damaged.")
    name = index.get("_class_name")
    cls = getattr(own, name, None) if isinstance(name, str) and not name.startswith("_") else None
    if cls is None and isinstance(name, str) and not name.startswith("_"):
        cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ModelFolderError(
            f"{path}: _class_name {name!r} is not a diffusers or stepdistill pipeline class; stepdistill loads no "
            "other code named by a file (custom pipelines need code you trust: load it yourself)."
        )
    for key, value in index.items():  # components are [library, class] pairs; other lists are config values
        pair = isinstance(value, (list, tuple)) and len(value) == 2
        if not key.startswith("_") and pair and all(v is None or isinstance(v, str) for v in value):
            component_class(root, key, value)
    return index


def pipeline_class(index: dict) -> type:
    """The pipeline class a checked ``model_index.json`` (:func:`check_pipeline_index`) names."""
    import diffusers

    from . import pipelines as own

    return getattr(own, index["_class_name"], None) or getattr(diffusers, index["_class_name"])


def damaged_folder_error(folder: str | Path, err: BaseException) -> ModelFolderError:
    """A one-line :class:`ModelFolderError` for a folder whose files fail to load (truncated / half-written)."""
    reason = " ".join(str(err).split()) or type(err).__name__
    return ModelFolderError(
        f"Cannot load {str(folder)!r}: {reason} The folder looks incomplete or damaged (an interrupted copy or "
        "export?): write it again, or point to a complete folder."
    )


#: What diffusers / safetensors raise for a folder with missing, truncated or corrupt files.
LOAD_ERRORS = (OSError, ValueError, EOFError)


def load_pipeline_folder(path: str | Path, cls: type | None = None, **kwargs) -> object:
    """Load a local pipeline folder after :func:`check_pipeline_index` (no hub, no code named by a file).

    Args:
        path: The folder (or a :data:`MODEL_ALIASES` name).
        cls: Pipeline class to load with (default: the one ``model_index.json`` names).
        **kwargs: More ``from_pretrained`` arguments (``torch_dtype``, replacement components, ...).

    Raises:
        ModelFolderError: for a folder that is not a pipeline, names foreign classes, or is damaged.
    """
    from safetensors import SafetensorError

    root = model_folder(path)
    index = check_pipeline_index(root)
    cls = cls or pipeline_class(index)
    try:
        return cls.from_pretrained(str(root), local_files_only=True, **kwargs)
    except (*LOAD_ERRORS, SafetensorError) as err:
        raise damaged_folder_error(root, err) from err


def load_network(folder: str | Path, torch_dtype: torch.dtype | None = None):
    """Load the diffusers model saved in ``folder`` (its class is read from ``config.json``)."""
    import diffusers
    from safetensors import SafetensorError

    folder = Path(folder)
    config = _read_json(folder / "config.json")
    class_name = config.get("_class_name")
    if class_name is None:
        raise ModelFolderError(
            f"{str(folder)!r} has a config.json without `_class_name`: it is not a diffusers model folder "
            "(a transformers model, or a hand-written config?). Save the network with `save_pretrained(folder)`."
        )
    if class_name not in _MODEL_CLASSES or not hasattr(diffusers, class_name):
        raise ModelFolderError(
            f"{str(folder)!r} holds a {class_name!r}, which is not a denoising network stepdistill can wrap "
            f"(supported: {sorted(_MODEL_CLASSES)}). For a custom module, build it yourself and use "
            "Denoiser.from_model(module, schedule)."
        )
    cls = getattr(diffusers, class_name)
    try:
        return cls.from_pretrained(folder, torch_dtype=torch_dtype)
    except (*LOAD_ERRORS, SafetensorError) as err:
        raise damaged_folder_error(folder, err) from err


def load_schedule(folder: str | Path, prediction_type: str | None = None) -> NoiseSchedule:
    """Build the :class:`NoiseSchedule` of a diffusers ``scheduler/`` folder."""
    path = Path(folder) / "scheduler_config.json"
    if not path.is_file():
        raise ModelFolderError(f"No scheduler_config.json in {str(folder)!r}.")
    return NoiseSchedule.from_scheduler_config(_read_json(path), prediction_type=prediction_type)


def load_denoiser(
    path: str | Path,
    prediction_type: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Denoiser:
    """Load a teacher or student from a local folder and wrap it as a :class:`Denoiser`.

    Args:
        path: A diffusers pipeline folder (``model_index.json``) or model folder (``config.json``).
        prediction_type: Override the scheduler's prediction type.
        torch_dtype: dtype to load the weights in (e.g. ``torch.bfloat16`` for frozen teachers).
        device: Device to move the network to.

    Example:
        >>> teacher = load_denoiser(teacher_path())
        >>> teacher.schedule.prediction_type
        'v_prediction'
    """
    net_folder, sched_folder = resolve_model_folder(path)
    if sched_folder is None:
        raise ModelFolderError(
            f"Found a network in {str(net_folder)!r} but no scheduler/ folder beside it: stepdistill needs the "
            "teacher's scheduler config to know its noise schedule and prediction type."
        )
    model = load_network(net_folder, torch_dtype=torch_dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return Denoiser.from_model(model, load_schedule(sched_folder, prediction_type=prediction_type))


def teacher_guidance_scale(folder: str | Path | None) -> float | None:
    """The ``guidance_scale`` a stepdistill teacher folder recommends (``stepdistill_teacher.json``), else ``None``.

    The trainers use it as the default real-score CFG, the pair generator as the teacher ODE's CFG, and the
    hybrid pipeline as the base's CFG, so the three always agree.
    """
    if folder is None or not str(folder):
        return None
    meta = model_folder(folder) / "stepdistill_teacher.json"
    if not meta.is_file():
        return None
    value = _read_json(meta).get("guidance_scale")
    return None if value is None else float(value)

"""Checkpoint files of the trainers: each trainable model written once, as diffusers folders where it can be.

Accelerate's ``save_state`` writes optimizers, LR schedules, EMAs and RNG states; the models themselves go
through a save / load hook (as diffusers' training examples do) into :func:`save_module_weights`:

* every diffusers ``ModelMixin`` inside a trainable module is written with ``save_pretrained`` into a
  sub-folder named by its module path (``generator/model/``, ``critic/denoiser/model/``): a diffusers folder
  that ``from_pretrained`` / ``--init_generator`` can read;
* every other tensor of the module's ``state_dict`` (a GAN head, LoRA adapter weights of a shared-base
  role, a custom module) goes into ``extra.safetensors``;
* the trainable's EMA weights, when it keeps an EMA, the same way into ``<name>/ema/`` (``generator/ema/model/``).

A shared-base LoRA role's ``state_dict`` holds only its adapter weights, so a LoRA checkpoint holds adapters,
never merged copies of the base network. Loading reads the same files back into the existing module
(safetensors only; nothing is unpickled and no class named in a file is built).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

#: Name of the folder prefix of complete checkpoints (``checkpoint-000500``).
CHECKPOINT_PREFIX = "checkpoint-"
#: The trainer's own state file; written last, so a checkpoint folder without it is incomplete.
TRAINER_STATE = "trainer_state.json"
#: Prefixes of a checkpoint being written and of one being deleted (neither is ever listed).
WRITING_PREFIX, DELETING_PREFIX = ".tmp-", ".del-"
#: File with a module's tensors that do not belong to a diffusers model inside it.
EXTRA_WEIGHTS = "extra.safetensors"
#: Sub-folder of a trainable's checkpoint folder with its EMA weights (same layout).
EMA_FOLDER = "ema"
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the trainer resuming from it (another method, layout, network or FSDP setting)."""


def check_checkpoint_fits(path: str | Path, modules: dict[str, nn.Module], sharded: bool = False) -> dict:
    """Compare a checkpoint with the trainables about to load it, before anything is loaded.

    Checks the trainable names of :data:`TRAINER_STATE`, that models were saved the way this run saves them (our
    folders, or accelerate's FSDP files when ``sharded``), and every saved tensor's name and shape against the
    module's ``state_dict`` (safetensors headers only; nothing is read into memory).

    Args:
        path: The checkpoint folder.
        modules: ``name -> bare module`` of every trainable.
        sharded: Whether this run is sharded (FSDP2).

    Returns:
        The parsed trainer state.

    Raises:
        CheckpointMismatchError: naming the first difference.
    """
    from safetensors import safe_open

    path = Path(path)
    fix = ("Resume with the recipe and flags that wrote it (its run folder's config.yaml), or start a new output_dir "
           "(--init_generator takes its weights).")
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointMismatchError(f"Checkpoint {str(path)!r} has no readable {TRAINER_STATE} ({err}).") from None
    saved = sorted(state.get("trainables", {}))
    if saved != sorted(modules):
        raise CheckpointMismatchError(
            f"Checkpoint {str(path)!r} holds trainables {saved}, this run trains {sorted(modules)}: it was written by "
            f"another method or configuration. {fix}"
        )
    fsdp_files = any(p.name.startswith("pytorch_model_fsdp") for p in path.iterdir())
    if sharded != fsdp_files:
        how = "with FSDP (accelerate's sharded files)" if fsdp_files else "without FSDP"
        raise CheckpointMismatchError(
            f"Checkpoint {str(path)!r} was written {how}; resume it the same way (the accelerate config decides). "
            f"{fix}"
        )
    if sharded:
        return state
    for name, module in modules.items():
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        have: dict[str, tuple[int, ...]] = {}
        try:
            for prefix, file in _weight_files(module, path / name):
                with safe_open(str(file), framework="pt") as f:
                    have.update({f"{prefix}{k}": tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except (OSError, FileNotFoundError) as err:
            raise CheckpointMismatchError(f"Checkpoint {str(path)!r}: {err} {fix}") from None
        missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        shapes = [f"{k}: saved {have[k]}, here {want[k]}" for k in sorted(set(want) & set(have)) if have[k] != want[k]]
        if missing or unexpected or shapes:
            detail = "; ".join(x for x in (f"missing {missing[:3]}" if missing else "",
                                           f"unexpected {unexpected[:3]}" if unexpected else "",
                                           f"other shapes {shapes[:2]}" if shapes else "") if x)  # fmt: skip
            raise CheckpointMismatchError(
                f"Checkpoint {str(path)!r} does not fit trainable {name!r} of this run ({detail}): another network, "
                f"layout (lora_rank) or method wrote it. {fix}"
            )
    return state


def _weight_files(module: nn.Module, folder: Path) -> list[tuple[str, Path]]:
    """``(key prefix, safetensors file)`` of what :func:`save_module_weights` wrote for ``module`` in ``folder``."""
    files = []
    for path in diffusers_submodules(module):
        sub = folder / (path.replace(".", "/") or "model")
        index = sub / f"{_DIFFUSERS_WEIGHTS}.index.json"
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else [_DIFFUSERS_WEIGHTS]
        for name in names:
            if not (sub / name).is_file():
                raise FileNotFoundError(f"{str(sub / name)!r} is missing: the checkpoint is incomplete.")
            files.append((f"{path}." if path else "", sub / name))
    if (folder / EXTRA_WEIGHTS).is_file():
        files.append(("", folder / EXTRA_WEIGHTS))
    return files


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-NNNNNN`` holding :data:`TRAINER_STATE`) in ``folder``, oldest first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)
             and (p / TRAINER_STATE).is_file()]  # fmt: skip
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def recover_checkpoints(folder: str | Path) -> None:
    """Clean up after a run killed while writing or deleting checkpoints (main process only).

    A replacement interrupted between its two renames gets its previous checkpoint back
    (:func:`~stepdistill.utils.restore_dir`); half-written (``.tmp-``) and half-deleted (``.del-``) folders are
    removed. Complete checkpoints are never touched.
    """
    from ..utils import restore_dir

    root = Path(folder)
    if not root.is_dir():
        return
    for path in list(root.iterdir()):
        match = re.fullmatch(rf"\.({CHECKPOINT_PREFIX}\d+)\.old", path.name)
        if match:
            restore_dir(root / match.group(1))
        elif path.name.startswith((WRITING_PREFIX, DELETING_PREFIX)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def commit_checkpoint(tmp: Path, final: Path, trainer_state: dict) -> Path:
    """Publish the checkpoint written into ``tmp`` as ``final`` (main process, after every process wrote its part).

    :data:`TRAINER_STATE` is written last, then everything is ``fsync``-ed and renamed onto ``final`` with
    :func:`~stepdistill.utils.replace_dir`: a crash at any instant leaves the previous checkpoint or this one.
    """
    from ..utils import replace_dir

    (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    return replace_dir(tmp, final)


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (``keep <= 0``: keep all).

    Each is first renamed to ``.del-<name>`` (atomic), so a crash mid-deletion never leaves a damaged folder that
    looks like a checkpoint.
    """
    if keep <= 0:
        return
    for old in list_checkpoints(folder)[:-keep]:
        doomed = old.with_name(f"{DELETING_PREFIX}{old.name}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def diffusers_submodules(module: nn.Module) -> dict[str, nn.Module]:
    """The outermost diffusers ``ModelMixin`` submodules of ``module`` by module path (``""`` for itself)."""
    from diffusers import ModelMixin

    found: dict[str, nn.Module] = {}
    for name, sub in module.named_modules():
        if not isinstance(sub, ModelMixin):
            continue
        if "" in found:  # the module is itself a diffusers model: everything else is inside it
            break
        if not any(name.startswith(f"{k}.") for k in found):
            found[name] = sub
    return found


def unsharded_class(module: nn.Module) -> type:
    """``module``'s own class: FSDP2 swaps a sharded module's class for a subclass (``FSDPUNet2DModel``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def save_module_weights(module: nn.Module, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``module``'s state: diffusers models as ``save_pretrained`` folders, the rest to ``extra.safetensors``.

    Args:
        module: The module (its diffusers submodules give the folder layout and configs).
        folder: Output folder.
        state: A full ``state_dict`` to write instead of the module's own (the gathered shards of an FSDP2
            module); each diffusers folder then gets its config and a safetensors file as ``save_pretrained`` writes.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    models = diffusers_submodules(module)
    covered = set()
    for path, sub in models.items():
        dst = folder / (path.replace(".", "/") or "model")
        prefix = f"{path}." if path else ""
        if state is None:
            sub.save_pretrained(dst, safe_serialization=True)
            covered.update(f"{prefix}{k}" for k in sub.state_dict())
            continue
        own = {k[len(prefix):]: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith(prefix)}
        dst.mkdir(parents=True, exist_ok=True)
        sub.save_config(dst)
        config = json.loads((dst / "config.json").read_text())
        config["_class_name"] = unsharded_class(sub).__name__
        (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(own, str(dst / _DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
        covered.update(f"{prefix}{k}" for k in own)
    full = module.state_dict() if state is None else state
    extra = {k: v.detach().contiguous().cpu() for k, v in full.items() if k not in covered}
    if extra:
        save_file(extra, str(folder / EXTRA_WEIGHTS))
    return folder


def read_module_weights(module: nn.Module, folder: str | Path) -> dict[str, torch.Tensor]:
    """The full ``state_dict`` that :func:`save_module_weights` wrote for ``module`` (its layout gives the files)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for prefix, file in _weight_files(module, Path(folder)):
        state.update({f"{prefix}{k}": v for k, v in load_file(str(file)).items()})
    return state


@torch.no_grad()
def load_module_weights(module: nn.Module, folder: str | Path) -> None:
    """Load what :func:`save_module_weights` wrote into ``module`` (strict: every key, exact shapes)."""
    module.load_state_dict(read_module_weights(module, folder), strict=True)


class RNGState:
    """The trainer's explicit generators, saved per process in checkpoints (``trainer_rng_<rank>.pt``).

    Args:
        generators: ``name -> torch.Generator``.
    """

    def __init__(self, **generators: torch.Generator) -> None:
        self.generators = generators

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Each generator's state (a uint8 tensor)."""
        return {k: g.get_state() for k, g in self.generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore every generator."""
        for k, g in self.generators.items():
            g.set_state(state[k])


__all__ = [
    "CHECKPOINT_PREFIX",
    "CheckpointMismatchError",
    "EMA_FOLDER",
    "EXTRA_WEIGHTS",
    "TRAINER_STATE",
    "RNGState",
    "check_checkpoint_fits",
    "commit_checkpoint",
    "diffusers_submodules",
    "list_checkpoints",
    "load_module_weights",
    "prune_checkpoints",
    "read_module_weights",
    "recover_checkpoints",
    "save_module_weights",
    "unsharded_class",
]

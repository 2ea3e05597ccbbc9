"""Small shared helpers: atomic writes of folders and files, the precision and device a run uses."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def atomic_write_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a folder atomically: ``write(tmp)`` fills a temporary sibling that then replaces ``target``.

    A crash while writing leaves any previous ``target`` intact (the temporary folder is removed).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        write(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def atomic_save_pretrained(obj, target: str | Path, **kwargs) -> Path:
    """``obj.save_pretrained`` into ``target`` atomically (models, schedulers, pipelines)."""
    return atomic_write_dir(target, lambda tmp: obj.save_pretrained(tmp, **kwargs))


def atomic_write_file(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a file atomically: ``write(tmp)`` fills a temporary sibling that is then renamed onto ``target``.

    A crash while writing leaves any previous ``target`` intact (the temporary file is removed).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def precision_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of frozen networks under accelerate's ``mixed_precision`` (``no`` / ``fp16`` / ``bf16``)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def runs_on_cpu(cpu: bool) -> bool:
    """Whether a run uses the CPU: asked for, or ``accelerate launch --multi_gpu`` on a machine without CUDA (gloo)."""
    return cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)

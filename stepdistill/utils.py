"""Small shared helpers: durable atomic writes of folders and files, the precision and device a run uses."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a folder's entries, to disk (``fsync``), so a crash after this call keeps it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """``fsync`` every file and folder under ``root``, bottom-up, then ``root`` itself."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(dirpath)


def _aside(target: Path) -> Path:
    """Where :func:`replace_dir` keeps the previous ``target`` while the new one is renamed in."""
    return target.with_name(f".{target.name}.old")


def restore_dir(target: str | Path) -> None:
    """Finish a :func:`replace_dir` that a crash interrupted.

    If the previous folder was moved aside but the new one never arrived, the previous one is put back; if the
    new one arrived, the aside copy is deleted.
    """
    target = Path(target)
    aside = _aside(target)
    if aside.is_dir():
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, target)
            fsync_path(target.parent)


def replace_dir(tmp: str | Path, target: str | Path) -> Path:
    """Rename the finished folder ``tmp`` onto ``target`` durably; at every instant the old or the new one exists.

    1. ``fsync`` everything in ``tmp`` (file contents, then folder entries), so the rename never publishes
       data still in the page cache;
    2. an existing ``target`` is renamed aside (``.<name>.old``): a crash now leaves both complete folders, and
       :func:`restore_dir` (called by every writer, and by checkpoint listing) puts the old one back;
    3. ``tmp`` is renamed to ``target`` and the parent folder is ``fsync``-ed (the rename is on disk);
    4. the aside copy is deleted.
    """
    tmp, target = Path(tmp), Path(target)
    restore_dir(target)  # an earlier interrupted replace must not lose its only copy below
    fsync_tree(tmp)
    aside = _aside(target)
    if target.exists():
        os.replace(target, aside)
    os.replace(tmp, target)
    fsync_path(target.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return target


def atomic_write_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a folder atomically and durably: ``write(tmp)`` fills a temporary sibling that then replaces ``target``.

    A crash at any point leaves the previous ``target`` or the complete new one (see :func:`replace_dir`); a
    failure removes the temporary folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_dir(target)
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):  # of a writer killed before its rename
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        write(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def atomic_save_pretrained(obj, target: str | Path, **kwargs) -> Path:
    """``obj.save_pretrained`` into ``target`` atomically (models, schedulers, pipelines)."""
    return atomic_write_dir(target, lambda tmp: obj.save_pretrained(tmp, **kwargs))


def atomic_write_file(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a file atomically and durably: ``write(tmp)`` fills a temporary sibling, renamed onto ``target``.

    The file is ``fsync``-ed before the rename and the folder after it, so a crash leaves the previous
    ``target`` or the complete new one (a rename onto a file is atomic); a failure removes the temporary file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o644)
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
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

"""Local datasets: one :func:`open_dataset` for the trainers' data sources and the evaluation command.

Never a hub download: ``save_to_disk`` folders, image folders (``imagefolder``), csv / json / jsonl /
parquet tables. Column names are found by :func:`pick_column` from the usual candidates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Column names tried, in order, when no prompt / image / label column is given.
PROMPT_COLUMNS = ("prompt", "text", "caption", "captions")
IMAGE_COLUMNS = ("image", "img", "file_name", "path", "image_path")
LABEL_COLUMNS = ("label", "labels", "class", "class_label")

_TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataSourceError(ValueError):
    """A prompt file or dataset that cannot be used; the message names the problem and the fix."""


def is_saved_dataset(path: str | Path) -> bool:
    """True when ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    p = Path(path)
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def open_dataset(path: str | Path, split: str | None = "train", split_flag: str = "--data_split") -> Any:
    """Open a local dataset with Hugging Face ``datasets`` (never a hub download).

    ``path`` may be a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, an image
    folder (``imagefolder`` builder: images, optionally with ``metadata.csv`` / ``metadata.jsonl`` holding
    captions or labels, or one sub-folder per class), or a csv / json / jsonl / parquet file. The trainers'
    data sources and the evaluation command both open datasets here.

    Args:
        path: The folder or file.
        split: Split of a multi-split dataset; ``None`` takes the only split (an error when there are several).
        split_flag: The option that chooses the split, named in errors.
    """
    import datasets

    root = Path(path).expanduser()
    if not root.exists():
        raise DataSourceError(f"Dataset {str(root)!r} does not exist; pass a local folder or file (no hub downloads).")
    if root.is_file():
        builder = _TABLE_SUFFIXES.get(root.suffix.lower())
        if builder is None:
            raise DataSourceError(
                f"{str(root)!r}: unsupported file type {root.suffix!r}; use .txt (one prompt per line), "
                f"{sorted(_TABLE_SUFFIXES)}, an image folder or a save_to_disk folder."
            )
        kwargs = {"delimiter": "\t"} if root.suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(builder, data_files=str(root), split="train", **kwargs)
    if is_saved_dataset(root) or (root / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            if split is None and len(ds) == 1:
                split = next(iter(ds))
            if split not in ds:
                raise DataSourceError(f"{str(root)!r} has splits {list(ds)}; choose one with {split_flag}.")
            ds = ds[split]
        return ds
    return datasets.load_dataset("imagefolder", data_dir=str(root), split=split or "train")


def pick_column(names: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, where: str) -> str:
    """The column for ``what``: ``wanted`` if given (must exist), else the first of ``candidates`` present."""
    if wanted:
        if wanted not in names:
            raise DataSourceError(f"{where} has no column {wanted!r} for {what}; its columns are {list(names)}.")
        return wanted
    for name in candidates:
        if name in names:
            return name
    raise DataSourceError(
        f"{where} has no {what} column (looked for {list(candidates)}; columns: {list(names)}). "
        f"Name it with --{what}_column."
    )


def class_label_map(feature: Any, where: str) -> list[int] | None:
    """Map a ``ClassLabel`` column's indices to the labels its names spell (image-folder classes ``0/``, ``3/``).

    ``datasets`` numbers class sub-folders 0..K-1 in sorted order; when every name is an integer the
    teacher's label is that integer, not the index. Other names keep their index (logged).
    """
    import datasets

    if not isinstance(feature, datasets.ClassLabel):
        return None
    names = list(feature.names)
    if all(n.strip().lstrip("-").isdigit() for n in names):
        return [int(n) for n in names]
    logger.warning("%s: class names %s are not integers; using their indices 0..%d as class labels.",
                   where, names, len(names) - 1)
    return None


__all__ = [
    "IMAGE_COLUMNS",
    "LABEL_COLUMNS",
    "PROMPT_COLUMNS",
    "DataSourceError",
    "class_label_map",
    "is_saved_dataset",
    "open_dataset",
    "pick_column",
]

"""Reference statistics: one ``.npz`` holding mu, sigma, the raw features and the extractor's identity.

The file is a plain numpy archive (no pickles), readable without stepdistill:

========================  ===============================================================
``mu``, ``sigma``         mean ``[D]`` and covariance ``[D, D]`` (float64), as clean-fid's FID files
``feats``                 the raw features ``[N, D]`` (KID and precision / recall need them; same key
                          as clean-fid's ``_kid.npz`` files)
``extractor``             identity of the feature extractor (network + weights hash)
``extractor_spec``        how to rebuild it (``inception:PATH``, ``digits``, ...)
``source``                what the statistics describe (a folder, ``digits:heldout``, ...)
``labels``                optional ``[N]`` class labels of the reference images
``meta``                  JSON: format version, extractor description, anything else
========================  ===============================================================

Comparing statistics with features of another extractor is an error, never a silent number.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import feature_statistics

FORMAT = "stepdistill-reference-stats/1"


class StatsMismatchError(ValueError):
    """Reference statistics were made with another feature extractor than the one in use."""


class StatsFileError(ValueError):
    """A statistics file is missing, damaged, or not stepdistill's format."""


def _extractor_name(extractor: object) -> str:
    return extractor if isinstance(extractor, str) else str(extractor.name)


def write_atomic(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path``: a failure leaves no file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, atomically (see :func:`write_atomic`)."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(payload, indent=2, default=str) + "\n")

    return write_atomic(path, write)


@dataclass
class ReferenceStats:
    """Statistics of a reference image set under one feature extractor.

    Args:
        mu: Feature mean ``[D]``.
        sigma: Feature covariance ``[D, D]``.
        features: Raw features ``[N, D]``.
        extractor: Identity of the extractor (``FeatureExtractor.name``).
        extractor_spec: Spec to rebuild the extractor (``FeatureExtractor.spec``).
        source: What the images were (folder path, dataset, ``digits:heldout``).
        labels: Optional class label of each reference image ``[N]``.
        meta: Extra JSON-able information.

    Example:
        >>> ref = ReferenceStats.from_features(extractor(images), extractor, source="digits:heldout")
        >>> ref.save("digits_heldout.npz")
        >>> ref = ReferenceStats.load("digits_heldout.npz", extractor=extractor)  # raises on a mismatch
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    extractor: str
    extractor_spec: str = ""
    source: str = ""
    labels: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of reference images."""
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return int(self.mu.shape[0])

    @classmethod
    def from_features(
        cls,
        features: np.ndarray,
        extractor: object,
        source: str = "",
        labels: np.ndarray | None = None,
        meta: dict | None = None,
    ) -> ReferenceStats:
        """Statistics of ``[N, D]`` features made by ``extractor`` (a ``FeatureExtractor`` or its name)."""
        feats = np.asarray(features, dtype=np.float64)
        mu, sigma = feature_statistics(feats)
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (feats.shape[0],):
                raise ValueError(f"Got {labels.shape} labels for {feats.shape[0]} reference features.")
        info = dict(meta or {})
        if not isinstance(extractor, str) and hasattr(extractor, "describe"):
            info.setdefault("extractor", extractor.describe())
        spec = "" if isinstance(extractor, str) else str(getattr(extractor, "spec", ""))
        return cls(mu, sigma, feats, _extractor_name(extractor), spec, source, labels, info)

    # ------------------------------------------------------------------------------------------------
    def check_extractor(self, extractor: object) -> None:
        """Raise :class:`StatsMismatchError` unless ``extractor`` (object or name) made these statistics."""
        name = _extractor_name(extractor)
        if name != self.extractor:
            raise StatsMismatchError(
                f"The reference statistics ({self.source or 'unknown source'}) were computed with feature extractor "
                f"{self.extractor!r}, but the features in use come from {name!r}. Numbers across extractors (or "
                "across weights of one network) are not comparable: recompute the reference with `stepdistill eval "
                "ref` and the same --features, or evaluate with the reference's extractor."
            )

    def save(self, path: str | Path) -> Path:
        """Write the ``.npz`` atomically (a failure leaves no partial file)."""
        feats = self.features
        if np.array_equal(feats.astype(np.float32).astype(np.float64), feats):
            feats = feats.astype(np.float32)  # network features are float32: store them losslessly and smaller
        arrays = {
            "format": np.array(FORMAT),
            "mu": np.asarray(self.mu, np.float64),
            "sigma": np.asarray(self.sigma, np.float64),
            "feats": feats,
            "extractor": np.array(self.extractor),
            "extractor_spec": np.array(self.extractor_spec),
            "source": np.array(self.source),
            "meta": np.array(json.dumps(self.meta, default=str)),
        }
        if self.labels is not None:
            arrays["labels"] = np.asarray(self.labels)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        return write_atomic(path, write)

    @classmethod
    def load(cls, path: str | Path, extractor: object | None = None) -> ReferenceStats:
        """Read statistics written by :meth:`save`; with ``extractor``, check it made them.

        Raises:
            StatsFileError: for a missing or damaged file, or a file without an extractor identity
                (e.g. a clean-fid statistics file, whose network stepdistill cannot verify).
            StatsMismatchError: when ``extractor`` is given and differs.
        """
        path = Path(path)
        if not path.is_file():
            raise StatsFileError(
                f"Reference statistics {str(path)!r} not found; make them with `stepdistill eval ref`."
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except Exception as err:  # noqa: BLE001 -- zip, pickle and value errors all mean "not a stats file"
            raise StatsFileError(f"Cannot read reference statistics {str(path)!r}: {err}.") from err
        missing = [k for k in ("mu", "sigma", "feats", "extractor") if k not in arrays]
        if missing:
            raise StatsFileError(
                f"{str(path)!r} lacks {missing}: it is not a stepdistill reference statistics file (clean-fid files "
                "hold mu/sigma without the extractor's identity, so a mismatch could not be detected). Make the "
                "reference with `stepdistill eval ref`."
            )
        stats = cls(
            mu=arrays["mu"].astype(np.float64),
            sigma=arrays["sigma"].astype(np.float64),
            features=arrays["feats"].astype(np.float64),
            extractor=str(arrays["extractor"]),
            extractor_spec=str(arrays.get("extractor_spec", "")),
            source=str(arrays.get("source", "")),
            labels=arrays.get("labels"),
            meta=json.loads(str(arrays["meta"])) if "meta" in arrays else {},
        )
        if stats.features.ndim != 2 or stats.mu.shape != (stats.features.shape[1],):
            raise StatsFileError(f"{str(path)!r} is inconsistent: feats {stats.features.shape}, mu {stats.mu.shape}.")
        if extractor is not None:
            stats.check_extractor(extractor)
        return stats


__all__ = ["FORMAT", "ReferenceStats", "StatsFileError", "StatsMismatchError", "write_atomic", "write_json"]

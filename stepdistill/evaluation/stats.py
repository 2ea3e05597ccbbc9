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

Comparing statistics with features of another extractor is an error, never a silent number. Nothing in the
file selects code: ``extractor_spec`` rebuilds only the built-in extractors (inception, digits); a custom one is
passed by the caller and checked against ``extractor``. clean-fid's own files (``mu`` / ``sigma``, no identity)
load only with an extractor the caller vouches for (``assume_extractor``; CLI ``--ref_extractor inception``), with a
warning, and serve FID only.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import feature_statistics

FORMAT = "stepdistill-reference-stats/1"


class StatsMismatchError(ValueError):
    """Reference statistics were made with another feature extractor than the one in use."""


class StatsFileError(ValueError):
    """A statistics file is missing, damaged, or not stepdistill's format."""


class UnverifiedStatsWarning(UserWarning):
    """Statistics without an extractor identity (clean-fid's files) are used on the caller's word."""


def _extractor_name(extractor: object) -> str:
    return extractor if isinstance(extractor, str) else str(extractor.name)


def write_atomic(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path`` (durably; see ``atomic_write_file``)."""
    from ..utils import atomic_write_file

    return atomic_write_file(path, lambda tmp: write(str(tmp)))


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
        features: Raw features ``[N, D]``; ``None`` for clean-fid ``mu`` / ``sigma`` files (FID only).
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
    features: np.ndarray | None
    extractor: str
    extractor_spec: str = ""
    source: str = ""
    labels: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int | None:
        """Number of reference images (``None`` when only ``mu`` / ``sigma`` are known)."""
        return None if self.features is None else int(self.features.shape[0])

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
        if feats is not None and np.array_equal(feats.astype(np.float32).astype(np.float64), feats):
            feats = feats.astype(np.float32)  # network features are float32: store them losslessly and smaller
        arrays = {
            "format": np.array(FORMAT),
            "mu": np.asarray(self.mu, np.float64),
            "sigma": np.asarray(self.sigma, np.float64),
            "extractor": np.array(self.extractor),
            "extractor_spec": np.array(self.extractor_spec),
            "source": np.array(self.source),
            "meta": np.array(json.dumps(self.meta, default=str)),
        }
        if feats is not None:
            arrays["feats"] = feats
        if self.labels is not None:
            arrays["labels"] = np.asarray(self.labels)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        return write_atomic(path, write)

    @classmethod
    def load(
        cls, path: str | Path, extractor: object | None = None, assume_extractor: object | None = None
    ) -> ReferenceStats:
        """Read statistics written by :meth:`save`; with ``extractor``, check it made them.

        Args:
            path: The ``.npz`` file.
            extractor: Check that this extractor (object or name) made the statistics.
            assume_extractor: For a file without an extractor identity (clean-fid's ``mu`` / ``sigma`` FID files,
                or its ``_kid.npz`` ``feats``): the extractor the caller vouches made it (CLI ``--ref_extractor
                inception``). It is taken on trust with an :class:`UnverifiedStatsWarning`; without it such a file is
                refused. Ignored for stepdistill files (their identity is checked instead).

        Raises:
            StatsFileError: for a missing or damaged file, or a file without an extractor identity and no
                ``assume_extractor``.
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
        if "extractor" not in arrays:
            return cls._load_unverified(path, arrays, assume_extractor)
        missing = [k for k in ("mu", "sigma") if k not in arrays]
        if missing:
            raise StatsFileError(f"{str(path)!r} lacks {missing}: it is damaged; make it with `stepdistill eval ref`.")
        stats = cls(
            mu=arrays["mu"].astype(np.float64),
            sigma=arrays["sigma"].astype(np.float64),
            features=arrays["feats"].astype(np.float64) if "feats" in arrays else None,
            extractor=str(arrays["extractor"]),
            extractor_spec=str(arrays.get("extractor_spec", "")),
            source=str(arrays.get("source", "")),
            labels=arrays.get("labels"),
            meta=json.loads(str(arrays["meta"])) if "meta" in arrays else {},
        )
        stats._check_shapes(path)
        if extractor is not None:
            stats.check_extractor(extractor)
        return stats

    def _check_shapes(self, path: Path) -> None:
        dim = self.mu.shape[0] if self.mu.ndim == 1 else -1
        feats_ok = self.features is None or (self.features.ndim == 2 and self.features.shape[1] == dim)
        if dim < 1 or self.sigma.shape != (dim, dim) or not feats_ok:
            feats = None if self.features is None else self.features.shape
            raise StatsFileError(
                f"{str(path)!r} is inconsistent: mu {self.mu.shape}, sigma {self.sigma.shape}, feats {feats}."
            )

    @classmethod
    def _load_unverified(cls, path: Path, arrays: dict, assume_extractor: object | None) -> ReferenceStats:
        """A file without an extractor identity (clean-fid's), on the caller's word (see :meth:`load`)."""
        if assume_extractor is None:
            raise StatsFileError(
                f"{str(path)!r} has no `extractor` field, so the network that made it cannot be verified: it is not "
                "a stepdistill reference statistics file. For clean-fid's Inception statistics (mu/sigma) pass "
                "--ref_extractor inception (FID only; Python: assume_extractor=InceptionFeatures(...)); otherwise "
                "make the reference with `stepdistill eval ref`."
            )
        feats = arrays["feats"].astype(np.float64) if "feats" in arrays else None
        if "mu" in arrays and "sigma" in arrays:
            mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
        elif feats is not None and feats.ndim == 2 and feats.shape[0] > 1:
            mu, sigma = feature_statistics(feats)
        else:
            raise StatsFileError(f"{str(path)!r} holds neither mu/sigma nor feats: it is not a statistics file.")
        name, dim = _extractor_name(assume_extractor), getattr(assume_extractor, "dim", None)
        if dim is not None and mu.shape != (dim,):
            raise StatsFileError(
                f"{str(path)!r} holds {mu.shape[-1] if mu.ndim else 0}-d statistics but {name} makes {dim}-d "
                "features: it was not made with that extractor."
            )
        stats = cls(mu, sigma, feats, name, str(getattr(assume_extractor, "spec", "")), str(path),
                    meta={"unverified_extractor": True})  # fmt: skip
        stats._check_shapes(path)
        only = "" if feats is not None else " FID only: KID and precision / recall need the reference's features."
        warnings.warn(
            f"{str(path)!r} carries no extractor identity; it is taken to be {name}'s as asked, which cannot be "
            f"verified (statistics of another network, clean-fid mode or image protocol give a wrong number "
            f"silently).{only}",
            UnverifiedStatsWarning,
            stacklevel=3,
        )
        return stats


__all__ = [
    "FORMAT",
    "ReferenceStats",
    "StatsFileError",
    "StatsMismatchError",
    "UnverifiedStatsWarning",
    "write_atomic",
    "write_json",
]

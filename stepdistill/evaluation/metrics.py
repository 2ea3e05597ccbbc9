"""Sample-quality metrics on features: FID, KID, precision / recall, diversity (pairwise distance, Vendi).

All functions take ``[N, D]`` feature arrays (any extractor) and compute in float64.

* FID and KID are clean-fid's own ``frechet_distance`` and ``kernel_distance`` (not re-implemented).
* Precision / recall: k-NN manifolds of Kynkaenniemi et al. (NeurIPS 2019), ``k = 3`` by default.
* Diversity: mean pairwise cosine distance and the Vendi score (Friedman & Dieng, TMLR 2023) with the
  cosine kernel, computed per condition (class or prompt) and averaged, because seed diversity within
  a condition is what distilled students lose.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .stats import ReferenceStats


class MetricUndefinedError(ValueError):
    """A metric is not defined for the given features (too few samples, mismatched dimensions, ...)."""


#: Why KID and precision / recall are missing against statistics that hold only ``mu`` / ``sigma`` (clean-fid).
REFERENCE_FEATURES_NEEDED = (
    "need the reference's features, and the reference holds only mu/sigma (a clean-fid FID statistics file): "
    "make the reference with `stepdistill eval ref` for KID and precision / recall."
)


def _as_features(feats: np.ndarray, what: str = "features") -> np.ndarray:
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2:
        raise MetricUndefinedError(f"{what} must be a [N, D] array, got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise MetricUndefinedError(f"{what} contain NaN or infinite values.")
    return arr


# ---------------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------------
def check_fid_defined(n: int, dim: int, what: str = "the samples") -> None:
    """Raise :class:`MetricUndefinedError` unless ``n > dim``.

    The covariance of ``n`` samples has rank at most ``n - 1``; below ``dim + 1`` samples it is singular
    and the Frechet distance between the fitted Gaussians is not defined.
    """
    if n <= dim:
        raise MetricUndefinedError(
            f"FID is undefined for {what}: {n} samples for {dim}-d features. The covariance of n samples has "
            f"rank at most n - 1, so FID needs at least {dim + 1} samples (more than the feature dimension; "
            "thousands in practice, 50k for the standard Inception FID). Use more samples or a lower-dimensional "
            "feature extractor; KID and precision/recall work with fewer."
        )


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov``, ``rowvar=False``, as clean-fid) of ``[N, D]`` features."""
    arr = _as_features(feats)
    if arr.shape[0] < 2:
        raise MetricUndefinedError(f"Need at least 2 samples for a covariance, got {arr.shape[0]}.")
    return arr.mean(axis=0), np.cov(arr, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` with clean-fid's ``frechet_distance``.

    ``d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.
    """
    from cleanfid.fid import frechet_distance as _cleanfid_frechet

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricUndefinedError(
            f"Cannot compare {mu1.shape[0]}-d and {mu2.shape[0]}-d statistics: different feature extractors?"
        )
    return float(_cleanfid_frechet(mu1, sigma1, mu2, sigma2))


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FID between two feature sets (each needs more samples than feature dimensions).

    Raises:
        MetricUndefinedError: when either set has ``n <= D``.
    """
    f1, f2 = _as_features(feats1, "first features"), _as_features(feats2, "second features")
    check_fid_defined(f1.shape[0], f1.shape[1], "the first set")
    check_fid_defined(f2.shape[0], f2.shape[1], "the second set")
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


# ---------------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------------
def kernel_inception_distance(
    feats1: np.ndarray,
    feats2: np.ndarray,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int | None = 0,
) -> float:
    """KID (unbiased MMD^2, cubic polynomial kernel) with clean-fid's ``kernel_distance``.

    clean-fid draws its subsets from numpy's global RNG; this seeds it with ``seed`` for the call and
    restores the previous global state afterwards, so the value is reproducible and nothing else moves.
    Can be slightly negative for small sets (unbiased estimator). Papers often report ``KID x 1e3``.

    Args:
        feats1: ``[N1, D]`` features.
        feats2: ``[N2, D]`` features.
        num_subsets: Random subsets averaged over.
        max_subset_size: Subset size cap (``m = min(N1, N2, max_subset_size)``).
        seed: Seed for the subsets (``None``: use the global RNG as is).
    """
    from cleanfid.fid import kernel_distance

    f1, f2 = _as_features(feats1, "first features"), _as_features(feats2, "second features")
    if f1.shape[1] != f2.shape[1]:
        raise MetricUndefinedError(f"Cannot compare {f1.shape[1]}-d and {f2.shape[1]}-d features.")
    if min(f1.shape[0], f2.shape[0], max_subset_size) < 2:
        raise MetricUndefinedError(f"KID needs at least 2 samples per set, got {f1.shape[0]} and {f2.shape[0]}.")
    if seed is None:
        return float(kernel_distance(f1, f2, num_subsets=num_subsets, max_subset_size=max_subset_size))
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(kernel_distance(f1, f2, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


# ---------------------------------------------------------------------------------------------------
# Precision / recall (k-NN manifolds)
# ---------------------------------------------------------------------------------------------------
def _pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b).clamp_min_(0)


def knn_radii(feats: np.ndarray | torch.Tensor, k: int = 3, batch_size: int = 4096) -> torch.Tensor:
    """Distance of every point to its ``k``-th nearest neighbour in the same set (itself excluded).

    Sorting the distances of a point to its own set puts itself (0) at index 0, so the k-th neighbour
    is at index ``k`` (``kthvalue(k + 1)``).
    """
    x = torch.as_tensor(feats, dtype=torch.float64)
    if not 1 <= k < x.shape[0]:
        raise MetricUndefinedError(f"k-NN radii need 1 <= k < N; got k={k} for N={x.shape[0]} samples.")
    radii = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], batch_size):
        radii[i : i + batch_size] = _pairwise_distances(x[i : i + batch_size], x).kthvalue(k + 1, dim=1).values
    return radii


def manifold_coverage(
    queries: np.ndarray | torch.Tensor, support: np.ndarray | torch.Tensor, k: int = 3, batch_size: int = 4096
) -> float:
    """Fraction of ``queries`` inside the k-NN manifold of ``support`` (union of balls ``B(phi, r_k(phi))``)."""
    q = torch.as_tensor(queries, dtype=torch.float64)
    s = torch.as_tensor(support, dtype=torch.float64)
    radii = knn_radii(s, k=k, batch_size=batch_size)
    inside = 0
    for i in range(0, q.shape[0], batch_size):
        dist = _pairwise_distances(q[i : i + batch_size], s)
        inside += int((dist <= radii[None, :]).any(dim=1).sum())
    return inside / q.shape[0]


def precision_recall(
    real_feats: np.ndarray, gen_feats: np.ndarray, k: int = 3, batch_size: int = 4096
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019).

    * precision: fraction of generated samples inside the real manifold (fidelity);
    * recall: fraction of real samples inside the generated manifold (coverage; mode collapse lowers it).

    Use equal set sizes and report ``k`` and the extractor. Distances are computed in float64 in
    batches of ``batch_size`` rows (on the device of the inputs when they are tensors).
    """
    real = _as_features(real_feats, "real features")
    gen = _as_features(gen_feats, "generated features")
    if real.shape[1] != gen.shape[1]:
        raise MetricUndefinedError(f"Cannot compare {real.shape[1]}-d and {gen.shape[1]}-d features.")
    precision = manifold_coverage(gen, real, k=k, batch_size=batch_size)
    recall = manifold_coverage(real, gen, k=k, batch_size=batch_size)
    return precision, recall


# ---------------------------------------------------------------------------------------------------
# Diversity
# ---------------------------------------------------------------------------------------------------
def _normalized(feats: np.ndarray) -> np.ndarray:
    arr = _as_features(feats)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise MetricUndefinedError(
            f"{int((norms == 0).sum())} feature vector(s) are all zeros; cosine similarity is undefined for them."
        )
    return arr / norms


def mean_pairwise_distance(feats: np.ndarray, metric: str = "cosine") -> float:
    """Mean distance over all pairs ``i < j``: ``1 - cos`` (``metric="cosine"``) or L2 (``"euclidean"``)."""
    arr = _as_features(feats)
    n = arr.shape[0]
    if n < 2:
        raise MetricUndefinedError(f"Pairwise distance needs at least 2 samples, got {n}.")
    if metric == "cosine":
        x = _normalized(arr)
        sim = x @ x.T
        return float(1.0 - (sim.sum() - np.trace(sim)) / (n * (n - 1)))
    if metric == "euclidean":
        t = torch.as_tensor(arr)
        return float(_pairwise_distances(t, t).sum() / (n * (n - 1)))
    raise ValueError(f"Unknown metric {metric!r}; use 'cosine' or 'euclidean'.")


def vendi_score(feats: np.ndarray) -> float:
    """Vendi score with the cosine kernel: ``exp(-sum_i lambda_i log lambda_i)``, ``lambda`` = eig(K / n).

    ``K = X X^T`` for L2-normalized features ``X``; its non-zero eigenvalues equal those of ``X^T X`` (the
    smaller matrix is used). ``1 <= VS <= n``: 1 for identical samples, ``n`` for mutually orthogonal
    ones -- the effective number of distinct samples.
    """
    x = _normalized(feats)
    n = x.shape[0]
    gram = x @ x.T if n <= x.shape[1] else x.T @ x
    lam = np.clip(np.linalg.eigvalsh(gram / n), 0.0, None)
    lam = lam[lam > 0]
    return float(math.exp(-np.sum(lam * np.log(lam))))


def group_indices(labels: Sequence | np.ndarray) -> dict:
    """``{label: indices}`` of each condition (class label or prompt), in sorted label order."""
    arr = np.asarray(labels)
    return {lab.item() if hasattr(lab, "item") else lab: np.flatnonzero(arr == lab) for lab in np.unique(arr)}


def per_group(fn: Callable[[np.ndarray], float], feats: np.ndarray, labels: Sequence | np.ndarray) -> dict:
    """Apply ``fn`` to the features of each condition with at least 2 samples: ``{label: value}``."""
    arr = _as_features(feats)
    if len(labels) != arr.shape[0]:
        raise MetricUndefinedError(f"Got {len(labels)} labels for {arr.shape[0]} feature rows.")
    return {lab: fn(arr[idx]) for lab, idx in group_indices(labels).items() if len(idx) >= 2}


def diversity(feats: np.ndarray, labels: Sequence | np.ndarray | None = None) -> dict:
    """Mean pairwise cosine distance and Vendi score, per condition then averaged over conditions.

    Without ``labels`` all samples form one group (which then mostly measures condition diversity).

    Returns:
        ``{"pairwise_cosine_distance", "vendi", "groups", "per_group": {label: {...}}}``.
    """
    if labels is None:
        labels = np.zeros(len(feats), dtype=np.int64)
    pairwise = per_group(mean_pairwise_distance, feats, labels)
    if not pairwise:
        raise MetricUndefinedError("Diversity needs at least one condition with 2 or more samples.")
    vendi = per_group(vendi_score, feats, labels)
    return {
        "pairwise_cosine_distance": float(np.mean(list(pairwise.values()))),
        "vendi": float(np.mean(list(vendi.values()))),
        "groups": len(pairwise),
        "per_group": {str(k): {"pairwise_cosine_distance": pairwise[k], "vendi": vendi[k]} for k in pairwise},
    }


# ---------------------------------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------------------------------
@dataclass
class MetricsResult:
    """The metrics of one generated set against reference statistics.

    Args:
        fid: Frechet distance.
        kid: Kernel distance (unbiased; x1e3 is common in papers); ``None`` against mu/sigma-only statistics.
        precision: k-NN precision (fidelity); ``None`` likewise.
        recall: k-NN recall (coverage); ``None`` likewise.
        pairwise_cosine_distance: Mean pairwise cosine distance within each condition, averaged.
        vendi: Vendi score (cosine kernel) within each condition, averaged.
        num_generated: Generated samples.
        num_reference: Reference samples (``None`` when unknown: mu/sigma-only statistics).
        extractor: Feature extractor identity.
        k: Neighbourhood size of precision / recall.
        diversity_groups: Conditions the diversity was averaged over.
        per_class: Per-condition metrics (``{label: {metric: value}}``), when asked for.
        extra: Anything else (e.g. class accuracy, timings).
        features: The generated features themselves (``[N, D]``; not in :meth:`to_dict`), for intervals and
            paired comparisons (:mod:`stepdistill.evaluation.uncertainty`).
        labels: The condition of each generated sample (not in :meth:`to_dict`).
        sample_ids: The noise seed of each generated sample when known (not in :meth:`to_dict`).
    """

    fid: float
    kid: float | None
    precision: float | None
    recall: float | None
    pairwise_cosine_distance: float
    vendi: float
    num_generated: int
    num_reference: int | None
    extractor: str
    k: int = 3
    diversity_groups: int = 1
    per_class: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    features: np.ndarray | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)
    sample_ids: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """Flat, JSON-able metric names (``fid``, ``kid``, ``precision``, ``diversity/vendi``, ...)."""
        out = {
            "fid": self.fid,
            "kid": self.kid,
            "precision": self.precision,
            "recall": self.recall,
            "diversity/pairwise_cosine_distance": self.pairwise_cosine_distance,
            "diversity/vendi": self.vendi,
            "diversity/groups": self.diversity_groups,
            "num_generated": self.num_generated,
            "num_reference": self.num_reference,
            "extractor": self.extractor,
            "k": self.k,
        }
        out.update(self.extra)
        if self.per_class:
            out["per_class"] = self.per_class
        return out


def compute_metrics(
    gen_feats: np.ndarray,
    ref: ReferenceStats,
    labels: Sequence | np.ndarray | None = None,
    extractor: str | object | None = None,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    per_class: bool = False,
) -> MetricsResult:
    """FID, KID, precision / recall and diversity of generated features against reference statistics.

    This is the function trainers call during training, on features of their samples made with the
    reference's extractor.

    Args:
        gen_feats: ``[N, D]`` features of the generated samples.
        ref: Reference statistics (:class:`~stepdistill.evaluation.stats.ReferenceStats`).
        labels: Condition of each generated sample (class label or prompt index): diversity is then
            computed per condition, and ``per_class`` metrics become available.
        extractor: The extractor that made ``gen_feats``, or its identity (``extractor.name``); when
            given it must match the reference's, else :class:`~stepdistill.evaluation.stats.StatsMismatchError`.
        k: Neighbourhood size for precision / recall.
        kid_subsets: KID subsets.
        kid_subset_size: KID subset size cap.
        seed: Seed of the KID subsets.
        per_class: Also report KID, precision / recall and diversity per class (needs ``labels`` and
            reference labels; FID per class only where each side has more samples than dimensions).

    Raises:
        MetricUndefinedError: when FID is undefined (``N <= D``) or dimensions disagree.

    Example:
        >>> ref = ReferenceStats.load("digits_heldout.npz", extractor=extractor)
        >>> result = compute_metrics(extractor(samples), ref, labels=class_labels)
        >>> accelerator.log({f"eval/{k}": v for k, v in result.to_dict().items() if isinstance(v, float)})
    """
    gen = _as_features(gen_feats, "generated features")
    if extractor is not None:
        ref.check_extractor(extractor)
    if gen.shape[1] != ref.dim:
        raise MetricUndefinedError(
            f"Generated features are {gen.shape[1]}-d but the reference statistics are {ref.dim}-d "
            f"(made with {ref.extractor}); use the same feature extractor on both sides."
        )
    check_fid_defined(gen.shape[0], gen.shape[1], "the generated samples")
    if ref.features is not None:
        check_fid_defined(ref.n, ref.dim, f"the reference statistics ({ref.source})")
    mu, sigma = feature_statistics(gen)
    fid = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    extra: dict = {}
    if ref.features is None:  # clean-fid mu / sigma: FID only
        kid = precision = recall = None
        extra["not_computed"] = {m: REFERENCE_FEATURES_NEEDED for m in ("kid", "precision", "recall")}
    else:
        kid = kernel_inception_distance(gen, ref.features, kid_subsets, kid_subset_size, seed)
        precision, recall = precision_recall(ref.features, gen, k=k)
    div = diversity(gen, labels)
    classes: dict = {}
    if per_class:
        if ref.features is None:
            raise MetricUndefinedError(f"Per-class metrics {REFERENCE_FEATURES_NEEDED}")
        classes = _per_class_metrics(gen, ref, labels, k, kid_subsets, kid_subset_size, seed, div["per_group"])
    return MetricsResult(
        fid=fid,
        kid=kid,
        precision=precision,
        recall=recall,
        pairwise_cosine_distance=div["pairwise_cosine_distance"],
        vendi=div["vendi"],
        num_generated=int(gen.shape[0]),
        num_reference=ref.n,
        extractor=ref.extractor,
        k=k,
        diversity_groups=div["groups"],
        per_class=classes,
        extra=extra,
        features=gen,
        labels=None if labels is None else np.asarray(labels),
    )


def _per_class_metrics(gen, ref, labels, k, kid_subsets, kid_subset_size, seed, div_groups) -> dict:
    if labels is None or ref.labels is None:
        raise MetricUndefinedError(
            "Per-class metrics need class labels for the generated samples and reference statistics made with labels."
        )
    gen_groups, ref_groups = group_indices(labels), group_indices(ref.labels)
    out = {}
    for lab, gi in gen_groups.items():
        if lab not in ref_groups:
            continue
        g, r = gen[gi], ref.features[ref_groups[lab]]
        row = {"num_generated": len(gi), "num_reference": len(r)}
        if min(len(g), len(r)) > gen.shape[1]:
            row["fid"] = frechet_distance(*feature_statistics(g), *feature_statistics(r))
        if min(len(g), len(r)) >= 2:
            row["kid"] = kernel_inception_distance(g, r, kid_subsets, kid_subset_size, seed)
        if min(len(g), len(r)) > k:
            row["precision"], row["recall"] = precision_recall(r, g, k=k)
        row.update(div_groups.get(str(lab), {}))
        out[str(lab)] = row
    return out


__all__ = [
    "MetricUndefinedError",
    "MetricsResult",
    "check_fid_defined",
    "compute_metrics",
    "diversity",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "group_indices",
    "kernel_inception_distance",
    "knn_radii",
    "manifold_coverage",
    "mean_pairwise_distance",
    "per_group",
    "precision_recall",
    "vendi_score",
]

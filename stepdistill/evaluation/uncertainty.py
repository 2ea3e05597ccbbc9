"""Numbers that hold: bias-corrected FID, bootstrap intervals, paired comparisons and the real-data floor.

* **FID∞** (Chong & Forsyth, "Effectively Unbiased FID and Inception Score and where to find them",
  CVPR 2020): the expected FID of ``N`` generated samples is close to linear in ``1 / N``,
  ``FID_N ~ FID_inf + c / N``. FID is computed on random subsets of several sizes (``n / 5 .. n``, drawn
  without replacement), a least-squares line is fitted in ``1 / N`` and its intercept is FID∞. Only the
  generated side is extrapolated; the reference is fixed, so its own finite-size bias stays in every row
  alike (the real-data floor shows it).
* **Bootstrap** (Efron 1979): the generated samples are resampled with replacement ``B`` times with a
  fixed seed and every metric is recomputed on each resample. A resample holds about 63 % distinct
  samples, which adds FID bias of its own; the replicates are therefore used for the spread only: the
  interval is the replicates' percentile interval moved so that their median sits on the estimate.
* **Paired comparison**: two models sampled from the same noise seeds and labels are resampled with the
  *same* indices (and the same FID∞ subsets), so what their samples share cancels in the difference
  ``A - B``; the verdict is "better" / "worse" only when the difference's interval excludes zero, else
  "not resolved".
* **Real-data floor**: real images disjoint from the reference, evaluated like a model; "excess over the
  floor" is a model's FID∞ minus the floor's (independent bootstraps of the two).

Precision / recall replicates keep each sample's k-NN radius from the full set (Kynkaenniemi et al. 2019)
and resample memberships; KID replicates use the all-pairs unbiased MMD^2 with clean-fid's cubic kernel,
skipping pairs of one sample with itself.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .metrics import MetricUndefinedError, _as_features, kernel_inception_distance, knn_radii

#: Metrics and whether lower is better.
LOWER_IS_BETTER = {"fid": True, "fid_inf": True, "kid": True, "precision": False, "recall": False,
                   "concept_fidelity": False, "concept_margin": False, "prompt_fidelity": False}

#: Above this many samples KID / precision-recall intervals are skipped (their replicates need n x n matrices).
MAX_PAIRWISE_SAMPLES = 10_000

_CHUNK = 25  # replicates per batched covariance / eigenvalue call


# ---------------------------------------------------------------------------------------------------
# The shared resampling plan
# ---------------------------------------------------------------------------------------------------
def fid_inf_sizes(n: int, dim: int, num_sizes: int = 8, min_fraction: float = 0.2) -> np.ndarray:
    """Subset sizes for FID∞: ``num_sizes`` sizes evenly spaced from ``max(n * min_fraction, 2 * dim)`` to ``n``.

    Below about twice the feature dimension the ``1 / N`` law breaks down (the covariance is nearly
    singular), so the smallest size is kept above ``2 * dim``.

    Raises:
        MetricUndefinedError: when ``n < 2.5 * dim`` (no range of sizes wide enough to fit a line).
    """
    lo = max(math.ceil(n * min_fraction), 2 * dim)
    if n < 2.5 * dim or num_sizes < 2:
        raise MetricUndefinedError(
            f"FID_inf needs at least 2.5 x the feature dimension in samples ({math.ceil(2.5 * dim)} for {dim}-d "
            f"features) and 2 or more subset sizes; got {n} samples and {num_sizes} sizes."
        )
    return np.unique(np.linspace(lo, n, num_sizes).round().astype(np.int64))


@dataclass
class ResamplePlan:
    """The bootstrap indices and FID∞ subsets shared by every feature set of ``n`` samples evaluated together.

    Two models evaluated with one plan are resampled identically: that is what makes a paired comparison
    (same noise seeds, same labels) valid.

    Args:
        n: Samples per set.
        indices: ``[B, n]`` bootstrap indices (with replacement).
        sizes: FID∞ subset sizes (``[]`` when FID∞ is undefined at this ``n``).
        subsets: Positions ``0 .. n - 1`` of each subset (without replacement), one array per size.
        seed: The seed everything was drawn with.

    Example:
        >>> plan = ResamplePlan.make(n=2000, dim=64, num_bootstrap=200, seed=0)
        >>> a, b = bootstrap_metrics(feats_a, ref, plan), bootstrap_metrics(feats_b, ref, plan)
        >>> compare_paired(a, b)["fid_inf"].verdict
    """

    n: int
    indices: np.ndarray
    sizes: np.ndarray
    subsets: list[np.ndarray]
    seed: int

    @classmethod
    def make(
        cls, n: int, dim: int, num_bootstrap: int = 200, seed: int = 0, num_sizes: int = 8, min_fraction: float = 0.2
    ) -> ResamplePlan:
        """Draw a plan with ``numpy.random.default_rng(seed)`` (FID∞ omitted where :func:`fid_inf_sizes` refuses)."""
        if num_bootstrap < 0:
            raise ValueError(f"num_bootstrap must be >= 0, got {num_bootstrap}.")
        rng = np.random.default_rng(seed)
        indices = rng.integers(0, n, size=(num_bootstrap, n), dtype=np.int64)
        try:
            sizes = fid_inf_sizes(n, dim, num_sizes, min_fraction)
        except MetricUndefinedError:
            sizes = np.zeros(0, dtype=np.int64)
        subsets = [np.sort(rng.permutation(n)[:s]) for s in sizes]
        return cls(n=n, indices=indices, sizes=sizes, subsets=subsets, seed=seed)

    @property
    def num_bootstrap(self) -> int:
        """Number of bootstrap replicates ``B``."""
        return int(self.indices.shape[0])

    def fingerprint(self) -> str:
        """A short hash of the indices and subsets (two results pair only when it is equal)."""
        h = hashlib.sha256(self.indices.tobytes())
        for s in self.subsets:
            h.update(s.tobytes())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Batched Frechet distance to one fixed reference
# ---------------------------------------------------------------------------------------------------
class _FixedReference:
    """``mu_r``, ``Sigma_r^(1/2)`` and ``tr Sigma_r`` of the reference, for many FIDs against it.

    ``Tr (Sigma Sigma_r)^(1/2) = sum sqrt(eig(Sigma_r^(1/2) Sigma Sigma_r^(1/2)))`` for PSD matrices (the
    two products are similar), so each FID costs one symmetric eigenvalue problem.
    """

    def __init__(self, mu: np.ndarray, sigma: np.ndarray) -> None:
        sigma = torch.as_tensor(np.asarray(sigma, np.float64))
        evals, evecs = torch.linalg.eigh((sigma + sigma.T) / 2)
        self.sqrt_sigma = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
        self.trace = float(torch.diagonal(sigma).sum())
        self.mu = torch.as_tensor(np.asarray(mu, np.float64))

    def fid(self, means: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
        """FIDs of ``[B, D]`` means and ``[B, D, D]`` covariances against the reference."""
        inner = self.sqrt_sigma @ covs @ self.sqrt_sigma
        root = torch.linalg.eigvalsh((inner + inner.transpose(-1, -2)) / 2).clamp_min(0).sqrt().sum(-1)
        trace = torch.diagonal(covs, dim1=-2, dim2=-1).sum(-1)
        return ((means - self.mu) ** 2).sum(-1) + trace + self.trace - 2 * root


def frechet_distance_to_reference(
    feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """FID of ``feats[rows[b]]`` against ``N(mu_ref, sigma_ref)`` for every row ``b`` of ``rows`` ``[B, m]``.

    The same value as clean-fid's ``frechet_distance`` (to about 1e-9 relative), batched: one symmetric
    eigenvalue problem per FID instead of a general matrix square root. ``rows=None``: the whole set once.
    """
    x = torch.as_tensor(_as_features(feats))
    rows = np.arange(x.shape[0])[None] if rows is None else np.atleast_2d(rows)
    return _batched_fids(x, _FixedReference(mu_ref, sigma_ref), rows)


def _batched_fids(x: torch.Tensor, ref: _FixedReference, rows: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, rows.shape[0], _CHUNK):
        sub = x[torch.as_tensor(rows[i : i + _CHUNK])]  # [b, m, D]
        mean = sub.mean(1)
        centered = sub - mean[:, None]
        covs = centered.transpose(1, 2) @ centered / (sub.shape[1] - 1)
        out.append(ref.fid(mean, covs))
    return torch.cat(out).numpy()


def fit_fid_inf(sizes: np.ndarray, fids: np.ndarray) -> np.ndarray:
    """Intercept at ``1 / N = 0`` of the least-squares line ``FID = a + b / N`` (``fids``: ``[..., S]``)."""
    design = np.stack([np.ones(len(sizes)), 1.0 / np.asarray(sizes, np.float64)], axis=1)
    coef = np.linalg.pinv(design) @ np.moveaxis(np.asarray(fids, np.float64), -1, 0).reshape(len(sizes), -1)
    return coef[0].reshape(np.asarray(fids).shape[:-1])


# ---------------------------------------------------------------------------------------------------
# Replicates of every metric
# ---------------------------------------------------------------------------------------------------
@dataclass
class MetricReplicates:
    """Point estimates and bootstrap replicates of FID, FID∞, KID, precision and recall for one feature set.

    Args:
        estimates: ``{metric: value}`` on the full set (``None`` where undefined).
        replicates: ``{metric: [B] replicates}`` for every metric with an estimate and an interval.
        n: Samples in the set.
        plan: Fingerprint of the :class:`ResamplePlan` (``""`` for an independent one).
        notes: ``{metric: why it has no estimate or no interval}``.
    """

    estimates: dict[str, float | None]
    replicates: dict[str, np.ndarray]
    n: int
    plan: str = ""
    notes: dict[str, str] = field(default_factory=dict)

    def interval(self, metric: str, confidence: float = 0.95) -> tuple[float, float] | None:
        """The bootstrap interval of ``metric`` (``None`` without replicates)."""
        if metric not in self.replicates or self.estimates.get(metric) is None:
            return None
        return centred_interval(self.estimates[metric], self.replicates[metric], confidence)

    def summary(self, confidence: float = 0.95) -> dict:
        """``{metric: {"value", "low", "high"}}`` (JSON-able; ``low`` / ``high`` ``None`` without replicates)."""
        out = {}
        for metric, value in self.estimates.items():
            ci = self.interval(metric, confidence)
            out[metric] = {"value": value, "low": None if ci is None else ci[0], "high": None if ci is None else ci[1]}
        return out


def mean_replicates(values: dict[str, np.ndarray], plan: ResamplePlan) -> MetricReplicates:
    """Means of per-sample values (e.g. a per-image similarity or a 0/1 match) and their bootstrap replicates.

    Every array holds one value per sample in the plan's sample order, so two models sampled from the same seeds
    and resampled with one ``plan`` pair (:func:`compare_paired`).

    Example:
        >>> a = mean_replicates({"prompt_fidelity": matches_a.astype(float)}, plan)
        >>> compare_paired(a, mean_replicates({"prompt_fidelity": matches_b.astype(float)}, plan))
    """
    estimates, replicates = {}, {}
    for metric, v in values.items():
        v = np.asarray(v, np.float64).reshape(-1)
        if v.shape[0] != plan.n:
            raise ValueError(f"{metric}: {v.shape[0]} values for a plan of {plan.n} samples.")
        estimates[metric] = float(v.mean())
        replicates[metric] = v[plan.indices].mean(axis=1)
    return MetricReplicates(estimates=estimates, replicates=replicates, n=plan.n, plan=plan.fingerprint())


def centred_interval(estimate: float, replicates: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``replicates`` moved so that their median sits on ``estimate``."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    reps = np.asarray(replicates, np.float64)
    alpha = (1 - confidence) / 2
    lo, med, hi = np.quantile(reps, [alpha, 0.5, 1 - alpha])
    return float(estimate + lo - med), float(estimate + hi - med)


def _kid_terms(gen: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The generated set's cubic-kernel matrix, its rows' mean kernel to the reference, the reference's self term."""
    d = gen.shape[1]
    k_gg = (gen @ gen.T / d + 1) ** 3
    k_gr_mean = ((gen @ ref.T / d + 1) ** 3).mean(1)
    k_rr = (ref @ ref.T / d + 1) ** 3
    m = ref.shape[0]
    rr = float((k_rr.sum() - torch.diagonal(k_rr).sum()) / (m * (m - 1)))
    return k_gg, k_gr_mean, rr


def _kid_replicates(k_gg: torch.Tensor, k_gr_mean: torch.Tensor, rr: float, counts: torch.Tensor) -> np.ndarray:
    """All-pairs unbiased MMD^2 for each row of sample ``counts`` ``[B, n]`` (pairs of a sample with itself skipped)."""
    n = counts.shape[1]
    diag = torch.diagonal(k_gg)
    quad = ((counts @ k_gg) * counts).sum(1) - (counts**2 * diag).sum(1)
    pairs = n * n - (counts**2).sum(1)
    return (quad / pairs + rr - 2 * (counts @ k_gr_mean) / n).numpy()


def _counts(indices: np.ndarray, n: int) -> torch.Tensor:
    counts = np.zeros((indices.shape[0], n))
    for b, idx in enumerate(indices):
        counts[b] = np.bincount(idx, minlength=n)
    return torch.as_tensor(counts)


def bootstrap_metrics(
    gen_feats: np.ndarray,
    ref_mu: np.ndarray,
    ref_sigma: np.ndarray,
    plan: ResamplePlan,
    ref_feats: np.ndarray | None = None,
    k: int = 3,
    kid: float | None = None,
) -> MetricReplicates:
    """Estimates and bootstrap replicates of FID, FID∞, KID, precision and recall of ``gen_feats`` vs a reference.

    Args:
        gen_feats: ``[n, D]`` generated (or floor) features; ``n`` must be ``plan.n``.
        ref_mu: Reference mean.
        ref_sigma: Reference covariance.
        plan: The shared :class:`ResamplePlan` (``ResamplePlan.make(n, D, ...)``).
        ref_feats: Reference features ``[m, D]`` (KID and precision / recall need them; ``None``: FID only).
        k: Neighbourhood size of precision / recall.
        kid: A KID estimate made already (clean-fid's subset average from
            :func:`~stepdistill.evaluation.metrics.compute_metrics`): the replicates are moved onto it.
            ``None``: the all-pairs unbiased estimate (same expectation, no subset noise, much faster).

    Returns:
        :class:`MetricReplicates`. FID is at ``n``; precision / recall are
        :func:`~stepdistill.evaluation.metrics.precision_recall`'s.
    """
    x = torch.as_tensor(_as_features(gen_feats, "generated features"))
    n, dim = x.shape
    if n != plan.n:
        raise MetricUndefinedError(f"The resampling plan is for {plan.n} samples, got {n}.")
    ref_dim = np.asarray(ref_mu).shape[0] if ref_feats is None else np.asarray(ref_feats).shape[1]
    if ref_dim != dim or np.asarray(ref_mu).shape != (dim,):
        raise MetricUndefinedError(f"Cannot compare {dim}-d features with {ref_dim}-d reference statistics.")
    raw = x
    shift = x.mean(0)  # FID is shift-invariant; centring keeps the covariance sums well conditioned
    x = x - shift
    fixed = _FixedReference(np.asarray(ref_mu, np.float64) - shift.numpy(), ref_sigma)
    estimates: dict[str, float | None] = {}
    reps: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    boot = plan.num_bootstrap > 0

    # 1. FID at n, and FID∞ from the subsets (the same positions in every replicate)
    estimates["fid"] = float(_batched_fids(x, fixed, np.arange(n)[None])[0])
    if boot:
        reps["fid"] = _batched_fids(x, fixed, plan.indices)
    if len(plan.sizes):
        point = np.array([_batched_fids(x, fixed, pos[None])[0] for pos in plan.subsets])
        estimates["fid_inf"] = float(fit_fid_inf(plan.sizes, point))
        if boot:
            per_size = np.stack([_batched_fids(x, fixed, plan.indices[:, pos]) for pos in plan.subsets], axis=1)
            reps["fid_inf"] = fit_fid_inf(plan.sizes, per_size)
    else:
        estimates["fid_inf"] = None
        notes["fid_inf"] = f"undefined: needs at least {math.ceil(2.5 * dim)} samples for {dim}-d features"

    # 2. KID and precision / recall need the reference's features
    if ref_feats is None:
        estimates.update(kid=None, precision=None, recall=None)
        notes.update({m: "the reference holds only mu/sigma" for m in ("kid", "precision", "recall")})
        return MetricReplicates(estimates, reps, n, plan.fingerprint(), notes)
    r = torch.as_tensor(_as_features(ref_feats, "reference features"))  # KID's kernel is not shift-invariant
    x = raw
    real_radii = knn_radii(r, k=k)
    gen_radii = knn_radii(x, k=k)
    inside_real = (torch.cdist(x, r) <= real_radii[None]).any(1).double()  # [n]: generated sample in real manifold
    covered = (torch.cdist(r, x) <= gen_radii[None]).double()  # [m, n]: real sample in generated sample's ball
    estimates["precision"] = float(inside_real.mean())
    estimates["recall"] = float((covered.sum(1) > 0).double().mean())
    if n > MAX_PAIRWISE_SAMPLES:  # no n x n kernel matrix: clean-fid's subset KID, no intervals
        estimates["kid"] = kernel_inception_distance(x.numpy(), r.numpy()) if kid is None else kid
        why = f"no interval above {MAX_PAIRWISE_SAMPLES} samples (replicates need n x n kernel / distance matrices)"
        notes.update({m: why for m in ("kid", "precision", "recall")} if boot else {})
        return MetricReplicates(estimates, reps, n, plan.fingerprint(), notes)
    k_gg, k_gr_mean, rr = _kid_terms(x, r)
    kid_full = float(_kid_replicates(k_gg, k_gr_mean, rr, torch.ones(1, n, dtype=torch.float64))[0])
    estimates["kid"] = kid_full if kid is None else kid
    if not boot:
        return MetricReplicates(estimates, reps, n, plan.fingerprint(), notes)
    counts = _counts(plan.indices, n)
    # replicates of the all-pairs estimator, moved onto the reported estimate (same expectation)
    reps["kid"] = _kid_replicates(k_gg, k_gr_mean, rr, counts) - kid_full + estimates["kid"]
    reps["precision"] = ((counts @ inside_real) / n).numpy()
    reps["recall"] = ((covered @ (counts > 0).double().T) > 0).double().mean(0).numpy()
    return MetricReplicates(estimates, reps, n, plan.fingerprint(), notes)


# ---------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------
@dataclass
class Difference:
    """``a - b`` for one metric, its bootstrap interval and the verdict for ``a``.

    Args:
        metric: Metric name.
        a: ``a``'s estimate.
        b: ``b``'s estimate.
        difference: ``a - b``.
        low: Lower end of the interval of ``a - b``.
        high: Upper end.
        verdict: ``"better"`` / ``"worse"`` (``a`` vs ``b``, by the metric's direction) when the interval
            excludes zero, else ``"not resolved"``.
    """

    metric: str
    a: float
    b: float
    difference: float
    low: float
    high: float
    verdict: str

    def to_dict(self) -> dict:
        """JSON-able fields."""
        return dict(self.__dict__)


def verdict(metric: str, low: float, high: float) -> str:
    """``"better"`` / ``"worse"`` for the first model when ``[low, high]`` (of ``a - b``) excludes zero."""
    if low <= 0 <= high:
        return "not resolved"
    lower = LOWER_IS_BETTER.get(metric, True)
    return "better" if (high < 0) == lower else "worse"


def _difference(metric: str, a: MetricReplicates, b: MetricReplicates, reps: np.ndarray, confidence: float):
    est = a.estimates[metric] - b.estimates[metric]
    low, high = centred_interval(est, reps, confidence)
    return Difference(metric, a.estimates[metric], b.estimates[metric], est, low, high, verdict(metric, low, high))


def compare_paired(a: MetricReplicates, b: MetricReplicates, confidence: float = 0.95) -> dict[str, Difference]:
    """Paired bootstrap comparison of two models sampled from the same noise (evaluated with one plan).

    Raises:
        MetricUndefinedError: when the two were not resampled with the same plan.
    """
    if a.plan != b.plan or a.n != b.n:
        raise MetricUndefinedError(
            f"Not paired: the two sets were resampled with different plans ({a.plan} / {b.plan}, n = {a.n} / {b.n}); "
            "evaluate both with one ResamplePlan, on samples from the same seeds."
        )
    out = {}
    for metric in LOWER_IS_BETTER:
        if metric in a.replicates and metric in b.replicates:
            out[metric] = _difference(metric, a, b, a.replicates[metric] - b.replicates[metric], confidence)
    return out


def compare_independent(
    a: MetricReplicates, b: MetricReplicates, confidence: float = 0.95, metrics: tuple[str, ...] = ("fid_inf",)
) -> dict[str, Difference]:
    """``a - b`` for sets bootstrapped independently (e.g. a model and the real-data floor).

    The replicates are paired in order; with independent index draws the difference's replicates are a
    bootstrap of the difference of two independent estimates.
    """
    out = {}
    for metric in metrics:
        if metric in a.replicates and metric in b.replicates:
            m = min(len(a.replicates[metric]), len(b.replicates[metric]))
            reps = a.replicates[metric][:m] - b.replicates[metric][:m]
            out[metric] = _difference(metric, a, b, reps, confidence)
    return out


# ---------------------------------------------------------------------------------------------------
# Per-sample features on disk, and the comparison of two saved evaluations
# ---------------------------------------------------------------------------------------------------
@dataclass
class SampleFeatures:
    """The per-sample features of one evaluation, what a later paired comparison needs.

    Saved as ``.npz`` of plain arrays (loaded with ``allow_pickle=False``).

    Args:
        features: ``[N, D]`` features, row ``k`` = sample ``k``.
        sample_ids: Noise seed of each sample (``None``: a folder, paired by sorted file order).
        labels: Condition of each sample (``None`` when unconditional).
        extractor: Identity of the extractor that made the features.

    Example:
        >>> SampleFeatures(result.features, seeds, result.labels, ref.extractor).save("a.features.npz")
    """

    features: np.ndarray
    sample_ids: np.ndarray | None
    labels: np.ndarray | None
    extractor: str

    def save(self, path: str | Path) -> Path:
        """Write the arrays atomically; returns the path."""
        from .stats import write_atomic

        arrays = {"features": np.asarray(self.features, np.float64), "extractor": np.array(self.extractor)}
        if self.sample_ids is not None:
            arrays["sample_ids"] = np.asarray(self.sample_ids, np.int64)
        if self.labels is not None:
            arrays["labels"] = np.asarray(self.labels, np.int64)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        return write_atomic(path, write)

    @classmethod
    def load(cls, path: str | Path) -> SampleFeatures:
        """Read a file written by :meth:`save` (no pickles).

        Raises:
            FileNotFoundError: when it is missing; MetricUndefinedError: when it is not such a file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Per-sample features {str(path)!r} not found (written by `eval calc --out`).")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (ValueError, OSError) as err:
            raise MetricUndefinedError(f"{str(path)!r} is not a per-sample features file: {err}") from err
        if "features" not in arrays or "extractor" not in arrays or arrays["features"].ndim != 2:
            raise MetricUndefinedError(f"{str(path)!r} is not a per-sample features file (no [N, D] 'features').")
        return cls(arrays["features"], arrays.get("sample_ids"), arrays.get("labels"), str(arrays["extractor"]))


def check_paired(a: SampleFeatures, b: SampleFeatures) -> str:
    """Check that ``a`` and ``b`` were sampled from the same noise and conditions; returns how they pair.

    Raises:
        MetricUndefinedError: different extractors, sizes, seeds or labels.
    """
    if a.extractor != b.extractor:
        raise MetricUndefinedError(f"Not comparable: features of {a.extractor!r} and of {b.extractor!r}.")
    if a.features.shape != b.features.shape:
        raise MetricUndefinedError(f"Not paired: {a.features.shape[0]} and {b.features.shape[0]} samples.")
    if (a.sample_ids is None) != (b.sample_ids is None):
        raise MetricUndefinedError("Not paired: one evaluation sampled a pipeline with seeds, the other read a folder.")
    if a.sample_ids is not None and not np.array_equal(a.sample_ids, b.sample_ids):
        raise MetricUndefinedError("Not paired: the two were sampled from different noise seeds; use the same --seeds.")
    if a.labels is not None and b.labels is not None and not np.array_equal(a.labels, b.labels):
        raise MetricUndefinedError("Not paired: the two were sampled with different class labels.")
    return "noise seeds" if a.sample_ids is not None else "sorted file order (folders: same names, same noise)"


def paired_comparison(
    a: SampleFeatures,
    b: SampleFeatures,
    ref_mu: np.ndarray,
    ref_sigma: np.ndarray,
    ref_feats: np.ndarray | None = None,
    num_bootstrap: int = 200,
    seed: int = 0,
    num_sizes: int = 8,
    confidence: float = 0.95,
    k: int = 3,
) -> tuple[dict[str, Difference], str]:
    """Paired bootstrap comparison of two evaluations against one reference: ``({metric: Difference}, pairing)``.

    Raises:
        MetricUndefinedError: when the two are not paired (see :func:`check_paired`) or ``num_bootstrap < 1``.
    """
    pairing = check_paired(a, b)
    if num_bootstrap < 1:
        raise MetricUndefinedError("A paired comparison needs bootstrap replicates (num_bootstrap >= 1).")
    n, dim = a.features.shape
    plan = ResamplePlan.make(n, dim, num_bootstrap, seed, num_sizes)
    ra = bootstrap_metrics(a.features, ref_mu, ref_sigma, plan, ref_feats, k=k)
    rb = bootstrap_metrics(b.features, ref_mu, ref_sigma, plan, ref_feats, k=k)
    return compare_paired(ra, rb, confidence), pairing


__all__ = [
    "LOWER_IS_BETTER",
    "MAX_PAIRWISE_SAMPLES",
    "Difference",
    "MetricReplicates",
    "ResamplePlan",
    "SampleFeatures",
    "bootstrap_metrics",
    "centred_interval",
    "check_paired",
    "compare_independent",
    "compare_paired",
    "fid_inf_sizes",
    "fit_fid_inf",
    "frechet_distance_to_reference",
    "paired_comparison",
    "verdict",
]

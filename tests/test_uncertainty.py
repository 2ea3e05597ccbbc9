"""FID∞, bootstrap intervals, paired comparisons and per-sample feature files (stepdistill.evaluation.uncertainty)."""

from __future__ import annotations

import numpy as np
import pytest
from cleanfid import fid as cleanfid_fid

from stepdistill.evaluation import (
    MetricUndefinedError,
    ResamplePlan,
    SampleFeatures,
    bootstrap_metrics,
    compare_independent,
    compare_paired,
    feature_statistics,
    frechet_distance,
    paired_comparison,
    precision_recall,
)
from stepdistill.evaluation.uncertainty import (
    centred_interval,
    fid_inf_sizes,
    fit_fid_inf,
    frechet_distance_to_reference,
    verdict,
)


def _exact(rng: np.random.Generator, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """``n`` samples whose sample mean and covariance (``np.cov``) are exactly ``mean`` and ``cov``."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z @ np.linalg.cholesky(cov).T + mean


# ---------------------------------------------------------------------------------------------------------
# Frechet distance: analytic values and clean-fid
# ---------------------------------------------------------------------------------------------------------
def test_equal_covariances_give_the_squared_mean_distance():
    rng = np.random.default_rng(0)
    d = 8
    m = rng.normal(size=(d, d))
    cov = m @ m.T + 0.5 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert frechet_distance(mu1, cov, mu2, cov) == pytest.approx(expected, rel=1e-6)
    feats = _exact(rng, 300, mu1, cov)
    assert frechet_distance_to_reference(feats, mu2, cov)[0] == pytest.approx(expected, rel=1e-9)


def test_a_diagonal_case_by_hand():
    # |mu1 - mu2|^2 = 1 + 4; per axis (sqrt(a) - sqrt(b))^2 = (1 - 2)^2 + (2 - 1)^2 + (3 - 4)^2 = 3: FID = 8
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 16.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(8.0, rel=1e-9)
    feats = _exact(np.random.default_rng(1), 50, mu1, s1)
    assert frechet_distance_to_reference(feats, mu2, s2)[0] == pytest.approx(8.0, rel=1e-9)


def test_batched_distance_agrees_with_cleanfid():
    rng = np.random.default_rng(2)
    d = 24
    gen = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) / 4 + 0.3
    ref = rng.normal(size=(300, d))
    mu_r, s_r = feature_statistics(ref)
    rows = np.stack([rng.choice(400, size=200, replace=False) for _ in range(3)])
    ours = frechet_distance_to_reference(gen, mu_r, s_r, rows)
    for value, row in zip(ours, rows):
        expected = cleanfid_fid.frechet_distance(*feature_statistics(gen[row]), mu_r, s_r)
        assert value == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# FID∞
# ---------------------------------------------------------------------------------------------------------
def test_fit_recovers_an_exact_line():
    sizes = np.array([100, 200, 400, 800])
    assert fit_fid_inf(sizes, 3.0 + 50.0 / sizes) == pytest.approx(3.0, rel=1e-12)
    assert list(fid_inf_sizes(1000, 16, num_sizes=5)) == [200, 400, 600, 800, 1000]
    assert fid_inf_sizes(200, 64, num_sizes=8)[0] == 128  # never below 2 x dim
    with pytest.raises(MetricUndefinedError, match="2.5 x the feature dimension"):
        fid_inf_sizes(100, 64)


def test_fid_inf_recovers_a_known_distance_within_its_interval():
    rng = np.random.default_rng(3)
    d, n = 16, 800
    mu_r, sigma_r = np.full(d, 0.1), np.diag(np.linspace(0.5, 2.0, d))
    truth = frechet_distance(np.zeros(d), np.eye(d), mu_r, sigma_r)  # generated: N(0, I)
    gen = rng.normal(size=(n, d))
    reps = bootstrap_metrics(gen, mu_r, sigma_r, ResamplePlan.make(n, d, num_bootstrap=100, seed=0))
    low, high = reps.interval("fid_inf")
    assert low <= truth <= high
    fid_low, _ = reps.interval("fid")
    assert fid_low > truth  # FID at n is biased upward by the sample size; FID∞ removes it
    assert reps.estimates["kid"] is None and "mu/sigma" in reps.notes["kid"]


def test_point_estimates_match_the_metric_functions():
    rng = np.random.default_rng(4)
    d = 8
    gen, ref = rng.normal(0.2, 1.0, size=(300, d)), rng.normal(size=(200, d))
    mu_r, s_r = feature_statistics(ref)
    reps = bootstrap_metrics(gen, mu_r, s_r, ResamplePlan.make(300, d, 20, seed=1), ref_feats=ref)
    assert reps.estimates["fid"] == pytest.approx(cleanfid_fid.frechet_distance(*feature_statistics(gen), mu_r, s_r))
    assert (reps.estimates["precision"], reps.estimates["recall"]) == precision_recall(ref, gen)
    for metric in ("fid", "fid_inf", "kid", "precision", "recall"):
        low, high = reps.interval(metric)
        assert low <= reps.estimates[metric] <= high and len(reps.replicates[metric]) == 20


def test_interval_is_centred_on_the_estimate():
    # replicates 100.0 .. 110.0: 5 % / 50 % / 95 % quantiles 100.5 / 105 / 109.5, moved onto 10
    low, high = centred_interval(10.0, np.arange(101) / 10 + 100.0, confidence=0.9)
    assert (low, high) == pytest.approx((5.5, 14.5))


# ---------------------------------------------------------------------------------------------------------
# Paired comparison
# ---------------------------------------------------------------------------------------------------------
def _model(rng: np.random.Generator, noise: np.ndarray, shift: float) -> np.ndarray:
    return noise + shift  # a "model" maps noise to features


def test_paired_verdicts():
    rng = np.random.default_rng(5)
    d, n = 8, 600
    ref = rng.normal(size=(500, d))
    mu_r, s_r = feature_statistics(ref)
    plan = ResamplePlan.make(n, d, num_bootstrap=100, seed=0)
    noise = rng.normal(size=(n, d))
    good = bootstrap_metrics(_model(rng, noise, 0.0), mu_r, s_r, plan, ref)
    # the same model, other noise: at 95 % a difference is "resolved" about 1 time in 20 per metric
    resolved = {m: 0 for m in ("fid", "fid_inf", "kid", "precision", "recall")}
    for _ in range(10):
        same = bootstrap_metrics(_model(rng, rng.normal(size=(n, d)), 0.0), mu_r, s_r, plan, ref)
        for m, c in compare_paired(same, good).items():
            resolved[m] += c.verdict != "not resolved"
    assert max(resolved.values()) <= 2, resolved
    # a clearly worse model from the same noise
    bad = bootstrap_metrics(_model(rng, noise, 0.4), mu_r, s_r, plan, ref)
    worse = compare_paired(bad, good)
    assert worse["fid_inf"].verdict == "worse" and worse["fid"].verdict == "worse" and worse["kid"].verdict == "worse"
    assert worse["fid_inf"].low > 0 and compare_paired(good, bad)["fid_inf"].verdict == "better"
    assert verdict("precision", 0.01, 0.02) == "better" and verdict("fid", 0.01, 0.02) == "worse"
    # sets resampled with different plans do not pair; independent sets compare without pairing
    other = bootstrap_metrics(noise, mu_r, s_r, ResamplePlan.make(n, d, 100, seed=1), ref)
    with pytest.raises(MetricUndefinedError, match="Not paired"):
        compare_paired(good, other)
    assert compare_independent(bad, other)["fid_inf"].verdict == "worse"


def test_sample_features_round_trip_and_pairing(tmp_path):
    rng = np.random.default_rng(6)
    d, n = 4, 60
    ref = rng.normal(size=(100, d))
    a = SampleFeatures(rng.normal(size=(n, d)), np.arange(n), np.arange(n) % 10, "toy")
    path = a.save(tmp_path / "a.features.npz")
    back = SampleFeatures.load(path)
    assert np.array_equal(back.features, a.features) and np.array_equal(back.sample_ids, a.sample_ids)
    assert back.extractor == "toy" and np.array_equal(back.labels, a.labels)
    diffs, pairing = paired_comparison(a, back, *feature_statistics(ref), ref, num_bootstrap=20)
    assert pairing == "noise seeds" and diffs["fid"].difference == 0 and diffs["fid"].verdict == "not resolved"
    shifted = SampleFeatures(a.features, a.sample_ids + 1, a.labels, "toy")
    with pytest.raises(MetricUndefinedError, match="different noise seeds"):
        paired_comparison(a, shifted, *feature_statistics(ref), ref)
    with pytest.raises(MetricUndefinedError, match="Not comparable"):
        paired_comparison(a, SampleFeatures(a.features, a.sample_ids, a.labels, "other"), *feature_statistics(ref))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(MetricUndefinedError, match="not a per-sample features file"):
        SampleFeatures.load(tmp_path / "bad.npz")

"""Phased DMD's subinterval targets: the Monte-Carlo check of Eq. 11-12, the clamp, the margin, the naive target."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from stepdistill.losses import (
    NaiveSubintervalScoreMatchingLoss,
    SubintervalDistributionMatchingLoss,
    SubintervalScoreMatchingLoss,
)
from stepdistill.schedules import FlowSchedule, VPSchedule

N = 1_000_000
MEAN, STD = 1.5, 0.7  # 1-D Gaussian data x0 ~ N(MEAN, STD^2)


def _vp(prediction_type: str) -> VPSchedule:
    return VPSchedule.from_config(DDPMScheduler(beta_schedule="linear").config, prediction_type=prediction_type)


CASES = [  # (schedule, s, t): a boundary s and a re-noise level t > s, where the naive target's bias is visible
    (_vp("epsilon"), 499.0, 599.0),
    (_vp("v_prediction"), 249.0, 499.0),
    (_vp("sample"), 99.0, 299.0),
    (FlowSchedule(prediction_type="flow"), 500.0, 800.0),
    (FlowSchedule(prediction_type="flow"), 250.0, 900.0),
]
IDS = ["vp-eps", "vp-v", "vp-x0", "flow-0.5-0.8", "flow-0.25-0.9"]


def _fit(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Least-squares slope and intercept of ``y`` on ``x``."""
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / xc.square().sum())
    return slope, float(y.mean() - slope * x.mean())


def _samples(sched, s: float, t: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x0 = MEAN + STD * torch.randn(N, generator=g, dtype=torch.float64)
    # subinterval: only x_s is kept, re-noised from s to t by the conditional kernel
    eps_s = torch.randn(N, generator=g, dtype=torch.float64)
    x_s = sched.add_noise(x0, eps_s, s)
    noise = torch.randn(N, generator=g, dtype=torch.float64)
    tt = torch.full((N,), t, dtype=torch.float64)
    # full interval on the same x_t (common random numbers): its noise is the two draws combined,
    # eps = (alpha_{t|s} sigma_s eps_s + sigma_{t|s} noise) / sigma_t, again N(0, 1) and independent of x0
    a_ts, s_ts = sched.conditional_kernel(t, s)
    eps = (a_ts * sched.alpha_sigma(s)[1] * eps_s + s_ts * noise) / sched.alpha_sigma(t)[1]
    full_xt = sched.add_noise(x0, eps, t)
    full_target = sched.target(x0, eps, t)
    sub_xt, sub_target = SubintervalScoreMatchingLoss(sched).targets(x_s, noise, tt, s)
    naive_xt, naive_target = NaiveSubintervalScoreMatchingLoss(sched).targets(x_s, noise, tt, s)
    return (full_xt, full_target), (sub_xt, sub_target), (naive_xt, naive_target)


@pytest.mark.parametrize(("sched", "s", "t"), CASES, ids=IDS)
def test_subinterval_target_regresses_like_the_full_interval_target(sched, s, t):
    full, sub, naive = _samples(sched, s, t, seed=0)
    torch.testing.assert_close(sub[0], naive[0])  # the same x_t for all three targets
    torch.testing.assert_close(sub[0], full[0])
    slope_f, icpt_f = _fit(*full)
    slope_s, icpt_s = _fit(*sub)
    slope_n, icpt_n = _fit(*naive)
    # E[target | x_t] is linear for Gaussian data: the subinterval target has the same line (within 1%) ...
    assert slope_s == pytest.approx(slope_f, rel=0.01)
    assert icpt_s == pytest.approx(icpt_f, rel=0.01)
    # ... the naive one (x_s taken for clean data) does not
    assert abs(slope_n - slope_f) > 0.05 * abs(slope_f) or abs(icpt_n - icpt_f) > 0.05 * abs(icpt_f)


@pytest.mark.parametrize(("sched", "s", "t"), CASES, ids=IDS)
def test_full_interval_line_matches_the_closed_form(sched, s, t):
    """The reference line itself is right: Gaussian posterior E[x0 | x_t] mapped to the target."""
    full, _, _ = _samples(sched, s, t, seed=1)
    a, sig = (float(v) for v in sched.alpha_sigma(t))
    # x_t ~ N(a MEAN, a^2 STD^2 + sig^2); E[x0|x_t] = MEAN + k (x_t - a MEAN), k = a STD^2 / var
    var = a * a * STD * STD + sig * sig
    k = a * STD * STD / var
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    x0 = MEAN + k * (x - a * MEAN)
    eps = (x - a * x0) / sig
    line = sched.target(x0, eps, t)
    slope, icpt = float(line[1] - line[0]), float(line[0])
    got_slope, got_icpt = _fit(*full)
    assert got_slope == pytest.approx(slope, rel=0.01, abs=1e-3)
    assert got_icpt == pytest.approx(icpt, rel=0.01, abs=1e-3)


def test_flow_target_is_the_papers_eq11():
    """For rectified flow the target equals Eq. 11 written out (the form LightX2V implements)."""
    sched = FlowSchedule()
    g = torch.Generator().manual_seed(0)
    x_s, n = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    s, t = 300.0, torch.rand(64, generator=g, dtype=torch.float64) * 600 + 350
    _, target = SubintervalScoreMatchingLoss(sched).targets(x_s, n, t, s)
    ss, st = s / 1000, t / 1000
    a = (1 - st) / (1 - ss)
    beta = (st ** 2 - a ** 2 * ss ** 2).sqrt()
    eq11 = -x_s / (1 - ss) + (st + (1 - st) * ss ** 2 / (1 - ss) ** 2) / beta * n
    torch.testing.assert_close(target, eq11)


def test_x0_target_is_the_papers_eq12_and_s0_gives_the_ordinary_targets():
    sched = _vp("sample")
    g = torch.Generator().manual_seed(0)
    x_s, n = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    s, t = 300.0, torch.full((32,), 700.0, dtype=torch.float64)
    _, target = SubintervalScoreMatchingLoss(sched).targets(x_s, n, t, s)
    (a_s, s_s), (a_t, _) = sched.alpha_sigma(s), sched.alpha_sigma(700.0)
    _, s_ts = sched.conditional_kernel(700.0, s)
    eq12 = x_s / a_s - a_t * s_s ** 2 / (a_s ** 2 * s_ts) * n
    torch.testing.assert_close(target, eq12)
    flow = FlowSchedule()
    x_t, target = SubintervalScoreMatchingLoss(flow).targets(x_s, n, torch.full((32,), 700.0), 0.0)
    torch.testing.assert_close(target, n - x_s)
    torch.testing.assert_close(x_t, flow.add_noise(x_s, n, 700.0))


def test_clamp_weights_close_pairs_by_sigma_squared_and_leaves_far_ones():
    sched = FlowSchedule()
    loss = SubintervalScoreMatchingLoss(sched, clamp_max=10.0)
    s = 500.0
    t = torch.tensor([501.0, 510.0, 550.0, 900.0, 1000.0], dtype=torch.float64)
    _, s_ts = sched.conditional_kernel(t, s)
    w = loss.weight(t, s)
    close = s_ts.square() < 0.1
    assert close.any() and (~close).any()
    torch.testing.assert_close(w[close], 10.0 * s_ts[close].square())
    torch.testing.assert_close(w[~close], torch.ones_like(w[~close]))
    # Eq. 13 literally: clamp(1/sigma^2, 0, 10) * |sigma psi - sigma target|^2 equals weight * |psi - target|^2
    g = torch.Generator().manual_seed(0)
    x_s = torch.randn(5, 1, 2, 2, generator=g)
    batch = loss.noise(x_s, s, generator=g)
    psi = torch.randn_like(x_s)
    _, sig = sched.conditional_kernel(batch.t, s)
    eq13 = (1 / sig.square()).clamp(0, 10).float() * ((sig.float().view(-1, 1, 1, 1) * (psi - batch.target)) ** 2
                                                      ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss(psi, batch), eq13)
    assert (SubintervalScoreMatchingLoss(sched, clamp_max=None).weight(t, s) == 1).all()


@pytest.mark.parametrize("sched", [FlowSchedule(), _vp("epsilon")], ids=["flow", "vp"])
def test_margin_keeps_every_level_above_the_boundary(sched):
    loss = SubintervalScoreMatchingLoss(sched, clamp_max=None, margin=20.0)
    batch = loss.noise(torch.zeros(4096, 1), 499.0, generator=torch.Generator().manual_seed(0))
    assert (batch.t > 519.0).all() and (batch.t <= sched.max_timestep).all()
    disjoint = loss.noise(torch.zeros(4096, 1), 249.0, high=499.0, generator=torch.Generator().manual_seed(0))
    assert (disjoint.t > 269.0).all() and (disjoint.t <= 499.0).all()
    with pytest.raises(ValueError, match="margin"):
        SubintervalScoreMatchingLoss(sched, margin=-1.0)
    with pytest.raises(ValueError, match="No re-noise level"):
        sched.sample_subinterval_timesteps(4, 499.0, high=499.0)


def test_last_phase_is_ordinary_score_matching():
    sched = _vp("epsilon")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 1, 2, 2, generator=g)
    batch = SubintervalScoreMatchingLoss(sched).noise(x0, None, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(batch.target, batch.noise)
    torch.testing.assert_close(batch.x_t, sched.add_noise(x0, batch.noise, batch.t))
    assert (batch.weight == 1).all()


def test_boundary_dm_loss_pushes_x_s_along_the_normalised_gap():
    sched = FlowSchedule()

    from stepdistill.denoiser import Denoiser, DenoiserOutput

    class Const(Denoiser):
        def __init__(self, c):
            torch.nn.Module.__init__(self)
            self.schedule, self.c = sched, c

        def forward(self, x_t, t, cond=None):
            return DenoiserOutput(torch.full_like(x_t, self.c), torch.zeros_like(x_t), x_t)

    x_s = torch.zeros(3, 1, 2, 2, requires_grad=True)
    x0_ref = torch.full((3, 1, 2, 2), 2.0)
    out = SubintervalDistributionMatchingLoss(sched)(x_s, x0_ref, 500.0, None, Const(1.0), Const(0.0),
                                                     generator=torch.Generator().manual_seed(0))
    assert (out.t > 500).all()
    out.loss.sum().backward()
    # grad = (x0_fake - x0_real) / mean|x0_ref - x0_real| = (0 - 1) / 1, through 0.5 * mean(.)^2 over 4 elements
    torch.testing.assert_close(x_s.grad, torch.full_like(x_s, -1.0 / 4))

"""Losses that own their noise-level draw draw exactly what they say, from the generator they are given."""

from __future__ import annotations

import torch

from stepdistill import Conditioning, FlowSchedule, VPSchedule
from stepdistill.denoiser import CallableDenoiser
from stepdistill.losses import (
    DenoisingScoreMatchingLoss,
    DistributionMatchingLoss,
    GANInputNoise,
    compute_distribution_matching_loss,
)

VP = VPSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                            prediction_type="v_prediction")


def test_training_timesteps_cover_the_requested_range():
    t = VP.sample_timesteps(20000, 0.02, 0.98, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and torch.equal(t, t.round())
    assert int(t.min()) == 20 and int(t.max()) == 980
    flow = FlowSchedule(prediction_type="flow")
    u = flow.sample_timesteps(20000, 0.25, 0.5, torch.Generator().manual_seed(0))
    assert u.min() >= 0.25 * flow.max_timestep and u.max() < 0.5 * flow.max_timestep
    assert not torch.equal(u, u.round())


def test_dsm_noise_draws_t_then_noise_and_targets_the_parameterization():
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = DenoisingScoreMatchingLoss(VP).noise(x0, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (4,), generator=g).double()
    eps = torch.randn(x0.shape, generator=g)
    assert torch.equal(batch.t, t) and torch.equal(batch.noise, eps)
    torch.testing.assert_close(batch.x_t, VP.add_noise(x0, eps, t))
    torch.testing.assert_close(batch.target, VP.target(x0, eps, t))
    assert DenoisingScoreMatchingLoss(VP)(batch.target, batch.target).abs().max() == 0


def test_dm_loss_equals_the_explicit_form_for_its_own_draw():
    sched = VPSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                                   prediction_type="sample")
    real = CallableDenoiser(lambda x, t, c: 0.5 * x + c.class_labels.float()[:, None, None, None], sched)
    fake = CallableDenoiser(lambda x, t, c: 0.25 * x, sched)
    cond = Conditioning(class_labels=torch.tensor([1, 2, 0]), null_class_label=0)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    out = DistributionMatchingLoss(sched, 0.02, 0.98, real_guidance_scale=2.0)(x, cond, real, fake,
                                                                              torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    t = sched.sample_timesteps(3, 0.02, 0.98, g)
    noise = torch.randn(x.shape, generator=g)
    loss, _, _ = compute_distribution_matching_loss(x, cond, real, fake, t, noise, 2.0)
    assert torch.equal(out.t, t) and torch.equal(out.loss, loss)


def test_gan_input_noise_clean_or_noised():
    x = torch.randn(2, 1, 4, 4)
    clean, t = GANInputNoise(VP, noisy=False)(x, torch.Generator().manual_seed(0))
    assert clean is x and torch.equal(t, torch.zeros(2, dtype=torch.float64))
    noisy, t = GANInputNoise(VP, noisy=True)(x, torch.Generator().manual_seed(0))
    assert not torch.equal(noisy, x) and t.shape == (2,)

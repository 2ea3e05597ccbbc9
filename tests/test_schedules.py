"""Noise schedules: round trips, agreement with diffusers' own schedulers, kernels, timestep checks.

Tolerances: float64 round trips to 1e-10; comparisons with diffusers (which computes in float32)
to 1e-5 absolute on unit-scale tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from stepdistill.denoiser import DenoiserOutput
from stepdistill.sampling import ddim_step
from stepdistill.schedules import (
    FlowSchedule,
    NoiseSchedule,
    VPSchedule,
    check_prediction_type,
)

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
DIFFUSERS_ATOL = 1e-5


def vp(prediction_type="epsilon", **kwargs) -> VPSchedule:
    return NoiseSchedule.from_scheduler_config(DDPMScheduler(prediction_type=prediction_type, **kwargs).config)


def flow(prediction_type="flow", shift=3.0) -> FlowSchedule:
    config = FlowMatchEulerDiscreteScheduler(shift=shift).config
    return NoiseSchedule.from_scheduler_config(config, prediction_type=prediction_type)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------------
# construction and prediction types


def test_from_scheduler_config_picks_the_family():
    assert isinstance(vp(), VPSchedule)
    assert isinstance(NoiseSchedule.from_scheduler_config(EulerDiscreteScheduler().config), VPSchedule)
    sched = flow(shift=3.0)
    assert isinstance(sched, FlowSchedule) and sched.shift == 3.0 and sched.prediction_type == "flow"
    assert vp("v_prediction").prediction_type == "v_prediction"
    # an override wins over the config
    assert NoiseSchedule.from_scheduler_config(DDPMScheduler().config, prediction_type="sample").prediction_type == (
        "sample"
    )


def test_unknown_prediction_type_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown prediction type 'x0'.*'epsilon'.*'v_prediction'.*'sample'"):
        check_prediction_type("x0")
    with pytest.raises(ValueError, match="Unknown prediction type 'velocity'"):
        NoiseSchedule.from_scheduler_config(DDPMScheduler().config, prediction_type="velocity")
    config = dict(DDPMScheduler().config, prediction_type="eps")
    with pytest.raises(ValueError, match="Unknown prediction type 'eps'"):
        NoiseSchedule.from_scheduler_config(config)
    with pytest.raises(ValueError, match="Unknown prediction type 'noise'"):
        FlowSchedule(prediction_type="noise")
    with pytest.raises(ValueError, match="does not fit a VP"):
        NoiseSchedule.from_scheduler_config(DDPMScheduler().config, prediction_type="flow")


def test_unsupported_flow_configs_are_rejected():
    config = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
    with pytest.raises(ValueError, match="Dynamic .* shifting is not supported"):
        NoiseSchedule.from_scheduler_config(config)
    with pytest.raises(ValueError, match="shift must be positive"):
        FlowSchedule(shift=0.0)


# --------------------------------------------------------------------------------------------------
# round trips


ROUND_TRIP_CASES = [("vp", p) for p in ("epsilon", "v_prediction", "sample")] + [
    ("flow", p) for p in ("flow", "epsilon", "v_prediction", "sample")
]


@pytest.mark.parametrize("family,prediction_type", ROUND_TRIP_CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_target_to_x0_eps_round_trip(family, prediction_type, dtype, tol):
    # Away from the ill-conditioned ends: t in [20, 950] for VP, sigma in [0.02, 0.95] for flow.
    sched = vp(prediction_type, beta_schedule="scaled_linear") if family == "vp" else flow(prediction_type)
    t = torch.tensor([20.0, 137.5, 400.0, 777.25, 950.0], dtype=torch.float64)
    x0, eps = randn(5, 2, 4, 4, dtype=dtype), randn(5, 2, 4, 4, dtype=dtype, seed=1)
    x_t = sched.add_noise(x0, eps, t)
    y = sched.target(x0, eps, t)
    x0_hat, eps_hat = sched.to_x0_eps(y, x_t, t)
    assert x0_hat.dtype == dtype and eps_hat.dtype == dtype
    torch.testing.assert_close(x0_hat, x0, atol=tol, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=tol, rtol=0)
    # from_x0_eps is the same map as target
    torch.testing.assert_close(sched.from_x0_eps(x0, eps, t), y)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_conversions_match_the_documented_formulas(prediction_type):
    """Independent check of the table in the methods README (alpha^2 + sigma^2 = 1 for VP)."""
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    sched = NoiseSchedule.from_scheduler_config(ddpm.config)
    t = torch.tensor([100, 500, 900])
    abar = ddpm.alphas_cumprod[t].double()[:, None, None, None]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x_t, y = randn(3, 2, 4, 4, dtype=torch.float64), randn(3, 2, 4, 4, dtype=torch.float64, seed=1)
    x0, eps = sched.to_x0_eps(y, x_t, t)
    if prediction_type == "epsilon":
        ref_x0, ref_eps = (x_t - s * y) / a, y
    elif prediction_type == "v_prediction":
        ref_x0, ref_eps = a * x_t - s * y, s * x_t + a * y
    else:
        ref_x0, ref_eps = y, (x_t - a * y) / s
    torch.testing.assert_close(x0, ref_x0, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(eps, ref_eps, atol=1e-12, rtol=1e-12)


def test_flow_conversions_match_the_documented_formulas():
    sched = flow()
    t = torch.tensor([100.0, 500.0, 900.0], dtype=torch.float64)
    sigma = (t / 1000)[:, None, None, None]
    x_t, u = randn(3, 2, 4, 4, dtype=torch.float64), randn(3, 2, 4, 4, dtype=torch.float64, seed=1)
    x0, eps = sched.to_x0_eps(u, x_t, t)
    torch.testing.assert_close(x0, x_t - sigma * u)
    torch.testing.assert_close(eps, x_t + (1 - sigma) * u)


def test_low_precision_inputs():
    """bf16 network outputs are converted in float64 and come back as float32; add_noise keeps x0's dtype."""
    sched = vp("v_prediction", beta_schedule="scaled_linear")
    x_t = randn(2, 2, 4, 4)
    y = randn(2, 2, 4, 4, seed=1).bfloat16()
    x0, eps = sched.to_x0_eps(y, x_t, 999)
    assert x0.dtype == torch.float32 and eps.dtype == torch.float32
    ref_x0, _ = sched.to_x0_eps(y.double(), x_t.double(), 999)
    torch.testing.assert_close(x0, ref_x0.float())
    assert sched.add_noise(x_t.bfloat16(), y, 500).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# agreement with diffusers


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_add_noise_matches_ddpm(beta_schedule, prediction_type):
    ddpm = DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
    sched = NoiseSchedule.from_scheduler_config(ddpm.config)
    t = torch.tensor([0, 1, 20, 399, 500, 998, 999])
    x0, noise = randn(7, 2, 4, 4), randn(7, 2, 4, 4, seed=1)
    torch.testing.assert_close(sched.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t), atol=DIFFUSERS_ATOL, rtol=0)
    # one scalar timestep for the whole batch
    torch.testing.assert_close(
        sched.add_noise(x0, noise, 250), ddpm.add_noise(x0, noise, torch.tensor([250])), atol=DIFFUSERS_ATOL, rtol=0
    )


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_add_noise_matches_ddpm_zero_terminal_snr(beta_schedule):
    ddpm = DDPMScheduler(beta_schedule=beta_schedule, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    sched = NoiseSchedule.from_scheduler_config(ddpm.config)
    alpha, sigma = sched.alpha_sigma(999)
    assert alpha.item() == 0.0 and sigma.item() == 1.0
    assert sched.log_snr(999).item() == -math.inf
    t = torch.tensor([0, 300, 998, 999])
    x0, noise = randn(4, 2, 4, 4), randn(4, 2, 4, 4, seed=1)
    torch.testing.assert_close(sched.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t), atol=DIFFUSERS_ATOL, rtol=0)
    # v-prediction still gives x0 at the terminal step: x0 = -v when alpha = 0
    v = sched.target(x0, noise, t)
    torch.testing.assert_close(sched.to_x0_eps(v, sched.add_noise(x0, noise, t), t)[0], x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_v_target_matches_get_velocity(beta_schedule):
    ddpm = DDPMScheduler(beta_schedule=beta_schedule, prediction_type="v_prediction")
    sched = NoiseSchedule.from_scheduler_config(ddpm.config)
    t = torch.tensor([0, 10, 500, 999])
    x0, noise = randn(4, 2, 4, 4), randn(4, 2, 4, 4, seed=1)
    torch.testing.assert_close(sched.target(x0, noise, t), ddpm.get_velocity(x0, noise, t), atol=DIFFUSERS_ATOL, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_step_matches_diffusers(prediction_type, spacing):
    """Every step of a 5-step DDIM (eta=0) run, including the last one with set_alpha_to_one=True."""
    common = dict(beta_schedule="scaled_linear", prediction_type=prediction_type, timestep_spacing=spacing)
    ddim = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    sched = NoiseSchedule.from_scheduler_config(ddim.config)
    ddim.set_timesteps(5)
    ts = sched.inference_timesteps(5)
    assert ts == [float(t) for t in ddim.timesteps]
    x = randn(3, 2, 4, 4)
    for i, t in enumerate(ddim.timesteps):
        model_output = randn(3, 2, 4, 4, seed=10 + i)
        ref = ddim.step(model_output, t, x, eta=0.0)
        x0, eps = sched.to_x0_eps(model_output, x, float(t))
        torch.testing.assert_close(x0, ref.pred_original_sample, atol=DIFFUSERS_ATOL, rtol=1e-5)
        ours = ddim_step(sched, DenoiserOutput(x0=x0, eps=eps), ts[i + 1] if i + 1 < len(ts) else None)
        torch.testing.assert_close(ours, ref.prev_sample, atol=DIFFUSERS_ATOL, rtol=1e-5)
        x = ref.prev_sample
    # the last step lands on x0 exactly (alpha_prev = 1)
    torch.testing.assert_close(ours, x0)


def test_flow_scale_noise_matches_diffusers():
    fm = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched = NoiseSchedule.from_scheduler_config(fm.config)
    x0, noise = randn(1, 2, 4, 4), randn(1, 2, 4, 4, seed=1)
    # training-table timesteps (already shifted) and sampling timesteps
    train_ts = [fm.timesteps[k] for k in (0, 10, 500, 998, 999)]
    fm.set_timesteps(6)
    for t in train_ts + list(fm.timesteps):
        ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
        if t in fm.timesteps:
            ref.set_timesteps(6)
        out = ref.scale_noise(x0, t.reshape(1), noise)
        torch.testing.assert_close(sched.add_noise(x0, noise, float(t)), out, atol=DIFFUSERS_ATOL, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_step_matches_diffusers(shift):
    fm = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched = NoiseSchedule.from_scheduler_config(fm.config)
    fm.set_timesteps(4)
    ts = sched.inference_timesteps(4)
    x = randn(2, 2, 4, 4)
    for i, t in enumerate(fm.timesteps):
        u = randn(2, 2, 4, 4, seed=10 + i)
        ref = fm.step(u, t, x).prev_sample
        x0, eps = sched.to_x0_eps(u, x, ts[i])
        ours = ddim_step(sched, DenoiserOutput(x0=x0, eps=eps), ts[i + 1] if i + 1 < len(ts) else None)
        torch.testing.assert_close(ours, ref, atol=DIFFUSERS_ATOL, rtol=1e-5)
        x = ref


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("steps", [1, 4, 7, 50])
def test_vp_inference_timesteps_match_set_timesteps(scheduler_cls, spacing, offset, steps):
    ref = scheduler_cls(beta_schedule="scaled_linear", timestep_spacing=spacing, steps_offset=offset)
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    ref.set_timesteps(steps)
    assert sched.inference_timesteps(steps) == [float(t) for t in ref.timesteps]


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0)])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_vp_inference_timesteps_from_an_euler_config(spacing, offset):
    """SDXL ships an EulerDiscreteScheduler config; leading / trailing spacings agree with it."""
    ref = EulerDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing=spacing, steps_offset=offset)
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    ref.set_timesteps(4)
    assert sched.inference_timesteps(4) == [float(t) for t in ref.timesteps]


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_inference_timesteps_match_set_timesteps(shift, steps):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    ref.set_timesteps(steps)
    ours = sched.inference_timesteps(steps)
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), ref.timesteps.double(), atol=1e-4, rtol=0)
    assert ours[0] == 1000.0


def test_flow_inference_timesteps_follow_other_config_keys():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1)
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    ref.set_timesteps(4)
    torch.testing.assert_close(
        torch.tensor(sched.inference_timesteps(4), dtype=torch.float64), ref.timesteps.double(), atol=1e-4, rtol=0
    )


def test_flow_timesteps_are_shifted_sigmas():
    """Flow timesteps carry the *shifted* sigma: t = sigma' * T, and alpha = 1 - sigma'."""
    sched = flow(shift=3.0)
    sigma = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    shifted = sched.shift_sigma(sigma)
    torch.testing.assert_close(shifted, 3 * sigma / (1 + 2 * sigma))
    alpha, s = sched.alpha_sigma(shifted * 1000)
    torch.testing.assert_close(s, shifted)
    torch.testing.assert_close(alpha, 1 - shifted)
    assert sched.model_timestep(torch.tensor([500.0], dtype=torch.float64)).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# alpha / sigma, fractional timesteps, log-SNR, conditional kernel


def test_vp_fractional_timesteps_interpolate_abar():
    ddpm = DDPMScheduler(beta_schedule="scaled_linear")
    sched = NoiseSchedule.from_scheduler_config(ddpm.config)
    abar = ddpm.alphas_cumprod.double()
    alpha, sigma = sched.alpha_sigma(torch.tensor([10.0, 10.25, 998.5]))
    ref = torch.stack([abar[10], 0.75 * abar[10] + 0.25 * abar[11], 0.5 * (abar[998] + abar[999])])
    torch.testing.assert_close(alpha**2, ref)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3, dtype=torch.float64))
    # integral timesteps go to the network as long indices, fractional ones stay fractional
    assert sched.model_timestep(torch.tensor([3.0, 999.0], dtype=torch.float64)).dtype == torch.long
    fractional = sched.model_timestep(torch.tensor([3.5], dtype=torch.float64))
    assert fractional.tolist() == [3.5] and fractional.dtype == torch.float32


@pytest.mark.parametrize(
    "sched",
    [vp(beta_schedule=b) for b in BETA_SCHEDULES] + [flow(shift=1.0), flow(shift=3.0)],
    ids=[f"vp-{b}" for b in BETA_SCHEDULES] + ["flow-shift1", "flow-shift3"],
)
def test_log_snr_is_strictly_decreasing(sched):
    t = torch.linspace(0, sched.max_timestep, 4001, dtype=torch.float64)
    lam = sched.log_snr(t)
    alpha, sigma = sched.alpha_sigma(t)
    torch.testing.assert_close(lam[1:-1], 2 * torch.log(alpha[1:-1] / sigma[1:-1]))
    assert (lam[1:] < lam[:-1]).all()


PAIRS = [(999.0, 0.0), (999.0, 998.0), (749.0, 249.0), (500.5, 20.25), (300.0, 300.0)]


@pytest.mark.parametrize("sched", [vp(beta_schedule="scaled_linear"), flow(shift=3.0)], ids=["vp", "flow"])
@pytest.mark.parametrize("t,s", PAIRS)
def test_conditional_kernel_composes_to_the_marginal(sched, t, s):
    a_ts, s_ts = sched.conditional_kernel(t, s)
    a_t, sig_t = sched.alpha_sigma(t)
    a_s, sig_s = sched.alpha_sigma(s)
    # x_t = a_ts * (a_s x0 + sig_s e1) + s_ts e2 ~ N(a_t x0, sig_t^2): mean and variance agree
    torch.testing.assert_close(a_ts * a_s, a_t, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a_ts**2 * sig_s**2 + s_ts**2, sig_t**2, atol=1e-12, rtol=1e-12)
    # and samples built that way have exactly the marginal's statistics for the same combined noise
    x0, e1, e2 = (
        randn(2, 8, dtype=torch.float64),
        randn(2, 8, dtype=torch.float64, seed=1),
        randn(2, 8, dtype=torch.float64, seed=2),
    )
    x_t = a_ts * sched.add_noise(x0, e1, s) + s_ts * e2
    combined = (a_ts * sig_s * e1 + s_ts * e2) / sig_t
    torch.testing.assert_close(x_t, sched.add_noise(x0, combined, t), atol=1e-12, rtol=1e-12)
    if t == s:
        assert a_ts.item() == 1.0 and s_ts.item() == 0.0


@pytest.mark.parametrize("sched", [vp(beta_schedule="scaled_linear"), flow(shift=3.0)], ids=["vp", "flow"])
def test_conditional_kernel_chains(sched):
    """q(x_t | x_r) is q(x_t | x_s) after q(x_s | x_r), batched over several triples."""
    r = torch.tensor([0.0, 100.0, 250.5])
    s = torch.tensor([300.0, 400.0, 600.0])
    t = torch.tensor([900.0, 401.0, 999.0])
    a_sr, s_sr = sched.conditional_kernel(s, r)
    a_ts, s_ts = sched.conditional_kernel(t, s)
    a_tr, s_tr = sched.conditional_kernel(t, r)
    torch.testing.assert_close(a_ts * a_sr, a_tr, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a_ts**2 * s_sr**2 + s_ts**2, s_tr**2, atol=1e-12, rtol=1e-12)


def test_conditional_kernel_needs_s_before_t():
    with pytest.raises(ValueError, match="needs s <= t"):
        vp().conditional_kernel(100, 200)


# --------------------------------------------------------------------------------------------------
# timestep validation


def test_timesteps_out_of_range():
    with pytest.raises(ValueError, match=r"out of range: this vp schedule accepts 0 <= t <= 999"):
        vp().alpha_sigma(1000)
    with pytest.raises(ValueError, match="out of range"):
        vp().add_noise(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([5, -1]))
    with pytest.raises(ValueError, match=r"out of range: this flow schedule accepts 0 <= t <= 1000"):
        flow().alpha_sigma(1000.5)
    with pytest.raises(ValueError, match="NaN"):
        vp().alpha_sigma(float("nan"))
    with pytest.raises(ValueError, match="scalar or a 1-D"):
        vp().alpha_sigma(torch.zeros(2, 2))


def test_timesteps_batch_mismatch():
    with pytest.raises(ValueError, match="3 timesteps for a batch of 2"):
        vp().as_timesteps(torch.tensor([1, 2, 3]), batch_size=2)
    assert vp().as_timesteps([7], batch_size=3).tolist() == [7.0, 7.0, 7.0]


@pytest.mark.parametrize(
    "timesteps,message",
    [
        ([], "empty"),
        ([999, 999, 500], "strictly decreasing"),
        ([249, 499, 749, 999], "strictly decreasing"),
        ([999, 499, 749], "strictly decreasing"),
        ([1000, 500], r"Timestep 1000 .* out of range.*0 <= t <= 999"),
        ([999, -1], "out of range"),
        ([999, float("nan")], "out of range"),
    ],
)
def test_validate_timesteps_vp(timesteps, message):
    with pytest.raises(ValueError, match=message):
        vp().validate_timesteps(timesteps)


def test_validate_timesteps_accepts_good_lists():
    assert vp().validate_timesteps(torch.tensor([999, 749, 499, 249])) == [999.0, 749.0, 499.0, 249.0]
    assert vp().validate_timesteps([399.5]) == [399.5]
    assert flow().validate_timesteps([1000.0, 750.0, 0.0]) == [1000.0, 750.0, 0.0]
    with pytest.raises(ValueError, match="0 <= t <= 1000"):
        flow().validate_timesteps([1001.0, 500.0])


def test_float32_work_dtype_path(monkeypatch):
    """MPS has no float64: there the schedule works in float32. Exercise that path on CPU."""
    import stepdistill.schedules as schedules

    monkeypatch.setattr(schedules, "_work_dtype", lambda device: torch.float32)
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    sched = NoiseSchedule.from_scheduler_config(ddpm.config)
    t = torch.tensor([20, 500, 999])
    assert sched.as_timesteps(t).dtype == torch.float32 and sched.alpha_sigma(t)[0].dtype == torch.float32
    x0, noise = randn(3, 2, 4, 4), randn(3, 2, 4, 4, seed=1)
    x_t = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, ddpm.add_noise(x0, noise, t), atol=DIFFUSERS_ATOL, rtol=0)
    x0_hat, eps_hat = sched.to_x0_eps(sched.target(x0, noise, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_hat, noise, atol=1e-5, rtol=0)


def test_epsilon_at_zero_terminal_snr_is_a_clear_error():
    from diffusers import DDPMScheduler

    from stepdistill.schedules import NoiseSchedule

    config = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="epsilon").config
    sched = NoiseSchedule.from_scheduler_config(config)
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="alpha_t = 0"):
        sched.to_x0_eps(torch.randn_like(x), x, 999)
    x0, eps = sched.to_x0_eps(torch.randn_like(x), x, 998)  # just below the end is fine
    assert torch.isfinite(x0).all() and torch.isfinite(eps).all()
    v_sched = NoiseSchedule.from_scheduler_config(config, prediction_type="v_prediction")
    x0, _ = v_sched.to_x0_eps(torch.randn_like(x), x, 999)
    assert torch.isfinite(x0).all()

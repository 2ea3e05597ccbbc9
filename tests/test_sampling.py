"""Samplers: the teacher ODE sampler against hand-rolled diffusers loops, the student sampler's
re-noising, per-sample generators, and bad input."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from stepdistill import (
    Conditioning,
    Denoiser,
    NoiseSchedule,
    PlanSegment,
    StepPlan,
    initial_noise,
    make_generators,
    rollout,
    run_step_plan,
    sample_student,
    sample_teacher,
)

SHAPE = (2, tm.C, tm.H, tm.W)


@pytest.fixture(scope="module")
def class_unet():
    return tm.unet2d(class_conditional=True)


@pytest.fixture(scope="module")
def student(class_unet):
    """A v-prediction class-conditional 'student' on SD's schedule (the digits teacher's setup)."""
    config = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction").config
    return Denoiser.from_model(class_unet, NoiseSchedule.from_scheduler_config(config))


def labels(n=2):
    return Conditioning(class_labels=torch.arange(n) % tm.NUM_CLASSES, null_class_label=tm.NULL_CLASS)


# --------------------------------------------------------------------------------------------------
# teacher sampling


@pytest.mark.parametrize(
    "prediction_type,spacing,offset,guidance",
    [
        ("epsilon", "leading", 1, 2.5),  # SD1.5-style config, CFG; the last step goes to alpha = 1
        ("v_prediction", "trailing", 0, 1.0),
        ("sample", "leading", 0, 0.0),  # w = 0: unconditional
    ],
)
def test_sample_teacher_matches_a_diffusers_ddim_loop(class_unet, prediction_type, spacing, offset, guidance):
    common = dict(beta_schedule="scaled_linear", prediction_type=prediction_type)
    ddim = DDIMScheduler(**common, timestep_spacing=spacing, steps_offset=offset, clip_sample=False)
    ddim.set_timesteps(4)
    cond = labels()
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    # the loop a diffusers pipeline runs, with CFG on the raw output
    x = latents
    with torch.no_grad():
        for t in ddim.timesteps:
            out_c = class_unet(x, t, class_labels=cond.class_labels).sample
            out_u = class_unet(x, t, class_labels=torch.full((2,), tm.NULL_CLASS)).sample
            x = ddim.step(out_u + guidance * (out_c - out_u), t, x, eta=0.0).prev_sample

    teacher = Denoiser.from_model(class_unet, NoiseSchedule.from_scheduler_config(ddim.config))
    seen = []
    ours = sample_teacher(
        teacher,
        latents,
        cond,
        num_inference_steps=4,
        guidance_scale=guidance,
        callback=lambda i, t, o, x: seen.append(t),
    )
    assert seen == ddim.timesteps.tolist()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)
    # an explicit timestep list gives the same samples
    explicit = sample_teacher(teacher, latents, cond, timesteps=seen, guidance_scale=guidance)
    torch.testing.assert_close(explicit, ours, atol=0, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sample_teacher_matches_a_flow_match_euler_loop(guidance):
    model = tm.sd3_transformer()
    fm = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fm.set_timesteps(4)
    cond = tm.text_cond(2, pooled=True)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def velocity(x, t, c):
        return model(
            hidden_states=x,
            encoder_hidden_states=c.prompt_embeds,
            pooled_projections=c.pooled_prompt_embeds,
            timestep=t.expand(x.shape[0]),
        ).sample

    x = latents
    uncond = cond.unconditional()
    with torch.no_grad():
        for t in fm.timesteps:
            u_c = velocity(x, t, cond)
            u = u_c if guidance == 1.0 else velocity(x, t, uncond) + guidance * (u_c - velocity(x, t, uncond))
            x = fm.step(u, t, x).prev_sample

    teacher = Denoiser.from_model(model, NoiseSchedule.from_scheduler_config(fm.config))
    ours = sample_teacher(teacher, latents, cond, num_inference_steps=4, guidance_scale=guidance)
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_sample_teacher_bad_input(student):
    latents = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_teacher(student, latents, labels(), timesteps=[249, 499, 999])
    with pytest.raises(ValueError, match="out of range"):
        sample_teacher(student, latents, labels(), timesteps=[1000, 500])
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        sample_teacher(student, latents, labels(), num_inference_steps=0)
    with pytest.raises(ValueError, match="Conditioning has batch size 3 but latents have 2"):
        sample_teacher(student, latents, labels(3), num_inference_steps=2)


# --------------------------------------------------------------------------------------------------
# student sampling


def test_one_step_student_is_the_denoisers_x0(student):
    latents = initial_noise(SHAPE, make_generators([0, 1]))
    cond = labels()
    for t in (999, 399):
        with torch.no_grad():
            ref = student(latents, t, cond).x0
        out = sample_student(student, latents, cond, timesteps=[t], generator=make_generators([5, 6]))
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_one_step_flow_student():
    model = tm.sd3_transformer()
    den = Denoiser.from_model(model, NoiseSchedule.from_scheduler_config(FlowMatchEulerDiscreteScheduler().config))
    latents, cond = initial_noise(SHAPE, make_generators([0, 1])), tm.text_cond(2, pooled=True)
    out = sample_student(den, latents, cond)  # default: one step from sigma = 1 (t = 1000), not 999
    with torch.no_grad():
        u = model(
            hidden_states=latents,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
            timestep=torch.full((2,), 1000.0),
        ).sample
    torch.testing.assert_close(out, latents - u, atol=1e-6, rtol=1e-6)  # x0 = x_1 - 1 * u


TIMESTEPS = [999, 749, 499, 249]


def test_per_sample_generators_make_image_k_batch_invariant(student):
    seeds = [10, 11, 12, 13]
    cond4 = Conditioning(class_labels=torch.tensor([0, 1, 2, 3]), null_class_label=tm.NULL_CLASS)
    gens = make_generators(seeds)
    batch = sample_student(student, initial_noise((4, *SHAPE[1:]), gens), cond4, TIMESTEPS, generator=gens)
    for k in (0, 2, 3):
        g = make_generators([seeds[k]])
        single = sample_student(student, initial_noise((1, *SHAPE[1:]), g), cond4.select([k]), TIMESTEPS, generator=g)
        torch.testing.assert_close(single[0], batch[k], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_student_renoises_with_fresh_noise_at_the_listed_timesteps(class_unet, student):
    calls = []

    def recording_unet(x, timestep, cond):
        calls.append((x.clone(), timestep.clone()))
        return class_unet(x, timestep, class_labels=cond.class_labels).sample

    den = Denoiser.from_model(recording_unet, student.schedule)
    cond, seeds = labels(), [3, 4]
    gens = make_generators(seeds)
    latents = initial_noise(SHAPE, gens)
    steps = []
    out = sample_student(den, latents, cond, TIMESTEPS, generator=gens, callback=lambda i, t, o, x: steps.append(o))

    # the student saw exactly the listed timesteps, one call per step, and returned the last x0
    assert [c[1].tolist() for c in calls] == [[t, t] for t in TIMESTEPS]
    torch.testing.assert_close(out, steps[-1].x0, atol=0, rtol=0)
    torch.testing.assert_close(calls[0][0], latents, atol=0, rtol=0)
    # between steps: x_{i+1} = alpha x0_i + sigma * fresh noise, drawn from the same generators
    # in order (initial latents first), like a stock LCMScheduler pipeline
    replay = make_generators(seeds)
    randn_tensor(SHAPE, generator=replay)
    for i in range(1, len(TIMESTEPS)):
        noise = randn_tensor(SHAPE, generator=replay)
        expected = student.schedule.add_noise(steps[i - 1].x0, noise, TIMESTEPS[i])
        torch.testing.assert_close(calls[i][0], expected, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(noise, steps[i - 1].eps, atol=1e-2)  # fresh, not the DDIM eps


def test_student_bad_input(student):
    latents = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="Got 3 generators for a batch of 2"):
        sample_student(student, latents, labels(), TIMESTEPS, generator=make_generators([1, 2, 3]))
    with pytest.raises(ValueError, match="Got 1 generators for a batch of 2"):
        sample_student(student, latents, labels(), [999], generator=make_generators([1]))
    with pytest.raises(ValueError, match="Got 3 generators for a batch of 2"):
        initial_noise(SHAPE, make_generators([1, 2, 3]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_student(student, latents, labels(), [249, 999])
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_student(student, latents, labels(), [999, 999])
    with pytest.raises(ValueError, match=r"Timestep 1000 .* out of range"):
        sample_student(student, latents, labels(), [1000])
    with pytest.raises(ValueError, match="empty"):
        sample_student(student, latents, labels(), [])
    with pytest.raises(ValueError, match="Conditioning has batch size 3 but latents have 2"):
        sample_student(student, latents, labels(3), [999])
    with pytest.raises(ValueError, match="does not take conditioning"):
        den = Denoiser.from_model(tm.unet2d(), student.schedule)
        sample_student(den, latents, labels(), [999])


# --------------------------------------------------------------------------------------------------
# rollout, step plans, callbacks that edit the state


def _by_hand(den, latents, cond, timesteps, generator, steps):
    """The first ``steps`` student steps written out: denoise, then re-noise x0 with a fresh draw."""
    x = latents
    for i in range(steps):
        with torch.no_grad():
            x0 = den(x, timesteps[i], cond).x0
        noise = initial_noise(x0.shape, generator, dtype=x0.dtype)
        x = den.schedule.add_noise(x0, noise, timesteps[i + 1]).to(latents.dtype)
    return x


@pytest.mark.parametrize("k", [1, 3])
def test_rollout_stops_at_the_noised_state(student, k):
    cond, gens = labels(), make_generators([3, 4])
    latents = initial_noise(SHAPE, gens)
    got = rollout(student, latents, cond, TIMESTEPS, generator=gens, stop=TIMESTEPS[k])
    replay = make_generators([3, 4])
    want = _by_hand(student, initial_noise(SHAPE, replay), cond, TIMESTEPS, replay, k)
    assert torch.equal(got, want)


def test_rollout_to_the_end_is_sample_student(student):
    cond = labels()
    runs = []
    for fn in (rollout, sample_student):
        gens = make_generators([7, 8])
        runs.append(fn(student, initial_noise(SHAPE, gens), cond, TIMESTEPS, generator=gens))
    assert torch.equal(runs[0], runs[1])
    latents = initial_noise(SHAPE, make_generators([7, 8]))
    assert rollout(student, latents, cond, TIMESTEPS, generator=make_generators([7, 8]), stop=999) is latents
    with pytest.raises(ValueError, match="stop=500 is not one of the timesteps"):
        rollout(student, latents, cond, TIMESTEPS, stop=500)


class Counted:
    """A custom network calling ``unet`` and recording the timesteps it was called at."""

    def __init__(self, unet):
        self.unet, self.timesteps = unet, []

    def __call__(self, x, timestep, cond):
        self.timesteps.append(int(timestep[0]))
        return self.unet(x, timestep, class_labels=cond.class_labels).sample


def test_step_plans_of_one_and_two_segments(class_unet, student):
    cond = labels()
    latents = initial_noise(SHAPE, make_generators([0, 1]))
    teacher = sample_teacher(student, latents, cond, timesteps=TIMESTEPS, guidance_scale=2.0)
    one = StepPlan.single("unet", TIMESTEPS, guidance_scale=2.0)
    assert one.num_steps == 4 and one.networks == ["unet"] * 4
    assert torch.equal(run_step_plan(one, {"unet": student}, latents, cond), teacher)
    # an ODE segment handed over by "transport" continues the same ODE
    base, rest = Counted(class_unet), Counted(class_unet)
    dens = {n: Denoiser.from_model(c, student.schedule) for n, c in (("base_unet", base), ("unet", rest))}
    two = StepPlan([PlanSegment("base_unet", TIMESTEPS[:2], guidance_scale=2.0),
                    PlanSegment("unet", TIMESTEPS[2:], guidance_scale=2.0, handover="transport")])  # fmt: skip
    assert torch.equal(run_step_plan(two, dens, latents, cond), teacher)
    assert base.timesteps == [999, 749] and rest.timesteps == [499, 249]  # one (batched CFG) call per step
    assert two.describe() == "base_unet ode [999, 749] w=2 -> transport to 499 -> unet ode [499, 249] w=2"
    assert two.to_dict()["segments"][1]["handover"] == "transport"


def test_three_expert_plan_counts_each_network(class_unet, student):
    """Phased experts: one segment per expert, re-noised hand-overs, each expert runs its phase's steps."""
    phases = [[999, 874], [749, 624], [499, 249]]
    experts = [Counted(class_unet) for _ in phases]
    dens = {f"expert_{k}": Denoiser.from_model(e, student.schedule) for k, e in enumerate(experts)}
    plan = StepPlan([PlanSegment(f"expert_{k}", ts, sampler="renoise", handover="noise" if k == 0 else "renoise")
                     for k, ts in enumerate(phases)])  # fmt: skip
    assert plan.networks == ["expert_0"] * 2 + ["expert_1"] * 2 + ["expert_2"] * 2
    cond, gens = labels(), make_generators([5, 6])
    got = run_step_plan(plan, dens, initial_noise(SHAPE, gens), cond, generator=gens)
    assert [e.timesteps for e in experts] == phases
    # the experts share weights here, so the plan is the student loop over all six timesteps, draw for draw
    gens = make_generators([5, 6])
    want = sample_student(student, initial_noise(SHAPE, gens), cond, sum(phases, []), generator=gens)
    assert torch.equal(got, want)


def test_step_plan_errors(student):
    latents, seg = torch.randn(SHAPE), PlanSegment("unet", [999, 499])
    with pytest.raises(ValueError, match="first segment starts from the latents"):
        StepPlan([PlanSegment("unet", [999], handover="renoise")])
    with pytest.raises(ValueError, match="every later one"):
        StepPlan([seg, PlanSegment("unet", [249])])
    with pytest.raises(ValueError, match="sampler="):
        PlanSegment("unet", [999], sampler="ddpm")
    with pytest.raises(ValueError, match="resume_timestep"):
        PlanSegment("unet", [999], resume_timestep=500)
    with pytest.raises(ValueError, match="network 'base_unet'"):
        run_step_plan(StepPlan.single("base_unet", [999]), {"unet": student}, latents, labels())
    with pytest.raises(ValueError, match="not below the previous"):
        run_step_plan(StepPlan([seg, PlanSegment("unet", [249], handover="renoise", resume_timestep=600)]),
                      {"unet": student}, latents, labels())  # fmt: skip


def test_callback_can_replace_the_state(class_unet, student):
    rec = Counted(class_unet)
    den = Denoiser.from_model(rec, student.schedule)
    cond, latents = labels(), initial_noise(SHAPE, make_generators([0, 1]))
    inputs = []
    den.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    zeros = torch.zeros(SHAPE)
    edit = lambda i, t, out, x: zeros if i in (1, 3) else None  # noqa: E731
    out = sample_student(den, latents, cond, TIMESTEPS, generator=make_generators([0, 1]), callback=edit)
    assert torch.equal(inputs[2], zeros) and not torch.equal(inputs[1], zeros)  # step 1's edit is step 2's input
    assert torch.equal(out, zeros)  # after the last step the state is the final x0
    teacher = sample_teacher(den, latents, cond, timesteps=TIMESTEPS, callback=lambda i, t, o, x: x + 1)
    plain = sample_teacher(den, latents, cond, timesteps=TIMESTEPS)
    assert not torch.allclose(teacher, plain + 1)  # every edit propagated through the ODE

"""HybridDiversityPipeline (base first step(s), student finishes), DT grids and the ``stepdistill-sample`` command.

Tiny random networks: the conftest digits-like teacher (class-conditional, v-prediction, guidance 2 in its json)
as the base and a perturbed copy of it as the 4-step LCM student; SD1.5-like and SD3-like (flow) text models.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
)
from tiny_models import sd3_transformer, text_cond, unet2d_condition

from stepdistill import (
    Conditioning,
    guided_denoise,
    initial_noise,
    make_generators,
    run_step_plan,
    sample_student,
    sample_teacher,
)
from stepdistill.commands.sample import build_parser
from stepdistill.commands.sample import main as cli_main
from stepdistill.pipelines import HybridDiversityPipeline, StepDistillPipeline, lcm_scheduler_for_student
from stepdistill.visualization import diffusion_targets, dt_grid

NULL = 10
T4 = [999, 749, 499, 249]
SHAPE = (1, 8, 8)


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    module = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


class Recorder:
    """Counts a network's calls and keeps each call's input and timestep (a forward pre-hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        self.attention_kwargs: list[dict | None] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.inputs.append(x.detach().clone())
        self.timesteps.append(torch.as_tensor(t).detach().clone())
        self.attention_kwargs.append(kwargs.get("cross_attention_kwargs"))

    @property
    def calls(self) -> int:
        return len(self.inputs)

    def close(self) -> None:
        self.handle.remove()


@pytest.fixture(scope="module")
def student_pipe(tiny_teacher) -> StepDistillPipeline:
    base = StepDistillPipeline.from_pretrained(tiny_teacher)
    return StepDistillPipeline(
        unet=_perturb(base.unet, seed=1),
        scheduler=lcm_scheduler_for_student(base.scheduler, T4),
        null_class_label=NULL,
        default_timesteps=T4,
    )


@pytest.fixture(scope="module")
def pipe(tiny_teacher, student_pipe) -> HybridDiversityPipeline:
    hybrid = HybridDiversityPipeline.from_pipelines(tiny_teacher, student_pipe)
    hybrid.set_progress_bar_config(disable=True)
    return hybrid


def _labels_cond(labels: list[int]) -> Conditioning:
    return Conditioning(class_labels=torch.tensor(labels), null_class_label=NULL)


# ---------------------------------------------------------------------------------------------------------
# the hand-over
def test_from_pipelines_reads_both_sides(pipe, student_pipe):
    assert pipe.unet is student_pipe.unet and isinstance(pipe.scheduler, LCMScheduler)
    assert isinstance(pipe.base_scheduler, DDIMScheduler)
    assert pipe.config.base_guidance_scale == 2.0  # the teacher folder's stepdistill_teacher.json
    assert pipe.config.null_class_label == NULL and pipe.config.default_timesteps == T4
    plan = pipe.plan()  # the paper's setting: shared schedule, one base step, renoise
    assert plan.base_timesteps == [999.0] and plan.student_timesteps == [749.0, 499.0, 249.0]
    assert plan.resume_timestep == 749.0 and plan.handover == "renoise"


@pytest.mark.parametrize("k", [1, 2])
def test_renoise_hands_over_at_the_next_student_timestep(pipe, k):
    labels, seeds = [1, 7], [3, 4]
    base_rec, student_rec = Recorder(pipe.base_unet), Recorder(pipe.unet)
    try:
        pipe(class_labels=labels, base_steps=k, generator=make_generators(seeds), output_type="pt")
    finally:
        base_rec.close(), student_rec.close()
    assert base_rec.calls == k and student_rec.calls == len(T4) - k
    assert [int(t[0]) for t in base_rec.timesteps] == T4[:k]
    assert [int(t[0]) for t in student_rec.timesteps] == T4[k:]
    assert base_rec.inputs[0].shape[0] == 4  # base CFG 2: conditional and unconditional rows in one call
    # the student's first input is add_noise(base x0, fresh noise, t_handover), noise drawn after the start noise
    gens = make_generators(seeds)
    x_T = initial_noise((2, *SHAPE), gens)
    last = {}
    sample_teacher(pipe.base_denoiser, x_T, _labels_cond(labels), timesteps=T4[:k], guidance_scale=2.0,
                   callback=lambda i, t, out, x: last.update(out=out))  # fmt: skip
    noise = initial_noise((2, *SHAPE), gens)
    want = pipe.schedule.add_noise(last["out"].x0, noise, T4[k])
    torch.testing.assert_close(student_rec.inputs[0], want, rtol=0, atol=1e-5)
    # not the transport value, and not the base's own DDIM state
    transport = pipe.schedule.add_noise(last["out"].x0, last["out"].eps, T4[k])
    assert (student_rec.inputs[0] - transport).abs().max() > 1e-2


def test_transport_is_the_deterministic_ddim_move(pipe):
    labels, seeds = [2, 5], [0, 9]
    rec = Recorder(pipe.unet)
    try:
        pipe(class_labels=labels, handover="transport", generator=make_generators(seeds), output_type="pt")
    finally:
        rec.close()
    x_T = initial_noise((2, *SHAPE), make_generators(seeds))
    out = guided_denoise(pipe.base_denoiser, x_T, 999, _labels_cond(labels), 2.0)
    want = pipe.schedule.add_noise(out.x0, out.eps, 749)
    torch.testing.assert_close(rec.inputs[0], want, rtol=0, atol=1e-5)


def test_handover_timestep_on_the_base_schedule(pipe):
    rec_b, rec_s = Recorder(pipe.base_unet), Recorder(pipe.unet)
    try:
        out = pipe(class_labels=[3], base_num_inference_steps=10, handover_timestep=700,
                   generator=make_generators([0]), output_type="pt")  # fmt: skip
    finally:
        rec_b.close(), rec_s.close()
    # trailing 10-step spacing 999, 899, 799, 699, ...: the base runs those above 700 and the student resumes at its
    # first timestep below the base's last one (799)
    assert out.plan.base_timesteps == [999.0, 899.0, 799.0] and rec_b.calls == 3
    assert out.plan.student_timesteps == [749.0, 499.0, 249.0] and rec_s.calls == 3


def test_modes_match_the_plain_samplers(pipe):
    labels, seeds = [4, 8], [5, 6]
    gens = make_generators(seeds)
    x_T = initial_noise((2, *SHAPE), gens)
    want_student = sample_student(pipe.denoiser, x_T, _labels_cond(labels), T4, generator=gens)
    got = pipe(class_labels=labels, mode="student", generator=make_generators(seeds), output_type="latent").images
    torch.testing.assert_close(got, want_student, rtol=0, atol=1e-6)
    x_T = initial_noise((2, *SHAPE), make_generators(seeds))
    want_base = sample_teacher(pipe.base_denoiser, x_T, _labels_cond(labels), num_inference_steps=5,
                               guidance_scale=2.0)  # fmt: skip
    got = pipe(class_labels=labels, mode="base", base_num_inference_steps=5, generator=make_generators(seeds),
               output_type="latent").images  # fmt: skip
    torch.testing.assert_close(got, want_base, rtol=0, atol=1e-6)
    hybrid = pipe(class_labels=labels, generator=make_generators(seeds), output_type="latent").images
    assert (hybrid - want_student).abs().max() > 1e-3


def test_one_step_student_resume_timestep(tiny_teacher, student_pipe):
    one = StepDistillPipeline(unet=student_pipe.unet, scheduler=student_pipe.scheduler, null_class_label=NULL,
                              default_timesteps=[399])  # fmt: skip
    pipe = HybridDiversityPipeline.from_pipelines(tiny_teacher, one, base_guidance_scale=1.0)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="one-step student.*resume_timestep"):
        pipe(class_labels=[1])
    with pytest.raises(ValueError, match="strictly below"):
        pipe(class_labels=[1], resume_timestep=999)
    rec = Recorder(pipe.unet)
    try:
        out = pipe(class_labels=[1, 6], resume_timestep=749, generator=make_generators([0, 1]), output_type="pt")
    finally:
        rec.close()
    assert out.plan.base_timesteps == [999.0] and out.plan.one_step
    assert rec.calls == 1 and int(rec.timesteps[0][0]) == 399  # the student keeps its own conditioning timestep
    gens = make_generators([0, 1])
    x_T = initial_noise((2, *SHAPE), gens)
    x0 = pipe.base_denoiser(x_T, 999, _labels_cond([1, 6])).x0
    want = pipe.schedule.add_noise(x0, initial_noise((2, *SHAPE), gens), 749)  # the state is at noise level 749
    torch.testing.assert_close(rec.inputs[0], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(base_steps=0), "zero base steps"),
        (dict(base_steps=4), "zero steps"),  # the base takes 999..249: no student timestep below 249
        (dict(base_steps=5), "only 4 timesteps"),
        (dict(handover_timestep=999), "zero base steps"),
        (dict(base_steps=1, handover_timestep=500), "not both"),
        (dict(resume_timestep=500), "one-step students"),
        (dict(handover="ddpm"), "renoise"),
        (dict(mode="teacher"), "mode="),
        (dict(base_num_inference_steps=0), "positive int"),
        (dict(base_timesteps=[499, 999]), "strictly decreasing"),
        (dict(num_inference_steps=3, timesteps=[999, 499]), "disagrees"),
        (dict(base_num_inference_steps=4, base_timesteps=[999]), "not both"),
    ],
)
def test_refused_mappings(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(class_labels=[1], **kwargs)


def test_leading_ddim_base_runs_zero_steps_and_is_refused(pipe):
    """The reference script's silent failure: a DDIM 'leading' 4-step base starts at 751 < 759."""
    leading = DDIMScheduler.from_config(pipe.base_scheduler.config, timestep_spacing="leading", steps_offset=1)
    other = HybridDiversityPipeline(**{**pipe.components, "base_scheduler": leading}, null_class_label=NULL,
                                    default_timesteps=[999, 759, 499, 259])  # fmt: skip
    assert other.plan(base_num_inference_steps=4, base_steps=1).base_timesteps == [751.0]
    with pytest.raises(ValueError, match="zero base steps.*751"):
        other.plan(base_num_inference_steps=4, handover_timestep=759)


# ---------------------------------------------------------------------------------------------------------
# randomness, outputs, persistence
def test_seeds_reproduce_and_batch_invariance(pipe):
    big = pipe(class_labels=[3, 7, 1], generator=make_generators([0, 1, 2]), output_type="np").images
    again = pipe(class_labels=[3, 7, 1], generator=make_generators([0, 1, 2]), output_type="np").images
    np.testing.assert_array_equal(big, again)
    one = pipe(class_labels=[7], generator=make_generators([1]), output_type="np").images
    np.testing.assert_allclose(one[0], big[1], rtol=0, atol=1e-6)
    other = pipe(class_labels=[7], generator=make_generators([11]), output_type="np").images
    assert np.abs(other[0] - big[1]).max() > 1e-3
    with pytest.raises(ValueError, match="generators"):
        pipe(class_labels=[1, 2], generator=make_generators([0]))


def test_output_types_and_callback(pipe):
    seen = []
    out = pipe(class_labels=4, generator=torch.Generator().manual_seed(0), base_steps=2,
               callback_on_step_end=lambda p, i, t, tensors: seen.append((i, t, sorted(tensors))),
               callback_on_step_end_tensor_inputs=["latents", "denoised"])  # fmt: skip
    assert isinstance(out.images[0], PIL.Image.Image) and out.images[0].size == (8, 8)
    assert [(i, t) for i, t, _ in seen] == list(enumerate(map(float, T4))) and seen[0][2] == ["denoised", "latents"]
    arr = pipe(class_labels=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    pt = pipe(class_labels=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    (latent,) = pipe(class_labels=4, generator=torch.Generator().manual_seed(0), output_type="latent",
                     return_dict=False)  # fmt: skip
    assert arr.shape == (1, 8, 8, 1) and pt.shape == (1, 1, 8, 8)
    torch.testing.assert_close(pt, (latent / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)


def test_save_load_round_trip(pipe, tmp_path):
    pipe.register_to_config(base_steps=2, handover="transport")
    try:
        pipe.save_pretrained(tmp_path)
        want = pipe(class_labels=[2, 9], generator=make_generators([4, 5]), output_type="pt").images
    finally:
        pipe.register_to_config(base_steps=1, handover="renoise")
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "HybridDiversityPipeline" and index["base_unet"] == ["diffusers", "UNet2DModel"]
    assert index["base_steps"] == 2 and index["handover"] == "transport" and index["default_timesteps"] == T4
    for cls in (HybridDiversityPipeline, DiffusionPipeline):
        loaded = cls.from_pretrained(tmp_path)
        assert type(loaded) is HybridDiversityPipeline
        loaded.set_progress_bar_config(disable=True)
        out = loaded(class_labels=[2, 9], generator=make_generators([4, 5]), output_type="pt")
        assert out.plan.base_timesteps == [999.0, 749.0] and out.plan.handover == "transport"
        assert torch.equal(out.images, want)


# ---------------------------------------------------------------------------------------------------------
# other model families
def test_stock_sd_pipelines_text_conditional():
    """An SD1.5-like base and an exported-style student (StableDiffusionPipeline + LCMScheduler), prompt_embeds."""
    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")  # fmt: skip
    stock = dict(vae=None, text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)  # fmt: skip
    base_unet = unet2d_condition()
    base = StableDiffusionPipeline(unet=base_unet, scheduler=DDIMScheduler(**sd), **stock)
    student = StableDiffusionPipeline(unet=_perturb(base_unet, seed=2),
                                      scheduler=lcm_scheduler_for_student(DDIMScheduler(**sd), [999, 499]), **stock)
    pipe = HybridDiversityPipeline.from_pipelines(base, student, student_timesteps=[999, 499])
    pipe.set_progress_bar_config(disable=True)
    embeds = text_cond(2).prompt_embeds
    rec_b, rec_s = Recorder(pipe.base_unet), Recorder(pipe.unet)
    try:
        out = pipe(prompt_embeds=embeds, base_guidance_scale=3.0, generator=make_generators([0, 1]), output_type="pt")
    finally:
        rec_b.close(), rec_s.close()
    assert out.images.shape == (2, 2, 8, 8) and out.plan.describe() == "base [999] -> renoise to 499 -> student [499]"
    assert (rec_b.calls, rec_b.inputs[0].shape[0]) == (1, 4) and (rec_s.calls, rec_s.inputs[0].shape[0]) == (1, 2)
    one = pipe(prompt_embeds=embeds[1:], base_guidance_scale=3.0, generator=make_generators([1]), output_type="pt")
    # batched attention rounds differently at other batch sizes, and eps-prediction divides it by alpha_999 = 0.07
    torch.testing.assert_close(one.images[0], out.images[1], rtol=0, atol=1e-4)
    assert (out.images[0] - out.images[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="text-conditional"):
        pipe(generator=make_generators([0]))
    # cross_attention_kwargs reach both networks' attention calls
    rec_b, rec_s = Recorder(pipe.base_unet), Recorder(pipe.unet)
    try:
        pipe(prompt_embeds=embeds, generator=make_generators([0, 1]), cross_attention_kwargs={"scale": 0.5})
    finally:
        rec_b.close(), rec_s.close()
    assert rec_b.attention_kwargs == rec_s.attention_kwargs == [{"scale": 0.5}]
    assert pipe.cross_attention_kwargs == {"scale": 0.5}


def test_flow_schedule_sd3_like():
    """Rectified flow: SD3-like transformers, Euler base, stochastic flow student; transport = the Euler step."""
    base_net = sd3_transformer()
    pipe = HybridDiversityPipeline(
        unet=_perturb(base_net, seed=3),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=True),
        base_unet=base_net,
        base_scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        default_timesteps=[1000, 750, 500, 250],
    )
    pipe.set_progress_bar_config(disable=True)
    cond = text_cond(2, pooled=True)
    kwargs = dict(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds)
    rec = Recorder(pipe.unet)
    try:
        out = pipe(**kwargs, handover="transport", generator=make_generators([0, 1]), output_type="pt")
    finally:
        rec.close()
    assert out.plan.base_timesteps == [1000.0] and out.plan.student_timesteps == [750.0, 500.0, 250.0]
    x_T = initial_noise((2, 2, 8, 8), make_generators([0, 1]))
    v = pipe.base_unet(hidden_states=x_T, encoder_hidden_states=cond.prompt_embeds,
                       pooled_projections=cond.pooled_prompt_embeds, timestep=torch.full((2,), 1000.0)).sample
    torch.testing.assert_close(rec.inputs[0], x_T - 0.25 * v, rtol=0, atol=1e-5)  # x_750 = x_1000 + (0.75 - 1) v
    assert torch.allclose(rec.timesteps[0].float(), torch.full((2,), 750.0))
    again = pipe(**kwargs, generator=make_generators([0, 1]), output_type="pt").images
    assert torch.isfinite(again).all() and (again - out.images).abs().max() > 1e-4  # renoise differs from transport


# ---------------------------------------------------------------------------------------------------------
# DT grid and command
def test_dt_grid_has_one_tile_per_seed_and_step(pipe):
    targets = diffusion_targets(pipe, "hybrid", seeds=[0, 1, 2], class_labels=5, base_steps=2)
    assert targets.x0.shape == (3, 4, *SHAPE) and targets.phases == ["base", "base", "student", "student"]
    assert targets.column_labels == ["B 999", "B 749", "S 499", "S 249"]
    torch.testing.assert_close(targets.x0[:, -1], targets.final, rtol=0, atol=1e-6)  # last target = the image
    assert (targets.x0[:, 0] - targets.x0[:, -1]).abs().max() > 1e-3
    tile, gap = 16, 2
    image = dt_grid(targets, tile_size=tile, title="", labels=False)
    assert image.size == (4 * (tile + gap) + gap, 3 * (tile + gap) + gap)
    cell = np.asarray(image)[gap : gap + tile, gap + 2 * (tile + gap) : gap + 2 * (tile + gap) + tile, 0]
    want = (targets.x0[0, 2, 0].numpy() * 255).round().astype(np.uint8).repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(cell, want)  # row 0 (seed 0), column 2 (S 499), upscaled x2
    labelled = dt_grid(diffusion_targets(pipe, "base", seeds=[0, 1], class_labels=5, base_num_inference_steps=3))
    assert labelled.width > 3 * (64 + gap) and labelled.height > 2 * (64 + gap)


def test_cli_hybrid_and_dt_end_to_end(pipe, tmp_path, capsys):
    saved = tmp_path / "pipe"
    pipe.save_pretrained(saved)
    out_dir = tmp_path / "out"
    assert cli_main(["hybrid", "--pipeline", str(saved), "--class_labels", "1,2", "--seeds", "0-3",
                     "--out_dir", str(out_dir), "--teacher_steps", "3", "--tile_size", "16"]) == 0  # fmt: skip
    summary = json.loads((out_dir / "samples.json").read_text())
    assert [r["class_label"] for r in summary["images"]] == [1, 2, 1, 2]
    assert summary["plan"]["describe"] == "base [999] -> renoise to 749 -> student [749, 499, 249]"
    files = sorted(p.name for p in out_dir.glob("*.png"))
    assert files == ["0000_seed0.png", "0001_seed1.png", "0002_seed2.png", "0003_seed3.png", "diversity_grid.png"]
    want = pipe(class_labels=[1, 2, 1, 2], generator=make_generators([0, 1, 2, 3])).images
    assert np.array_equal(np.asarray(PIL.Image.open(out_dir / "0003_seed3.png")), np.asarray(want[3]))
    grid = PIL.Image.open(out_dir / "diversity_grid.png")
    assert grid.width >= 4 * 18 and grid.height >= 3 * 18
    dt = tmp_path / "dt.png"
    assert cli_main(["dt", "--pipeline", str(saved), "--class_labels", "3", "--seeds", "0-1", "--out", str(dt),
                     "--modes", "student,hybrid", "--base_steps", "2", "--tile_size", "16"]) == 0  # fmt: skip
    assert PIL.Image.open(dt).height > 2 * 2 * 18
    assert "base [999, 749] -> renoise to 499" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        cli_main(["hybrid", "--pipeline", str(saved), "--class_labels", "1", "--base_steps", "4",
                  "--out_dir", str(tmp_path / "bad")])  # fmt: skip
    assert err.value.code == 1 and "zero steps" in capsys.readouterr().err
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"hybrid", "dt"} <= set(commands)


# ---------------------------------------------------------------------------------------------------------
# diffusers conventions
def test_callback_edits_take_effect_across_the_handover(pipe):
    """Zeroed latents after the last base step are what the student gets; after the last step, the output."""
    zero_at = lambda step: lambda p, i, t, kw: {"latents": torch.zeros_like(kw["latents"])} if i == step else {}  # noqa: E731
    seen = []
    record = lambda p, i, t, kw: seen.append((p.num_timesteps, p.guidance_scale, p.do_classifier_free_guidance))  # noqa: E731
    rec = Recorder(pipe.unet)
    try:
        pipe(class_labels=[1, 7], generator=make_generators([3, 4]), callback_on_step_end=zero_at(0))
        pipe(class_labels=[1, 7], generator=make_generators([3, 4]), callback_on_step_end=record)
    finally:
        rec.close()
    assert torch.equal(rec.inputs[0], torch.zeros(2, *SHAPE)) and not torch.equal(rec.inputs[3], rec.inputs[0])
    assert seen == [(4, 1.0, True)] * 4  # student guidance off, base guidance 2 on
    out = pipe(class_labels=[1, 7], generator=make_generators([3, 4]), output_type="latent",
               callback_on_step_end=zero_at(3)).images  # fmt: skip
    assert torch.equal(out, torch.zeros(2, *SHAPE))


def test_hybrid_plan_is_a_step_plan(pipe):
    plan = pipe.plan(base_steps=2, handover="transport")
    steps = plan.step_plan(base_guidance_scale=2.0, student_renoise=True)
    assert steps.networks == ["base_unet"] * 2 + ["unet"] * 2 and steps.timesteps == plan.timesteps
    assert steps.describe() == "base_unet ode [999, 749] w=2 -> transport to 499 -> unet renoise [499, 249]"
    labels, seeds = [2, 5], [8, 9]
    gens = make_generators(seeds)
    x0 = run_step_plan(steps, {"base_unet": pipe.base_denoiser, "unet": pipe.denoiser},
                       initial_noise((2, *SHAPE), gens), _labels_cond(labels), generator=gens)  # fmt: skip
    got = pipe(class_labels=labels, base_steps=2, handover="transport", generator=make_generators(seeds),
               output_type="latent").images  # fmt: skip
    assert torch.equal(got, x0)

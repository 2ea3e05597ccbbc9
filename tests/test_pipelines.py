"""StepDistillPipeline on a tiny digits-like (class-conditional, 8x8, 1 channel, v-prediction) network."""

from __future__ import annotations

import copy
import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, LCMScheduler, UNet2DModel
from tiny_models import clip_text_encoder, clip_tokenizer, unet2d_condition, write_clip_tokenizer

from stepdistill import Conditioning, initial_noise, make_generators, sample_student, sample_teacher
from stepdistill.data.digits_models import teacher_scheduler, teacher_unet
from stepdistill.pipelines import (
    StepDistillPipeline,
    StepDistillPipelineOutput,
    export_student,
    is_student_scheduler,
    lcm_scheduler_for_student,
)

NULL = 10
TIMESTEPS = [999, 749, 499, 249]
TINY = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
)


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # break zero inits: outputs must depend on labels and timesteps
    return model.eval()


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    return _randomize(teacher_unet(**TINY))


@pytest.fixture(scope="module")
def student(unet) -> StepDistillPipeline:
    pipe = StepDistillPipeline(
        unet=unet,
        scheduler=lcm_scheduler_for_student(teacher_scheduler(), TIMESTEPS),
        null_class_label=NULL,
        default_timesteps=TIMESTEPS,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return (x / 2 + 0.5).clamp(0, 1)


def test_seeded_output_is_sample_student(student):
    labels, seeds = [3, 7], [0, 1]
    out = student(class_labels=labels, generator=make_generators(seeds), output_type="pt")
    assert isinstance(out, StepDistillPipelineOutput) and out.images.shape == (2, 1, 8, 8)
    gens = make_generators(seeds)
    cond = Conditioning(class_labels=torch.tensor(labels), null_class_label=NULL)
    x0 = sample_student(student.denoiser, initial_noise((2, 1, 8, 8), gens), cond, TIMESTEPS, generator=gens)
    torch.testing.assert_close(out.images, _to_unit(x0), rtol=0, atol=1e-6)
    again = student(class_labels=labels, generator=make_generators(seeds), output_type="pt").images
    assert torch.equal(out.images, again)
    assert (out.images[0] - out.images[1]).abs().max() > 1e-3


def test_image_k_does_not_depend_on_batch_size(student):
    big = student(class_labels=[3, 7, 1], generator=make_generators([0, 1, 2]), output_type="np").images
    one = student(class_labels=[7], generator=make_generators([1]), output_type="np").images
    np.testing.assert_allclose(one[0], big[1], rtol=0, atol=1e-6)
    two = student(class_labels=[3], num_images_per_prompt=2, generator=make_generators([0, 5]), output_type="np")
    np.testing.assert_allclose(two.images[0], big[0], rtol=0, atol=1e-6)


def test_output_types(student):
    pil = student(class_labels=4, generator=torch.Generator().manual_seed(0)).images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].mode == "L" and pil[0].size == (8, 8)
    arr = student(class_labels=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert arr.shape == (1, 8, 8, 1) and 0 <= arr.min() and arr.max() <= 1
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0, :, :, 0] * 255).round().astype(np.uint8))
    (latent,) = student(
        class_labels=4, generator=torch.Generator().manual_seed(0), output_type="latent", return_dict=False
    )
    torch.testing.assert_close(_to_unit(latent).permute(0, 2, 3, 1).numpy(), arr, rtol=0, atol=1e-6)


def test_save_load_round_trip(student, tmp_path):
    student.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StepDistillPipeline"
    assert index["null_class_label"] == NULL and index["default_timesteps"] == TIMESTEPS
    assert index["vae"] == [None, None]
    loaded = StepDistillPipeline.from_pretrained(tmp_path)
    via_diffusers = DiffusionPipeline.from_pretrained(tmp_path)  # resolvable once stepdistill.pipelines is imported
    assert type(via_diffusers) is StepDistillPipeline and isinstance(loaded.scheduler, LCMScheduler)
    for pipe in (loaded, via_diffusers):
        pipe.set_progress_bar_config(disable=True)
        got = pipe(class_labels=[2, 9], generator=make_generators([4, 5]), output_type="pt").images
        want = student(class_labels=[2, 9], generator=make_generators([4, 5]), output_type="pt").images
        assert torch.equal(got, want)


def test_scheduler_selects_teacher_or_student_sampler(unet):
    ddim = teacher_scheduler()
    teacher = StepDistillPipeline(unet=unet, scheduler=ddim, null_class_label=NULL)
    teacher.set_progress_bar_config(disable=True)
    assert not teacher.is_student and not is_student_scheduler(ddim)
    assert is_student_scheduler(LCMScheduler())
    cond = Conditioning(class_labels=torch.tensor([1, 8]), null_class_label=NULL)
    ddim.set_timesteps(3)
    latents = initial_noise((2, 1, 8, 8), make_generators([0, 1]))
    want = sample_teacher(teacher.denoiser, latents, cond, timesteps=ddim.timesteps.tolist(), guidance_scale=2.5)
    got = teacher(class_labels=[1, 8], num_inference_steps=3, guidance_scale=2.5, generator=make_generators([0, 1]),
                  output_type="pt").images  # fmt: skip
    torch.testing.assert_close(got, _to_unit(want), rtol=0, atol=1e-6)
    # the same network and seeds under LCMScheduler run the student sampler: fresh noise, different images
    student = StepDistillPipeline(unet=unet, scheduler=LCMScheduler.from_config(ddim.config), null_class_label=NULL)
    student.set_progress_bar_config(disable=True)
    other = student(class_labels=[1, 8], timesteps=ddim.timesteps.tolist(), guidance_scale=2.5,
                    generator=make_generators([0, 1]), output_type="pt").images  # fmt: skip
    assert (other - got).abs().max() > 1e-3


def test_callback_sees_every_step(student):
    seen = []
    student(
        class_labels=[1],
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=lambda pipe, i, t, tensors: seen.append((i, t, sorted(tensors))),
        callback_on_step_end_tensor_inputs=["latents", "denoised"],
    )
    assert [(i, t) for i, t, _ in seen] == list(enumerate(map(float, TIMESTEPS)))
    assert seen[0][2] == ["denoised", "latents"]


def test_unconditional_model_and_num_inference_steps():
    torch.manual_seed(0)
    net = _randomize(teacher_unet(**TINY, num_class_embeds=None))
    pipe = StepDistillPipeline(unet=net, scheduler=lcm_scheduler_for_student(teacher_scheduler(), [999]))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, num_inference_steps=2, generator=make_generators([0, 1, 2]), output_type="np").images
    assert images.shape == (3, 8, 8, 1)
    with pytest.raises(ValueError, match="not class-conditional"):
        pipe(class_labels=[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "class-conditional: pass class_labels"),
        (dict(class_labels=[11]), "out of range"),
        (dict(class_labels=[-1]), "out of range"),
        (dict(class_labels=[1], timesteps=[499, 999]), "strictly decreasing"),
        (dict(class_labels=[1], timesteps=[1000]), "out of range"),
        (dict(class_labels=[1], num_inference_steps=0), "positive int"),
        (dict(class_labels=[1], num_inference_steps=3, timesteps=[999, 499]), "disagrees"),
        (dict(class_labels=[1, 2], generator=[torch.Generator()]), "1 generators for 2 images"),
        (dict(class_labels=[1], output_type="jpeg"), "output_type"),
        (dict(class_labels=[1], latents=torch.zeros(1, 1, 4, 4)), "latents have shape"),
        (dict(class_labels=[1], prompt="a digit"), "not text-conditional"),
        (dict(class_labels=[1], batch_size=2), "batch_size is for unconditional"),
        (dict(class_labels="three"), "prompt="),
        (dict(class_labels=[1], callback_on_step_end_tensor_inputs=["noise"]), "not available"),
    ],
)
def test_check_inputs_errors(student, kwargs, message):
    with pytest.raises(ValueError, match=message):
        student(**kwargs)


def test_guidance_needs_null_class(unet):
    pipe = StepDistillPipeline(unet=unet, scheduler=DDIMScheduler.from_config(teacher_scheduler().config))
    with pytest.raises(ValueError, match="null class"):
        pipe(class_labels=[1], guidance_scale=3.0)


def test_export_student_writes_stepdistill_pipeline(unet, tmp_path):
    result = export_student(unet, teacher_scheduler(), [999, 499], tmp_path / "digits", null_class_label=NULL)
    assert result.pipeline_class == "StepDistillPipeline" and result.kind == "stepdistill"
    card = (result.path / "README.md").read_text()
    assert "class_labels=[0, 1, 2, 3]" in card and "timesteps=[999, 499]" in card
    pipe = StepDistillPipeline.from_pretrained(result.path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.default_timesteps == [999, 499] and pipe.scheduler.config.prediction_type == "v_prediction"
    got = pipe(class_labels=[5], generator=make_generators([3]), output_type="pt").images
    gens = make_generators([3])
    cond = Conditioning(class_labels=torch.tensor([5]), null_class_label=NULL)
    x0 = sample_student(pipe.denoiser, initial_noise((1, 1, 8, 8), gens), cond, [999, 499], generator=gens)
    torch.testing.assert_close(got, _to_unit(x0), rtol=0, atol=1e-6)


class _Custom(torch.nn.Module):
    """A custom network ``fn(x_t, timestep, cond)`` with no diffusers config."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, timestep, cond):
        return self.scale * x + cond.class_labels.float()[:, None, None, None] / 10


def test_custom_network_needs_latents():
    pipe = StepDistillPipeline(unet=_Custom(), scheduler=lcm_scheduler_for_student(teacher_scheduler(), [999]))
    pipe.set_progress_bar_config(disable=True)
    latents = initial_noise((2, 1, 4, 4), make_generators([0, 1]))
    images = pipe(class_labels=[1, 2], latents=latents, output_type="pt").images
    assert images.shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="pass latents="):
        pipe(class_labels=[1, 2])


# ---------------------------------------------------------------------------------------------------------
# diffusers conventions: callback edits, call-state properties, encode_prompt, layerwise casting, attention kwargs
def test_callback_edits_the_latents(student):
    seeds, labels = [0, 1], [3, 7]

    def zero_at(step):
        return lambda pipe, i, t, kw: {"latents": torch.zeros_like(kw["latents"])} if i == step else None

    last = student(class_labels=labels, generator=make_generators(seeds), output_type="latent",
                   callback_on_step_end=zero_at(len(TIMESTEPS) - 1)).images  # fmt: skip
    assert torch.equal(last, torch.zeros(2, 1, 8, 8))  # after the last step the latents are the final x0
    mid = student(class_labels=labels, generator=make_generators(seeds), output_type="latent",
                  callback_on_step_end=zero_at(1)).images  # fmt: skip
    gens = make_generators(seeds)
    cond = Conditioning(class_labels=torch.tensor(labels), null_class_label=NULL)
    want = sample_student(student.denoiser, initial_noise((2, 1, 8, 8), gens), cond, TIMESTEPS, generator=gens,
                          callback=lambda i, t, out, x: torch.zeros_like(x) if i == 1 else None)  # fmt: skip
    plain = student(class_labels=labels, generator=make_generators(seeds), output_type="latent").images
    assert torch.equal(mid, want) and (mid - plain).abs().max() > 1e-3


def test_num_timesteps_and_guidance_scale_properties(unet, student):
    teacher = StepDistillPipeline(unet=unet, scheduler=teacher_scheduler(), null_class_label=NULL)
    teacher.set_progress_bar_config(disable=True)
    seen = []

    def record(pipe, i, t, callback_kwargs):
        seen.append((pipe.num_timesteps, pipe.guidance_scale, pipe.do_classifier_free_guidance))
    teacher(class_labels=[1], num_inference_steps=3, guidance_scale=2.5, callback_on_step_end=record)
    assert seen == [(3, 2.5, True)] * 3
    student(class_labels=[1], callback_on_step_end=record)
    assert seen[-1] == (4, 1.0, False) and student.num_timesteps == 4 and not student.do_classifier_free_guidance


@pytest.fixture(scope="module")
def text_pipe(tmp_path_factory) -> StepDistillPipeline:
    """A pixel-space SD1.5-like student with its own CLIP text encoder and tokenizer."""
    tokenizer = clip_tokenizer(write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer")))
    scheduler, encoder = lcm_scheduler_for_student(teacher_scheduler(), [999, 499]), clip_text_encoder(0, hidden=12)
    pipe = StepDistillPipeline(unet=unet2d_condition(), scheduler=scheduler, text_encoder=encoder, tokenizer=tokenizer,
                               default_timesteps=[999, 499])  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPTS = ["a red cube", "two cats"]


def test_encode_prompt_round_trip(text_pipe):
    run = lambda **kw: text_pipe(guidance_scale=3.0, generator=make_generators([0, 1, 2, 3]), output_type="pt",  # noqa: E731
                                 **kw).images  # fmt: skip
    embeds, negative = text_pipe.encode_prompt(PROMPTS, "cpu", 2, True)
    assert embeds.shape == negative.shape == (4, 16, 12)
    empty, _ = text_pipe.encode_prompt([""], "cpu")
    assert torch.equal(negative, empty.expand(4, -1, -1))  # the empty prompt, as Stable Diffusion does
    want = run(prompt=PROMPTS, num_images_per_prompt=2)
    assert torch.equal(run(prompt_embeds=embeds, negative_prompt_embeds=negative), want)
    # prompt_embeds alone: the unconditional branch is the empty prompt's embedding too (not zeros)
    assert torch.equal(run(prompt_embeds=embeds), want)
    zeros = run(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds))
    assert (zeros - want).abs().max() > 1e-3
    assert torch.equal(text_pipe.encode_prompt(None, "cpu", 2, prompt_embeds=embeds[::2])[0], embeds)


def test_prompt_embeds_without_text_encoder_guide_with_zeros(text_pipe):
    pipe = StepDistillPipeline(unet=text_pipe.unet, scheduler=text_pipe.scheduler, default_timesteps=[999, 499])
    pipe.set_progress_bar_config(disable=True)
    embeds, _ = text_pipe.encode_prompt(PROMPTS, "cpu")
    got, want = (pipe(prompt_embeds=embeds, guidance_scale=3.0, generator=make_generators([0, 1]), output_type="pt",
                      **kw).images for kw in ({}, {"negative_prompt_embeds": torch.zeros_like(embeds)}))  # fmt: skip
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="need a text_encoder"):
        pipe(prompt_embeds=embeds, negative_prompt="blurry", guidance_scale=3.0)


def test_layerwise_casting_unet_runs(text_pipe):
    """float8 storage / bf16 compute: inputs must go in as bf16 (the compute dtype), not float8."""
    net = copy.deepcopy(text_pipe.unet)
    net.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    pipe = StepDistillPipeline(unet=net, scheduler=text_pipe.scheduler, default_timesteps=[999, 499])
    pipe.set_progress_bar_config(disable=True)
    embeds, _ = text_pipe.encode_prompt(PROMPTS, "cpu")
    got = pipe(prompt_embeds=embeds, generator=make_generators([0, 1]), output_type="latent").images
    want = text_pipe(prompt_embeds=embeds, generator=make_generators([0, 1]), output_type="latent").images
    assert pipe.denoiser.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert 0 < (got - want).abs().max() < 0.1 * want.abs().max()  # float8 weights: close to float32, not equal


def test_cross_attention_kwargs_reach_attention(text_pipe, student):
    """The LoRA scale 0 (``cross_attention_kwargs={"scale": 0.0}``) gives back the network without LoRA."""
    from peft import LoraConfig

    net = copy.deepcopy(text_pipe.unet)
    net.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                               target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # fmt: skip
    pipe = StepDistillPipeline(**{**text_pipe.components, "unet": net}, default_timesteps=[999, 499])
    pipe.set_progress_bar_config(disable=True)
    run = lambda p, **kw: p(prompt=PROMPTS, generator=make_generators([0, 1]), output_type="pt", **kw).images  # noqa: E731
    plain, lora = run(text_pipe), run(pipe)
    assert (lora - plain).abs().max() > 1e-3
    torch.testing.assert_close(run(pipe, cross_attention_kwargs={"scale": 0.0}), plain, rtol=0, atol=1e-6)
    assert pipe.cross_attention_kwargs == {"scale": 0.0}
    with pytest.raises(ValueError, match="UNet2DModel takes no attention kwargs"):
        student(class_labels=[1], cross_attention_kwargs={"scale": 0.5})

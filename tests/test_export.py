"""Export to stock diffusers: a fresh Python process that never imports stepdistill must get stepdistill's images.

Tiny SD1.5-, SDXL- and SD3-like students (random weights, built from configs, no hub) are exported; one
subprocess loads every folder with ``diffusers.DiffusionPipeline.from_pretrained`` and samples fixed seeds; the
images must equal ``sample_student`` + VAE decode in this process to ``ATOL`` (pixels in [0, 1]).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from tiny_models import (
    clip_text_encoder,
    clip_tokenizer,
    latent_sd3_transformer,
    latent_unet,
    tiny_vae,
    write_clip_tokenizer,
)
from transformers import CLIPTokenizer

from stepdistill import Conditioning, Denoiser, NoiseSchedule, initial_noise, make_generators, sample_student
from stepdistill.pipelines import (
    StepDistillPipeline,
    export_stable_diffusion,
    export_stable_diffusion_3,
    export_stable_diffusion_xl,
    export_student,
    lcm_original_inference_steps,
    lcm_scheduler_for_student,
    teacher_kind,
)

#: Max abs difference allowed between stock-diffusers and stepdistill pixels in [0, 1]. Both run the same float32
#: networks on the same noise; they differ only in rounding (stepdistill converts x0 and re-noises in float64, the
#: schedulers in float32): measured <= 7e-7 for every export here, while another seed or step count moves pixels
#: by > 1e-3 (asserted below).
ATOL = 1e-5
SEEDS = [11, 5, 7]
PROMPTS = ["a red cube", "two small cats", "x"]
MAX_LEN = 16
SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


# ---------------------------------------------------------------------------------------------------------
# tiny components
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A CLIP BPE tokenizer with the byte-level alphabet, no merges, and CLIP's two special tokens."""
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _tokenizer(folder) -> CLIPTokenizer:
    return clip_tokenizer(folder, MAX_LEN)


def _text_encoder(seed: int, projection: bool = False, hidden: int = 16):
    return clip_text_encoder(seed, projection, hidden, MAX_LEN)


def _ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------------------
# stepdistill's side: conditioning computed from the components, then sample_student + VAE decode
@torch.no_grad()
def reference_images(denoiser, vae, cond, timesteps, generator) -> np.ndarray:
    shape = (cond.batch_size, 4, 8, 8)
    latents = initial_noise(shape, generator)
    x0 = sample_student(denoiser, latents, cond, timesteps=timesteps, generator=generator)
    latents = x0 / vae.config.scaling_factor
    if vae.config.shift_factor is not None:
        latents = latents + vae.config.shift_factor
    pixels = vae.decode(latents).sample
    return (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline

    specs = json.load(open(sys.argv[1]))
    out = {}
    for spec in specs:
        pipe = DiffusionPipeline.from_pretrained(spec["path"], **spec["load_kwargs"])
        pipe.set_progress_bar_config(disable=True)
        kwargs = dict(spec["call_kwargs"], output_type="np")
        if spec["global_seed"] is not None:
            torch.manual_seed(spec["global_seed"])
        else:
            kwargs["generator"] = [torch.Generator().manual_seed(s) for s in spec["seeds"]]
        out[spec["name"]] = pipe(spec["prompts"], **kwargs).images
        out[spec["name"] + "/class"] = np.array(type(pipe).__name__)
    np.savez(sys.argv[2], **out)
    assert "stepdistill" not in sys.modules, "the stock side imported stepdistill"
    print("OK", sorted(m for m in sys.modules if m.startswith("stepdistill")))
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):
    """Export every student, run one fresh process over all folders, return (expected, stock) images by name."""
    root = tmp_path_factory.mktemp("exports")
    tok = _tokenizer(tokenizer_dir)
    specs, expected, results = [], {}, {}

    def add(name, result, reference, global_seed=None, prompts=PROMPTS):
        results[name] = result
        expected[name] = reference
        specs.append(
            dict(
                name=name,
                path=str(result.path),
                load_kwargs=result.load_kwargs,
                call_kwargs=result.call_kwargs,
                seeds=SEEDS,
                prompts=prompts,
                global_seed=global_seed,
            )
        )

    # SD1.5-like: one text encoder, eps-prediction teacher scheduler.
    te, vae, unet = _text_encoder(0), tiny_vae(), latent_unet(16)
    teacher = DDIMScheduler(**SD_SCHEDULER)
    base = dict(vae=vae, text_encoder=te, tokenizer=tok, scheduler=teacher)
    student = Denoiser.from_model(unet, NoiseSchedule.from_scheduler_config(teacher.config))
    with torch.no_grad():
        cond = Conditioning(prompt_embeds=te(_ids(tok, PROMPTS))[0])
    for ts in ([999], [999, 749, 499, 249]):
        name = f"sd15-{len(ts)}step"
        result = export_stable_diffusion(student, base, ts, root / name)
        add(name, result, reference_images(student, vae, cond, ts, make_generators(SEEDS)))

    # SDXL-like: two text encoders (penultimate hidden states), pooled embeds from the second, time ids.
    te1, te2 = _text_encoder(4), _text_encoder(5, projection=True, hidden=8)
    xl_unet = latent_unet(
        24, addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8
    )
    xl_teacher = DDIMScheduler(**SD_SCHEDULER)
    xl_base = dict(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, scheduler=xl_teacher)
    xl_student = Denoiser.from_model(xl_unet, NoiseSchedule.from_scheduler_config(xl_teacher.config))
    with torch.no_grad():
        ids = _ids(tok, PROMPTS)
        out1, out2 = te1(ids, output_hidden_states=True), te2(ids, output_hidden_states=True)
        xl_cond = Conditioning(
            prompt_embeds=torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1),
            pooled_prompt_embeds=out2.text_embeds,
            time_ids=torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).repeat(len(PROMPTS), 1),
        )
    for ts in ([399], [999, 499]):
        name = f"sdxl-{len(ts)}step"
        result = export_stable_diffusion_xl(xl_student, xl_base, ts, root / name)
        add(name, result, reference_images(xl_student, vae, xl_cond, ts, make_generators(SEEDS)))

    # SD3-like: rectified flow, shifted teacher scheduler, VAE with a shift factor, no T5.
    s3_te1, s3_te2 = _text_encoder(6, projection=True), _text_encoder(7, projection=True)
    s3_vae = tiny_vae(shift_factor=0.1, scaling_factor=1.5)
    s3_teacher = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s3_net = latent_sd3_transformer()
    s3_base = dict(
        vae=s3_vae, text_encoder=s3_te1, text_encoder_2=s3_te2, tokenizer=tok, tokenizer_2=tok, scheduler=s3_teacher
    )
    s3_student = Denoiser.from_model(s3_net, NoiseSchedule.from_scheduler_config(s3_teacher.config))
    encoder = StableDiffusion3Pipeline(
        transformer=s3_net, scheduler=s3_teacher, text_encoder_3=None, tokenizer_3=None, **{
            k: v for k, v in s3_base.items() if k != "scheduler"
        }
    )  # fmt: skip
    with torch.no_grad():
        embeds, _, pooled, _ = encoder.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    s3_cond = Conditioning(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    one = export_stable_diffusion_3(s3_student, s3_base, [1000], root / "sd3-1step")
    add("sd3-1step", one, reference_images(s3_student, s3_vae, s3_cond, [1000], make_generators(SEEDS)))
    two = export_student(s3_student, s3_base, [1000, 600], root / "sd3-2step")  # dispatches on the network
    ref = reference_images(s3_student, s3_vae, s3_cond, [1000, 600], torch.Generator().manual_seed(SEEDS[0]))
    add("sd3-2step", two, ref, global_seed=SEEDS[0])

    spec_file = root / "specs.json"
    spec_file.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(spec_file), str(root / "stock.npz")],
        cwd=root,  # not the repository: nothing on sys.path points at stepdistill
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("OK []"), proc.stdout
    stock = dict(np.load(root / "stock.npz"))
    return dict(
        expected=expected,
        stock=stock,
        results=results,
        student=student,
        base=base,
        cond=cond,
        sdxl=(xl_student, xl_teacher, vae, xl_cond),
        sd3=(s3_student, s3_teacher, s3_vae, s3_cond),
    )


def _assert_same(exported, name):
    got, want = exported["stock"][name], exported["expected"][name]
    assert got.shape == want.shape == (len(SEEDS), 16, 16, 3)
    assert want.std() > 0.01, "degenerate reference images"
    diff = np.abs(got - want).max()
    per_image = np.abs(got - want).reshape(len(got), -1).max(axis=1)
    assert diff < ATOL, f"{name}: max |stock - stepdistill| = {diff:.3g} (per image {per_image})"


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 4])
def test_sd15_export_matches_stepdistill_in_fresh_process(exported, steps):
    name = f"sd15-{steps}step"
    assert str(exported["stock"][name + "/class"]) == "StableDiffusionPipeline"
    _assert_same(exported, name)
    # the images depend on the seed (per-sample generators), so the comparison is not vacuous
    images = exported["stock"][name]
    assert np.abs(images[0] - images[1]).max() > 1e-3


def test_multistep_differs_from_one_step(exported):
    assert np.abs(exported["stock"]["sd15-1step"] - exported["stock"]["sd15-4step"]).max() > 1e-3


@pytest.mark.parametrize("steps", [1, 2])
def test_sdxl_export_matches_stepdistill_in_fresh_process(exported, steps):
    name = f"sdxl-{steps}step"
    assert str(exported["stock"][name + "/class"]) == "StableDiffusionXLPipeline"
    _assert_same(exported, name)


@pytest.mark.parametrize("steps", [1, 2])
def test_sd3_export_matches_stepdistill_in_fresh_process(exported, steps):
    name = f"sd3-{steps}step"
    assert str(exported["stock"][name + "/class"]) == "StableDiffusion3Pipeline"
    _assert_same(exported, name)
    assert exported["results"][name].exact == (steps == 1)


def test_exported_scheduler_and_model_card(exported):
    result = exported["results"]["sd15-4step"]
    config = json.loads((result.path / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "LCMScheduler"
    assert config["original_inference_steps"] == 1000 and config["prediction_type"] == "epsilon"
    assert not config["clip_sample"]
    index = json.loads((result.path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    card = (result.path / "README.md").read_text()
    assert "timesteps=[999, 749, 499, 249], guidance_scale=0.0" in card
    assert "library_name: diffusers" in card
    sd3_card = (exported["results"]["sd3-2step"].path / "README.md").read_text()
    assert "torch.manual_seed" in sd3_card and "sigmas=[1.0, 0.6]" in sd3_card


def test_lcm_num_inference_steps_gives_trained_timesteps():
    assert lcm_original_inference_steps([999, 749, 499, 249]) == 1000
    assert lcm_original_inference_steps([999]) == 1000
    assert lcm_original_inference_steps([999, 759, 499, 259]) == 50  # LCM's default 4-step list
    assert lcm_original_inference_steps([399]) is None
    lcm = lcm_scheduler_for_student(DDIMScheduler(**SD_SCHEDULER), [999, 749, 499, 249])
    lcm.set_timesteps(4)
    assert lcm.timesteps.tolist() == [999, 749, 499, 249]
    assert isinstance(lcm, LCMScheduler) and lcm.config.timestep_scaling == 1e6


@pytest.mark.parametrize(
    "timesteps, message",
    [([999, 999], "strictly decreasing"), ([1000], "out of range"), ([999, 499.5], "integer"), ([999, 0], "t=0")],
)
def test_export_rejects_bad_timesteps(timesteps, message):
    with pytest.raises(ValueError, match=message):
        lcm_scheduler_for_student(DDIMScheduler(**SD_SCHEDULER), timesteps)


def test_stepdistill_pipeline_with_text_encoder_matches_stock(exported, tmp_path):
    """The same components in a StepDistillPipeline (with its own prompt encoding) give the same images."""
    base, student = exported["base"], exported["student"]
    lcm = lcm_scheduler_for_student(base["scheduler"], [999, 749, 499, 249])
    pipe = StepDistillPipeline(
        unet=student.model,
        scheduler=lcm,
        vae=base["vae"],
        text_encoder=base["text_encoder"],
        tokenizer=base["tokenizer"],
        default_timesteps=[999, 749, 499, 249],
    )
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=PROMPTS, generator=make_generators(SEEDS), output_type="np").images
    assert np.abs(images - exported["stock"]["sd15-4step"]).max() < ATOL


def test_export_from_pipeline_folder_or_object(exported, tmp_path):
    source = exported["results"]["sd15-1step"].path  # any local StableDiffusionPipeline folder serves as the base
    student = exported["student"]
    from_folder = export_stable_diffusion(student, str(source), [999, 499], tmp_path / "a", model_card=False)
    base_pipe = StableDiffusionPipeline.from_pretrained(source)
    from_object = export_student(student.model, base_pipe, [999, 499], tmp_path / "b")
    for result in (from_folder, from_object):
        config = json.loads((result.path / "scheduler" / "scheduler_config.json").read_text())
        assert config["_class_name"] == "LCMScheduler" and config["beta_schedule"] == "scaled_linear"
        assert result.call_kwargs == {"timesteps": [999, 499], "guidance_scale": 0.0}
    assert not (from_folder.path / "README.md").exists() and (from_object.path / "README.md").exists()
    # an SD3 folder without T5 (text_encoder_3 = null) also serves as a base
    sd3_source = exported["results"]["sd3-1step"].path
    sd3 = export_student(exported["sd3"][0], str(sd3_source), [1000], tmp_path / "c", model_card=False)
    assert sd3.pipeline_class == "StableDiffusion3Pipeline" and sd3.call_kwargs["sigmas"] == [1.0]


def test_export_errors(exported, tmp_path):
    base = exported["base"]
    with pytest.raises(ValueError, match="needs the base pipeline's \\['text_encoder'\\]"):
        export_stable_diffusion(exported["student"], dict(base, text_encoder=None), [999], tmp_path / "x")
    with pytest.raises(ValueError, match="SDXL-like"):
        export_stable_diffusion_xl(exported["student"], base, [999], tmp_path / "y")
    assert teacher_kind(exported["student"].model) == "stable-diffusion"


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_stepdistill_pipeline_with_precomputed_embeddings_matches_stock(exported, family):
    """SDXL (time ids made by the pipeline) and SD3 (flow, VAE shift factor) students in a StepDistillPipeline."""
    student, teacher, vae, cond = exported[family]
    if family == "sdxl":
        timesteps, scheduler, generator = [999, 499], lcm_scheduler_for_student(teacher, [999, 499]), None
    else:
        timesteps, generator = [1000, 600], torch.Generator().manual_seed(SEEDS[0])
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=True)
    pipe = StepDistillPipeline(unet=student.model, scheduler=scheduler, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.is_student
    images = pipe(
        prompt_embeds=cond.prompt_embeds,
        pooled_prompt_embeds=cond.pooled_prompt_embeds,
        timesteps=timesteps,
        generator=generator or make_generators(SEEDS),
        output_type="np",
    ).images
    assert np.abs(images - exported["stock"][f"{family}-2step"]).max() < ATOL

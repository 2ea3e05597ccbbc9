"""DMD2 on every teacher kind's code path: SD1.5-, SDXL- and SD3-like pipeline folders with prompts and
image datasets, a custom torch module, and the prompt / dataset readers (random tiny models, no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from recipe_methods import RECIPES, recipe_config
from tiny_models import (
    TinyCustom,
    clip_text_encoder,
    clip_tokenizer,
    latent_sd3_transformer,
    latent_unet,
    tiny_vae,
    write_clip_tokenizer,
)

from stepdistill import Denoiser, VPSchedule
from stepdistill.configs import parse_config
from stepdistill.data import DataSourceError, PromptEncoder, load_prompts, open_dataset
from stepdistill.trainers.dmd import DMDConfig, DMDTrainer

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
PROMPTS = ["a red cube", "two small cats", "a blue house on a hill"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny SD1.5-, SDXL- and SD3-like teacher pipeline folders, a prompt file and a captioned image folder."""
    root = tmp_path_factory.mktemp("text_teachers")
    tok = clip_tokenizer(write_clip_tokenizer(root / "tok"))
    out = {}
    sd = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=clip_text_encoder(4), tokenizer=tok, unet=latent_unet(16),
        scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.save_pretrained(root / "sd15")
    out["sd15"] = root / "sd15"
    xl_unet = latent_unet(32, addition_embed_type="text_time", addition_time_embed_dim=4,
                    projection_class_embeddings_input_dim=6 * 4 + 8)
    xl = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=clip_text_encoder(4), text_encoder_2=clip_text_encoder(5, projection=True),
        tokenizer=tok, tokenizer_2=tok, unet=xl_unet, scheduler=DDIMScheduler(**SD_SCHEDULER),
    )
    xl.save_pretrained(root / "sdxl")
    out["sdxl"] = root / "sdxl"
    s3_net = latent_sd3_transformer()
    s3 = StableDiffusion3Pipeline(
        transformer=s3_net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(shift_factor=0.1),
        text_encoder=clip_text_encoder(6, projection=True), text_encoder_2=clip_text_encoder(7, projection=True),
        tokenizer=tok, tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None,
    )
    s3.save_pretrained(root / "sd3")
    out["sd3"] = root / "sd3"
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    out["prompts"] = root / "prompts.txt"
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        PIL.Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": PROMPTS[i % 3]})
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["images"] = images
    return out


def _config(teacher, out, **overrides) -> DMDConfig:
    base = dict(
        teacher=str(teacher), output_dir=str(out), max_train_steps=2, train_batch_size=2,
        generator_learning_rate=1e-3, critic_learning_rate=1e-3, lr_warmup_steps=0,
        critic_updates_per_generator_update=1, checkpointing_steps=0, log_every=1, eval_num_samples=0,
        sample_grid_size=2, seed=1, real_guidance_scale=2.0,
    )
    base.update(overrides)
    return DMDConfig(**base)


def _check_trains(trainer: DMDTrainer) -> dict:
    before = {n: {k: v.detach().clone() for k, v in trainer.unwrap(n).named_parameters()}
              for n in ("generator", "critic")}
    teacher0 = {k: v.detach().clone() for k, v in trainer.teacher.model.named_parameters()}
    summary = trainer.train()
    for key, value in summary["final_metrics"].items():
        assert np.isfinite(value), key
    for name, params in before.items():
        after = dict(trainer.unwrap(name).named_parameters())
        unchanged = [k for k, v in params.items() if torch.equal(v, after[k].detach())]
        assert not unchanged, f"{name}: {unchanged[:4]}"
    for k, v in trainer.teacher.model.named_parameters():
        assert torch.equal(v, teacher0[k])
    return summary


@pytest.mark.parametrize("kind,timesteps", [("sd15", [999]), ("sdxl", [999, 499]), ("sd3", [1000])])
def test_text_teachers_train_and_export_stock(folders, tmp_path, kind, timesteps):
    trainer = DMDTrainer(_config(folders[kind], tmp_path / "run", data="prompts", prompts=str(folders["prompts"]),
                                 student_timesteps=timesteps))
    cond, _ = trainer.data.sample(2, torch.Generator().manual_seed(0))
    assert cond.prompt_embeds is not None and cond.negative is not None
    if kind == "sdxl":  # SDXL's added conditioning and its zeroed empty-prompt negative
        assert cond.time_ids is not None and torch.equal(cond.time_ids[0], torch.tensor([16.0, 16, 0, 0, 16, 16]))
        assert cond.negative.prompt_embeds.abs().sum() == 0
    else:  # SD1.5 / SD3: the negative is the empty prompt's embedding, not zeros
        assert cond.negative.prompt_embeds.abs().sum() > 0
    summary = _check_trains(trainer)
    index = json.loads((tmp_path / "run" / "student" / "model_index.json").read_text())
    expected = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                "sd3": "StableDiffusion3Pipeline"}[kind]
    assert index["_class_name"] == expected
    card = (tmp_path / "run" / "student" / "README.md").read_text()  # names the final folder, not the temporary one
    assert f'from_pretrained("{tmp_path / "run" / "student"}"' in card and ".tmp" not in card
    assert summary["global_step"] == 2
    # diagnostic grid, decoded by the teacher's VAE: samples + (real, fake) at 3 noise levels = 7 rows of 2
    grid = PIL.Image.open(tmp_path / "run" / "samples" / "step-000002.png")
    assert abs(grid.height / grid.width - 7 / 2) < 0.1


def test_prompt_encoder_matches_the_stock_pipeline(folders):
    pipe = StableDiffusionPipeline.from_pretrained(folders["sd15"], safety_checker=None)
    enc = PromptEncoder.from_pretrained(folders["sd15"], pipe.unet)
    cond = enc(PROMPTS)
    emb, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, None)
    assert torch.equal(cond.prompt_embeds, emb) and torch.equal(cond.negative.prompt_embeds, neg)
    assert not torch.equal(emb[0], emb[1])


def test_dataset_source_gan_on_latent_teacher(folders, tmp_path):
    cfg = _config(folders["sd15"], tmp_path / "run", data="dataset", dataset=str(folders["images"]),
                  use_gan=True, export=False)
    trainer = DMDTrainer(cfg)
    cond, latents = trainer.data.sample(3, torch.Generator().manual_seed(0))
    assert latents.shape == (3, 4, 8, 8) and cond.prompt_embeds.shape[0] == 3  # VAE-encoded 16 px crops
    assert trainer.unwrap("critic").head is not None
    summary = _check_trains(trainer)
    assert "loss/gan_critic" in summary["final_metrics"]


def test_custom_module_teacher(tmp_path):
    schedule = VPSchedule.from_config(dict(SD_SCHEDULER, num_train_timesteps=1000))
    teacher = Denoiser.from_model(TinyCustom(), schedule)
    cfg = _config("", tmp_path / "run", data="uniform_labels", num_classes=4, null_class_label=4,
                  sample_shape=[2, 8, 8], student_timesteps=[999], real_guidance_scale=1.5)
    trainer = DMDTrainer(cfg, teacher=teacher)
    _check_trains(trainer)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "student" / "student.safetensors")
    trained = trainer.unwrap("generator").model.state_dict()
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)


def test_custom_module_without_shape_is_a_clear_error(tmp_path):
    schedule = VPSchedule.from_config(dict(SD_SCHEDULER, num_train_timesteps=1000))
    cfg = _config("", tmp_path / "run", data="uniform_labels", num_classes=4, null_class_label=4)
    with pytest.raises(ValueError, match="sample_shape"):
        DMDTrainer(cfg, teacher=Denoiser.from_model(TinyCustom(), schedule))


def test_prompts_on_a_class_teacher_is_a_clear_error(tiny_teacher, tmp_path, folders):
    cfg = _config(tiny_teacher, tmp_path / "run", data="prompts", prompts=str(folders["prompts"]))
    with pytest.raises(DataSourceError, match="not text-conditional"):
        DMDTrainer(cfg)


def test_load_prompts_from_files_and_datasets(tmp_path):
    import datasets

    (tmp_path / "p.csv").write_text("id,caption\n1,a cat\n2,\n3,a dog\n")
    assert load_prompts(tmp_path / "p.csv") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x y"}\n{"prompt": "z"}\n')
    assert load_prompts(tmp_path / "p.jsonl") == ["x y", "z"]
    datasets.Dataset.from_dict({"desc": ["one", "two"]}).save_to_disk(str(tmp_path / "arrow"))
    assert load_prompts(tmp_path / "arrow", column="desc") == ["one", "two"]
    with pytest.raises(DataSourceError, match=r"no prompt column.*\['desc'\]"):
        load_prompts(tmp_path / "arrow")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataSourceError, match="no non-empty prompt"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(DataSourceError, match="does not exist"):
        open_dataset(tmp_path / "missing")


def test_image_folder_with_classes_feeds_a_pixel_teacher(tiny_teacher, tmp_path):
    rng = np.random.default_rng(1)
    for label in ("0", "3"):
        (tmp_path / "digits" / label).mkdir(parents=True)
        for i in range(3):
            PIL.Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), "L").save(tmp_path / "digits" / label /
                                                                                      f"{i}.png")
    cfg = _config(tiny_teacher, tmp_path / "run", data="dataset", dataset=str(tmp_path / "digits"), use_gan=True,
                  export=False, train_batch_size=4)
    trainer = DMDTrainer(cfg)
    cond, images = trainer.data.sample(4, torch.Generator().manual_seed(0))
    assert images.shape == (4, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    # class sub-folders named by integers keep those labels (datasets numbers them 0..K-1 by sorted name)
    assert set(cond.class_labels.tolist()) == {0, 3} and cond.null_class_label == 10
    grid = trainer.data.grid_conditioning(6).class_labels.tolist()
    assert grid == [0, 0, 0, 3, 3, 3]
    _check_trains(trainer)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses(recipe):
    cfg = parse_config(recipe_config(recipe), ["--config", str(recipe)])
    assert cfg.teacher and cfg.max_train_steps > 0


@pytest.mark.parametrize("name,kind", [("sd15_dmd2_1step", "sd15"), ("sd15_dmd2_1step_gan", "sd15"),
                                       ("sdxl_dmd2_4step", "sdxl")])
def test_reference_recipes_run_on_tiny_pipelines(folders, tmp_path, name, kind):
    """The SD1.5 / SDXL reference settings (GAN, backward simulation, grad checkpointing, init_generator) for real."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml"
    cfg = parse_config(DMDConfig, [
        "--config", str(recipe), "--teacher", str(folders[kind]), "--prompts", str(folders["prompts"]),
        "--dataset", str(folders["images"]), "--output_dir", str(tmp_path / "run"), "--max_train_steps", "2",
        "--train_batch_size", "2", "--mixed_precision", "no", "--checkpointing_steps", "0", "--sample_every", "0",
        "--export", "false", "--lr_warmup_steps", "0", "--generator_learning_rate", "1e-3",
        "--critic_learning_rate", "1e-3", "--critic_updates_per_generator_update", "1", "--log_every", "1",
        *(["--init_generator", str(folders[kind])] if "gan" in name else []),
    ])
    trainer = DMDTrainer(cfg)
    assert trainer.generator.model.is_gradient_checkpointing
    _check_trains(trainer)


def test_init_generator_must_match_the_teacher(folders, tmp_path):
    cfg = _config(folders["sd15"], tmp_path / "run", data="prompts", prompts=str(folders["prompts"]),
                  init_generator=str(folders["sdxl"]))
    with pytest.raises(ValueError, match="architecture"):
        DMDTrainer(cfg)


def test_prompt_encoder_gradient_path_and_prompt_subsets(folders):
    from stepdistill.data import PromptSource
    from stepdistill.loading import load_denoiser

    encoder = PromptEncoder.from_pretrained(folders["sd15"], load_denoiser(folders["sd15"]).model)
    (text_encoder,) = encoder.text_encoders
    table = text_encoder.get_input_embeddings().weight
    assert not encoder(["a red cube"]).prompt_embeds.requires_grad  # the default path keeps no graph
    table.requires_grad_(True)  # e.g. a new token's row trains
    try:
        cond = encoder.encode(["a red cube"], grad=True)
        cond.prompt_embeds.sum().backward()
        assert table.grad is not None and table.grad.abs().sum() > 0
        torch.testing.assert_close(cond.prompt_embeds.detach(), encoder(["a red cube"]).prompt_embeds)
    finally:
        table.requires_grad_(False)
        table.grad = None
    source = PromptSource(PROMPTS, encoder)
    first = encoder([PROMPTS[0]]).prompt_embeds[0]
    part = source.subset(lambda c: (c.prompt_embeds - first).abs().flatten(1).amax(1) > 0)  # all but the first
    assert part.prompts == PROMPTS[1:] and len(source) == 3


def test_pipeline_folder_naming_foreign_code_is_refused(folders, tmp_path):
    import json
    import shutil

    from stepdistill.loading import load_denoiser

    bad = tmp_path / "sd15_bad"
    shutil.copytree(folders["sd15"], bad)
    index = json.loads((bad / "model_index.json").read_text())
    index["text_encoder"] = ["this", "s"]  # would print the Zen of Python if imported
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DataSourceError, match="component 'text_encoder' is this.s"):
        PromptEncoder.from_pretrained(bad, load_denoiser(folders["sd15"]).model)

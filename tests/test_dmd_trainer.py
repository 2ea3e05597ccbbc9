"""DMD / DMD2 trainer on a tiny digits-shaped teacher: a few steps of each mode, resume, DDP, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import launch_two_processes
from recipe_methods import RECIPES, recipe_config

from stepdistill import Conditioning, VPSchedule
from stepdistill.configs import parse_config
from stepdistill.denoiser import CallableDenoiser
from stepdistill.loading import ModelFolderError, load_denoiser
from stepdistill.losses import compute_distribution_matching_loss, distribution_matching_gradient
from stepdistill.pipelines import StepDistillPipeline
from stepdistill.sampling import make_generators
from stepdistill.trainers.base import NonFiniteLossError, list_checkpoints
from stepdistill.trainers.dmd import DMDConfig, DMDTrainer

ROOT = Path(__file__).resolve().parents[1]


def _config(teacher: Path, out: Path, **overrides) -> DMDConfig:
    base = dict(
        teacher=str(teacher), output_dir=str(out), max_train_steps=2, train_batch_size=4,
        generator_learning_rate=1e-3, critic_learning_rate=1e-3, lr_warmup_steps=0,
        critic_updates_per_generator_update=1, checkpointing_steps=0, log_every=1,
        eval_num_samples=0, sample_grid_size=4, seed=3,
    )
    base.update(overrides)
    return DMDConfig(**base)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_dmd2_one_step_gan_ema_trains_everything(tiny_teacher, tmp_path):
    cfg = _config(tiny_teacher, tmp_path / "run", use_gan=True, use_ema=True, student_timesteps=[399],
                  checkpointing_steps=2)
    trainer = DMDTrainer(cfg)
    gen0, critic0 = _params(trainer.unwrap("generator")), _params(trainer.unwrap("critic"))
    teacher0 = _params(trainer.teacher.model)
    assert trainer.unwrap("critic").head is not None and any(k.startswith("head.") for k in critic0)
    summary = trainer.train()

    metrics = summary["final_metrics"]
    for key in ("loss/dm", "loss/fake_score", "loss/gan_generator", "loss/gan_critic", "grad_norm/generator",
                "grad_norm/dm_at_x", "grad_norm/gan_at_x"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    for name, before in (("generator", gen0), ("critic", critic0)):
        after = dict(trainer.unwrap(name).named_parameters())
        unchanged = [k for k, v in before.items() if torch.equal(v, after[k].detach())]
        assert not unchanged, f"{name} parameters did not change: {unchanged[:5]}"
    for k, v in trainer.teacher.model.named_parameters():
        assert torch.equal(v, teacher0[k]) and not v.requires_grad
    # outputs: checkpoint with each model once (diffusers folders + the head), sample grid, exported student
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert (ckpt / "generator" / "model" / "config.json").is_file()
    assert (ckpt / "critic" / "denoiser" / "model" / "config.json").is_file()
    assert (ckpt / "critic" / "extra.safetensors").is_file()  # the GAN head
    assert not list(ckpt.glob("model*.safetensors")), "accelerate wrote the models a second time"
    assert (ckpt / "generator" / "ema" / "model" / "config.json").is_file()  # the EMA as weights, not a pickle
    assert len(list(ckpt.glob("custom_checkpoint_*"))) == 2  # the two LR schedules only
    # --init_generator <checkpoint> starts from the EMA weights
    with trainer.ema_weights("generator"):
        ema = {k: v.clone() for k, v in trainer.unwrap("generator").model.state_dict().items()}
    init = trainer.load_init_network(ckpt, trainer.unwrap("generator").model, "generator", "init_generator")
    assert all(torch.equal(v, ema[k]) for k, v in init.state_dict().items())
    assert (tmp_path / "run" / "samples" / "step-000002.png").is_file()
    student = load_denoiser(tmp_path / "run" / "student")
    meta = json.loads((tmp_path / "run" / "student" / "stepdistill_student.json").read_text())
    assert meta["timesteps"] == [399.0]
    scheduler_cfg = json.loads((tmp_path / "run" / "student" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_cfg["_class_name"] == "LCMScheduler"
    x = torch.randn(2, 1, 8, 8)
    labels = Conditioning(class_labels=torch.tensor([1, 2]), null_class_label=10)
    assert torch.isfinite(student(x, 399, labels).x0).all()


def test_dmd1_regression_on_teacher_pairs(tiny_teacher, tmp_path):
    cfg = _config(tiny_teacher, tmp_path / "dmd1", max_train_steps=1, regression_loss_weight=0.25,
                  num_regression_pairs=6, regression_teacher_steps=2, export=False)
    trainer = DMDTrainer(cfg)
    assert trainer.regression_pairs["y"].shape == (6, 1, 8, 8)
    gen0 = _params(trainer.unwrap("generator"))
    metrics = trainer.train()["final_metrics"]
    assert torch.isfinite(torch.tensor([metrics["loss/regression"], metrics["loss/dm"]])).all()
    after = dict(trainer.unwrap("generator").named_parameters())
    assert all(not torch.equal(v, after[k].detach()) for k, v in gen0.items())


def test_dmd2_four_steps_on_a_flow_teacher_exports_a_flow_student(tiny_flow_teacher, tmp_path):
    """The flow recipes' path: sigma * 1000 timesteps from pure noise (t = 1000, alpha = 0), backward simulation."""
    cfg = _config(tiny_flow_teacher, tmp_path / "flow", max_train_steps=3, student_timesteps=[1000, 750, 500, 250])
    trainer = DMDTrainer(cfg)
    assert trainer.schedule.family == "flow" and trainer.guidance_scale == 2.0  # from the teacher's json
    gen0 = _params(trainer.unwrap("generator"))
    metrics = trainer.train()["final_metrics"]
    assert torch.isfinite(torch.tensor([metrics["loss/dm"], metrics["loss/fake_score"]])).all()
    after = dict(trainer.unwrap("generator").named_parameters())
    assert any(not torch.equal(v, after[k].detach()) for k, v in gen0.items())
    folder = tmp_path / "flow" / "student"
    scheduler_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_cfg["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    labels = torch.tensor([1, 2, 3])
    ref = trainer.sample_student_images(Conditioning(class_labels=labels, null_class_label=10), [0, 1, 2])
    pipe = StepDistillPipeline.from_pretrained(folder)
    got = pipe(class_labels=labels, generator=make_generators([0, 1, 2]), output_type="latent").images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_dm_gradient_matches_hand_computed_value():
    schedule = VPSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                                      prediction_type="sample")
    # x0-predicting toy scores: real(cond) = 0.5 x_t + label, real(uncond) = 0.5 x_t, fake = 0.25 x_t
    real = CallableDenoiser(lambda x, t, c: 0.5 * x + c.class_labels.float()[:, None, None, None], schedule)
    fake = CallableDenoiser(lambda x, t, c: 0.25 * x, schedule)
    cond = Conditioning(class_labels=torch.tensor([1, 0]), null_class_label=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    noise = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([100.0, 700.0], dtype=torch.float64)
    w = 3.0
    loss, _, _ = compute_distribution_matching_loss(x, cond, real, fake, t, noise, real_guidance_scale=w)
    loss.mean().backward()

    with torch.no_grad():
        abar = schedule.alphas_cumprod[t.long()]
        x_t = abar.sqrt()[:, None, None, None] * x + (1 - abar).sqrt()[:, None, None, None] * noise
        x0_real = 0.5 * x_t + w * cond.class_labels.double()[:, None, None, None]
        x0_fake = 0.25 * x_t
        norm = (x - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        expected = (x0_fake - x0_real) / norm / x.numel()
    torch.testing.assert_close(x.grad, expected.to(x.grad.dtype), rtol=1e-4, atol=1e-7)
    # the helper alone, and its zero-normaliser guard
    grad = distribution_matching_gradient(x.detach(), x0_real, x0_fake)
    torch.testing.assert_close(grad.double(), (expected * x.numel()), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(distribution_matching_gradient(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2),
                                                         torch.ones(1, 1, 2, 2))).all()


def test_resume_equivalence_multistep_backward_simulation(tiny_teacher, tmp_path):
    common = dict(student_timesteps=[999, 666, 333], use_gan=True, use_ema=True, max_train_steps=4,
                  critic_updates_per_generator_update=2, checkpointing_steps=2, checkpoints_total_limit=1)
    straight = DMDTrainer(_config(tiny_teacher, tmp_path / "a", export=False, **common))
    assert straight.config.uses_backward_simulation
    summary = straight.train()
    assert torch.isfinite(torch.tensor(summary["final_metrics"]["loss/fake_score"]))
    ckpts = list_checkpoints(tmp_path / "a" / "checkpoints")
    assert [c.name for c in ckpts] == ["checkpoint-000004"]  # keep-last-1 pruned step 2
    # N/2 steps, stop, then resume "latest" for the other N/2 (same output dir)
    half = DMDTrainer(_config(tiny_teacher, tmp_path / "b", export=False, **dict(common, max_train_steps=2)))
    half.train()
    resumed = DMDTrainer(_config(tiny_teacher, tmp_path / "b", export=False, resume_from_checkpoint="latest",
                                 **common))
    resumed.train()
    assert resumed.global_step == 4
    for name in ("generator", "critic"):
        a = dict(straight.unwrap(name).named_parameters())
        for k, v in resumed.unwrap(name).named_parameters():
            torch.testing.assert_close(v, a[k], rtol=0, atol=1e-6, msg=f"{name}.{k}")
    for s, r in zip(straight.emas["generator"].shadow_params, resumed.emas["generator"].shadow_params):
        torch.testing.assert_close(s, r, rtol=0, atol=1e-6)


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(tiny_teacher, tmp_path):
    trainer = DMDTrainer(_config(tiny_teacher, tmp_path / "run", max_train_steps=3, checkpointing_steps=1))

    def poison(module, inputs, output):
        if trainer.global_step >= 1:
            output.sample = output.sample * float("nan")
        return output

    trainer.unwrap("critic").denoiser.model.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match="checkpoint-000001"):
        trainer.train()
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.name for c in ckpts] == ["checkpoint-000001"]
    assert (ckpts[0] / "generator" / "model" / "config.json").is_file()


def test_bad_inputs_give_clear_errors(tiny_teacher, tmp_path):
    from stepdistill.data.digits_models import classifier_path

    with pytest.raises(ValueError, match="backward_simulation=True needs a multi-step student"):
        _config(tiny_teacher, tmp_path, student_timesteps=[999], backward_simulation=True)
    with pytest.raises(ValueError, match="strictly decreasing"):
        _config(tiny_teacher, tmp_path, student_timesteps=[499, 999])
    with pytest.raises(ModelFolderError):
        DMDTrainer(_config(classifier_path(), tmp_path / "x"))
    with pytest.raises(ModelFolderError):
        DMDTrainer(_config(tiny_teacher / "scheduler", tmp_path / "y"))
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("teacher: t\nstudent_timestep: [999]\n")
    with pytest.raises(ValueError, match="unknown key"):
        parse_config(DMDConfig, ["--config", str(recipe)])


def test_parse_config_yaml_then_cli_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: t\ngenerator_learning_rate: 1e-5\nstudent_timesteps: [999, 499]\nuse_ema: true\n")
    cfg = parse_config(DMDConfig, ["--config", str(recipe), "--student_timesteps", "999", "666", "333",
                                   "--use_ema", "false", "--real_guidance_scale", "none"])
    assert cfg.generator_learning_rate == 1e-5 and cfg.student_timesteps == [999.0, 666.0, 333.0]
    assert cfg.use_ema is False and cfg.real_guidance_scale is None and cfg.uses_backward_simulation
    for recipe_file in RECIPES:
        parse_config(recipe_config(recipe_file), ["--config", str(recipe_file)])


@pytest.mark.parametrize("mode", ["full_gan", "shared_lora"])
def test_accelerate_launch_two_processes_agree(tiny_teacher, tmp_path, mode):
    out = tmp_path / "ddp"
    extra = ["--use_gan", "true"] if mode == "full_gan" else ["--lora_rank", "4", "--gradient_checkpointing", "true"]
    launch_two_processes(ROOT / "training_scripts" / "train_dmd.py", [
        "--teacher", str(tiny_teacher), "--output_dir", str(out), "--max_train_steps", "2",
        "--train_batch_size", "2", "--gradient_accumulation_steps", "2", *extra,
        "--critic_updates_per_generator_update", "1", "--lr_warmup_steps", "0", "--eval_num_samples", "0",
        "--checkpointing_steps", "2", "--generator_learning_rate", "1e-3", "--critic_learning_rate", "1e-3",
        "--student_timesteps", "999", "499",
    ])
    summary = json.loads((out / "train_summary.json").read_text())
    sums = summary["param_checksums"]
    assert len(sums) == 2, sums
    assert sums[0] == pytest.approx(sums[1], rel=0, abs=1e-9)
    assert (out / "checkpoints" / "checkpoint-000002" / "trainer_rng_1.pt").is_file()
    assert (out / "student" / "unet" / "config.json").is_file()


def test_gan_head_keeps_enough_channels_per_group_to_discriminate():
    """At 1x1 the head's last GroupNorm must not normalise tiny groups: with 2 channels per group every output
    is +-1 (only the sign of a channel difference survives), which left the digits discriminator at chance."""
    from stepdistill.networks import GANHead, gan_head_groups

    assert gan_head_groups(1280) == 32 and gan_head_groups(64) == 4 and gan_head_groups(16) == 1
    torch.manual_seed(0)
    head = GANHead(64, 2)
    norms = [m for m in head.net if isinstance(m, torch.nn.GroupNorm)]
    seen = []
    norms[-1].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    head(torch.randn(16, 64, 2, 2))
    magnitudes = seen[-1].abs().flatten()
    assert magnitudes.std() > 0.2, "GroupNorm over 1x1 maps saturates to +-1: too few channels per group"

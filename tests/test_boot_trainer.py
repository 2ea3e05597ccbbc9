"""BOOT: the signal-ODE step on constructed cases, gradient paths, the boundary, data-freedom, resume, DDP, errors."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import fails_in_one_line as _fails
from cli_helpers import launch_two_processes

from stepdistill import Conditioning, Denoiser, FlowSchedule, VPSchedule
from stepdistill.data.digits_models import teacher_unet
from stepdistill.denoiser import CallableDenoiser
from stepdistill.loading import load_denoiser
from stepdistill.losses import SignalBootstrapLoss, SignalBoundaryLoss, bootstrap_target
from stepdistill.networks.time_reversal import reverse_timestep_input
from stepdistill.sampling import ddim_step
from stepdistill.trainers.base import list_checkpoints
from stepdistill.trainers.boot import BOOTConfig, BOOTTrainer

ROOT = Path(__file__).resolve().parents[1]
VP_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _config(teacher: Path | str, out: Path, **overrides) -> BOOTConfig:
    base = dict(
        teacher=str(teacher), output_dir=str(out), data="uniform_labels", max_train_steps=2, train_batch_size=4,
        student_learning_rate=1e-3, lr_warmup_steps=0, checkpointing_steps=0, log_every=1, eval_num_samples=0,
        sample_grid_size=4, seed=3, bootstrap_steps=8,
    )
    base.update(overrides)
    return BOOTConfig(**base)


def _toy_teacher(schedule) -> CallableDenoiser:
    """A teacher in the schedule's parameterization whose x-prediction is ``0.5 x_t + label + 0.001 t``."""
    def fn(x, t, c):
        x0 = 0.5 * x + c.class_labels.to(x.dtype)[:, None, None, None] + 0.001 * t.to(x.dtype)[:, None, None, None]
        return _raw(schedule, x0, x, t)
    return CallableDenoiser(fn, schedule)


def _raw(schedule, x0, x, t):
    """The raw output that converts to ``x0`` at ``(x, t)`` (eps implied by x)."""
    alpha, sigma = schedule.alpha_sigma(t.double())
    a, s = alpha[:, None, None, None], sigma[:, None, None, None]
    eps = (x.double() - a * x0.double()) / s
    return schedule.target(x0.double(), eps, t.double()).to(x.dtype)


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon", "flow"])
def test_bootstrap_target_is_one_teacher_ddim_step_in_signal_space(kind):
    schedule = FlowSchedule(prediction_type="flow") if kind == "flow" else \
        VPSchedule.from_config(VP_BETAS, prediction_type=kind)
    teacher = _toy_teacher(schedule)
    g = torch.Generator().manual_seed(0)
    y_t = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    cond = Conditioning(class_labels=torch.tensor([0, 1, 2]), null_class_label=10)
    for t, s in ((700.0, 650.0), (999.0, 900.0), (40.0, 0.0)):
        x_t = schedule.signal_to_x(y_t, eps, t)
        out = teacher(x_t, t, cond)
        delta = schedule.signal_step_size(t, s).expand(3)
        target = bootstrap_target(y_t, out.x0, delta)
        # the teacher's DDIM step (Euler for rectified flow), read back in signal space with the same eps
        x_s = ddim_step(schedule, out, s)
        torch.testing.assert_close(target, schedule.x_to_signal(x_s, eps, s), rtol=1e-9, atol=1e-9)
        if kind == "flow":  # explicitly: x_s = x_t + (sigma_s - sigma_t) v, v = eps_hat - x0
            v = out.eps - out.x0
            torch.testing.assert_close(x_s, x_t + (s - t) / schedule.num_train_timesteps * v, rtol=1e-9, atol=1e-9)
        # delta = 1 - exp(lambda_s - lambda_t), BOOT's lambda = -log(alpha / sigma)
        lam = lambda u: -0.5 * schedule.log_snr(u)  # noqa: E731
        if s > 0 or kind != "flow":
            torch.testing.assert_close(delta[0], 1 - torch.exp(lam(s) - lam(t)), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="s < t"):
        schedule.signal_step_size(100.0, 100.0)


def test_losses_send_gradient_only_to_the_student_at_s():
    g = torch.Generator().manual_seed(0)
    g_s, y_t, f = (torch.randn(2, 1, 3, 3, generator=g, requires_grad=True) for _ in range(3))
    delta = torch.tensor([0.2, 0.5], dtype=torch.float64)
    loss = SignalBootstrapLoss()(g_s, y_t, f, delta)
    expected = ((g_s - bootstrap_target(y_t, f, delta)) ** 2).flatten(1).mean(1) / delta.float() ** 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    assert y_t.grad is None and f.grad is None and g_s.grad.abs().sum() > 0
    g_end, f_end = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    SignalBoundaryLoss()(g_end, f_end).sum().backward()
    assert f_end.grad is None
    torch.testing.assert_close(g_end.grad, (g_end - f_end).detach() / 2)


def test_time_reversal_is_exact_and_the_boundary_holds_at_initialisation(tiny_teacher, tmp_path):
    teacher = load_denoiser(tiny_teacher)
    student = reverse_timestep_input(copy.deepcopy(teacher.model), 999.0)
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    for tau in (0.0, 250.0, 999.0):
        a = student(x, torch.full((3,), tau), class_labels=labels).sample
        b = teacher.model(x, torch.full((3,), 999.0 - tau), class_labels=labels).sample
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    trainer = BOOTTrainer(_config(tiny_teacher, tmp_path / "run", guidance_scale=1.0))
    cond = Conditioning(class_labels=labels, null_class_label=10)
    end = torch.full((3,), 999.0, dtype=torch.float64)
    with torch.no_grad():
        g_end = trainer.signal(trainer.unwrap("student"), x, end, cond)
        torch.testing.assert_close(g_end, trainer.teacher_x0(x, end, cond), rtol=0, atol=1e-5)
        # the one-step sample is the student's signal at t = 0: one call on pure noise at the noise end
        y0 = trainer.signal(trainer.unwrap("student"), x, torch.zeros(3, dtype=torch.float64), cond)
        torch.testing.assert_close(trainer.unwrap("student")(x, 999, cond).x0, y0, rtol=0, atol=1e-6)


def test_training_step_gradient_only_through_g_at_s_and_boundary_anchor(tiny_teacher, tmp_path):
    trainer = BOOTTrainer(_config(tiny_teacher, tmp_path / "run", guidance_scale=2.0, boundary_fraction=0.5))
    calls = []
    trainer.unwrap("student").model.register_forward_hook(
        lambda m, inputs, out: calls.append((torch.is_grad_enabled(), inputs[1].double().clone())))
    teacher0 = {k: v.clone() for k, v in trainer.teacher.model.named_parameters()}
    metrics = trainer.training_step(0)
    assert {"loss/bootstrap", "loss/boundary", "grad_norm/student"} <= set(metrics)
    (nograd, tau_t), (grad, tau_s) = calls
    assert not nograd and grad and len(calls) == 2
    grid = trainer.grid
    b = trainer.config.train_batch_size
    k_t = [int((grid == 999 - v).nonzero()) for v in tau_t]
    k_s = [int((grid == 999 - v).nonzero()) for v in tau_s[:b]]
    assert [k - 1 for k in k_t] == k_s, "the student is trained at s = the grid neighbour below t"
    assert torch.equal(tau_s[b:], torch.zeros(b // 2, dtype=torch.float64)), "boundary rows run at t = T"
    for k, v in trainer.teacher.model.named_parameters():
        assert torch.equal(v, teacher0[k]) and v.grad is None and not v.requires_grad


def test_boundary_loss_pulls_the_noise_end_back_to_the_teacher(tiny_teacher, tmp_path):
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    cond = Conditioning(class_labels=torch.arange(16) % 10, null_class_label=10)
    end = torch.full((16,), 999.0, dtype=torch.float64)
    gaps = {}
    for weight in (0.0, 10.0):  # the same run without the boundary term is the control
        trainer = BOOTTrainer(_config(tiny_teacher, tmp_path / f"w{weight}", max_train_steps=8, export=False,
                                      boundary_loss_weight=weight, guidance_scale=1.0, boundary_fraction=1.0))
        with torch.no_grad():  # knock the student off the boundary
            for p in trainer.unwrap("student").model.conv_out.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))

        def gap(trainer=trainer) -> float:
            with torch.no_grad():
                g_end = trainer.signal(trainer.unwrap("student"), x, end, cond)
                return float((g_end - trainer.teacher_x0(x, end, cond)).pow(2).mean())

        before = gap()
        metrics = trainer.train()["final_metrics"]
        assert ("loss/boundary" in metrics) == (weight > 0)
        gaps[weight] = gap() / before
    assert gaps[10.0] < 1.0 and gaps[10.0] < 0.5 * gaps[0.0], gaps


def test_data_free_no_image_file_or_column_is_opened(tiny_teacher, tmp_path, monkeypatch):
    import PIL.Image

    import stepdistill.data.digits as digits
    import stepdistill.data.sources as sources

    def refuse(*args, **kwargs):
        raise AssertionError("BOOT opened an image source")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    monkeypatch.setattr(digits, "load_digits_split", refuse)
    monkeypatch.setattr(sources, "DigitsSource", refuse)
    monkeypatch.setattr(sources, "DatasetSource", refuse)
    trainer = BOOTTrainer(_config(tiny_teacher, tmp_path / "run", use_ema=True, checkpointing_steps=2))
    summary = trainer.train()
    assert torch.isfinite(torch.tensor(summary["final_metrics"]["loss/bootstrap"]))
    assert not trainer.data.has_images
    meta = json.loads((tmp_path / "run" / "student" / "stepdistill_student.json").read_text())
    assert meta["training_images"] == 0 and meta["timesteps"] == [999.0]
    for source in ("digits", "dataset"):
        with pytest.raises(ValueError, match="data-free"):
            _config(tiny_teacher, tmp_path, data=source, dataset=str(tmp_path))


def test_trains_exports_one_call_student_and_signal_trajectory(tiny_teacher, tmp_path):
    trainer = BOOTTrainer(_config(tiny_teacher, tmp_path / "run", use_ema=True, checkpointing_steps=2))
    before = {k: v.clone() for k, v in trainer.unwrap("student").named_parameters()}
    summary = trainer.train()
    for key in ("loss/bootstrap", "loss/boundary", "grad_norm/student"):
        assert torch.isfinite(torch.tensor(summary["final_metrics"][key])), key
    unchanged = [k for k, v in trainer.unwrap("student").named_parameters() if torch.equal(v, before[k])]
    assert not unchanged, unchanged[:5]
    assert (tmp_path / "run" / "samples" / "step-000002.png").is_file()
    cond = Conditioning(class_labels=torch.tensor([3, 7]), null_class_label=10)
    traj = trainer.signal_trajectory(cond, [0, 1], [0.0, 500.0, 999.0])
    assert traj.shape == (3, 2, 1, 8, 8)
    # the exported folder samples as the trainer does: one call on pure noise at t = 999
    student = load_denoiser(tmp_path / "run" / "student")
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    from stepdistill.sampling import initial_noise, make_generators

    z = initial_noise((2, 1, 8, 8), make_generators([0, 1]))
    torch.testing.assert_close(student(z, 999, cond).x0, traj[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(trainer.sample_student_images(cond, [0, 1]), traj[0], rtol=0, atol=1e-5)


def test_flow_teacher_trains(tmp_path):
    """A tiny class-conditional rectified-flow teacher (a module from configs): boundary exact, loss finite."""
    torch.manual_seed(0)
    unet = teacher_unet(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    teacher = Denoiser.from_model(unet, FlowSchedule(prediction_type="flow"))
    cfg = _config("", tmp_path / "flow", sample_shape=[1, 8, 8], export=False, guidance_scale=1.5)
    trainer = BOOTTrainer(cfg, teacher=teacher)
    assert trainer.noise_end == 1000.0 and float(trainer.deltas.max()) == pytest.approx(1.0)
    x = torch.randn(2, 1, 8, 8)
    cond = Conditioning(class_labels=torch.tensor([1, 4]), null_class_label=10)
    end = torch.full((2,), 1000.0, dtype=torch.float64)
    with torch.no_grad():
        # at initialisation the student is the conditional teacher at the noise end (CFG comes in by training)
        torch.testing.assert_close(trainer.signal(trainer.unwrap("student"), x, end, cond),
                                   trainer.teacher(x, end, cond).x0, rtol=0, atol=1e-5)
    summary = trainer.train()
    assert torch.isfinite(torch.tensor(summary["final_metrics"]["loss/bootstrap"]))


def test_resume_equivalence(tiny_teacher, tmp_path):
    common = dict(use_ema=True, max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=1, export=False,
                  guidance_scale=2.0)
    straight = BOOTTrainer(_config(tiny_teacher, tmp_path / "a", **common))
    straight.train()
    assert [c.name for c in list_checkpoints(tmp_path / "a" / "checkpoints")] == ["checkpoint-000004"]
    BOOTTrainer(_config(tiny_teacher, tmp_path / "b", **dict(common, max_train_steps=2))).train()
    resumed = BOOTTrainer(_config(tiny_teacher, tmp_path / "b", resume_from_checkpoint="latest", **common))
    resumed.train()
    assert resumed.global_step == 4
    a = dict(straight.unwrap("student").named_parameters())
    for k, v in resumed.unwrap("student").named_parameters():
        torch.testing.assert_close(v, a[k], rtol=0, atol=1e-6, msg=k)
    for s, r in zip(straight.emas["student"].shadow_params, resumed.emas["student"].shadow_params):
        torch.testing.assert_close(s, r, rtol=0, atol=1e-6)


def test_accelerate_launch_two_processes_agree(tiny_teacher, tmp_path):
    out = tmp_path / "ddp"
    launch_two_processes(ROOT / "training_scripts" / "train_boot.py", [
        "--teacher", str(tiny_teacher), "--output_dir", str(out), "--data", "uniform_labels",
        "--max_train_steps", "2", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--lr_warmup_steps", "0", "--eval_num_samples", "0", "--checkpointing_steps", "2",
        "--student_learning_rate", "1e-3", "--bootstrap_steps", "8", "--use_ema", "true",
    ])
    sums = json.loads((out / "train_summary.json").read_text())["param_checksums"]
    assert len(sums) == 2 and sums[0] == pytest.approx(sums[1], rel=0, abs=1e-9), sums
    assert (out / "checkpoints" / "checkpoint-000002" / "trainer_rng_1.pt").is_file()
    assert (out / "student" / "unet" / "config.json").is_file()


def test_bad_recipes_get_one_line_errors(tiny_teacher, tmp_path, capsys):
    fast = ["--teacher", str(tiny_teacher), "--output_dir", str(tmp_path / "x"), "--max_train_steps", "1",
            "--train_batch_size", "2", "--eval_num_samples", "0"]
    _fails(["train", "boot", *fast, "--data", "digits"], capsys, "data-free", "data=uniform_labels")
    images = tmp_path / "imgs"
    images.mkdir()
    _fails(["train", "boot", *fast, "--data", "dataset", "--dataset", str(images)], capsys, "data-free")
    _fails(["train", "boot", *fast, "--data", "prompts", "--prompts", str(images)], capsys, "data-free", ".txt")
    # guidance on a teacher without an unconditional branch (no null class among its 11 embeddings)
    _fails(["train", "boot", *fast, "--guidance_scale", "2", "--null_class_label", "11"], capsys,
           "no unconditional branch", "guidance_scale 1")
    # settings that divide by ~0: too fine a grid
    _fails(["train", "boot", *fast, "--bootstrap_steps", "5000"], capsys, "use fewer steps")
    _fails(["train", "boot", *fast, "--lora_rank", "4"], capsys, "lora_rank=0")
    # an eps teacher whose x0 divides by alpha_T = 0 (zero terminal SNR): the same folder with another scheduler
    eps_teacher = tmp_path / "eps_teacher"
    shutil.copytree(tiny_teacher, eps_teacher)
    sched = eps_teacher / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps(dict(json.loads(sched.read_text()), prediction_type="epsilon",
                                     rescale_betas_zero_snr=True)))
    _fails(["train", "boot", *fast, "--teacher", str(eps_teacher), "--output_dir", str(tmp_path / "e")], capsys,
           "divides by alpha_T = 0", "noise_end")
    assert not (tmp_path / "x").exists() and not (tmp_path / "e").exists()
    # a flow grid whose delta is ~0
    flow = Denoiser.from_model(load_denoiser(tiny_teacher).model, FlowSchedule(prediction_type="flow"))
    with pytest.raises(ValueError, match="use fewer bootstrap_steps") as err:
        BOOTTrainer(_config("", tmp_path / "flow", sample_shape=[1, 8, 8], bootstrap_steps=200_000), teacher=flow)
    assert "\n" not in str(err.value)

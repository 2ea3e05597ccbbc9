"""Shared-base LoRA mode of the DMD trainer: one frozen teacher network, generator / fake-score adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepdistill import Conditioning
from stepdistill.adapters import parameter_memory_report
from stepdistill.loading import load_denoiser
from stepdistill.trainers.dmd import DMDConfig, DMDTrainer


def _config(teacher: Path, out: Path, **overrides) -> DMDConfig:
    base = dict(
        teacher=str(teacher), output_dir=str(out), max_train_steps=3, train_batch_size=4,
        generator_learning_rate=1e-2, critic_learning_rate=1e-2, lr_warmup_steps=0,
        critic_updates_per_generator_update=1, checkpointing_steps=0, log_every=1,
        eval_num_samples=0, sample_grid_size=4, seed=3, student_timesteps=[399], lora_rank=4,
    )
    base.update(overrides)
    return DMDConfig(**base)


def _inputs(n: int = 4):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, 1, 8, 8, generator=g)
    cond = Conditioning(class_labels=torch.arange(n) % 10, null_class_label=10)
    return x, torch.full((n,), 500.0, dtype=torch.float64), cond


def test_shared_lora_trains_only_adapters_and_exports_plain_student(tiny_teacher, tmp_path):
    trainer = DMDTrainer(_config(tiny_teacher, tmp_path / "run"))
    shared = trainer.generator.model
    assert trainer.teacher.model is shared and trainer.unwrap("critic").denoiser.model is shared
    gen_params = {id(p) for p in trainer.unwrap("generator").parameters()}
    fake_params = {id(p) for p in trainer.unwrap("critic").parameters()}
    assert gen_params and fake_params and not gen_params & fake_params
    before = {n: p.detach().clone() for n, p in shared.named_parameters()}
    original = load_denoiser(tiny_teacher).eval()
    x, t, cond = _inputs()
    with torch.no_grad():
        ref = original(x, t, cond).x0
        assert torch.allclose(trainer.generator(x, t, cond).x0, ref, atol=1e-6)  # B = 0 at init

    trainer.train()

    changed = {n for n, p in shared.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "no LoRA parameter moved"
    assert all("lora_" in n for n in changed), sorted(n for n in changed if "lora_" not in n)
    assert any(".generator." in n for n in changed) and any(".fake_score." in n for n in changed)
    assert not any(p.requires_grad for n, p in shared.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        teacher_out = trainer.teacher(x, t, cond).x0
        gen_out = trainer.generator(x, t, cond).x0
        fake_out = trainer.unwrap("critic").denoiser(x, t, cond).x0
    assert torch.equal(teacher_out, ref) or torch.allclose(teacher_out, ref, atol=1e-6, rtol=0)
    assert (gen_out - ref).abs().max() > 1e-4 and (fake_out - ref).abs().max() > 1e-4
    assert (gen_out - fake_out).abs().max() > 1e-4

    folder = trainer.export(tmp_path / "student")
    from diffusers import UNet2DModel

    student_net = UNet2DModel.from_pretrained(folder / "unet")
    assert not any("lora" in n for n, _ in student_net.named_parameters())
    with torch.no_grad():
        exported = load_denoiser(folder).eval()(x, t, cond).x0
    assert torch.allclose(exported, gen_out, atol=1e-5)


def test_full_vs_shared_parameter_memory(tiny_teacher, capsys):
    report = parameter_memory_report(load_denoiser(tiny_teacher).model, rank=4)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()})
    assert report["full_params"] == 3 * report["base_params"]
    assert report["shared_params"] == report["base_params"] + 2 * report["lora_params_per_adapter"]
    assert 0 < report["shared_mb"] < report["full_mb"]


def test_lora_config_errors(tiny_teacher, tmp_path):
    with pytest.raises(ValueError, match="use_gan is not supported with lora_rank"):
        _config(tiny_teacher, tmp_path, use_gan=True)
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        _config(tiny_teacher, tmp_path, lora_rank=-1)


def test_shared_lora_gradient_checkpointing_reaches_the_shared_network(tiny_teacher, tmp_path):
    trainer = DMDTrainer(_config(tiny_teacher, tmp_path / "run", lora_rank=4, gradient_checkpointing=True))
    shared = trainer.generator.model
    assert shared is trainer.unwrap("critic").denoiser.model  # one network for every role
    assert shared.is_gradient_checkpointing
    plain = DMDTrainer(_config(tiny_teacher, tmp_path / "run2", lora_rank=4))
    assert not plain.generator.model.is_gradient_checkpointing


def test_shared_lora_gradient_checkpointing_gives_the_same_training(tiny_teacher, tmp_path):
    """Checkpointed blocks are recomputed in backward; they must use the adapter of their forward."""
    results = []
    for gc in (False, True):
        trainer = DMDTrainer(_config(tiny_teacher, tmp_path / f"run{gc}", gradient_checkpointing=gc))
        for step in range(2):
            trainer.training_step(step)
        results.append([p.detach().clone() for name in ("generator", "critic")
                        for p in trainer.unwrap(name).parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_shared_base_exports_the_fp32_teacher_plus_the_adapter(tiny_teacher, tmp_path):
    """With mixed precision the shared base is bf16; the exported student must not inherit that rounding."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # this process's earlier trainers used "no"
    try:
        trainer = DMDTrainer(_config(tiny_teacher, tmp_path / "run", mixed_precision="bf16", max_train_steps=1))
        student = trainer.student_network()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert next(trainer.teacher.model.parameters()).dtype == torch.bfloat16
    teacher = load_denoiser(tiny_teacher).model
    untouched = [n for n, _ in teacher.named_parameters() if n.startswith("conv_in.")]  # no LoRA there
    assert untouched
    ref = dict(teacher.named_parameters())
    got = dict(student.named_parameters())
    for n in untouched:
        assert torch.equal(got[n], ref[n]), n  # fp32 teacher weights exactly, not bf16-rounded
    assert any(not torch.equal(ref[n].to(torch.bfloat16).float(), ref[n]) for n in untouched)  # rounding is real

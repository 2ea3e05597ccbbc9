"""The role-neutral trainer core: per-trainable optimizer settings and EMAs, reset / freeze across resume,
checkpoints that hold each model once (adapters only in LoRA mode), named adapters on one base under DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import launch_two_processes
from toy_trainer import ToyTrainer, toy_config, trained_tensors

from stepdistill.trainers.base import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("schedule", [
    dict(reset_at=2, freeze_at=3),
    dict(reset_at=5, freeze_at=6),
    dict(reset_at=2, freeze_at=3, lora_rank=2, lr_scheduler="linear", gradient_accumulation_steps=2),
    dict(reset_at=5, freeze_at=6, lora_rank=2, lr_scheduler="cosine"),
], ids=["before_checkpoint", "after_checkpoint", "lora_linear_before", "lora_cosine_after"])
def test_reset_and_freeze_survive_resume_bitwise(tiny_teacher, tmp_path, schedule):
    common = dict(reset_role="a", freeze_role="b", use_ema=True, intervals=[1, 2], **schedule)
    straight = ToyTrainer(toy_config(tiny_teacher, tmp_path / "straight", **common))
    straight.train()
    killed = ToyTrainer(toy_config(tiny_teacher, tmp_path / "resumed", checkpointing_steps=4, interrupt_at=5, **common))
    with pytest.raises(KeyboardInterrupt):  # killed after the checkpoint of iteration 4, one step into the rest
        killed.train()
    resumed = ToyTrainer(toy_config(tiny_teacher, tmp_path / "resumed", resume_from_checkpoint="latest", **common))
    resumed.train()
    assert resumed.global_step == 8
    a, b = trained_tensors(straight), trained_tensors(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    for t in (straight, resumed):
        assert t.trainables["b"].frozen and not t.trainables["a"].frozen
        assert t.trainables["a"].resets == [schedule["reset_at"]]
        assert not any(p.requires_grad for p in t.unwrap("b").parameters())
    ckpt = list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["trainables"]["a"]["resets"] == ([2] if schedule["reset_at"] < 4 else [])
    assert state["trainables"]["a"]["ema"]["optimization_step"] > 0  # EMA counters in the state, weights as files
    assert (ckpt / "a" / "ema" / "extra.safetensors").is_file() or (ckpt / "a" / "ema" / "model").is_dir()
    assert len(list(ckpt.glob("custom_checkpoint_*"))) == 2  # the two LR schedules; no pickled EMA
    for t in (straight, resumed):  # the reset schedule restarted over the steps left (linear / cosine reach 0)
        lr_a = t.trainables["a"].lr_scheduler.get_last_lr()[0]
        if schedule.get("lr_scheduler") in ("linear", "cosine"):
            assert lr_a < 1e-4


def test_reset_restores_weights_optimizer_schedule_and_ema_and_freeze_stops_updates(tiny_teacher, tmp_path):
    trainer = ToyTrainer(toy_config(tiny_teacher, tmp_path / "run", use_ema=True, lr_warmup_steps=4))
    initial = {k: v.clone() for k, v in trainer.unwrap("a").state_dict().items()}
    for step in range(3):
        trainer.training_step(step)
        for t in trainer.trainables.values():
            t.lr_scheduler.step()
    a = trainer.trainables["a"]
    assert any(not torch.equal(v, initial[k]) for k, v in trainer.unwrap("a").state_dict().items())
    assert a.optimizer.state and a.optimizer.param_groups[0]["lr"] > 0
    trainer.reset_trainable("a")
    assert all(torch.equal(v, initial[k]) for k, v in trainer.unwrap("a").state_dict().items())
    assert not a.optimizer.state
    assert a.optimizer.param_groups[0]["lr"] == 0.0  # warm-up starts again (step 0 of 4 -> lr 0)
    assert all(torch.equal(s, p) for s, p in zip(a.ema.shadow_params, trainer.unwrap("a").parameters()))
    b_before = [p.detach().clone() for p in trainer.unwrap("b").parameters()]
    trainer.freeze_trainable("b")
    assert not trainer.should_update("b", 4)
    with pytest.raises(RuntimeError, match="frozen"):
        trainer.optimizer_step("b")
    metrics = trainer.training_step(4)
    assert "loss/a" in metrics and "loss/b" not in metrics
    assert all(torch.equal(p, q) for p, q in zip(trainer.unwrap("b").parameters(), b_before))


def test_optimizer_settings_default_to_the_config():
    from stepdistill.trainers.base import OptimizerSettings

    with pytest.raises(ValueError, match="learning_rate"):
        OptimizerSettings(learning_rate=0.0)
    with pytest.raises(ValueError, match="update_interval"):
        OptimizerSettings(learning_rate=1.0, update_interval=0)


def test_per_trainable_settings_param_groups_intervals_and_emas(tiny_teacher, tmp_path):
    cfg = toy_config(tiny_teacher, tmp_path / "run", intervals=[1, 3], use_ema=True, adam_weight_decay=0.01,
                  group_prefix="model.conv_in.", group_learning_rate=0.1, group_weight_decay=0.5, lr_warmup_steps=0)
    trainer = ToyTrainer(cfg)
    groups = trainer.trainables["a"].optimizer.param_groups
    assert len(groups) == 2  # the conv_in group, then the rest
    conv_in = {id(p) for p in trainer.unwrap("a").model.conv_in.parameters()}
    assert {id(p) for p in groups[0]["params"]} == conv_in
    assert (groups[0]["lr"], groups[0]["weight_decay"]) == (0.1, 0.5)
    assert (groups[1]["lr"], groups[1]["weight_decay"]) == (1e-3, 0.01)
    assert len(trainer.trainables["b"].optimizer.param_groups) == 1
    b_group = trainer.trainables["b"].optimizer.param_groups[0]
    assert (b_group["betas"], b_group["eps"], b_group["weight_decay"]) == ((0.9, 0.999), 1e-8, 0.01)  # config defaults
    assert set(trainer.emas) == {"a", "b"}
    snapshots = []
    for step in range(4):
        trainer.training_step(step)
        snapshots.append([p.detach().clone() for p in trainer.unwrap("b").parameters()])
    changed = [any(not torch.equal(p, q) for p, q in zip(snapshots[i], snapshots[i - 1])) for i in (1, 2, 3)]
    assert changed == [False, False, True]  # role b steps on iterations 0 and 3 only
    for name in ("a", "b"):
        ema, params = trainer.emas[name].shadow_params, list(trainer.unwrap(name).parameters())
        assert any(not torch.equal(e, p) for e, p in zip(ema, params))  # averaged, not a copy


def test_lora_checkpoint_holds_adapters_once_and_no_merged_networks(tiny_teacher, tmp_path):
    trainer = ToyTrainer(toy_config(tiny_teacher, tmp_path / "lora", lora_rank=2, roles=["e0", "e1", "e2"],
                                 max_train_steps=1, checkpointing_steps=1))
    trainer.train()
    ckpt = list_checkpoints(tmp_path / "lora" / "checkpoints")[-1]
    from safetensors.torch import load_file

    for role in ("e0", "e1", "e2"):
        assert not (ckpt / role / "model").exists()  # no copy of the base network
        saved = load_file(str(ckpt / role / "extra.safetensors"))
        own = trainer.unwrap(role).state_dict()
        assert saved.keys() == own.keys() and all(torch.equal(saved[k], own[k]) for k in own)
    assert not list(ckpt.glob("model*.safetensors"))
    full = ToyTrainer(toy_config(tiny_teacher, tmp_path / "full", roles=["e0"], max_train_steps=1,
                                 checkpointing_steps=1))
    full.train()
    ckpt_full = list_checkpoints(tmp_path / "full" / "checkpoints")[-1]
    assert (ckpt_full / "e0" / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(ckpt_full.glob("model*.safetensors"))  # written once, by the hook


def test_three_adapters_gradient_checkpointing_matches_plain_training(tiny_teacher, tmp_path):
    results = []
    for gc in (False, True):
        trainer = ToyTrainer(toy_config(tiny_teacher, tmp_path / f"gc{gc}", lora_rank=2, roles=["e0", "e1", "e2"],
                                     gradient_checkpointing=gc))
        assert trainer.layout.adapters.network.is_gradient_checkpointing == gc
        for step in range(2):
            trainer.training_step(step)
        results.append({r: [p.detach().clone() for p in trainer.unwrap(r).parameters()] for r in ("e0", "e1", "e2")})
    for role in ("e0", "e1", "e2"):
        for a, b in zip(results[0][role], results[1][role]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_three_named_adapters_with_gradient_checkpointing_under_two_process_ddp(tiny_teacher, tmp_path):
    out = tmp_path / "ddp"
    launch_two_processes(ROOT / "tests" / "toy_trainer.py", [
        "--teacher", str(tiny_teacher), "--output_dir", str(out),
        "--max_train_steps", "3", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--lora_rank", "2", "--roles", "e0", "e1", "e2", "--gradient_checkpointing", "true", "--lr_warmup_steps", "0",
        "--checkpointing_steps", "3", "--eval_num_samples", "0", "--export", "false", "--freeze_role", "e2",
        "--freeze_at", "2",
    ], tests_on_path=True)
    summary = json.loads((out / "train_summary.json").read_text())
    sums = summary["param_checksums"]
    assert len(sums) == 2 and sums[0] == pytest.approx(sums[1], rel=0, abs=1e-9), sums
    info = json.loads((out / "toy_info.json").read_text())
    assert info["gradient_checkpointing"]
    assert all(v > 0 for v in info["adapter_b_norms"].values()), info  # every adapter trained (B starts at 0)
    state = json.loads((out / "checkpoints" / "checkpoint-000003" / "trainer_state.json").read_text())
    assert state["trainables"]["e2"]["frozen"] and not state["trainables"]["e0"]["frozen"]

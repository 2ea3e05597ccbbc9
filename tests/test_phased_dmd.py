"""Phased DMD trainer and PhasedExpertsPipeline on a tiny digits-shaped teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import launch_two_processes

from stepdistill import Conditioning
from stepdistill.commands.train import main as train_main
from stepdistill.configs import parse_config
from stepdistill.pipelines import PhasedExpertsPipeline
from stepdistill.sampling import StepPlan, make_generators, run_step_plan
from stepdistill.trainers.base import list_checkpoints
from stepdistill.trainers.dmd import DMDConfig
from stepdistill.trainers.phased_dmd import PhasedDMDConfig, PhasedDMDTrainer, split_phases

ROOT = Path(__file__).resolve().parents[1]

TIMESTEPS = [999.0, 666.0, 333.0]


def _config(teacher, out, **overrides) -> PhasedDMDConfig:
    base = dict(teacher=str(teacher), output_dir=str(out), max_train_steps=4, phase_steps=[2, 2], train_batch_size=4,
                generator_learning_rate=1e-3, critic_learning_rate=1e-3, lr_warmup_steps=0,
                critic_updates_per_generator_update=1, checkpointing_steps=0, log_every=1, eval_num_samples=0,
                sample_grid_size=4, seed=3, export=False, student_timesteps=TIMESTEPS, phase_boundaries=[666.0],
                lora_rank=0)
    base.update(overrides)
    return PhasedDMDConfig(**base)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "adapters"])
def test_phases_freeze_experts_and_reinitialise_the_fake_score(tiny_teacher, tmp_path, lora_rank):
    trainer = PhasedDMDTrainer(_config(tiny_teacher, tmp_path / "run", lora_rank=lora_rank, use_ema=True))
    critic0 = _state(trainer.unwrap("critic"))
    teacher0 = {k: v.detach().clone() for k, v in trainer.teacher.model.named_parameters()}
    seen = {}
    enter = trainer.enter_phase

    def spy(phase):
        seen["critic_before"] = _state(trainer.unwrap("critic"))
        seen["expert0_before"] = _state(trainer.unwrap("expert_0"))
        enter(phase)
        seen["critic_after"] = _state(trainer.unwrap("critic"))
        seen["expert0_frozen"] = _state(trainer.unwrap("expert_0"))

    trainer.enter_phase = spy
    summary = trainer.train()
    for key in ("loss/dm", "loss/fake_score", "grad_norm/generator", "grad_norm/critic"):
        assert torch.isfinite(torch.tensor(summary["final_metrics"][key])), key
    # the fake score trained in phase 0, then restarted from the teacher at phase 1
    assert any(not torch.equal(v, seen["critic_before"][k]) for k, v in critic0.items())
    assert all(torch.equal(v, critic0[k]) for k, v in seen["critic_after"].items())
    assert trainer.trainables["critic"].resets == [2]
    # expert 0 trained in phase 0 and is bitwise unchanged through phase 1; expert 1 trained in phase 1
    after = _state(trainer.unwrap("expert_0"))
    assert trainer.trainables["expert_0"].frozen
    assert all(torch.equal(v, seen["expert0_frozen"][k]) for k, v in after.items())
    for k, v in trainer.teacher.model.named_parameters():
        if "lora" not in k:
            assert torch.equal(v, teacher0[k]), k


def test_expert_changes_only_in_its_phase(tiny_teacher, tmp_path):
    trainer = PhasedDMDTrainer(_config(tiny_teacher, tmp_path / "run"))
    e0, e1 = _state(trainer.unwrap("expert_0")), _state(trainer.unwrap("expert_1"))
    snapshots = []
    step = trainer.training_step

    def spy(i):
        out = step(i)
        snapshots.append((_state(trainer.unwrap("expert_0")), _state(trainer.unwrap("expert_1"))))
        return out

    trainer.training_step = spy
    trainer.train()
    (a0, a1), (b0, b1) = snapshots[1], snapshots[3]  # end of phase 0, end of phase 1
    assert any(not torch.equal(v, e0[k]) for k, v in a0.items()), "expert_0 did not train in phase 0"
    assert all(torch.equal(v, e1[k]) for k, v in a1.items()), "expert_1 moved in phase 0"
    assert all(torch.equal(v, a0[k]) for k, v in b0.items()), "frozen expert_0 moved in phase 1"
    assert any(not torch.equal(v, a1[k]) for k, v in b1.items()), "expert_1 did not train in phase 1"


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("truncation", [False, True], ids=["full-phase", "truncated"])
def test_intermediate_phase_ends_at_its_boundary_never_at_x0(request, tmp_path, truncation, kind):
    teacher = request.getfixturevalue("tiny_teacher" if kind == "vp" else "tiny_flow_teacher")
    phases = [[999.0, 800.0], [600.0, 400.0], [200.0]]
    cfg = _config(teacher, tmp_path / "run", student_timesteps=[t for p in phases for t in p],
                  phase_boundaries=[600.0, 200.0], max_train_steps=3, phase_steps=[1, 1, 1], truncation=truncation)
    trainer = PhasedDMDTrainer(cfg)
    assert trainer.phases == phases
    cond = Conditioning(class_labels=torch.tensor([1, 2, 3, 4]), null_class_label=10)
    levels = []
    original = trainer.schedule.add_noise

    def spy(x0, noise, t):  # ddim_step moves with schedule.add_noise(x0, eps, t_next)
        levels.append(float(torch.as_tensor(t).reshape(-1)[0]))
        return original(x0, noise, t)

    trainer.schedule.add_noise = spy
    for phase in (0, 1):
        for _ in range(4):  # several truncation draws
            levels.clear()
            x_b, x0_ref, b = trainer.phase_samples(cond, phase, grad=False)
            assert b == phases[phase + 1][0]
            assert levels and levels[-1] == b  # the last move lands on the boundary ...
            assert not torch.allclose(x_b, x0_ref)  # ... which is a noisy state, not the x0 estimate
    x_b, x0_ref, b = trainer.phase_samples(cond, 2, grad=False)
    assert b is None and torch.equal(x_b, x0_ref)  # only the last phase produces x0
    trainer.schedule.add_noise = original
    # the rollout of phase 1 without truncation is the plan run to the boundary
    if not truncation:
        trainer.rng.manual_seed(7)
        x_b, _, _ = trainer.phase_samples(cond, 1, grad=False)
        trainer.rng.manual_seed(7)
        z = torch.randn(4, *trainer.sample_shape, generator=trainer.rng)
        ref = run_step_plan(trainer.plan, trainer.denoisers(), z, cond, trainer.rng, stop=200.0)
        torch.testing.assert_close(x_b, ref)


def test_resume_in_the_middle_of_phase_two_is_bitwise_equal(tiny_teacher, tmp_path):
    common = dict(max_train_steps=6, phase_steps=[2, 4], use_ema=True, checkpointing_steps=4,
                  critic_updates_per_generator_update=2)
    straight = PhasedDMDTrainer(_config(tiny_teacher, tmp_path / "a", **common))
    straight.train()
    first = PhasedDMDTrainer(_config(tiny_teacher, tmp_path / "b", **common))
    first.training_step_orig = first.training_step

    def stop_after_4(i):
        if i == 4:
            raise KeyboardInterrupt
        return first.training_step_orig(i)

    first.training_step = stop_after_4
    with pytest.raises(KeyboardInterrupt):
        first.train()
    ckpt = list_checkpoints(tmp_path / "b" / "checkpoints")[-1]
    assert json.loads((ckpt / "trainer_state.json").read_text())["phase"] == 1
    resumed = PhasedDMDTrainer(_config(tiny_teacher, tmp_path / "b", resume_from_checkpoint="latest", **common))
    resumed.train()
    assert resumed.phase == 1 and resumed.trainables["expert_0"].frozen
    for name in ("expert_0", "expert_1", "critic"):
        a = straight.unwrap(name).state_dict()
        for k, v in resumed.unwrap(name).state_dict().items():
            assert torch.equal(v, a[k]), f"{name}.{k}"
    for s, r in zip(straight.emas["expert_1"].shadow_params, resumed.emas["expert_1"].shadow_params):
        assert torch.equal(s, r)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(phase_boundaries=[500.0]), "Phase boundary 500 is not one of student_timesteps"),
        (dict(phase_boundaries=[999.0]), "leaves phase 1 with no step"),
        (dict(phase_boundaries=[666.0, 666.0], phase_steps=[1, 1, 2]), "a repeated one leaves a phase with no step"),
        (dict(phase_steps=[2, 3]), "sum to max_train_steps"),
        (dict(phase_steps=[4]), "one iteration count per phase"),
        (dict(renoise_intervals="nested"), "renoise_intervals must be one of"),
        (dict(use_gan=True), "data-free"),
    ],
)
def test_bad_recipes_fail_in_one_line(tiny_teacher, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        _config(tiny_teacher, tmp_path, **overrides)
    assert "\n" not in str(err.value)


def test_bad_recipe_through_the_command_is_one_line(tiny_teacher, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["phased-dmd", "--teacher", str(tiny_teacher), "--output_dir", str(tmp_path / "x"),
                    "--student_timesteps", "999", "749", "499", "249", "--phase_boundaries", "500"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not one of student_timesteps" in err[0]


def test_shipped_recipes_parse_into_two_phases_of_two_steps():
    recipes = sorted((ROOT / "recipes").glob("*phased*.yaml"))
    assert {r.stem for r in recipes} >= {"digits_phased_dmd_4step", "digits_flow_phased_dmd_4step"}
    for recipe in recipes:
        cfg = parse_config(PhasedDMDConfig, ["--config", str(recipe)])
        ts = cfg.student_timesteps
        assert cfg.phases == [ts[:2], ts[2:]] and sum(cfg.phase_steps) == cfg.max_train_steps, recipe.name


@pytest.mark.parametrize("method", ["phased_dmd", "dmd2"])
def test_flow_recipes_match_their_vp_twins_but_for_teacher_and_timesteps(method):
    """Same batch, learning rates, TTUR, EMA, iterations and phase split: the flow rows spend the VP rows' compute."""
    cls = PhasedDMDConfig if method == "phased_dmd" else DMDConfig
    vp = parse_config(cls, ["--config", str(ROOT / "recipes" / f"digits_{method}_4step.yaml")])
    flow = parse_config(cls, ["--config", str(ROOT / "recipes" / f"digits_flow_{method}_4step.yaml")])
    differ = {"teacher", "output_dir", "student_timesteps", "phase_boundaries"}
    assert flow.teacher == "digits-flow" and flow.student_timesteps == [1000.0, 750.0, 500.0, 250.0]
    for name, value in vars(vp).items():
        if name not in differ:
            assert getattr(flow, name) == value, name
    assert len(flow.student_timesteps) == len(vp.student_timesteps)
    if method == "phased_dmd":
        assert [len(p) for p in flow.phases] == [len(p) for p in vp.phases] and flow.phase_boundaries == [500.0]


def test_split_phases():
    assert split_phases([999, 749, 499, 249], [499]) == [[999.0, 749.0], [499.0, 249.0]]
    assert split_phases([999, 749, 499, 249], []) == [[999.0, 749.0, 499.0, 249.0]]


# ------------------------------------------------------------------------------------------------------------------
# the pipeline
@pytest.fixture(scope="module")
def exported(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("phased") / "run"
    trainer = PhasedDMDTrainer(_config(tiny_teacher, out, export=True, lora_rank=4))
    trainer.train()
    return trainer, out / "student"


def test_pipeline_round_trip_matches_the_trainer(exported):
    trainer, folder = exported
    pipe = PhasedExpertsPipeline.from_pretrained(folder)
    assert pipe.manifest()["num_experts"] == 2 and pipe.config.phases == [[999.0], [666.0, 333.0]]
    labels = torch.tensor([1, 2, 3])
    cond = Conditioning(class_labels=labels, null_class_label=10)
    ref = trainer.sample_student_images(cond, [0, 1, 2])
    got = pipe(class_labels=labels, generator=make_generators([0, 1, 2]), output_type="latent").images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    pipe.save_pretrained(folder.parent / "again")
    again = PhasedExpertsPipeline.from_pretrained(folder.parent / "again")
    got2 = again(class_labels=labels, generator=make_generators([0, 1, 2]), output_type="latent").images
    assert torch.equal(got, got2)


def test_pipeline_routes_each_step_to_its_phase_expert(exported):
    _, folder = exported
    pipe = PhasedExpertsPipeline.from_pretrained(folder)
    calls = []
    for name in ("unet", "expert_1"):
        getattr(pipe, name).register_forward_pre_hook(
            lambda m, args, kwargs, name=name: calls.append((name, float(torch.as_tensor(args[1]).reshape(-1)[0])))
            if len(args) > 1 else calls.append((name, float(torch.as_tensor(kwargs["timestep"]).reshape(-1)[0]))),
            with_kwargs=True)
    pipe(class_labels=[4], generator=make_generators([0]), output_type="latent")
    assert calls == [("unet", 999.0), ("expert_1", 666.0), ("expert_1", 333.0)]
    assert isinstance(pipe.plan, StepPlan) and pipe.plan.networks == ["unet", "expert_1", "expert_1"]


def test_pipeline_folder_that_disagrees_with_its_manifest_is_refused(exported, tmp_path):
    import shutil

    _, folder = exported
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    manifest = json.loads((bad / "phased_experts.json").read_text())
    manifest["boundaries"] = [333.0]
    (bad / "phased_experts.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="boundaries .* disagrees with its manifest"):
        PhasedExpertsPipeline.from_pretrained(bad)
    manifest = json.loads((folder / "phased_experts.json").read_text())
    manifest["num_experts"] = 3
    (bad / "phased_experts.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="num_experts .* disagrees with its manifest"):
        PhasedExpertsPipeline.from_pretrained(bad)
    (bad / "phased_experts.json").unlink()
    with pytest.raises(ValueError, match="no phased_experts.json"):
        PhasedExpertsPipeline.from_pretrained(bad)


def test_flow_teacher_phases_train_and_export_a_flow_pipeline(tiny_flow_teacher, tmp_path):
    """Rectified flow end to end: t = 1000 (alpha = 0) start, Eq. 11 target, the exported experts' Euler steps."""
    out = tmp_path / "flow"
    trainer = PhasedDMDTrainer(_config(tiny_flow_teacher, out, export=True, student_timesteps=[1000.0, 500.0, 250.0],
                                       phase_boundaries=[500.0]))
    assert trainer.schedule.family == "flow"
    e0, e1 = _state(trainer.unwrap("expert_0")), _state(trainer.unwrap("expert_1"))
    metrics = trainer.train()["final_metrics"]
    for key in ("loss/dm", "loss/fake_score"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    for name, before in (("expert_0", e0), ("expert_1", e1)):
        assert any(not torch.equal(v, before[k]) for k, v in _state(trainer.unwrap(name)).items()), name
    pipe = PhasedExpertsPipeline.from_pretrained(out / "student")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.config.phases == [[1000.0], [500.0, 250.0]]
    labels = torch.tensor([1, 2, 3])
    ref = trainer.sample_student_images(Conditioning(class_labels=labels, null_class_label=10), [0, 1, 2])
    got = pipe(class_labels=labels, generator=make_generators([0, 1, 2]), output_type="latent").images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_accelerate_launch_two_processes_agree(tiny_flow_teacher, tmp_path):
    out = tmp_path / "ddp"
    launch_two_processes(ROOT / "training_scripts" / "train_phased_dmd.py", [
        "--teacher", str(tiny_flow_teacher), "--output_dir", str(out), "--max_train_steps", "2",
        "--phase_steps", "1", "1", "--student_timesteps", "1000", "500", "--phase_boundaries", "500",
        "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--lora_rank", "4",
        "--critic_updates_per_generator_update", "1", "--lr_warmup_steps", "0", "--eval_num_samples", "0",
        "--checkpointing_steps", "2", "--generator_learning_rate", "1e-3", "--critic_learning_rate", "1e-3",
    ])
    sums = json.loads((out / "train_summary.json").read_text())["param_checksums"]
    assert len(sums) == 2 and sums[0] == pytest.approx(sums[1], rel=0, abs=1e-9), sums
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    assert (ckpt / "trainer_rng_1.pt").is_file() and json.loads((ckpt / "trainer_state.json").read_text())["phase"] == 1
    assert json.loads((out / "student" / "phased_experts.json").read_text())["num_experts"] == 2

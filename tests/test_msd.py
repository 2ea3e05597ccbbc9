"""Multi-student distillation: the partition, per-student data filtering, TSM, the routed pipeline, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import fails_in_one_line, launch_two_processes

from stepdistill import Conditioning
from stepdistill.data.partition import ConditionPartition, PartitionError, network_fingerprint
from stepdistill.pipelines import RoutedStudentsPipeline, StepDistillPipeline
from stepdistill.sampling import make_generators
from stepdistill.trainers.msd import MSDConfig, MSDStudentTrainer, MSDTrainer, TSMTrainer, smaller_network

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _config(teacher: Path, out: Path, **overrides) -> MSDConfig:
    base = dict(
        teacher=str(teacher), output_dir=str(out), num_students=2, max_train_steps=4, train_batch_size=4,
        generator_learning_rate=1e-3, critic_learning_rate=1e-3, lr_warmup_steps=0, student_timesteps=[399],
        critic_updates_per_generator_update=1, checkpointing_steps=0, log_every=1, eval_num_samples=0,
        sample_grid_size=2, seed=3, num_threads=1,
    )
    base.update(overrides)
    return MSDConfig(**base)


def _labels(cond: Conditioning) -> set[int]:
    return set(cond.class_labels.tolist())


# --------------------------------------------------------------------------------------------------
# the partition
def test_class_partitions_cover_every_class_and_route_deterministically(tmp_path):
    part = ConditionPartition.class_ranges(10, 4, null_class_label=10)
    assert part.assignment.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]  # consecutive ranges, sizes 3/2/3/2
    assert sum(part.balance) == pytest.approx(1.0) and min(part.balance) > 0
    labels = Conditioning(class_labels=torch.tensor([9, 0, 4, 4, 7]), null_class_label=10)
    assert part.route(labels).tolist() == [3, 0, 1, 1, 2]
    assert part.predicate(1)(labels).tolist() == [False, False, True, True, False]
    emb = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    a = ConditionPartition.class_kmeans(emb, 3, 10, seed=1)
    b = ConditionPartition.class_kmeans(emb, 3, 10, seed=1)
    assert torch.equal(a.assignment, b.assignment) and set(a.assignment.tolist()) == {0, 1, 2}
    a.save(tmp_path / "p")
    loaded = ConditionPartition.load(tmp_path / "p")
    assert torch.equal(loaded.assignment, a.assignment) and loaded.kind == "class_kmeans"
    assert json.loads((tmp_path / "p" / "partition.json").read_text())["balance"] == pytest.approx(a.balance)


def test_text_partitions_route_identically_after_a_save_load_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(40, 5, 8, generator=g)  # 40 prompts' [L, D] token embeddings
    cond = Conditioning(prompt_embeds=embeds)
    pooled = embeds.mean(dim=1)
    for part in (ConditionPartition.text_quadrants(pooled), ConditionPartition.text_kmeans(pooled, 3, seed=2)):
        routes = part.route(cond)
        assert set(routes.tolist()) == set(range(part.num_parts))
        part.save(tmp_path / part.kind)
        again = ConditionPartition.load(tmp_path / part.kind)
        assert torch.equal(again.route(cond), routes)
        assert torch.equal(again.route(cond.select(torch.arange(39, -1, -1))), routes.flip(0))  # order-free
    quadrants = ConditionPartition.text_quadrants(pooled)
    assert quadrants.balance == pytest.approx([0.25] * 4, abs=0.1)  # median thresholds: close to even
    with pytest.raises(PartitionError, match="another text encoder"):
        quadrants.route(Conditioning(prompt_embeds=torch.randn(2, 5, 7)))


def test_bad_partitions_give_one_line_errors_naming_the_fix(tmp_path):
    with pytest.raises(PartitionError, match=r"Classes \[3\] are assigned to no part.*rebuild"):
        ConditionPartition("class_ranges", 2, assignment=torch.tensor([0, 0, 1, -1]))
    with pytest.raises(PartitionError, match=r"Parts \[1\].*hold no class.*fewer students"):
        ConditionPartition("class_kmeans", 3, assignment=torch.tensor([0, 0, 2, 2]))
    with pytest.raises(PartitionError, match="would leave a part empty"):
        ConditionPartition.class_ranges(3, 4)
    with pytest.raises(PartitionError, match="no part in this partition"):
        ConditionPartition.class_ranges(4, 2).route(Conditioning(class_labels=torch.tensor([5])))
    mine = ConditionPartition.class_ranges(4, 2, identity={"teacher": {"class": "UNet2DModel", "weights": "aa"}})
    mine.save(tmp_path / "p")
    with pytest.raises(PartitionError, match=r"another teacher \(differs in \['weights'\]\)"):
        ConditionPartition.load(tmp_path / "p", {"teacher": {"class": "UNet2DModel", "weights": "bb"}})
    pooled = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    text = ConditionPartition.text_quadrants(pooled, {"encoder": {"class": "CLIPTextModel", "weights": "aa"}})
    text.save(tmp_path / "t")
    with pytest.raises(PartitionError, match="another text encoder"):
        ConditionPartition.load(tmp_path / "t", {"encoder": {"class": "CLIPTextModel", "weights": "cc"}})
    meta = json.loads((tmp_path / "p" / "partition.json").read_text())
    meta["num_parts"] = 3
    (tmp_path / "p" / "partition.json").write_text(json.dumps(meta))
    with pytest.raises(PartitionError, match="disagree"):
        ConditionPartition.load(tmp_path / "p")
    for err in ("assigned to no part", "disagree"):
        assert "\n" not in err


# --------------------------------------------------------------------------------------------------
# the trainer
def test_each_fake_score_sees_only_its_part_and_regression_pairs_are_shared(tiny_teacher, tmp_path):
    cfg = _config(tiny_teacher, tmp_path / "run", use_gan=True, regression_loss_weight=0.25, num_regression_pairs=16,
                  regression_teacher_steps=2, regression_pairs_verify=0)
    msd = MSDTrainer(cfg)
    seen: dict[int, set[int]] = {}
    for k in range(2):
        student = MSDStudentTrainer(cfg.student_config(k), msd.partition)
        part_classes = set(msd.partition.classes_of(k))
        assert _labels(student.data.grid_conditioning(20)) == part_classes
        assert set(student.data.labels.tolist()) == part_classes  # real images (GAN) of the part only
        assert set(student.full_data.labels.tolist()) == set(range(10))
        # regression pairs come from the whole data: classes of the other part too (the paper's ablation)
        assert _labels(student.regression_pairs["cond"]) - part_classes
        seen[k] = set()

        def hook(module, args, kwargs, k=k):
            seen[k].update(kwargs["class_labels"].tolist())

        fake = student.unwrap("critic").denoiser.model
        handle = fake.register_forward_pre_hook(hook, with_kwargs=True)
        gen0 = {n: p.detach().clone() for n, p in student.unwrap("generator").named_parameters()}
        student.train()
        handle.remove()
        assert seen[k] and seen[k] <= part_classes, (k, seen[k], part_classes)
        changed = [n for n, p in student.unwrap("generator").named_parameters() if not torch.equal(p, gen0[n])]
        assert changed


def test_students_in_separate_runs_assemble_a_routed_pipeline_that_routes_like_training(tiny_teacher, tmp_path):
    out = tmp_path / "run"
    cfg = _config(tiny_teacher, out, student_index=0)
    summary = MSDTrainer(cfg).train()
    assert "student" not in summary and not (out / "student").exists()  # student 1 not trained yet
    summary = MSDTrainer(_config(tiny_teacher, out, student_index=1)).train()
    assert summary["student"] == str(out / "student")
    train_partition = ConditionPartition.load(out / "partition")
    pipe = RoutedStudentsPipeline.from_pretrained(out / "student")
    pipe.set_progress_bar_config(disable=True)
    all_labels = Conditioning(class_labels=torch.arange(10), null_class_label=10)
    assert torch.equal(pipe.partition.route(all_labels), train_partition.route(all_labels))
    # each image equals its own student's (StepDistillPipeline of students/student_k) output for the same seed
    labels = [0, 9, 4, 5, 2, 7]
    routed = pipe(class_labels=labels, generator=make_generators(range(6)), output_type="pt")
    assert routed.routes.tolist() == train_partition.route(
        Conditioning(class_labels=torch.tensor(labels))).tolist()
    for k in range(2):
        single = StepDistillPipeline.from_pretrained(out / "students" / f"student_{k}" / "student")
        single.set_progress_bar_config(disable=True)
        idx = [i for i, r in enumerate(routed.routes.tolist()) if r == k]
        ref = single(class_labels=[labels[i] for i in idx], generator=make_generators(idx), output_type="pt").images
        assert torch.allclose(routed.images[idx], ref, atol=1e-6)
    # batch order and batch size do not change image k (per-image generators; batched convolutions may differ in
    # the last float32 bits)
    perm = [3, 1, 5, 0, 2, 4]
    shuffled = pipe(class_labels=[labels[i] for i in perm], generator=make_generators(perm), output_type="pt")
    assert torch.allclose(shuffled.images, routed.images[perm], atol=1e-6)
    alone = pipe(class_labels=[labels[4]], generator=make_generators([4]), output_type="pt")
    assert torch.allclose(alone.images[0], routed.images[4], atol=1e-6)
    # bad inputs: a partition for another teacher, a student folder missing, a partition of another size
    bad = tmp_path / "bad"
    shutil.copytree(out / "student", bad)
    other = ConditionPartition.class_ranges(10, 2, 10, {"teacher": {**network_fingerprint(pipe.unet_0),
                                                                    "weights": "0" * 16}})
    other.save(bad)
    with pytest.raises(PartitionError, match="made for another teacher"):
        RoutedStudentsPipeline.from_pretrained(bad)
    ConditionPartition.class_ranges(10, 3, 10, train_partition.identity).save(bad)
    with pytest.raises(PartitionError, match="has 3 parts but the pipeline holds 2 students"):
        RoutedStudentsPipeline.from_pretrained(bad)
    shutil.rmtree(bad / "unet_1")
    with pytest.raises(FileNotFoundError, match=r"Student folder\(s\) \['unet_1'\] missing"):
        RoutedStudentsPipeline.from_pretrained(bad)


def test_smaller_students_start_from_teacher_score_matching(tiny_teacher, tmp_path):
    cfg = _config(tiny_teacher, tmp_path / "run", student_block_out_channels=[4, 8], student_norm_num_groups=2,
                  tsm_steps=4, use_ema=True)
    msd = MSDTrainer(cfg)
    scfg = cfg.student_config(0)
    assert scfg.max_train_steps == 2 and scfg.tsm_steps == 2 and scfg.ema_decay == pytest.approx(0.98)
    small = smaller_network(msd.teacher.model, scfg)
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in msd.teacher.model.parameters())
    before = {k: v.clone() for k, v in small.state_dict().items()}
    tsm = TSMTrainer(scfg, small, msd.partition.predicate(0))
    summary = tsm.train()
    assert torch.isfinite(torch.tensor(summary["final_metrics"]["loss/tsm"]))
    tsm_net = tsm.standalone_network("student")
    assert any(not torch.equal(v, before[k]) for k, v in tsm_net.state_dict().items())
    assert not any(p.requires_grad for p in tsm.teacher.model.parameters())  # the teacher stays frozen
    student = MSDStudentTrainer(scfg, msd.partition, tsm_net)
    gen = student.unwrap("generator").model
    assert list(gen.config.block_out_channels) == [4, 8]
    assert all(torch.equal(v, tsm_net.state_dict()[k]) for k, v in gen.state_dict().items())  # DMD starts at TSM
    critic = student.unwrap("critic").denoiser.model  # the fake score stays teacher-sized
    assert list(critic.config.block_out_channels) == list(msd.teacher.model.config.block_out_channels)


def test_msd_command_bad_inputs_are_one_line(tiny_teacher, tmp_path, capsys):
    fast = ["--teacher", str(tiny_teacher), "--max_train_steps", "8", "--train_batch_size", "2", "--num_threads", "1",
            "--eval_num_samples", "0", "--lr_warmup_steps", "0"]

    def fails(argv, *needles):
        fails_in_one_line(["train", "msd", *fast, *argv], capsys, *needles)

    fails(["--output_dir", str(tmp_path / "a"), "--num_students", "11"], "num_students must be in 1..8")
    fails(["--output_dir", str(tmp_path / "b"), "--num_students", "2", "--student_index", "2"],
          "student_index must be in 0..1")
    other = tmp_path / "other_partition"
    ConditionPartition.class_ranges(10, 2, 10, {"teacher": {"class": "UNet2DModel", "weights": "x"}}).save(other)
    fails(["--output_dir", str(tmp_path / "c"), "--partition_dir", str(other)], "made for another teacher")
    fails(["--output_dir", str(tmp_path / "d"), "--tsm_steps", "4"], "tsm_steps is for smaller students")
    fails(["--output_dir", str(tmp_path / "e"), "--assemble_only", "true"], "are not trained yet", "--student_index")


def test_accelerate_launch_trains_every_student_with_ddp(tiny_teacher, tmp_path):
    out = tmp_path / "ddp"
    launch_two_processes(ROOT / "training_scripts" / "train_msd.py", [
        "--teacher", str(tiny_teacher), "--output_dir", str(out), "--num_students", "2", "--max_train_steps", "4",
        "--train_batch_size", "2", "--critic_updates_per_generator_update", "1", "--lr_warmup_steps", "0",
        "--eval_num_samples", "0", "--checkpointing_steps", "0", "--student_timesteps", "399", "--num_threads", "1",
    ])
    for k in range(2):
        sums = json.loads((out / "students" / f"student_{k}" / "train_summary.json").read_text())["param_checksums"]
        assert len(sums) == 2 and sums[0] == pytest.approx(sums[1], rel=0, abs=1e-9)  # the ranks agree
    assert RoutedStudentsPipeline.from_pretrained(out / "student").num_students == 2


def test_bench_msd_smoke(tiny_teacher, tmp_path, capsys, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "eval"))  # as when run as a script: bench_msd imports bench_digits
    MSDTrainer(_config(tiny_teacher, tmp_path / "run", max_train_steps=2)).train()
    spec = importlib.util.spec_from_file_location("bench_msd", ROOT / "eval" / "bench_msd.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    student = str(tmp_path / "run" / "student")
    payload = bench.main(["--num_samples", "70", "--seeds", "2", "--model", f"a={student}", "--model",
                          f"b={student}", "--pair", "a:b", "--latency", "a:b", "--out", str(tmp_path / "b.json")])
    assert [r["name"] for r in payload["rows"]] == ["real (train split)", "a", "b"]
    assert payload["pairs"][0]["differences"] == [0.0, 0.0]  # the same model, the same seeds and labels
    assert payload["pairs"][0]["verdict"] == "not resolved"
    assert payload["latency"][0]["param_ratio"] == 1.0 and payload["latency"][0]["ms_a"] > 0
    assert "| a vs b |" in payload["markdown"] and json.loads((tmp_path / "b.json").read_text())["rows"]

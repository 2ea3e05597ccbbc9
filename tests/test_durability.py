"""Durable atomic writes: files and folders are fsynced before the rename, a replacement never leaves neither the
old nor the new folder, model cards name the final folder, and a run SIGKILLed while a checkpoint is being written
resumes (``--resume_from_checkpoint latest``) to weights bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from toy_trainer import ToyConfig, ToyTrainer, toy_config, trained_tensors

from stepdistill import utils
from stepdistill.trainers.checkpointing import TRAINER_STATE, list_checkpoints, recover_checkpoints

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))


def _fsync_log(monkeypatch) -> list[tuple[str, str]]:
    """Record ``("fsync", path)`` and ``("replace", src)`` events in order."""
    log: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        log.append(("replace", str(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(utils.os, "fsync", fsync)
    monkeypatch.setattr(utils.os, "replace", replace)
    return log


def test_atomic_writes_fsync_everything_before_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "out"
    utils.atomic_write_dir(target, lambda tmp: (tmp / "old.txt").write_text("old"))
    log = _fsync_log(monkeypatch)

    def write(tmp: Path) -> None:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a")
        (tmp / "b.txt").write_text("new")

    utils.atomic_write_dir(target, write)
    assert sorted(p.name for p in target.rglob("*")) == ["a.bin", "b.txt", "sub"]
    publish = next(i for i, (kind, src) in enumerate(log) if kind == "replace" and ".tmp-" in src)
    synced = {Path(p).name for kind, p in log[:publish] if kind == "fsync"}
    assert {"a.bin", "b.txt", "sub"} <= synced and any(".out.tmp-" in p for _, p in log[:publish])
    assert ("fsync", str(tmp_path)) in log[publish:]  # the rename itself is made durable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no aside copy, no temporary folder left
    # a failing writer leaves the previous folder whole and nothing else
    with pytest.raises(RuntimeError):
        utils.atomic_write_dir(target, lambda tmp: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert (target / "b.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    log.clear()
    utils.atomic_write_file(tmp_path / "f.json", lambda tmp: tmp.write_text("{}"))
    assert [kind for kind, _ in log] == ["fsync", "replace", "fsync"]


def test_replacement_killed_between_the_renames_keeps_the_old_checkpoint(tmp_path):
    ckpts = tmp_path / "checkpoints"
    old = ckpts / "checkpoint-000004"
    old.mkdir(parents=True)
    (old / TRAINER_STATE).write_text('{"global_step": 4}')
    (old / "weights.bin").write_text("old")
    new = ckpts / ".tmp-checkpoint-000004"
    new.mkdir()
    (new / "weights.bin").write_text("new")
    marker = tmp_path / "between"
    (new / TRAINER_STATE).write_text('{"global_step": 4}')  # what commit_checkpoint writes before replace_dir
    script = textwrap.dedent(f"""
        import importlib.util, os, time
        from pathlib import Path
        spec = importlib.util.spec_from_file_location("utils", {str(Path(utils.__file__))!r})  # no package import
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if str(dst).endswith(".old"):  # the old checkpoint is aside, the new one not yet renamed in
                Path({str(marker)!r}).write_text("x")
                time.sleep(600)
        os.replace = replace
        module.replace_dir(Path({str(new)!r}), Path({str(old)!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, start_new_session=True)
    try:
        _wait_for(marker, proc, 120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not old.exists() and (ckpts / ".checkpoint-000004.old").is_dir()  # the window: neither under its name
    (ckpts / ".del-checkpoint-000002").mkdir()  # an interrupted prune
    recover_checkpoints(ckpts)
    assert list_checkpoints(ckpts) == [old] and (old / "weights.bin").read_text() == "old"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-000004"]


def test_model_card_names_the_final_folder(tiny_teacher, tmp_path):
    from stepdistill.loading import load_denoiser
    from stepdistill.trainers.outputs import export_student_folder

    teacher = load_denoiser(tiny_teacher)
    folder = tmp_path / "run" / "student"
    for _ in range(2):  # a fresh folder, then a replacement
        export_student_folder(teacher.model, folder, [999], {"run": 1}, str(tiny_teacher), teacher.schedule, 10)
        card = (folder / "README.md").read_text()
        assert f'from_pretrained("{folder}"' in card and ".tmp" not in card
    assert sorted(p.name for p in folder.parent.iterdir()) == ["student"]


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float) -> None:
    start = time.time()
    while not marker.exists():
        assert proc.poll() is None, f"the process ended (status {proc.returncode}) before reaching the kill point"
        assert time.time() - start < timeout, "the kill point was not reached in time"
        time.sleep(0.2)


def _config(teacher: Path, out: Path, **overrides) -> ToyConfig:
    return toy_config(teacher, out, **{**dict(max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=2,
                                              use_ema=True, intervals=[1, 2], num_threads=1), **overrides})


def test_sigkill_while_writing_a_checkpoint_then_resume_latest_is_bitwise(tiny_teacher, tmp_path):
    straight = ToyTrainer(_config(tiny_teacher, tmp_path / "straight"))
    straight.train()
    out = tmp_path / "killed"
    flags = [f"--{k}={v}" for k, v in dict(teacher=tiny_teacher, output_dir=out, max_train_steps=4,
                                           train_batch_size=4, lr_warmup_steps=2, checkpointing_steps=2,
                                           log_every=1, eval_num_samples=0, sample_grid_size=4, seed=5,
                                           export="false", use_ema="true", num_threads=1,
                                           stall_in_checkpoint_at=4).items()]  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "tests" / "toy_trainer.py"), *flags,
           "--intervals", "1", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        _wait_for(out / "stalled", proc, 240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole launch (launcher and trainer), as the OOM killer would
        proc.wait()
    ckpts = out / "checkpoints"
    half = ckpts / ".tmp-checkpoint-000004"
    assert (half / "a").is_dir() and not (half / TRAINER_STATE).exists()  # killed mid-write: models in, state not
    assert list_checkpoints(ckpts) == [ckpts / "checkpoint-000002"]
    resumed = ToyTrainer(_config(tiny_teacher, out, resume_from_checkpoint="latest"))
    resumed.train()
    assert resumed.global_step == 4 and not half.exists()
    assert json.loads((ckpts / "checkpoint-000004" / TRAINER_STATE).read_text())["global_step"] == 4
    a, b = trained_tensors(straight), trained_tensors(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]

"""The ``stepdistill`` command tree (stepdistill.commands), the thin training scripts, and the installed wheel."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from stepdistill.commands import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FAST = ["--max_train_steps", "2", "--train_batch_size", "4", "--eval_num_samples", "0",
              "--checkpointing_steps", "0", "--lr_warmup_steps", "0", "--sample_grid_size", "2",
              "--critic_updates_per_generator_update", "1", "--num_threads", "1"]  # fmt: skip


def _fails(argv: list[str], capsys, status: int = 1) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == status
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_top_level_help_lists_every_command(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS) and "train-teacher" in out
    assert _fails(["bogus"], capsys, status=2).startswith("stepdistill: error: argument COMMAND: invalid choice")
    assert "invalid choice: 'gan'" in _fails(["train", "gan"], capsys, status=2)
    with pytest.raises(SystemExit) as exc:  # python -m stepdistill
        monkeypatch.setattr(sys, "argv", ["stepdistill", "sample", "--help"])
        runpy.run_module("stepdistill", run_name="__main__")
    assert exc.value.code == 0 and "train-style-lora" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["train", "dmd", "--help"], ["eval", "--help"], ["sample", "--help"],
                                  ["sample", "train-style-lora", "--help"], ["pairs", "--help"],
                                  ["train-teacher", "--help"]])  # fmt: skip
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: stepdistill {' '.join(a for a in argv if a != '--help')}")


def test_train_dmd_trains_and_exports(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "dmd", "--teacher", str(tiny_teacher), "--output_dir", str(out), *TRAIN_FAST]) == 0
    assert '"global_step": 2' in capsys.readouterr().out  # the printed summary
    assert (out / "student" / "model_index.json").is_file() and (out / "train_summary.json").is_file()
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 2


def test_train_user_errors_are_one_line(tiny_teacher, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: t\nstudent_timestep: [999]\n")
    err = _fails(["train", "dmd", "--config", str(recipe)], capsys)
    assert err.startswith("stepdistill train dmd: error: Recipe") and "valid keys" in err
    err = _fails(["train", "dmd", "--teacher", str(tiny_teacher), "--student_timesteps", "499,999"], capsys)
    assert err.startswith("stepdistill train dmd: error: student_timesteps must be strictly decreasing")
    err = _fails(["train", "dmd", "--teacher", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "x")],
                 capsys)  # fmt: skip
    assert err.startswith("stepdistill train dmd: error: Model folder") and "does not exist" in err


def test_pairs_and_train_teacher_user_errors(capsys):
    assert _fails(["pairs", "--teacher", "t"], capsys) == "stepdistill pairs: error: give --output PATH (or set " \
                                                          "regression_pairs in the recipe)."
    err = _fails(["train-teacher", "--only", "unet"], capsys)
    assert err.startswith("stepdistill train-teacher: error: only must be one of "
                          "['classifier', 'teacher', 'text_teacher']")


def test_train_teacher_flags_route_by_prefix():
    """The old parser built flags with ``type(f.default)``: ``--only`` none, ``1e3`` for an int were refused."""
    from stepdistill.commands.teacher import parse_args

    run, clf, teacher, text = parse_args(["--only", "none", "--report_to", "null", "--classifier_seed", "2",
                                          "--teacher_seed", "5", "--teacher_max_train_steps", "1e3",
                                          "--teacher_learning_rate", "5e-4", "--text_teacher_seed", "7"])  # fmt: skip
    assert run.only is None and run.report_to is None and run.output_dir == "runs/digits_world"
    assert clf.seed == 2 and teacher.seed == 5 and teacher.max_train_steps == 1000 and teacher.learning_rate == 5e-4
    assert text.seed == 7 and text.max_train_steps == 5000


def test_train_teacher_script_writes_both_networks(tmp_path, monkeypatch):
    out = tmp_path / "world"
    monkeypatch.setattr(sys, "argv", [
        "train_teacher.py", "--output_dir", str(out), "--classifier_epochs", "1", "--classifier_batch_size", "256",
        "--teacher_max_train_steps", "2", "--teacher_batch_size", "4", "--teacher_lr_warmup_steps", "1",
    ])  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "training_scripts" / "train_teacher.py"), run_name="__main__")
    assert exc.value.code == 0
    assert (out / "classifier" / "config.json").is_file() and (out / "teacher" / "model_index.json").is_file()
    meta = json.loads((out / "teacher" / "stepdistill_teacher.json").read_text())
    assert meta["config"]["max_train_steps"] == 2


def test_training_scripts_are_thin_wrappers():
    for script in ("train_dmd.py", "generate_pairs.py", "train_teacher.py", "train_text_teacher.py"):
        text = (ROOT / "training_scripts" / script).read_text()
        assert len(text.splitlines()) <= 35 and "from stepdistill.commands." in text


# ---------------------------------------------------------------------------------------------------------
# the wheel: installed outside the repo, it carries the digits assets and trains
def test_wheel_installs_and_trains_without_the_repo(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # build from a copy: no build/ or egg-info in the checkout, no stale build/lib
    shutil.copytree(ROOT / "stepdistill", src / "stepdistill", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PIP_NO_INDEX": "1"}
    env.pop("PYTHONPATH", None)
    run = dict(capture_output=True, text=True, env=env, timeout=180)
    proc = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
                           str(src)], **run)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("stepdistill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for asset in ("teacher/unet/diffusion_pytorch_model.safetensors", "teacher/scheduler/scheduler_config.json",
                  "teacher/stepdistill_teacher.json", "classifier/diffusion_pytorch_model.safetensors"):
        assert f"stepdistill/assets/digits/{asset}" in names, asset
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "stepdistill = stepdistill.commands:main" in entry_points
    site = tmp_path / "site"
    proc = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], **run)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    env["PYTHONPATH"] = str(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = work / "run"
    code = ("import sys, runpy, stepdistill; print('FROM', stepdistill.__file__); "
            "sys.argv = ['stepdistill', *sys.argv[1:]]; runpy.run_module('stepdistill', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, "train", "dmd", "--teacher", "digits", "--output_dir",
                           str(out), *TRAIN_FAST], cwd=work, **run)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"FROM {site / 'stepdistill' / '__init__.py'}" in proc.stdout
    assert (out / "student" / "model_index.json").is_file()
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 2

"""The README's bad-input table: every row through the ``stepdistill`` command, which must exit with a one-line
error naming the problem and the fix, no traceback, and nothing on disk lost or half-written.

Rows already covered elsewhere (named in the README table): image folders that are empty, mixed-size, RGBA or
too small for FID and statistics of another extractor (``tests/test_eval_cli.py``), a LoRA for another network
(``tests/test_control.py``), an unknown recipe key (``tests/test_configs.py``), a pairs file of another
teacher's weights (``tests/test_dmd_pairs.py``), crafted statistics / pipeline folders (``test_untrusted_files.py``).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import fails_in_one_line as _fails
from PIL import Image

from stepdistill.commands import main
from stepdistill.data.digits import load_digits_split, to_uint8

FAST = ["--max_train_steps", "2", "--train_batch_size", "2", "--eval_num_samples", "0", "--lr_warmup_steps", "0",
        "--sample_grid_size", "2", "--critic_updates_per_generator_update", "1", "--num_threads", "1"]  # fmt: skip

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _tree_digest(folder: Path) -> str:
    """Names, sizes and contents of every file under ``folder``."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_wrong_teacher_kind_for_the_data_source(tiny_teacher, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    out = tmp_path / "run"
    _fails(["train", "dmd", "--teacher", str(tiny_teacher), "--output_dir", str(out), "--data", "prompts",
            "--prompts", str(tmp_path / "prompts.txt"), *FAST], capsys, "is not text-conditional", "data=digits")
    _fails(["train", "dmd", "--teacher", str(tiny_teacher), "--output_dir", str(out), "--data", "unconditional",
            *FAST], capsys, "data='unconditional' does not fit this teacher", "['class_labels']", "digits")
    assert not out.exists()


def test_corrupt_or_half_written_pipeline_folder(tiny_teacher, tmp_path, capsys):
    half = tmp_path / "half"
    shutil.copytree(tiny_teacher, half)
    weights = half / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    out = tmp_path / "run"
    _fails(["train", "dmd", "--teacher", str(half), "--output_dir", str(out), *FAST], capsys,
           "looks incomplete or damaged", "write it again")  # fmt: skip
    ref = tmp_path / "ref.npz"
    assert main(["eval", "ref", "--data", "digits:heldout", "--features", "digits", "--out", str(ref), "--quiet"]) == 0
    metrics = tmp_path / "m.json"
    _fails(["eval", "calc", "--ref", str(ref), "--pipeline", str(half), "--class_labels", "reference", "--out",
            str(metrics), "--quiet"], capsys, "looks incomplete or damaged")  # fmt: skip
    (half / "model_index.json").write_text('{"_class_name": "StepDistillPipeline", "unet": ["diff')  # cut short
    _fails(["eval", "calc", "--ref", str(ref), "--pipeline", str(half), "--class_labels", "reference", "--out",
            str(metrics), "--quiet"], capsys, "is not valid JSON", "damaged")  # fmt: skip
    assert not out.exists() and not metrics.exists()


def test_recipe_with_a_wrong_type_or_unknown_key(tiny_teacher, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"teacher: {tiny_teacher}\nmax_train_steps: many\n")
    _fails(["train", "dmd", "--config", str(recipe)], capsys, "max_train_steps", "many")
    recipe.write_text(f"teacher: {tiny_teacher}\nstudent_timestep: [999]\n")
    _fails(["train", "dmd", "--config", str(recipe)], capsys, "student_timestep", "valid keys")


def test_negative_or_zero_counts(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(["train", "dmd", "--teacher", str(tiny_teacher), "--output_dir", str(out), *FAST,
            "--max_train_steps", "0"], capsys, "max_train_steps must be >= 1, got 0")  # fmt: skip
    _fails(["train", "dmd", "--teacher", str(tiny_teacher), "--output_dir", str(out), *FAST,
            "--train_batch_size", "-2"], capsys, "train_batch_size must be >= 1, got -2")  # fmt: skip
    for flag, value in (("--num_samples", "0"), ("--batch_size", "-3"), ("--k", "0")):
        _fails(["eval", "calc", "--ref", "r.npz", "--images", str(tmp_path), flag, value], capsys,
               f"argument {flag}: must be >= 1", status=2)  # fmt: skip
    _fails(["eval", "calc", "--ref", "r.npz", "--images", str(tmp_path), "--seeds", "5-1"], capsys,
           "names no number", status=2)  # fmt: skip
    assert not out.exists()


def test_image_folder_with_a_truncated_file(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(to_uint8(load_digits_split("train").images[:70])):
        Image.fromarray(im[..., 0]).save(folder / f"{i:03d}.png")
    big = np.random.default_rng(0).integers(0, 256, size=(8, 8), dtype=np.uint8)
    Image.fromarray(big).save(folder / "cut.png")
    data = (folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])  # header intact, image data cut short
    out = tmp_path / "ref.npz"
    _fails(["eval", "ref", "--data", str(folder), "--features", "digits", "--out", str(out), "--quiet"], capsys,
           "cut.png")  # fmt: skip
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_pairs_file_for_another_teacher(tiny_teacher, tmp_path, capsys):
    pairs = tmp_path / "pairs.safetensors"
    assert main(["pairs", "--teacher", str(tiny_teacher), "--num_regression_pairs", "4",
                 "--regression_teacher_steps", "2", "--num_threads", "1", "--output", str(pairs)]) == 0  # fmt: skip
    before = pairs.read_bytes()
    out = tmp_path / "run"
    _fails(["train", "dmd", "--teacher", "digits", "--output_dir", str(out), "--regression_loss_weight", "0.25",
            "--regression_pairs", str(pairs), *FAST], capsys, "different teacher network", "stepdistill pairs")
    assert pairs.read_bytes() == before and not out.exists()


def test_checkpoint_from_another_config(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "dmd", "--teacher", str(tiny_teacher), "--output_dir", str(out), *FAST,
                 "--checkpointing_steps", "1", "--export", "false"]) == 0  # fmt: skip
    capsys.readouterr()
    before = _tree_digest(out)
    _fails(["train", "dmd", "--teacher", str(tiny_teacher), "--output_dir", str(out), *FAST, "--lora_rank", "2",
            "--resume_from_checkpoint", "latest"], capsys, "does not fit trainable", "config.yaml")
    _fails(["train", "dmd", "--teacher", str(tiny_teacher), "--output_dir", str(out), *FAST, "--lora_rank", "2",
            "--resume_from_checkpoint", str(out / "checkpoints" / "nothing")], capsys, "no such checkpoint folder")
    assert _tree_digest(out) == before  # the run folder (config.yaml, checkpoints) is untouched

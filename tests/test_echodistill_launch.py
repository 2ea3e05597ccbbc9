"""EchoDistill's training script under 2-process DDP (gloo on CPU): the ranks end with identical trainables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import launch_two_processes
from echo_world import write_echo_world

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    world = write_echo_world(tmp_path / "world")
    out = tmp_path / "run"
    launch_two_processes(ROOT / "training_scripts" / "train_echodistill.py", [
        "--teacher", str(world["teacher"]), "--student", str(world["student"]), "--concept_images",
        str(world["concept"]), "--initializer_token", "dog", "--output_dir", str(out), "--max_train_steps", "3",
        "--gradient_accumulation_steps", "2", "--head_hidden", "8", "--ms_swd_projections", "4",
        "--eval_num_samples", "0", "--checkpointing_steps", "3", "--echo_loss_weight", "0.5",
        "--teacher_learning_rate", "1e-3", "--token_learning_rate", "1e-2", "--student_learning_rate", "1e-3",
    ])
    summary = json.loads((out / "train_summary.json").read_text())
    sums = summary["param_checksums"]  # the token row is in the teacher's sum: its gradient is all-reduced too
    assert len(sums) == 2 and sums[0] == pytest.approx(sums[1], rel=0, abs=1e-9), sums
    assert (out / "student" / "model_index.json").is_file() and (out / "teacher" / "model_index.json").is_file()
    assert (out / "checkpoints" / "checkpoint-000003" / "trainer_state.json").is_file()

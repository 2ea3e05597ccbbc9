"""Helpers shared by the command-line and multi-process tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stepdistill.commands import main

ROOT = Path(__file__).resolve().parents[1]


def fails_in_one_line(argv: list[str], capsys, *needles: str, status: int = 1) -> str:
    """Run ``stepdistill argv``: it must exit with ``status`` and one ``error:`` line holding every needle."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == status
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def launch_two_processes(script: Path, args: list[str], tests_on_path: bool = False) -> None:
    """``accelerate launch --multi_gpu --num_processes 2 script args`` (gloo on CPU); it must exit with status 0."""
    cmd = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args,
    ]
    paths = [str(ROOT), str(ROOT / "tests")] if tests_on_path else [str(ROOT)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

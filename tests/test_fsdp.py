"""FSDP2 on CPU: accelerate's own FSDP2 path (``fully_shard``, DTensor optimizer states, sharded checkpoints,
gathered state dicts) driven over gloo by ``tests/fsdp_cpu.py`` in one ``torchrun --nproc_per_node 2`` launch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dmd2_with_gan_head_sharded_resumes_bitwise_and_matches_ddp(tiny_teacher, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "fsdp_cpu.py"), str(tiny_teacher), str(tmp_path)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "fsdp_result.json").read_text())
    assert result["sharded_types"] == ["FSDPFakeScore", "FSDPUNet2DDenoiser"]  # both trainables really sharded
    # resuming the sharded checkpoint of iteration 1 ends bitwise where the uninterrupted run did (weights + EMA)
    assert result["hashes"]["resumed"] == result["hashes"]["straight"]
    # sharding changes only the order of float sums: the same training as DDP up to rounding
    assert result["max_abs_diff_fsdp_vs_ddp"] < 1e-4
    sums = result["param_checksums"]
    assert len(sums) == 2 and sums[0] == pytest.approx(sums[1], rel=0, abs=1e-9)  # ranks agree
    assert {"pytorch_model_fsdp_0", "pytorch_model_fsdp_1", "optimizer_0", "optimizer_1",
            "trainer_state.json"} <= set(result["checkpoint_files"])  # fmt: skip
    assert "generator/ema/model/diffusion_pytorch_model.safetensors" in result["ema_checkpoint"]  # gathered EMA
    assert result["export_equals_gathered_ema"] and result["grid"]
    assert all(v == v and abs(v) < 1e6 for v in result["losses"].values())  # finite, GAN terms included
    assert "loss/gan_generator" in result["losses"]
    assert result["lora_refusal"] and "FSDP cannot shard" in result["lora_refusal"]

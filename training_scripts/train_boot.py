"""Distill a diffusion teacher into a one-step student with BOOT, from conditions alone (no images).

    accelerate launch training_scripts/train_boot.py --config recipes/digits_boot_1step.yaml
    accelerate launch training_scripts/train_boot.py --config recipes/digits_boot_1step.yaml \
        --max_train_steps 200 --output_dir runs/try --resume_from_checkpoint latest   # flags override

The same as ``stepdistill train boot ...`` (:mod:`stepdistill.commands.train`): every field of ``BOOTConfig`` is a
flag (``--help`` lists them); the YAML recipe sets defaults and flags override it. Writes
``<output_dir>/checkpoints``, ``samples/``, ``config.yaml``, ``train_summary.json`` and the exported student
``<output_dir>/student``.
"""

from __future__ import annotations

import sys

from stepdistill.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main(["boot", *sys.argv[1:]]))

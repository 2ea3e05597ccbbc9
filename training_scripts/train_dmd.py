"""Distill a diffusion teacher into a one- or few-step student with DMD2 (or DMD1).

    accelerate launch training_scripts/train_dmd.py --config recipes/digits_dmd2_1step.yaml
    accelerate launch training_scripts/train_dmd.py --config recipes/digits_dmd2_4step.yaml \
        --max_train_steps 200 --output_dir runs/try --resume_from_checkpoint latest   # flags override

The same as ``stepdistill train dmd ...`` (:mod:`stepdistill.commands.train`): every field of ``DMDConfig`` is a
flag (``--help`` lists them); the YAML recipe sets defaults and flags override it. Writes
``<output_dir>/checkpoints``, ``samples/``, ``config.yaml``, ``train_summary.json`` and the exported student
``<output_dir>/student``.
"""

from __future__ import annotations

import sys

from stepdistill.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main(["dmd", *sys.argv[1:]]))

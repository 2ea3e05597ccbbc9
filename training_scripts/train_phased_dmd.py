"""Distill a diffusion teacher into a few-step student with Phased DMD (one expert per SNR phase).

    accelerate launch training_scripts/train_phased_dmd.py --config recipes/digits_phased_dmd_4step.yaml
    accelerate launch training_scripts/train_phased_dmd.py --config recipes/digits_phased_dmd_4step.yaml \
        --renoise_intervals disjoint --output_dir runs/phased_disjoint   # flags override the recipe

The same as ``stepdistill train phased-dmd ...`` (:mod:`stepdistill.commands.train`): every field of
``PhasedDMDConfig`` is a flag (``--help`` lists them). Writes ``<output_dir>/checkpoints``, ``samples/``,
``config.yaml``, ``train_summary.json`` and the experts as a ``PhasedExpertsPipeline`` folder
``<output_dir>/student``.
"""

from __future__ import annotations

import sys

from stepdistill.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main(["phased-dmd", *sys.argv[1:]]))

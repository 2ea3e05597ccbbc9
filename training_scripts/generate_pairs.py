"""Make a DMD1 regression-pairs file: the teacher's ODE samples on fixed noise and data-source conditions.

    python training_scripts/generate_pairs.py --config recipes/digits_dmd_1step.yaml \
        --output runs/pairs/digits_1024.safetensors
    accelerate launch --num_processes 2 training_scripts/generate_pairs.py --config recipe.yaml --output p.safetensors
    python training_scripts/generate_pairs.py --teacher stepdistill/assets/digits/teacher --data uniform_labels \
        --num_regression_pairs 4096 --regression_teacher_steps 50 --output pairs.safetensors

The same as ``stepdistill pairs ...`` (:mod:`stepdistill.commands.pairs`): reads the DMD recipe fields that decide
the pairs (teacher, data options, real_guidance_scale, num_regression_pairs, regression_teacher_steps, seed,
mixed_precision), so training with ``--regression_pairs <file>`` uses exactly the pairs the trainer would
otherwise generate at start.
"""

from __future__ import annotations

import sys

from stepdistill.commands.pairs import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

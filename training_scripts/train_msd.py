"""Multi-student distillation (MSD): K one-step DMD2 students, one per part of the conditions, and their router.

    accelerate launch training_scripts/train_msd.py --config recipes/digits_msd4_1step.yaml
    accelerate launch training_scripts/train_msd.py --config recipes/digits_msd4_small_tsm.yaml   # smaller + TSM
    accelerate launch training_scripts/train_msd.py --config recipes/digits_msd4_1step.yaml --student_index 2  # one

The same as ``stepdistill train msd ...`` (:mod:`stepdistill.commands.train`): every field of ``MSDConfig`` is a
flag (``--help`` lists them). Writes ``<output_dir>/partition``, ``students/student_<k>/`` (each a DMD run folder)
and the routed pipeline ``<output_dir>/student`` once every student is trained.
"""

from __future__ import annotations

import sys

from stepdistill.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main(["msd", *sys.argv[1:]]))

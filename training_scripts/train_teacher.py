"""Train the digits world's feature classifier and class-conditional teacher, and ship them.

    accelerate launch training_scripts/train_teacher.py --output_dir stepdistill/assets/digits
    accelerate launch training_scripts/train_teacher.py --only teacher --teacher_max_train_steps 2000 \
        --output_dir runs/digits_world

The same as ``stepdistill train-teacher ...`` (:mod:`stepdistill.commands.teacher`): ``--classifier_<field>`` and
``--teacher_<field>`` set the ``ClassifierConfig`` / ``TeacherConfig`` fields (``--help`` lists them). Writes
``<output_dir>/classifier`` and ``<output_dir>/teacher`` (diffusers / safetensors folders).
"""

from __future__ import annotations

import sys

from stepdistill.commands.teacher import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

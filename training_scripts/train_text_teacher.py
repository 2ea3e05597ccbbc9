"""Train the text-conditioned digits world (tiny VAE, CLIP text encoder and UNet) and ship it as a pipeline folder.

    accelerate launch training_scripts/train_text_teacher.py --output_dir stepdistill/assets/digits
    accelerate launch training_scripts/train_text_teacher.py --text_teacher_max_train_steps 500 --output_dir runs/tw

The same as ``stepdistill train-teacher --only text_teacher ...`` (:mod:`stepdistill.commands.teacher`):
``--text_teacher_<field>`` sets the ``TextTeacherConfig`` fields (``--help`` lists them). Writes
``<output_dir>/text_teacher``, a stock ``StableDiffusionPipeline`` folder.
"""

from __future__ import annotations

import sys

from stepdistill.commands.teacher import main

if __name__ == "__main__":
    raise SystemExit(main(["--only", "text_teacher", *sys.argv[1:]]))

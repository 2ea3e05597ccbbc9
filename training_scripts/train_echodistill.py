"""Personalize a one-step student and its teacher together on 3-5 concept images with EchoDistill / OPAD.

    accelerate launch training_scripts/train_echodistill.py --teacher worlds/text_digits/teacher \
        --student worlds/text_digits/student --concept_images concepts/slant --initializer_token slanted \
        --concept_prompts "a handwritten seven, {}" --augment_fill -1 --output_dir runs/echo_slant

The same as ``stepdistill train echodistill ...`` (:mod:`stepdistill.commands.train`): every field of
``EchoDistillConfig`` is a flag (``--help`` lists them); a ``--config`` YAML recipe sets defaults and flags override
it. The feature extractors are the digits classifier's (``--feature_extractor digits:PATH`` for another one; other
extractors through ``EchoDistillTrainer(extractors=[...])``). Writes ``<output_dir>/checkpoints``, ``samples/``,
``config.yaml``, ``train_summary.json``, the personalized one-step student ``<output_dir>/student`` and the
personalized teacher ``<output_dir>/teacher`` (stock ``StableDiffusionPipeline`` folders with the new token).
"""

from __future__ import annotations

import sys

from stepdistill.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main(["echodistill", *sys.argv[1:]]))

"""Distill a diffusion teacher into a one- or few-step student with DMD2 (or DMD1).

    accelerate launch training_scripts/train_dmd.py --config recipes/digits_dmd2_1step.yaml
    accelerate launch training_scripts/train_dmd.py --config recipes/digits_dmd2_4step.yaml
        --max_train_steps 200 --output_dir runs/try --resume_from_checkpoint latest   # flags override

Every field of ``DMDConfig`` is a flag (``--help`` lists them); the YAML recipe sets defaults and
flags override it. Writes ``<output_dir>/checkpoints``, ``samples/``, ``config.yaml``,
``train_summary.json`` and the exported student ``<output_dir>/student``.
"""

from __future__ import annotations

import json
import sys

from stepdistill.configs import parse_config
from stepdistill.trainers.dmd import DMDConfig, DMDTrainer


def main(argv: list[str] | None = None) -> dict:
    """Parse the recipe and flags, train, print the summary."""
    config = parse_config(DMDConfig, argv)
    trainer = DMDTrainer(config)
    summary = trainer.train()
    if trainer.accelerator.is_main_process:
        print(json.dumps({k: summary[k] for k in ("global_step", "final_metrics", "eval", "train_seconds")},
                         indent=2, default=str))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])

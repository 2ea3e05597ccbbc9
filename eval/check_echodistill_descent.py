"""Fixed-batch descent check of EchoDistill's three objectives on the tests' tiny random SD-like world (CPU, ~20 s).

Trains ``--steps`` iterations and probes, before and after, on one fixed batch (fixed latents, noise, timesteps):
the teacher's denoising MSE on the concept images with the new token's prompt, the student's unweighted latent
MSE to the teacher's refinement, and the discriminator heads' accuracy. A sign or wiring error shows up as a
probe that does not move the right way; the networks are random, so the sizes of the changes mean nothing.

    python eval/check_echodistill_descent.py                                   # all losses, reference weights
    python eval/check_echodistill_descent.py --extra '{"adversarial_loss_weight": 0, "teacher_learning_rate": 1e-12,
        "token_learning_rate": 1e-12}'                                        # alignment only, teacher frozen
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main(argv: list[str] | None = None) -> dict:
    """Train, probe before / after, print the JSON."""
    from echo_world import write_echo_world
    from test_echodistill import _config, _extractors

    from stepdistill.denoiser import guided_denoise
    from stepdistill.trainers import EchoDistillTrainer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--extra", default="{}", help="JSON of EchoDistillConfig overrides.")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="echo_descent_"))
    world = write_echo_world(root)
    kw = dict(max_train_steps=args.steps, teacher_learning_rate=1e-3, token_learning_rate=1e-2,
              student_learning_rate=1e-3, head_learning_rate=1e-3)
    kw.update(json.loads(args.extra))
    trainer = EchoDistillTrainer(_config(world, root / "run", **kw), extractors=_extractors())
    g = torch.Generator().manual_seed(123)
    eps = torch.randn(8, *trainer.sample_shape, generator=g)
    t, t_ref = (torch.randint(0, 1000, (8,), generator=g).double() for _ in range(2))
    idx = torch.arange(8) % trainer.concept.shape[0]
    state = trainer.rng.get_state()
    z0 = trainer.encode_images(trainer.concept[idx])
    trainer.rng.set_state(state)  # the probe's posterior sample does not shift the training stream

    @torch.no_grad()
    def probe() -> dict[str, float]:
        s, c = trainer.schedule, trainer.encoder(["a photo of <new1>"] * 8)  # the token row as trained so far
        pred = trainer.teacher.kv(s.add_noise(z0, eps, t), t, c).model_output
        z_s = trainer.student(eps, trainer.student_timestep, c).x0
        z_t = guided_denoise(trainer.teacher.kv.denoiser, s.add_noise(z_s, eps, t_ref), t_ref, c,
                             trainer.guidance_scale).x0
        fake, real = trainer.discriminator(trainer.decode_latents(z_s)), trainer.discriminator(trainer.concept[idx])
        return {"teacher_denoising_mse": float(((pred - s.target(z0, eps, t)) ** 2).mean()),
                "student_latent_mse": float(0.5 * ((z_s - z_t) ** 2).mean()),
                "discriminator_accuracy": float(0.5 * ((real > 0).float().mean() + (fake < 0).float().mean()))}

    result = {"steps": args.steps, "overrides": kw, "before": probe()}
    for step in range(args.steps):
        trainer.training_step(step)
    result["after"] = probe()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

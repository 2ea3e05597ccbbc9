"""Fingerprint short training runs: every logged metric per iteration and a hash of every trained tensor.

    python eval/fingerprint_trainers.py --out runs/fingerprint_after.json
    python eval/fingerprint_trainers.py --compare runs/fingerprint_before.json runs/fingerprint_after.json

Used to show that a refactor of the trainer layer leaves behaviour unchanged: each digits recipe runs
``--steps`` iterations (default 20; ``log_every=1``, so ``metrics.jsonl`` holds every iteration's exact
values), then every trainable module's tensors, the EMA's averaged tensors and the exported student's
tensors are hashed (SHA-256 of the raw bytes). Hashes are compared as sorted lists per module, so a renamed
parameter still matches while a changed bit does not. ``--compare`` prints one line per recipe and exits 1
on any difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

#: name -> (recipe, extra flags). The LoRA run is the 1-step recipe in shared-base mode at rank 16.
RUNS = {
    "dmd2_1step": ("recipes/digits_dmd2_1step.yaml", []),
    "dmd2_4step": ("recipes/digits_dmd2_4step.yaml", []),
    "dmd2_1step_gan": ("recipes/digits_dmd2_1step_gan.yaml", []),
    "dmd_1step_pairs": ("recipes/digits_dmd_1step.yaml", ["--num_regression_pairs", "64"]),
    "dmd2_1step_lora16": ("recipes/digits_dmd2_1step.yaml", ["--lora_rank", "16", "--generator_learning_rate", "5e-4",
                                                             "--critic_learning_rate", "5e-4"]),
}


def tensor_hashes(tensors) -> list[str]:
    """Sorted SHA-256 digests of the tensors' raw bytes (dtype and shape included)."""
    out = []
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out.append(h.hexdigest())
    return sorted(out)


def _ema_tensors(trainer) -> dict[str, list]:
    emas = getattr(trainer, "emas", None)
    if emas is None:  # before the trainer-core refactor: one EMA
        ema = getattr(trainer, "ema", None)
        emas = {"generator": ema} if ema is not None else {}
    return {name: list(ema.shadow_params) for name, ema in emas.items()}


def fingerprint(name: str, steps: int, work: Path) -> dict:
    """Train one recipe for ``steps`` iterations; return its metrics and tensor hashes."""
    from safetensors.torch import load_file

    from stepdistill.trainers import DMDConfig, DMDTrainer, parse_config

    recipe, extra = RUNS[name]
    out = work / name
    argv = ["--config", str(ROOT / recipe), *extra, "--max_train_steps", str(steps), "--output_dir", str(out),
            "--log_every", "1", "--checkpointing_steps", "0", "--sample_every", "0", "--eval_num_samples", "0",
            "--teacher", str(ROOT / "stepdistill/assets/digits/teacher"), "--num_threads", "1"]
    trainer = DMDTrainer(parse_config(DMDConfig, argv))
    trainer.train()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trainables = {n: tensor_hashes(trainer.unwrap(n).state_dict().values()) for n in trainer.trainables}
    ema = {n: tensor_hashes(v) for n, v in _ema_tensors(trainer).items()}
    student = sorted(out.glob("student/**/*.safetensors"))
    exported = {str(p.relative_to(out)): tensor_hashes(load_file(p).values()) for p in student}
    return {"metrics": metrics, "trainables": trainables, "ema": ema, "export": exported}


def compare(before: dict, after: dict) -> int:
    """Print one verdict line per run; return the number of runs that differ."""
    bad = 0
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None or b is None:
            print(f"{name}: only in {'after' if a is None else 'before'}")
            bad += 1
            continue
        problems = []
        if len(a["metrics"]) != len(b["metrics"]):
            problems.append(f"{len(a['metrics'])} vs {len(b['metrics'])} metric records")
        for ra, rb in zip(a["metrics"], b["metrics"]):
            common = sorted(set(ra) & set(rb))
            diff = [k for k in common if ra[k] != rb[k]]
            missing = sorted(set(ra) ^ set(rb))
            if diff or missing:
                problems.append(f"step {ra.get('step')}: differs {diff[:4]} missing {missing[:4]}")
                break
        for part in ("trainables", "ema"):
            if sorted(a[part].values()) != sorted(b[part].values()):
                problems.append(f"{part} tensors differ")
        if sorted(a["export"].values()) != sorted(b["export"].values()):
            problems.append("exported student tensors differ")
        n_loss = sum(1 for r in a["metrics"] for k in r if k.startswith("loss/"))
        n_tensors = sum(len(v) for part in ("trainables", "ema", "export") for v in a[part].values())
        verdict = "IDENTICAL" if not problems else "DIFFERENT: " + "; ".join(problems)
        print(f"{name}: {verdict} ({len(a['metrics'])} iterations, {n_loss} loss values, {n_tensors} tensors)")
        bad += bool(problems)
    return bad


def main() -> int:
    """Fingerprint the runs, or compare two fingerprint files."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/fingerprint.json")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        return 1 if compare(before, after) else 0
    torch.set_num_threads(1)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            result[name] = fingerprint(name, args.steps, Path(tmp))
            print(f"{name}: {len(result[name]['metrics'])} iterations fingerprinted", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job on the digits default: distill (DMD2, 1 step), evaluate, write sample grids.

    python eval/run_digits.py --out runs/digits

1. ``accelerate launch training_scripts/train_dmd.py --config recipes/digits_dmd2_1step.yaml``
   writes the student pipeline to ``<out>/train/student``;
2. ``eval/bench_digits.py`` measures the 50-step teacher and the student with one protocol
   (N = 2,000, held-out class mix, the same noise seeds, FID∞, bootstrap intervals, the real-data floor)
   -> ``<out>/bench.json`` / ``bench.md``;
3. ``<out>/grid_student.png`` and ``<out>/grid_teacher.png``: one row per class, same noise;
4. ``<out>/summary.json``: the student / 50-step-teacher FID∞ ratio, the paired difference's 95 %
   interval and verdict, class accuracy and speedup, checked against the targets (FID∞ ratio <= FID_INF_RATIO_MAX,
   class accuracy >= 0.98).
``--skip_train`` evaluates an existing ``<out>/train/student``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
#: Pass targets: the student's FID∞ at most this multiple of the 50-step teacher's, and its class accuracy.
FID_INF_RATIO_MAX = 2.0
CLASS_ACCURACY_MIN = 0.98


def run(cmd: list[str]) -> None:
    """Run a command, streaming its output; raise if it fails."""
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def write_grids(student_dir: Path, out: Path, per_class: int = 10) -> None:
    """Sample ``per_class`` images of each digit from student and teacher with the same noise."""
    from stepdistill.data.digits import make_grid_image
    from stepdistill.data.digits_models import teacher_path
    from stepdistill.pipelines import StepDistillPipeline
    from stepdistill.sampling import make_generators

    labels = [c for c in range(10) for _ in range(per_class)]
    seeds = range(len(labels))
    for name, folder, kwargs in (
        ("student", student_dir, {}),
        ("teacher", teacher_path(), {"num_inference_steps": 50}),
    ):
        pipe = StepDistillPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(class_labels=labels, generator=make_generators(seeds), output_type="pt", **kwargs).images
        make_grid_image(images * 2 - 1, nrow=per_class, scale=4).save(out / f"grid_{name}.png")
        print(f"wrote {out / f'grid_{name}.png'}")


def main() -> int:
    """Distill, evaluate, draw; return 1 if a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/digits")
    parser.add_argument("--recipe", default="recipes/digits_dmd2_1step.yaml")
    parser.add_argument("--skip_train", action="store_true", help="Evaluate an existing <out>/train/student.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training and evaluation.")
    parser.add_argument("--train_args", default="", help="Extra flags for train_dmd.py, e.g. '--max_train_steps 500'.")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_dir = out / "train"
    t0 = time.time()

    # 1. distill
    if not args.skip_train:
        run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "training_scripts/train_dmd.py",
             "--config", args.recipe, "--output_dir", str(train_dir), "--num_threads", str(args.threads),
             *args.train_args.split()])
    t_train = time.time() - t0
    student = train_dir / "student"
    if not (student / "model_index.json").is_file():
        print(f"error: no student pipeline at {student}; train first (drop --skip_train).", file=sys.stderr)
        return 1

    # 2. evaluate (teacher 50 steps vs the student, one protocol)
    run([sys.executable, "eval/bench_digits.py", "--steps", "50", "--threads", str(args.threads),
         "--student", f"dmd2-1step={student}", "--out", str(out / "bench.json"),
         "--markdown", str(out / "bench.md")])

    # 3. sample grids
    torch.set_num_threads(args.threads)
    write_grids(student, out)

    # 4. summary against the targets
    bench = json.loads((out / "bench.json").read_text())
    rows = {row["name"]: row for row in bench["rows"]}
    teacher = rows["teacher, 50 steps"]
    stud = rows["dmd2-1step"]
    ratio = stud["vs_teacher"]["fid_inf_ratio"]
    summary = {
        "student_fid_inf": stud["fid_inf"],
        "teacher50_fid_inf": teacher["fid_inf"],
        "floor_fid_inf": rows["real (train split)"]["fid_inf"],
        "fid_inf_ratio": ratio,
        "fid_inf_vs_teacher": stud["vs_teacher"]["fid_inf"],
        "student_excess_over_floor": stud["excess_over_floor"],
        "teacher50_excess_over_floor": teacher["excess_over_floor"],
        "student_class_accuracy": stud["class_accuracy"],
        "speedup_vs_teacher50": stud.get("speedup"),
        "train_seconds": t_train,
        "total_seconds": time.time() - t0,
        "targets": {"fid_inf_ratio_max": FID_INF_RATIO_MAX, "class_accuracy_min": CLASS_ACCURACY_MIN},
    }
    summary["pass"] = ratio <= FID_INF_RATIO_MAX and stud["class_accuracy"] >= CLASS_ACCURACY_MIN
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print((out / "bench.md").read_text())
    print(json.dumps(summary, indent=2))
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

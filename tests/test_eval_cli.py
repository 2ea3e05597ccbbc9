"""The ``stepdistill-eval`` command (``ref`` / ``calc``), ``eval/fid.py``, ``eval/bench_digits.py`` and
``eval/check_digits_world.py``.

Runs in-process on tiny random models (a random digits classifier as the extractor, tiny StepDistillPipeline
and stock DDPMPipeline folders), except one ``accelerate launch`` run with two CPU processes.
Every bad input must exit with status 1, a one-line error naming the problem, and no output file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, LCMScheduler, UNet2DModel
from PIL import Image

from stepdistill.commands.eval import main
from stepdistill.data.digits import load_digits_split, to_uint8
from stepdistill.data.digits_models import DigitsClassifier, teacher_scheduler, teacher_unet
from stepdistill.evaluation import ReferenceStats, load_pipeline, sample_pipeline
from stepdistill.pipelines import StepDistillPipeline

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    layers_per_block=1,
)
N = 70  # > 64 = the digits classifier's feature dimension, so FID is defined

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random classifier, its held-out reference, a tiny teacher and a tiny one-step student."""
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    DigitsClassifier().save_pretrained(root / "clf")
    torch.manual_seed(1)
    DigitsClassifier().save_pretrained(root / "clf_other")
    torch.manual_seed(2)
    StepDistillPipeline(
        unet=teacher_unet(**TINY_UNET).eval(), scheduler=teacher_scheduler(), null_class_label=10
    ).save_pretrained(root / "teacher")
    StepDistillPipeline(
        unet=teacher_unet(**TINY_UNET).eval(),
        scheduler=LCMScheduler.from_config(teacher_scheduler().config),
        null_class_label=10,
        default_timesteps=[999],
    ).save_pretrained(root / "student")
    torch.manual_seed(3)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, **TINY_UNET).eval()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=20)).save_pretrained(root / "ddpm")
    run(["ref", "--data", "digits:heldout", "--features", f"digits:{root / 'clf'}", "--out", str(root / "ref.npz")])
    return root


def run(argv: list[str]) -> int:
    return main([*argv, "--quiet"])


def write_digits(folder: Path, n: int, nested: bool = True) -> np.ndarray:
    data = load_digits_split("train")
    images = to_uint8(data.images[:n])
    for i, im in enumerate(images):
        sub = folder / (f"part{i % 3}" if nested else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im[..., 0]).save(sub / f"{i:04d}.png")
    return data.labels[:n].numpy()


def fails(argv: list[str], capsys, match: str, out: Path) -> str:
    """Run a command that must fail cleanly: status 1, ``match`` in stderr, no ``out`` written."""
    with pytest.raises(SystemExit) as exc:
        run(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "error:" in err and match in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary leftovers
    return err


# ---------------------------------------------------------------------------------------------------------
def test_ref_and_calc_on_folders(world, tmp_path, capsys):
    ref = ReferenceStats.load(world / "ref.npz")
    assert ref.n == 400 and ref.dim == 64 and ref.labels is not None
    assert ref.extractor_spec == f"digits:{(world / 'clf').resolve()}"
    labels = write_digits(tmp_path / "gen", N)
    (tmp_path / "labels.txt").write_text("\n".join(map(str, labels)))
    out = tmp_path / "metrics.json"
    assert run(["calc", "--ref", str(world / "ref.npz"), "--images", str(tmp_path / "gen"), "--out", str(out),
                "--class_labels", str(tmp_path / "labels.txt"), "--per_class"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| fid " in printed and "| precision " in printed and "class 3:" in printed
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["num_generated"] == N and metrics["extractor"] == ref.extractor
    assert {"fid", "kid", "precision", "recall", "diversity/vendi", "diversity/pairwise_cosine_distance"} <= set(
        metrics
    )
    assert metrics["diversity/groups"] == 10 and set(metrics["per_class"]) == {str(c) for c in range(10)}

    # a folder as the reference, then the same folder evaluated against it
    assert run(["ref", "--data", str(tmp_path / "gen"), "--features", f"digits:{world / 'clf'}",
                "--out", str(tmp_path / "gen.npz")]) == 0  # fmt: skip
    assert run(["calc", "--ref", str(tmp_path / "gen.npz"), "--images", str(tmp_path / "gen"),
                "--out", str(out)]) == 0  # fmt: skip
    same = json.loads(out.read_text())["metrics"]
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and (same["precision"], same["recall"]) == (1.0, 1.0)


def test_calc_on_a_stepdistill_pipeline_folder(world, tmp_path):
    out, saved = tmp_path / "metrics.json", tmp_path / "samples"
    assert run(["calc", "--ref", str(world / "ref.npz"), "--pipeline", str(world / "student"),
                "--class_labels", "reference", "--num_samples", str(N), "--timesteps", "999",
                "--batch_size", "32", "--save_images", str(saved), "--out", str(out)]) == 0  # fmt: skip
    payload = json.loads(out.read_text())
    assert payload["metrics"]["num_generated"] == N and payload["metrics"]["diversity/groups"] == 10
    assert payload["evaluated"]["timesteps"] == [999]
    assert (
        sorted(p.name for p in saved.iterdir())[:2] == ["000000.png", "000001.png"] and len(list(saved.iterdir())) == N
    )
    # the saved PNGs give the same numbers as the in-memory samples
    assert run(["calc", "--ref", str(world / "ref.npz"), "--images", str(saved), "--batch_size", "32",
                "--out", str(tmp_path / "from_disk.json")]) == 0  # fmt: skip
    disk = json.loads((tmp_path / "from_disk.json").read_text())["metrics"]
    assert disk["fid"] == pytest.approx(payload["metrics"]["fid"], rel=1e-9)
    assert disk["precision"] == payload["metrics"]["precision"]


def test_per_image_seeds_do_not_depend_on_the_batch_size(world):
    pipe = load_pipeline(world / "student")
    seeds, labels = [5, 9, 2, 7, 1, 3], [0, 1, 2, 3, 4, 5]
    one = np.concatenate([u8 for _, u8 in sample_pipeline(pipe, seeds, labels, batch_size=6)])
    many = np.concatenate([u8 for _, u8 in sample_pipeline(pipe, seeds, labels, batch_size=4)])
    assert one.shape == (6, 8, 8, 1)
    assert np.abs(one.astype(int) - many.astype(int)).max() <= 1  # float32 jitter may flip a rounding
    again = np.concatenate([u8 for _, u8 in sample_pipeline(pipe, seeds[::-1], labels[::-1], batch_size=6)])
    assert np.abs(again[::-1].astype(int) - one.astype(int)).max() <= 1


def test_calc_on_a_stock_diffusers_pipeline(world, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert run(["calc", "--ref", str(world / "ref.npz"), "--pipeline", str(world / "ddpm"), "--steps", "2",
                "--seeds", f"100-{99 + N}", "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["metrics"]["num_generated"] == N
    out.unlink()
    fails(["calc", "--ref", str(world / "ref.npz"), "--pipeline", str(world / "ddpm"), "--class_labels",
           "reference", "--num_samples", str(N), "--out", str(out)],
          capsys, "DDPMPipeline takes no `class_labels`", out)  # fmt: skip


def test_ref_on_a_saved_hf_dataset(world, tmp_path, capsys):
    import datasets

    data = load_digits_split("train")
    rows = {"img": [Image.fromarray(im[..., 0]) for im in to_uint8(data.images[:N])], "digit": data.labels[:N].tolist()}
    ds = datasets.Dataset.from_dict(rows).cast_column("img", datasets.Image())
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "ds.npz"
    base = ["ref", "--data", str(tmp_path / "ds"), "--features", f"digits:{world / 'clf'}", "--out", str(out)]
    fails(base, capsys, "has splits ['train', 'test']; choose one with --split", out)
    assert run([*base, "--split", "test", "--label_column", "digit"]) == 0
    stats = ReferenceStats.load(out)
    assert stats.n == N and stats.labels.tolist() == data.labels[:N].tolist()
    # the same images from a folder give the same statistics
    write_digits(tmp_path / "folder", N, nested=False)
    assert run(["ref", "--data", str(tmp_path / "folder"), "--features", f"digits:{world / 'clf'}",
                "--out", str(tmp_path / "folder.npz")]) == 0  # fmt: skip
    assert np.allclose(ReferenceStats.load(tmp_path / "folder.npz").mu, stats.mu, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# bad input: a clear error and nothing written
# ---------------------------------------------------------------------------------------------------------
def _empty(folder: Path) -> None:
    folder.mkdir()


def _corrupt(folder: Path) -> None:
    write_digits(folder, N)
    (folder / "part1" / "0004.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def _translucent(folder: Path) -> None:
    write_digits(folder, N)
    px = np.full((8, 8, 4), 200, np.uint8)
    Image.fromarray(px, "RGBA").save(folder / "rgba.png")


def _mixed_sizes(folder: Path) -> None:
    write_digits(folder, N)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "big.png")


def _too_few(folder: Path) -> None:
    write_digits(folder, 30)


@pytest.mark.parametrize(
    "make, message",
    [
        (_empty, "No images in"),
        (_corrupt, "0004.png"),
        (_translucent, "translucent alpha"),
        (_mixed_sizes, "big.png' is 16x16 (WxH), but the feature extractor takes 8x8"),
        (_too_few, "FID is undefined for the reference"),
    ],
    ids=["empty", "corrupt", "rgba", "mixed-sizes", "too-few"],
)
def test_ref_refuses_bad_folders(world, tmp_path, capsys, make, message):
    make(tmp_path / "images")
    out = tmp_path / "ref.npz"
    fails(["ref", "--data", str(tmp_path / "images"), "--features", f"digits:{world / 'clf'}", "--out", str(out)],
          capsys, message, out)  # fmt: skip


def test_calc_refuses_bad_inputs(world, tmp_path, capsys):
    ref, out = str(world / "ref.npz"), tmp_path / "metrics.json"
    write_digits(tmp_path / "gen", N)
    # statistics from another extractor
    fails(["calc", "--ref", ref, "--images", str(tmp_path / "gen"), "--features", f"digits:{world / 'clf_other'}",
           "--out", str(out)], capsys, "were computed with feature extractor", out)  # fmt: skip
    # a clean-fid statistics file (no extractor identity)
    stats = ReferenceStats.load(ref)
    np.savez(tmp_path / "cleanfid.npz", mu=stats.mu, sigma=stats.sigma)
    fails(["calc", "--ref", str(tmp_path / "cleanfid.npz"), "--images", str(tmp_path / "gen"), "--out", str(out)],
          capsys, "not a stepdistill reference statistics file", out)  # fmt: skip
    # fewer samples than feature dimensions: a folder, and a pipeline (refused before sampling anything)
    write_digits(tmp_path / "few", 30)
    fails(["calc", "--ref", ref, "--images", str(tmp_path / "few"), "--out", str(out)], capsys,
          "FID is undefined for the generated samples: 30 samples for 64-d features", out)  # fmt: skip
    saved = tmp_path / "samples"
    fails(["calc", "--ref", ref, "--pipeline", str(world / "student"), "--class_labels", "reference",
           "--num_samples", "30", "--save_images", str(saved), "--out", str(out)], capsys,
          "needs at least 65 samples", out)  # fmt: skip
    assert not saved.exists()
    # label file that does not match the folder; a folder that is not a pipeline
    (tmp_path / "labels.txt").write_text("1 2 3")
    fails(["calc", "--ref", ref, "--images", str(tmp_path / "gen"), "--class_labels", str(tmp_path / "labels.txt"),
           "--out", str(out)], capsys, "Got 3 class labels for 70 images", out)  # fmt: skip
    fails(["calc", "--ref", ref, "--pipeline", str(tmp_path / "gen"), "--out", str(out)], capsys,
          "is not a diffusers pipeline folder", out)  # fmt: skip
    fails(["calc", "--ref", str(tmp_path / "missing.npz"), "--images", str(tmp_path / "gen"), "--out", str(out)],
          capsys, "not found", out)  # fmt: skip


def test_calc_prints_intervals_fid_inf_and_the_floor(world, tmp_path, capsys):
    write_digits(tmp_path / "gen", 200, nested=False)  # FID_inf needs >= 2.5 x 64 samples
    out = tmp_path / "m.json"
    assert run(["calc", "--ref", str(world / "ref.npz"), "--images", str(tmp_path / "gen"), "--bootstrap", "40",
                "--floor", "digits:train", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    for field in ("| fid ", "| fid_inf ", "| kid ", "| precision ", "| recall ", "95% interval (40 bootstrap)",
                  "floor (digits:train, 1397)/fid_inf", "excess_over_floor/fid_inf"):  # fmt: skip
        assert field in printed, field
    payload = json.loads(out.read_text())
    assert set(payload["intervals"]) == {"fid", "fid_inf", "kid", "precision", "recall"}
    for metric, (low, high) in payload["intervals"].items():
        assert low <= payload["metrics"][metric] <= high, metric
    assert payload["excess_over_floor"]["fid_inf"]["b"] == payload["floor"]["fid_inf"]["value"]
    assert (tmp_path / payload["features_file"]).is_file() and payload["features_file"] == "m.features.npz"
    fails(["calc", "--ref", str(world / "ref.npz"), "--images", str(tmp_path / "gen"), "--floor", "digits:heldout",
           "--out", str(tmp_path / "x.json")], capsys, "disjoint", tmp_path / "x.json")  # fmt: skip


def test_paired_compare_of_two_pipelines(world, tmp_path, capsys):
    def calc(pipeline: str, seeds: str, out: str, *extra: str) -> int:
        return run(["calc", "--ref", str(world / "ref.npz"), "--pipeline", str(world / pipeline),
                    "--class_labels", "reference", "--seeds", seeds, "--bootstrap", "30",
                    "--out", str(tmp_path / out), *extra])  # fmt: skip

    assert calc("student", "0-99", "a.json", "--timesteps", "999") == 0
    assert calc("teacher", "0-99", "b.json", "--steps", "1", "--compare", str(tmp_path / "a.json")) == 0
    printed = capsys.readouterr().out
    assert "A = this evaluation" in printed and "paired by noise seeds" in printed and "| fid |" in printed
    verdict = json.loads((tmp_path / "b.json").read_text())["comparison"]["fid"]["verdict"]
    assert verdict in ("better", "worse", "not resolved")
    # the compare subcommand: a model against itself is "not resolved" with a zero difference
    assert run(["compare", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--bootstrap", "30",
                "--out", str(tmp_path / "c.json")]) == 0  # fmt: skip
    comparison = json.loads((tmp_path / "c.json").read_text())["comparison"]
    assert {c["verdict"] for c in comparison.values()} == {"not resolved"}
    assert comparison["fid"]["difference"] == 0 and "verdict for A" in capsys.readouterr().out
    # other seeds do not pair
    assert calc("student", "100-199", "d.json", "--timesteps", "999") == 0
    fails(["compare", str(tmp_path / "a.json"), str(tmp_path / "d.json"), "--out", str(tmp_path / "e.json")],
          capsys, "different noise seeds", tmp_path / "e.json")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# scripts
# ---------------------------------------------------------------------------------------------------------
def test_eval_fid_script(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ref.npz"
    argv = ["eval/fid.py", "ref", "--data", "digits:train", "--features", f"digits:{world / 'clf'}", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--quiet"])
    runpy.run_path(str(REPO / "eval" / "fid.py"), run_name="__main__")
    assert ReferenceStats.load(out).source == "digits:train"


def test_bench_digits_smoke(world, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_digits", REPO / "eval" / "bench_digits.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    payload = bench.main([
        "--teacher", str(world / "teacher"), "--classifier", str(world / "clf"), "--num_samples", "170",
        "--bootstrap", "20", "--steps", "1", "--reference_steps", "2", "--batch_size", "85",
        "--student", f"tiny={world / 'student'}:999,499", "--baseline", "teacher, 1 step", "--out", str(out),
    ])  # fmt: skip
    names = [r["name"] for r in payload["rows"]]
    assert names == ["real (train split)", "teacher, 1 step", "teacher, 2 steps", "tiny"]
    rows = {r["name"]: r for r in payload["rows"]}
    assert (
        rows["teacher, 1 step"]["nfe"] == 1 and rows["tiny"]["nfe"] == 2 and rows["real (train split)"]["nfe"] is None
    )
    assert rows["teacher, 2 steps"]["speedup"] == pytest.approx(1.0) and rows["real (train split)"]["n"] == 1397
    for metric in ("fid", "fid_inf", "kid", "precision", "recall", "excess_over_floor"):
        cell = rows["tiny"][metric]
        assert cell["low"] <= cell["value"] <= cell["high"], metric
    assert rows["tiny"]["vs_teacher"]["against"] == "teacher, 2 steps"
    assert rows["tiny"]["vs_baseline"]["fid_inf"]["verdict"] in ("better", "worse", "not resolved")
    assert "vs_baseline" not in rows["teacher, 1 step"] and "vs_teacher" not in rows["teacher, 2 steps"]
    table = capsys.readouterr().out
    assert "| teacher, 1 step | 1 |" in table and "Reproduce: `python eval/bench_digits.py" in table
    assert "| tiny | " in table.split("FID∞ − 2-step teacher")[1]  # the verdict table
    protocol = json.loads(out.read_text())["protocol"]
    assert protocol["num_samples"] == 170 and "--out" not in protocol["command"]
    assert bench.parse_student("a=/x/y:999,499") == ("a", "/x/y", [999, 499])
    assert bench.parse_student("b=C:/dir") == ("b", "C:/dir", None)
    assert bench.parse_student("c=/f:1000,667.5,334") == ("c", "/f", [1000.0, 667.5, 334.0])  # flow: sigma * T



def test_check_digits_world_checks_the_teacher_it_is_given(world, tiny_flow_teacher, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("check_digits_world", REPO / "eval" / "check_digits_world.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    common = ["--classifier", str(world / "clf"), "--num_samples", "20", "--steps", "2"]
    report = check.main(["--teacher", str(tiny_flow_teacher), *common, "--out", str(tmp_path / "r.json")])
    row = report["teacher_sample_class_accuracy"]
    # the flow folder's own json guidance (2.0) and scheduler; a random teacher misses the target
    assert row["teacher"] == str(tiny_flow_teacher) and row["guidance_scale"] == 2.0 and row["schedule"] == "flow"
    assert row["prediction_type"] == "flow" and row["n"] == 20 and report["pass"] is False
    assert json.loads((tmp_path / "r.json").read_text()) == report and "FAIL" in capsys.readouterr().out
    for argv, needle in ((["--teacher", str(tmp_path)], "not a teacher folder"),
                         (["--teacher", str(tiny_flow_teacher), "--teacher_kind", "vp"], "not allowed with"),
                         (["--teacher_kind", "edm"], "invalid choice")):
        with pytest.raises(SystemExit) as exc:
            check.main([*argv, *common])
        assert exc.value.code == 2 and needle in capsys.readouterr().err

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_launch_two_processes_matches_one(world, tmp_path):
    """Sampling and features split over 2 processes (gloo on CPU) and gathered: the numbers of one process.

    ``accelerate launch --multi_gpu`` is accelerate's torchrun launcher; without CUDA the command joins a CPU
    process group (``accelerate launch --cpu`` alone starts a single process).
    """
    common = ["calc", "--ref", str(world / "ref.npz"), "--pipeline", str(world / "student"), "--class_labels",
              "reference", "--num_samples", str(N), "--batch_size", "16", "--quiet"]  # fmt: skip
    assert run([*common, "--out", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", str(REPO / "eval" / "fid.py"), *common,
           "--out", str(tmp_path / "two.json")]  # fmt: skip
    if torch.cuda.device_count() < 2:
        env["CUDA_VISIBLE_DEVICES"] = ""  # two CPU processes
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["evaluated"]["num_processes"] == 2
    for key in ("fid", "kid", "precision", "recall", "diversity/vendi"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-6, abs=1e-9)

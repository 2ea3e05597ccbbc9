"""Files choose no code: statistics files and pipeline folders are data.

A crafted file that names a module (``this``, whose import prints the Zen of Python) must be refused with a
one-line error naming the field, and nothing may be imported; clean-fid's ``mu`` / ``sigma`` files load only
with an explicit ``--ref_extractor inception``, for FID only.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.commands.eval import main as eval_main
from stepdistill.data.digits import load_digits_split, to_uint8
from stepdistill.data.digits_models import teacher_scheduler, teacher_unet
from stepdistill.evaluation import (
    FeatureExtractorError,
    InceptionFeatures,
    ReferenceStats,
    build_feature_extractor,
    make_reference,
    resolve_extractor,
)
from stepdistill.evaluation import features as features_module
from stepdistill.evaluation.metrics import feature_statistics, frechet_distance
from stepdistill.evaluation.stats import UnverifiedStatsWarning
from stepdistill.loading import ModelFolderError, load_pipeline_folder
from stepdistill.pipelines import HybridDiversityPipeline, StepDistillPipeline

ZEN = "Beautiful is better than ugly"
CUSTOM = f"{__name__}:quadrant_means"  # a custom extractor named by the CALLER (this module is importable)
TINY_UNET = dict(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, layers_per_block=1)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def quadrant_means(batch: torch.Tensor) -> torch.Tensor:
    """A custom feature extractor: the mean of each image quadrant per channel (12-d for RGB)."""
    return torch.nn.functional.adaptive_avg_pool2d(batch, 2).flatten(1)


class _StandInInception(torch.nn.Module):
    """A small TorchScript stand-in for clean-fid's Inception (``.layers``: [B, 3, 299, 299] -> [B, 4])."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 4))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """70 digit PNGs and a tiny StepDistillPipeline folder."""
    root = tmp_path_factory.mktemp("untrusted")
    for i, im in enumerate(to_uint8(load_digits_split("train").images[:70])):
        (root / "images").mkdir(exist_ok=True)
        Image.fromarray(im[..., 0]).save(root / "images" / f"{i:03d}.png")
    torch.manual_seed(0)
    StepDistillPipeline(unet=teacher_unet(**TINY_UNET).eval(), scheduler=teacher_scheduler(),
                        null_class_label=10).save_pretrained(root / "pipe")  # fmt: skip
    return root


def _calc(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = eval_main(["calc", *argv, "--quiet"])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _crafted_copy(src: Path, dst: Path, **fields: str) -> Path:
    with np.load(src, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update({k: np.array(v) for k, v in fields.items()})
    np.savez(dst, **arrays)
    return dst


# ---------------------------------------------------------------------------------------------------------
# reference statistics
# ---------------------------------------------------------------------------------------------------------
def test_statistics_naming_a_module_import_nothing(world, tmp_path, capsys):
    custom = build_feature_extractor(CUSTOM)  # the caller's choice: imports this module, which is fine
    ref = make_reference(world / "images", custom, progress=False).save(tmp_path / "custom.npz")
    crafted = _crafted_copy(ref, tmp_path / "crafted.npz", extractor="this:s", extractor_spec="this:s")
    out = tmp_path / "m.json"
    assert "this" not in sys.modules
    code, stdout, err = _calc(["--ref", str(crafted), "--images", str(world / "images"), "--out", str(out)], capsys)
    _one_line_error(code, err, "field `extractor_spec`", "'this:s'", "--features")
    assert ZEN not in stdout and "this" not in sys.modules and not out.exists()
    # a file naming a genuine custom extractor is not imported either; the caller passes it, identity checked
    code, _, err = _calc(["--ref", str(ref), "--images", str(world / "images"), "--out", str(out)], capsys)
    _one_line_error(code, err, "field `extractor_spec`", CUSTOM)
    code, stdout, _ = _calc(["--ref", str(ref), "--images", str(world / "images"), "--features", CUSTOM,
                             "--out", str(out)], capsys)  # fmt: skip
    assert code == 0 and json.loads(out.read_text())["metrics"]["fid"] == pytest.approx(0.0, abs=1e-6)
    code, _, err = _calc(["--ref", str(crafted), "--images", str(world / "images"), "--features", CUSTOM], capsys)
    _one_line_error(code, err, "were computed with feature extractor 'this:s'")  # the identity check


def test_statistics_never_load_the_inception_file_they_name(tmp_path, monkeypatch):
    monkeypatch.setattr(features_module, "INCEPTION_DIM", 4)
    monkeypatch.setattr(features_module, "default_inception_dir", lambda: tmp_path / "empty")
    weights = tmp_path / "elsewhere" / features_module.INCEPTION_FILENAME
    weights.parent.mkdir()
    torch.jit.save(torch.jit.script(_StandInInception()), str(weights))
    inception = InceptionFeatures(weights)
    images = np.random.default_rng(0).integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)
    ref = ReferenceStats.from_features(inception(images), inception, source="random")
    assert ref.extractor_spec == f"inception:{weights.resolve()}"
    # loading the named file would succeed (its hash is the recorded identity), so only a refusal proves it is not
    with pytest.raises(FeatureExtractorError, match=f"pass --inception_weights {weights.resolve()}"):
        resolve_extractor(ref)
    assert resolve_extractor(ref, inception_weights=weights).name == ref.extractor  # the caller's path is used


def test_clean_fid_mu_sigma_needs_ref_extractor_inception_and_gives_fid_only(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(features_module, "INCEPTION_DIM", 4)
    weights = tmp_path / features_module.INCEPTION_FILENAME
    torch.jit.save(torch.jit.script(_StandInInception()), str(weights))
    inception = InceptionFeatures(weights)
    real = inception(np.random.default_rng(1).integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8))
    mu, sigma = feature_statistics(real)
    np.savez(tmp_path / "cifar10_clean_train_32.npz", mu=mu, sigma=sigma)  # what clean-fid publishes
    stats, images, out = tmp_path / "cifar10_clean_train_32.npz", str(world / "images"), tmp_path / "m.json"
    code, _, err = _calc(["--ref", str(stats), "--images", images, "--out", str(out)], capsys)
    _one_line_error(code, err, "--ref_extractor inception", "no `extractor` field")
    code, _, err = _calc(["--ref", str(stats), "--images", images, "--ref_extractor", "inception", "--features",
                          "digits"], capsys)  # fmt: skip
    _one_line_error(code, err, "drop --features")
    code, stdout, err = _calc(["--ref", str(stats), "--images", images, "--ref_extractor", "inception",
                               "--inception_weights", str(weights), "--out", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    assert "calc: warning:" in err and "cannot be verified" in err and "FID only" in err
    assert "| kid" in stdout and "n/a" in stdout and "kid: not computed: need the reference's features" in stdout
    metrics = json.loads(out.read_text())["metrics"]
    from stepdistill.evaluation import folder_features

    gen, _ = folder_features(images, inception, progress=False)
    assert metrics["fid"] == pytest.approx(frechet_distance(*feature_statistics(gen), mu, sigma), rel=1e-9)
    assert metrics["kid"] is None and metrics["precision"] is None and metrics["num_reference"] is None
    # the library call warns too; statistics of another width are refused
    with pytest.warns(UnverifiedStatsWarning, match="cannot be verified"):
        ReferenceStats.load(stats, assume_extractor=inception)
    np.savez(tmp_path / "wide.npz", mu=np.zeros(6), sigma=np.eye(6))
    with warnings.catch_warnings(), pytest.raises(Exception, match="6-d statistics but inception"):
        ReferenceStats.load(tmp_path / "wide.npz", assume_extractor=inception)


# ---------------------------------------------------------------------------------------------------------
# pipeline folders
# ---------------------------------------------------------------------------------------------------------
def _crafted_pipeline(world: Path, dst: Path, **index_fields) -> Path:
    import shutil

    shutil.copytree(world / "pipe", dst)
    index = json.loads((dst / "model_index.json").read_text())
    index.update(index_fields)
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("fields, needle", [
    (dict(unet=["this", "s"]), "component 'unet' is this.s"),
    (dict(scheduler=["os", "system"]), "component 'scheduler' is os.system"),  # in sys.modules: diffusers takes it
    (dict(_class_name="Zen"), "_class_name 'Zen' is not a diffusers or stepdistill pipeline class"),
    (dict(_class_name=["pipeline", "MyPipeline"]), "_class_name ['pipeline', 'MyPipeline']"),  # custom code
], ids=["module", "sys-modules", "class", "custom-pipeline"])
def test_pipeline_folders_naming_foreign_classes_import_nothing(world, tmp_path, capsys, fields, needle):
    crafted = _crafted_pipeline(world, tmp_path / "crafted", **fields)
    with pytest.raises(ModelFolderError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_pipeline_folder(crafted)
    with pytest.raises(ModelFolderError, match="not a"):
        HybridDiversityPipeline.from_pipelines(crafted, world / "pipe")
    ref = make_reference(world / "images", build_feature_extractor(CUSTOM), progress=False)
    ref.save(tmp_path / "ref.npz")
    code, stdout, err = _calc(["--ref", str(tmp_path / "ref.npz"), "--features", CUSTOM, "--pipeline", str(crafted),
                               "--class_labels", "reference"], capsys)  # fmt: skip
    _one_line_error(code, err, needle)
    assert ZEN not in stdout and "this" not in sys.modules

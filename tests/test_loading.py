"""Loading teachers from local diffusers folders, and clear errors for folders that are not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from stepdistill import (
    Conditioning,
    DiTDenoiser,
    FlowSchedule,
    SD3TransformerDenoiser,
    UNet2DDenoiser,
    VPSchedule,
)
from stepdistill.loading import (
    ModelFolderError,
    load_denoiser,
    model_folder,
    resolve_model_folder,
    teacher_guidance_scale,
)


def save_pipeline(root: Path, network, scheduler, subfolder: str = "unet") -> Path:
    """Write a minimal pipeline folder: model_index.json, the network and the scheduler."""
    root.mkdir(parents=True, exist_ok=True)
    index = {
        "_class_name": "DiffusionPipeline",
        subfolder: ["diffusers", type(network).__name__],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    network.save_pretrained(root / subfolder)
    scheduler.save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def unet_pipeline(tmp_path_factory):
    unet = tm.unet2d(class_conditional=True)
    sched = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    return save_pipeline(tmp_path_factory.mktemp("teacher"), unet, sched), unet


def test_load_a_pipeline_folder(unet_pipeline):
    root, unet = unet_pipeline
    den = load_denoiser(root)
    assert isinstance(den, UNet2DDenoiser) and not den.model.training
    assert isinstance(den.schedule, VPSchedule) and den.prediction_type == "v_prediction"
    x = torch.randn(2, tm.C, tm.H, tm.W)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        out = den(x, 500, Conditioning(class_labels=labels))
        ref = unet(x, torch.tensor([500, 500]), class_labels=labels).sample
    torch.testing.assert_close(out.model_output, ref)


def test_load_a_model_folder_beside_its_scheduler(unet_pipeline):
    root, _ = unet_pipeline
    assert resolve_model_folder(root / "unet") == (root / "unet", root / "scheduler")
    den = load_denoiser(root / "unet", prediction_type="sample", torch_dtype=torch.bfloat16)
    assert den.prediction_type == "sample" and den.dtype == torch.bfloat16


def test_load_transformer_folders(tmp_path):
    sd3 = save_pipeline(
        tmp_path / "sd3", tm.sd3_transformer(), FlowMatchEulerDiscreteScheduler(shift=3.0), "transformer"
    )
    den = load_denoiser(sd3)
    assert isinstance(den, SD3TransformerDenoiser)
    assert isinstance(den.schedule, FlowSchedule) and den.schedule.shift == 3.0 and den.prediction_type == "flow"

    dit = save_pipeline(tmp_path / "dit", tm.dit(), DDIMScheduler(), "transformer")
    den = load_denoiser(dit)  # diffusers may remap Transformer2DModel to DiTTransformer2DModel
    assert isinstance(den, DiTDenoiser)
    out = den(torch.randn(2, tm.C, tm.H, tm.W), 10, Conditioning(class_labels=torch.tensor([0, 1])))
    assert out.x0.shape == (2, tm.C, tm.H, tm.W)


# --------------------------------------------------------------------------------------------------
# bad folders


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist.*local folders only"):
        load_denoiser(tmp_path / "nope")


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFolderError, match="is a file"):
        load_denoiser(tmp_path / "model.safetensors")


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelFolderError, match="not a diffusers folder.*model_index.json.*config.json"):
        load_denoiser(tmp_path)
    assert issubclass(ModelFolderError, ValueError)


def test_pipeline_folder_without_a_denoiser(tmp_path, unet_pipeline):
    root, _ = unet_pipeline
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline"}))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ModelFolderError, match=r"pipeline folder but has none of \['unet', 'transformer'"):
        load_denoiser(tmp_path)


def test_a_network_that_is_not_a_denoiser(tmp_path, unet_pipeline):
    root, _ = unet_pipeline
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    (pipe / "unet").mkdir()
    (pipe / "unet" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(
        (root / "scheduler" / "scheduler_config.json").read_text()
    )
    with pytest.raises(ModelFolderError, match="'AutoencoderKL', which is not a denoising network.*from_model"):
        load_denoiser(pipe)
    # a transformers config (no _class_name) is not a diffusers model
    (pipe / "unet" / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"]}))
    with pytest.raises(ModelFolderError, match="without `_class_name`: it is not a diffusers model"):
        load_denoiser(pipe)
    (pipe / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        load_denoiser(pipe)


def test_model_folder_without_scheduler(tmp_path):
    tm.unet2d().save_pretrained(tmp_path / "unet")
    with pytest.raises(ModelFolderError, match="no scheduler/ folder beside it"):
        load_denoiser(tmp_path / "unet")


def test_scheduler_with_unknown_prediction_type(tmp_path, unet_pipeline):
    root, _ = unet_pipeline
    with pytest.raises(ValueError, match="Unknown prediction type 'x0'"):
        load_denoiser(root, prediction_type="x0")


def test_digits_alias_names_the_shipped_teacher(tmp_path, monkeypatch):
    """``--teacher digits`` works for a pip-installed package: the alias is resolved in loading.model_folder."""
    from stepdistill.data.digits_models import teacher_path
    from stepdistill.evaluation.sources import load_pipeline

    assert model_folder("digits") == teacher_path()
    assert resolve_model_folder("digits") == (teacher_path() / "unet", teacher_path() / "scheduler")
    assert teacher_guidance_scale("digits") == teacher_guidance_scale(teacher_path()) is not None
    assert load_denoiser("digits").schedule.prediction_type == "v_prediction"
    assert type(load_pipeline("digits")).__name__ == "StepDistillPipeline"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # the alias wins; a local folder of that name is ./digits
    assert model_folder("digits") == teacher_path() and model_folder("./digits") == Path("digits")
    assert model_folder("~/x") == Path.home() / "x"

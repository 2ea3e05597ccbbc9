"""Control transfer: LoRAs moved between networks of one architecture (stepdistill.control, `stepdistill sample`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny_models import NUM_CLASSES, unet2d, unet2d_condition

from stepdistill.control import (
    LORA_INFO_NAME,
    LORA_WEIGHT_NAME,
    LoraCompatibilityError,
    LoraFolderError,
    LoraWeights,
    active_adapters,
    add_lora,
    apply_lora,
    load_lora,
    loaded_adapters,
    lora_applied,
    remove_lora,
    save_lora,
    set_lora_scale,
)

TARGETS = ["conv1", "conv2", "time_emb_proj", "to_q", "to_k", "to_v"]


def _inputs(kind: str, n: int = 3):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 2, 8, 8, generator=g)
    t = torch.tensor([10, 400, 900][:n])
    if kind == "unet2d":
        return x, t, {"class_labels": torch.arange(n) % (NUM_CLASSES + 1)}
    return x, t, {"encoder_hidden_states": torch.randn(n, 5, 12, generator=g)}


def _build(kind: str):
    return unet2d(class_conditional=True) if kind == "unet2d" else unet2d_condition()


def _run(model, kind: str) -> torch.Tensor:
    x, t, kw = _inputs(kind)
    with torch.no_grad():
        return model(x, t, **kw).sample


def _fine_tuned(model, seed: int = 1):
    """A 'student': the same architecture with every weight moved (a full fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return out


def _trained_lora(model, rank: int = 4, alpha: float = 8.0, seed: int = 2) -> LoraWeights:
    """Inject a LoRA into ``model`` and give it random non-zero weights (as training would)."""
    params = add_lora(model, rank=rank, alpha=alpha, target_modules=TARGETS, adapter_name="style")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return LoraWeights.from_model(model, "style", info={"base_model": "model-A"})


def _merged_copy(model, lora: LoraWeights, scale: float):
    """Reference: ``W + scale * alpha / r * B @ A`` written into a plain copy of ``model``."""
    out = copy.deepcopy(model)
    r, alpha = lora.config["r"], lora.config["lora_alpha"]
    with torch.no_grad():
        for name in lora.module_names:
            a, b = lora.state_dict[f"{name}.lora_A.weight"], lora.state_dict[f"{name}.lora_B.weight"]
            w = out.get_submodule(name).weight
            delta = (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
            w.add_(scale * alpha / r * delta)
    return out


@pytest.mark.parametrize("kind", ["unet2d", "unet2d_condition"])
def test_lora_from_a_loads_into_b_and_back(kind):
    a = _build(kind)
    b = _fine_tuned(a)
    ref_a, ref_b = _run(a, kind), _run(b, kind)
    lora = _trained_lora(a)
    assert lora.prefix == "unet" and lora.config["r"] == 4 and len(lora.module_names) >= 4

    expected = _run(_merged_copy(b, lora, 0.5), kind)
    apply_lora(b, lora, scale=0.5)
    assert torch.allclose(_run(b, kind), expected, atol=1e-5)
    assert (_run(b, kind) - ref_b).abs().max() > 1e-3
    assert not any(p.requires_grad for n, p in b.named_parameters() if "lora_" in n)

    # the reverse: a LoRA made on the fine-tune goes into a fresh copy of the base
    back = LoraWeights.from_model(b, "control")
    base = _build(kind)
    assert torch.equal(_run(base, kind), ref_a)
    apply_lora(base, back, scale=1.0)
    assert torch.allclose(_run(base, kind), _run(_merged_copy(_build(kind), back, 1.0), kind), atol=1e-5)


@pytest.mark.parametrize("kind", ["unet2d", "unet2d_condition"])
def test_scale_zero_and_removal_restore_bitwise(kind):
    a, b = _build(kind), _fine_tuned(_build(kind))
    lora = _trained_lora(a)
    ref = _run(b, kind)
    keys = list(b.state_dict())
    types = [type(m) for m in b.modules()]

    apply_lora(b, lora, scale=1.0, adapter_name="style")
    out1 = _run(b, kind)
    set_lora_scale(b, 0.0, "style")
    assert torch.equal(_run(b, kind), ref)
    set_lora_scale(b, 1.0, "style")
    assert torch.equal(_run(b, kind), out1)
    assert loaded_adapters(b) == ["style"]

    remove_lora(b, "style")
    assert torch.equal(_run(b, kind), ref)
    assert list(b.state_dict()) == keys and [type(m) for m in b.modules()] == types
    assert not hasattr(b, "peft_config") and loaded_adapters(b) == []
    with lora_applied(b, lora, scale=2.0):  # and again, through the context manager
        assert (_run(b, kind) - ref).abs().max() > 1e-3
    assert torch.equal(_run(b, kind), ref)


def test_other_adapters_survive_apply_and_remove():
    from stepdistill.adapters import adapter_parameters, inject_adapters

    net = _fine_tuned(_build("unet2d"))
    inject_adapters(net, ["generator"], rank=2)
    with torch.no_grad():
        for p in adapter_parameters(net, "generator"):
            p.normal_(0, 0.1)
    ref = _run(net, "unet2d")
    lora = _trained_lora(_build("unet2d"))
    apply_lora(net, lora, scale=1.0)
    assert set(active_adapters(net)) == {"generator", "control"}
    assert (_run(net, "unet2d") - ref).abs().max() > 1e-3
    remove_lora(net, "control")
    assert loaded_adapters(net) == ["generator"] and active_adapters(net) == ["generator"]
    assert torch.equal(_run(net, "unet2d"), ref)
    assert all(p.requires_grad for p in adapter_parameters(net, "generator"))


def test_mismatched_architecture_is_a_clear_error():
    lora = _trained_lora(_build("unet2d"))
    from diffusers import UNet2DModel

    wider = UNet2DModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(16, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=NUM_CLASSES + 1,
    )
    first_key = r"unet\.down_blocks\.0\.resnets\.0\.conv1\.lora_A\.weight"
    with pytest.raises(LoraCompatibilityError, match=first_key + r" has shape \(4, 8, 3, 3\).*Conv2d\(in=16, out=16, "
                       r"kernel=\(3, 3\)\), which needs \(r, 16, 3, 3\).*retrain it on this UNet2DModel"):
        apply_lora(wider, lora)
    assert loaded_adapters(wider) == [] and not hasattr(wider, "peft_config")

    other = _build("unet2d_condition")
    with pytest.raises(LoraCompatibilityError, match=r"targets module .* which this UNet2DConditionModel does not "
                       r"have.*trained on a UNet2DModel \(model-A\)"):
        apply_lora(other, lora)
    assert loaded_adapters(other) == []

    net = _build("unet2d")
    apply_lora(net, lora)
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'control'"):
        apply_lora(net, lora)


def test_save_load_round_trip_and_diffusers_format(tmp_path):
    a = _build("unet2d_condition")
    lora = _trained_lora(a)
    folder = save_lora(a, tmp_path / "lora", "style", info={"note": "round trip"})
    assert (folder / LORA_WEIGHT_NAME).is_file()
    info = json.loads((folder / LORA_INFO_NAME).read_text())
    assert info["note"] == "round trip" and info["base_model_class"] == "UNet2DConditionModel"
    loaded = load_lora(folder)
    assert loaded.state_dict.keys() == lora.state_dict.keys()
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in lora.state_dict.items())
    assert loaded.config["r"] == 4 and loaded.config["lora_alpha"] == 8
    assert sorted(loaded.config["target_modules"]) == sorted(TARGETS)

    # a stock SD pipeline reads the same folder with load_lora_weights (diffusers' LoRA loader mixin)
    from diffusers import DiffusionPipeline
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class _SDLike(DiffusionPipeline, StableDiffusionLoraLoaderMixin):  # StableDiffusionPipeline's LoRA loading
        _optional_components = ["text_encoder"]

        def __init__(self, unet, text_encoder=None):
            super().__init__()
            self.register_modules(unet=unet, text_encoder=text_encoder)

    student = _fine_tuned(_build("unet2d_condition"))
    ours = copy.deepcopy(student)
    pipe = _SDLike(student)
    pipe.load_lora_weights(str(folder), adapter_name="style")
    apply_lora(ours, folder, scale=1.0)
    assert torch.allclose(_run(pipe.unet, "unet2d_condition"), _run(ours, "unet2d_condition"), atol=1e-6)

    with pytest.raises(LoraFolderError, match="does not exist"):
        load_lora(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraFolderError, match="has no pytorch_lora_weights.safetensors"):
        load_lora(tmp_path / "empty")


def test_thicken_strokes():
    from stepdistill.trainers.style_lora import thicken_strokes

    x = -torch.ones(1, 1, 3, 4)
    x[0, 0, 1, 1] = 1.0
    x[0, 0, 0, 3] = 0.0  # half ink at the right border
    out = thicken_strokes(x, 2)
    expected = -torch.ones(1, 1, 3, 4)
    expected[0, 0, 1, 1:3] = 1.0
    expected[0, 0, 0, 3] = 0.0
    assert torch.equal(out, expected)
    assert torch.equal(thicken_strokes(x, 1), x)


def test_train_style_lora_changes_only_lora_params(tiny_teacher, tmp_path):
    from stepdistill.loading import load_denoiser
    from stepdistill.trainers.style_lora import StyleLoraConfig, train_style_lora

    config = StyleLoraConfig(teacher=str(tiny_teacher), output_dir=str(tmp_path / "style"), max_train_steps=3,
                             batch_size=8, rank=2, lora_alpha=2.0, lr_warmup_steps=1, log_every=1)
    result = train_style_lora(config)
    fresh = load_denoiser(tiny_teacher).model
    base = {n: p for n, p in fresh.named_parameters()}
    for name, p in result.network.named_parameters():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer", "")
        assert torch.equal(p, base[clean]), f"{name} changed"
    lora_b = [p for n, p in result.network.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at 0: these moved
    assert len(result.history) == 3

    lora = load_lora(result.folder)
    assert lora.info["train_config"]["max_train_steps"] == 3 and lora.info["base_model_class"] == "UNet2DModel"
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([100, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        ref = fresh(x, t, class_labels=labels).sample
        apply_lora(fresh, lora)
        styled = fresh(x, t, class_labels=labels).sample
        trained = result.network(x, t, class_labels=labels).sample
        remove_lora(fresh)
        assert torch.allclose(styled, trained, atol=1e-6) and (styled - ref).abs().max() > 0
        assert torch.equal(fresh(x, t, class_labels=labels).sample, ref)


def _student_folder(teacher: Path, out: Path) -> Path:
    from diffusers import LCMScheduler

    from stepdistill.data.digits_models import teacher_scheduler
    from stepdistill.loading import load_network
    from stepdistill.pipelines import StepDistillPipeline

    unet = _fine_tuned(load_network(teacher / "unet"))
    pipe = StepDistillPipeline(unet=unet, scheduler=LCMScheduler.from_config(teacher_scheduler().config),
                               null_class_label=10, default_timesteps=[999, 499])
    pipe.save_pretrained(out)
    return out


def test_cli_train_and_transfer_end_to_end(tiny_teacher, tmp_path, capsys):
    from PIL import Image

    from stepdistill.commands.sample import main  # the stepdistill-sample console script

    lora_dir = tmp_path / "style"
    assert main(["train-style-lora", "--teacher", str(tiny_teacher), "--output_dir", str(lora_dir),
                 "--max_train_steps", "2", "--batch_size", "4", "--rank", "2", "--lora_alpha", "2"]) == 0
    student = _student_folder(tiny_teacher, tmp_path / "run" / "student")
    png, js = tmp_path / "grid.png", tmp_path / "t.json"
    rc = main(["transfer", "--lora", str(lora_dir), "--model", f"teacher={tiny_teacher}", "--model", str(student),
               "--scales", "0.5,1", "--classes", "0-2", "--per_class", "2", "--num_inference_steps", "3",
               "--output", str(png), "--json", str(js)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| teacher | 3 | none |" in text and "| run | 2 | 1 |" in text
    grid = Image.open(png)
    assert grid.size == (150 + 2 + 6 * (32 + 2), 6 * (2 + 32 + 2))  # 2 models x 3 rows of six 8x8 samples, x4
    summary = json.loads(js.read_text())
    assert [r["name"] for r in summary] == ["teacher", "run"] and all(r["restored_bitwise"] for r in summary)
    assert set(summary[0]["stats"]) == {"0.0", "0.5", "1.0"} and "accuracy" in summary[0]["stats"]["1.0"]


def test_cli_reports_incompatible_lora(tmp_path, capsys):
    from stepdistill.commands.sample import main

    a = _build("unet2d_condition")
    _trained_lora(a)
    folder = save_lora(a, tmp_path / "sd_lora", "style")
    from stepdistill.data.digits_models import teacher_path

    with pytest.raises(SystemExit) as exc:
        main(["transfer", "--lora", str(folder), "--model", str(teacher_path()), "--output", str(tmp_path / "g.png")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "stepdistill-sample transfer: error: LoRA key unet." in err and "UNet2DModel" in err

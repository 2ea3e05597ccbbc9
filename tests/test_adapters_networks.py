"""Named adapters on one network, the two network layouts, and the critic / discriminator networks."""

from __future__ import annotations

import copy

import pytest
import torch

from stepdistill import Conditioning
from stepdistill.adapters import FullCopies, NamedAdapters, SharedBaseAdapters, adapter_parameters
from stepdistill.loading import load_denoiser
from stepdistill.networks import FeatureDiscriminator


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(n, 1, 8, 8, generator=g), torch.full((n,), 300.0, dtype=torch.float64),
            Conditioning(class_labels=torch.arange(n), null_class_label=10))


def _perturb(params):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)


def test_named_adapters_activate_save_load_add_and_merge(tiny_teacher, tmp_path):
    teacher = load_denoiser(tiny_teacher)
    adapters = NamedAdapters(copy.deepcopy(teacher.model), teacher.schedule, rank=2, names=["e0", "e1", "e2"])
    x, t, cond = _inputs()
    with torch.no_grad():
        ref = teacher(x, t, cond).x0
        assert all(torch.allclose(adapters.view(n)(x, t, cond).x0, ref, atol=1e-6) for n in adapters.names)
    _perturb(adapters.parameters("e1"))
    with torch.no_grad():
        e1 = adapters.view("e1")(x, t, cond).x0
        assert (e1 - ref).abs().max() > 1e-3
        assert torch.equal(adapters.view(None)(x, t, cond).x0, adapters.view(None)(x, t, cond).x0)
        torch.testing.assert_close(adapters.view(None)(x, t, cond).x0, ref, rtol=0, atol=1e-6)
    path = adapters.save("e1", tmp_path / "e1.safetensors")
    other = NamedAdapters(copy.deepcopy(teacher.model), teacher.schedule, rank=2, names=["x"])
    other.load("x", path)
    with torch.no_grad():
        torch.testing.assert_close(other.view("x")(x, t, cond).x0, e1, rtol=0, atol=1e-6)
    wrong = NamedAdapters(copy.deepcopy(teacher.model), teacher.schedule, rank=3, names=["x"])
    with pytest.raises(ValueError, match="rank-2"):
        wrong.load("x", path)
    for p in adapters.parameters("e0"):  # a finished expert stays frozen when another adapter is added
        p.requires_grad_(False)
    adapters.add("e3")
    assert not any(p.requires_grad for p in adapters.parameters("e0"))
    assert all(p.requires_grad for p in adapters.parameters("e3") + adapters.parameters("e1"))
    merged = adapters.merged("e1")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        from stepdistill import Denoiser

        torch.testing.assert_close(Denoiser.from_model(merged, teacher.schedule)(x, t, cond).x0, e1,
                                   rtol=1e-5, atol=1e-5)


def test_bf16_shared_base_merges_onto_fp32_weights(tiny_teacher):
    teacher = load_denoiser(tiny_teacher)
    fp32 = dict(copy.deepcopy(teacher.model).named_parameters())
    layout = SharedBaseAdapters(teacher, ["g"], rank=2, base_dtype=torch.bfloat16, base_weights=lambda: fp32)
    net = layout.standalone("g", layout.network("g"))
    untouched = [n for n in fp32 if n.startswith("conv_in.")]
    assert untouched and all(torch.equal(dict(net.named_parameters())[n], fp32[n]) for n in untouched)


def test_layouts_give_the_same_roles_behind_one_interface(tiny_teacher):
    teacher = load_denoiser(tiny_teacher)
    full = FullCopies(teacher)
    g = full.network("g")
    assert g.model is not teacher.model and all(p.requires_grad for p in g.parameters())
    shared = SharedBaseAdapters(teacher, ["g"], rank=2)
    view = shared.network("h")  # a role added after construction
    assert {id(p) for p in view.parameters()} == {id(p) for p in adapter_parameters(shared.adapters.network, "h")}
    assert shared.teacher.model is view.model and not list(shared.teacher.parameters())
    with pytest.raises(ValueError, match="full copies"):
        shared.network("k", init=teacher.model)


def test_feature_discriminator_trains_only_its_heads():
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16))
    disc = FeatureDiscriminator(extractor, feature_dims=16, hidden=8)
    assert {n.split(".")[0] for n, _ in disc.named_parameters()} == {"heads"}
    assert all(k.startswith("heads.") for k in disc.state_dict())
    images = torch.randn(4, 1, 8, 8, requires_grad=True)
    logits = disc(images)
    assert logits.shape == (4,)
    logits.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # the generator's loss reaches the images
    assert all(p.grad is None for p in extractor.parameters())
    disc.to(torch.float64)
    assert extractor[1].weight.dtype == torch.float64  # .to() moves the unregistered extractor too


def test_adapter_names_that_look_like_module_path_segments(tiny_teacher):
    teacher = load_denoiser(tiny_teacher)
    adapters = NamedAdapters(copy.deepcopy(teacher.model), teacher.schedule, rank=2, names=["0", "1"])
    zero, one = ({id(p) for p in adapters.parameters(n)} for n in ("0", "1"))
    assert zero and one and not zero & one  # "0" does not match down_blocks.0.* of adapter "1"
    assert set(adapters.state_dict("0")) == set(adapters.state_dict("1"))
    assert all(".lora_" in k and ".0." not in k.split(".lora_")[1] for k in adapters.state_dict("0"))

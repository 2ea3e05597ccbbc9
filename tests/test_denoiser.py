"""One denoiser interface over every teacher kind, classifier-free guidance, and conditioning errors.

Each teacher kind is a tiny diffusers model built from a config. For each we check that the wrapper
calls the network exactly as a hand-written diffusers call does, and that x0 / eps follow from the
raw output by the documented formulas computed here independently of ``stepdistill.schedules``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import tiny_models as tm
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.models.attention_processor import Attention
from torch import nn

from stepdistill import (
    CallableDenoiser,
    Conditioning,
    Denoiser,
    DiTDenoiser,
    NoiseSchedule,
    SD3TransformerDenoiser,
    UNet2DConditionDenoiser,
    UNet2DDenoiser,
    cfg,
    guided_denoise,
)

B = 2


def vp_schedule(prediction_type: str) -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(DDPMScheduler(beta_schedule="scaled_linear").config, prediction_type)


def flow_schedule(shift: float = 3.0) -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(FlowMatchEulerDiscreteScheduler(shift=shift).config)


def class_cond(null=tm.NULL_CLASS, labels=(0, 3)) -> Conditioning:
    return Conditioning(class_labels=torch.tensor(labels), null_class_label=null)


@dataclass
class Kind:
    """A teacher kind: how to build it, its schedule and conditioning, and a direct diffusers call."""

    build: Callable[[], nn.Module]
    schedule: Callable[[], NoiseSchedule]
    cond: Callable[[], Conditioning | None]
    call: Callable  # (model, x, network timestep, cond) -> raw output
    wrapper: type
    timesteps: tuple[float, ...] = (999.0, 250.0)


KINDS = {
    "unet2d": Kind(
        lambda: tm.unet2d(),
        lambda: vp_schedule("epsilon"),
        lambda: None,
        lambda m, x, t, c: m(x, t).sample,
        UNet2DDenoiser,
    ),
    "unet2d_class": Kind(
        lambda: tm.unet2d(class_conditional=True),
        lambda: vp_schedule("v_prediction"),
        class_cond,
        lambda m, x, t, c: m(x, t, class_labels=c.class_labels).sample,
        UNet2DDenoiser,
    ),
    "sd15": Kind(
        lambda: tm.unet2d_condition(),
        lambda: vp_schedule("epsilon"),
        lambda: tm.text_cond(B),
        lambda m, x, t, c: m(x, t, encoder_hidden_states=c.prompt_embeds).sample,
        UNet2DConditionDenoiser,
    ),
    "sdxl": Kind(
        lambda: tm.unet2d_condition(sdxl=True),
        lambda: vp_schedule("epsilon"),
        lambda: tm.text_cond(B, sdxl=True),
        lambda m, x, t, c: (
            m(
                x,
                t,
                encoder_hidden_states=c.prompt_embeds,
                added_cond_kwargs={"text_embeds": c.pooled_prompt_embeds, "time_ids": c.time_ids},
            ).sample
        ),
        UNet2DConditionDenoiser,
    ),
    "sd3": Kind(
        lambda: tm.sd3_transformer(),
        lambda: flow_schedule(3.0),
        lambda: tm.text_cond(B, pooled=True),
        lambda m, x, t, c: (
            m(
                hidden_states=x,
                encoder_hidden_states=c.prompt_embeds,
                pooled_projections=c.pooled_prompt_embeds,
                timestep=t.float(),
            ).sample
        ),
        SD3TransformerDenoiser,
        timesteps=(1000.0, 376.25),
    ),
    "dit": Kind(
        lambda: tm.dit(),
        lambda: vp_schedule("epsilon"),
        lambda: class_cond(null=tm.DIT_CLASSES, labels=(1, 5)),
        # learned sigma: the first C channels are the mean (eps) prediction
        lambda m, x, t, c: m(hidden_states=x, timestep=t, class_labels=c.class_labels).sample[:, : tm.C],
        DiTDenoiser,
    ),
    "custom": Kind(
        lambda: tm.TinyCustom(),
        lambda: vp_schedule("sample"),
        class_cond,
        lambda m, x, t, c: m(x, t, c),
        CallableDenoiser,
    ),
}
CONDITIONAL = [k for k in KINDS if k != "unet2d"]


def hand_x0_eps(schedule: NoiseSchedule, raw: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
    """The conversion table of the methods README, written out without NoiseSchedule.to_x0_eps."""
    x, y = x.double(), raw.double()
    if schedule.family == "vp":
        abar = DDPMScheduler(beta_schedule="scaled_linear").alphas_cumprod.double()[t.long()]
        a, s = abar.sqrt()[:, None, None, None], (1 - abar).sqrt()[:, None, None, None]
    else:
        s = (t.double() / 1000)[:, None, None, None]
        a = 1 - s
    kind = schedule.prediction_type
    if kind == "epsilon":
        return (x - s * y) / a, y
    if kind == "v_prediction":
        return a * x - s * y, s * x + a * y
    if kind == "sample":
        return y, (x - a * y) / s
    return x - s * y, x + (1 - s) * y  # flow


def inputs(kind: Kind, seed: int = 0):
    x = torch.randn(B, tm.C, tm.H, tm.W, generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor(kind.timesteps)


@pytest.fixture(scope="module")
def denoisers():
    """Build every tiny teacher once for the module."""
    return {name: Denoiser.from_model(kind.build(), kind.schedule()) for name, kind in KINDS.items()}


# --------------------------------------------------------------------------------------------------
# every teacher kind


@pytest.mark.parametrize("name", list(KINDS))
def test_every_teacher_kind(name, denoisers):
    kind, den = KINDS[name], denoisers[name]
    assert type(den) is kind.wrapper
    x, t = inputs(kind)
    cond = kind.cond()
    with torch.no_grad():
        out = den(x, t, cond)
        raw = kind.call(den.model, x, den.schedule.model_timestep(t.double()), cond)
    assert out.x0.shape == x.shape and out.eps.shape == x.shape and out.x0.dtype == torch.float32
    # the wrapper calls the network as diffusers does ...
    torch.testing.assert_close(out.model_output, raw, atol=1e-6, rtol=1e-6)
    # ... and x0 / eps follow from the raw output by the documented formulas
    x0, eps = hand_x0_eps(den.schedule, raw, x, t)
    torch.testing.assert_close(out.x0, x0.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.eps, eps.float(), atol=1e-5, rtol=1e-5)
    # consistency: alpha x0 + sigma eps gives back x_t
    torch.testing.assert_close(den.schedule.add_noise(out.x0, out.eps, t), x, atol=1e-5, rtol=1e-5)
    # a scalar timestep means the same timestep for the whole batch
    with torch.no_grad():
        scalar = den(x, float(t[0]), cond)
        vector = den(x, t[:1].expand(B), cond)
    torch.testing.assert_close(scalar.x0, vector.x0)


def test_dit_learned_sigma_channels_are_dropped(denoisers):
    den = denoisers["dit"]
    x, t = inputs(KINDS["dit"])
    with torch.no_grad():
        full = den.model(hidden_states=x, timestep=t.long(), class_labels=torch.tensor([1, 5])).sample
        out = den(x, t, class_cond(null=tm.DIT_CLASSES, labels=(1, 5)))
    assert full.shape[1] == 2 * tm.C and out.model_output.shape[1] == tm.C
    torch.testing.assert_close(out.model_output, full[:, : tm.C])


def test_custom_callable_with_declared_prediction_type():
    """A plain function works too; its prediction type is the schedule's (checked against the override)."""
    schedule = flow_schedule(1.0)
    schedule_sample = NoiseSchedule.from_scheduler_config(schedule.scheduler_config, prediction_type="sample")

    def half(x, timestep, cond):
        assert timestep.dtype == torch.float32 and timestep.shape == (x.shape[0],)
        return 0.5 * x

    den = Denoiser.from_model(half, schedule_sample, prediction_type="sample")
    assert isinstance(den, CallableDenoiser) and den.prediction_type == "sample"
    x = torch.randn(3, 2, 4, 4)
    out = den(x, 400.0)
    torch.testing.assert_close(out.x0, 0.5 * x)
    torch.testing.assert_close(out.eps, (x - 0.6 * 0.5 * x) / 0.4)

    # an object with a .sample attribute (a diffusers-style output) is unwrapped
    @dataclass
    class Out:
        sample: torch.Tensor

    den = Denoiser.from_model(lambda x, t, c: Out(x), schedule)
    torch.testing.assert_close(den(x, 1000.0).x0, x - 1.0 * x)


def test_denoiser_is_differentiable():
    """Trainers backpropagate through x0 (the float64 conversion must keep the graph)."""
    module = tm.TinyCustom().train()
    den = Denoiser.from_model(module, vp_schedule("v_prediction"))
    out = den(torch.randn(2, tm.C, tm.H, tm.W), 500, class_cond())
    out.x0.square().mean().backward()
    assert module.conv.weight.grad is not None and module.conv.weight.grad.abs().sum() > 0


def test_bf16_teacher(denoisers):
    """A bf16 teacher takes float32 latents and conditioning; x0 / eps come back in float32."""
    ref = denoisers["sdxl"]
    den = Denoiser.from_model(tm.unet2d_condition(sdxl=True).to(torch.bfloat16), ref.schedule)
    assert den.dtype == torch.bfloat16
    x, t = inputs(KINDS["sdxl"])
    cond = tm.text_cond(B, sdxl=True)
    with torch.no_grad():
        out, out32 = den(x, t, cond), ref(x, t, cond)
    assert out.x0.dtype == torch.float32 and out.model_output.dtype == torch.bfloat16
    torch.testing.assert_close(out.model_output.float(), out32.model_output, atol=0.05, rtol=0.05)
    # the conversion uses the float32 x_t, not its bf16 copy
    x0, _ = hand_x0_eps(den.schedule, out.model_output, x, t)
    torch.testing.assert_close(out.x0, x0.float(), atol=1e-5, rtol=1e-5)


def test_layerwise_casting_runs_in_the_compute_dtype(denoisers):
    """float8 storage, bf16 compute (diffusers' layerwise casting): inputs go in as bf16, never as float8."""
    schedule = denoisers["sd15"].schedule
    net = tm.unet2d_condition()
    net.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    den = Denoiser.from_model(net, schedule)
    assert den.dtype == torch.bfloat16 and next(net.parameters()).dtype == torch.float8_e4m3fn
    rounded = tm.unet2d_condition()  # the float32 network with the weights as they are stored
    with torch.no_grad():
        for p, q in zip(rounded.parameters(), net.parameters()):
            p.copy_(q.float())
    x, t = inputs(KINDS["sd15"])
    cond = tm.text_cond(B)
    with torch.no_grad():
        out, want = den(x, t, cond), Denoiser.from_model(rounded, schedule)(x, t, cond)
    assert out.model_output.dtype == torch.bfloat16 and torch.isfinite(out.x0).all()
    torch.testing.assert_close(out.model_output.float(), want.model_output, atol=0.05, rtol=0.05)


class TaggedProcessor:
    """Wraps an attention processor and records the ``tag`` attention kwarg it is called with."""

    def __init__(self, inner, log: list) -> None:
        self.inner, self.log = inner, log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, tag=None, **kwargs):
        self.log.append(tag)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


@pytest.mark.parametrize("name", ["sd15", "sd3", "dit"])
def test_attention_kwargs_reach_the_attention_processors(name):
    kind, log = KINDS[name], []
    net = kind.build()
    layers = [m for m in net.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.set_processor(TaggedProcessor(layer.processor, log))
    x, t = inputs(kind)
    with torch.no_grad():
        Denoiser.from_model(net, kind.schedule(), attention_kwargs={"tag": 7})(x, t, kind.cond())
        assert len(log) == len(layers) > 0 and set(log) == {7}
        Denoiser.from_model(net, kind.schedule())(x, t, kind.cond())
    assert log.count(None) == len(layers)
    with pytest.raises(ValueError, match="takes no attention kwargs"):
        Denoiser.from_model(tm.unet2d(), vp_schedule("epsilon"), attention_kwargs={"scale": 0.5})


# --------------------------------------------------------------------------------------------------
# classifier-free guidance


def hand_uncond(name: str, cond: Conditioning) -> Conditioning:
    """The unconditional twin written out: null class for labels, zero embeddings, same time ids."""
    if cond.class_labels is not None:
        return Conditioning(class_labels=torch.full_like(cond.class_labels, cond.null_class_label))
    zeros = lambda v: None if v is None else torch.zeros_like(v)  # noqa: E731
    return Conditioning(
        prompt_embeds=zeros(cond.prompt_embeds),
        pooled_prompt_embeds=zeros(cond.pooled_prompt_embeds),
        time_ids=cond.time_ids,
    )


@pytest.mark.parametrize("name", CONDITIONAL)
def test_cfg_matches_two_separate_calls(name, denoisers):
    kind, den = KINDS[name], denoisers[name]
    x, t = inputs(kind, seed=3)
    cond = kind.cond()
    with torch.no_grad():
        c = den(x, t, cond)
        u = den(x, t, hand_uncond(name, cond))
        guided = guided_denoise(den, x, t, cond, guidance_scale=3.5)
        w1 = guided_denoise(den, x, t, cond, guidance_scale=1.0)
        w0 = guided_denoise(den, x, t, cond, guidance_scale=0.0)
    # uncond + w * (cond - uncond), by hand
    torch.testing.assert_close(guided.x0, u.x0 + 3.5 * (c.x0 - u.x0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(guided.eps, u.eps + 3.5 * (c.eps - u.eps), atol=1e-4, rtol=1e-4)
    # guidance is the same in raw-output space (conversions are affine at fixed x_t, t)
    raw_guided = cfg(u.model_output, c.model_output, 3.5)
    x0_from_raw, _ = den.schedule.to_x0_eps(raw_guided, x, t)
    torch.testing.assert_close(guided.x0, x0_from_raw, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(c.x0, u.x0, atol=1e-3), "conditioning has no effect: the test would be vacuous"
    # w = 1 is conditional only (one call, exact); w = 0 is unconditional
    torch.testing.assert_close(w1.x0, c.x0, atol=0, rtol=0)
    torch.testing.assert_close(w0.x0, u.x0, atol=1e-5, rtol=1e-5)


def test_cfg_with_an_explicit_negative(denoisers):
    den = denoisers["sd15"]
    x, t = inputs(KINDS["sd15"], seed=4)
    positive, negative = tm.text_cond(B, seed=1), tm.text_cond(B, seed=2)
    cond = Conditioning(prompt_embeds=positive.prompt_embeds, negative=negative)
    with torch.no_grad():
        c, u = den(x, t, positive), den(x, t, negative)
        guided = guided_denoise(den, x, t, cond, guidance_scale=2.0)
    torch.testing.assert_close(guided.x0, u.x0 + 2.0 * (c.x0 - u.x0), atol=1e-4, rtol=1e-4)


def test_cfg_convention():
    uncond, cond = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert cfg(uncond, cond, 1.0).tolist() == cond.tolist()
    assert cfg(uncond, cond, 0.0).tolist() == uncond.tolist()
    assert cfg(uncond, cond, 4.0).tolist() == [9.0, -2.0]  # FastVideo's s = 3 is w = 4 here


# --------------------------------------------------------------------------------------------------
# conditioning object


def test_conditioning_twin_and_batch_helpers():
    cond = Conditioning(class_labels=torch.tensor([3, 1, 2]), null_class_label=10)
    assert cond.unconditional().class_labels.tolist() == [10, 10, 10]
    assert cond.select([2, 0]).class_labels.tolist() == [2, 3]
    assert cond.repeat(2).class_labels.tolist() == [3, 3, 1, 1, 2, 2]
    text = tm.text_cond(2, sdxl=True)
    twin = text.unconditional()
    assert twin.prompt_embeds.abs().sum() == 0 and twin.pooled_prompt_embeds.abs().sum() == 0
    assert torch.equal(twin.time_ids, text.time_ids)
    both = Conditioning.cat([text, twin])
    assert both.batch_size == 4
    half = text.to(dtype=torch.bfloat16)
    assert half.prompt_embeds.dtype == torch.bfloat16
    assert cond.to(dtype=torch.bfloat16).class_labels.dtype == torch.long
    assert Conditioning().is_empty and Conditioning().unconditional().is_empty


def test_conditioning_errors():
    with pytest.raises(ValueError, match="disagree on the batch size"):
        Conditioning(class_labels=torch.tensor([1, 2]), prompt_embeds=torch.zeros(3, 5, 12))
    with pytest.raises(ValueError, match="must have a batch dimension"):
        Conditioning(class_labels=torch.tensor(3))
    with pytest.raises(TypeError, match="class_labels must be a tensor, got list"):
        Conditioning(class_labels=[1, 2])
    with pytest.raises(ValueError, match="needs the model's null class"):
        Conditioning(class_labels=torch.tensor([1])).unconditional()
    with pytest.raises(ValueError, match="negative conditioning has batch size 1"):
        Conditioning(prompt_embeds=torch.zeros(2, 5, 12), negative=Conditioning(prompt_embeds=torch.zeros(1, 5, 12)))
    with pytest.raises(ValueError, match="different fields"):
        Conditioning.cat([class_cond(), tm.text_cond(2)])


# --------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "name,cond,message",
    [
        (
            "unet2d",
            class_cond(),
            r"UNet2DModel does not take conditioning field\(s\) \['class_labels'\].*unconditional",
        ),
        ("unet2d_class", None, r"UNet2DModel needs conditioning field\(s\) \['class_labels'\].*has none"),
        ("sd15", class_cond(), r"UNet2DConditionModel needs conditioning field\(s\) \['prompt_embeds'\]"),
        ("sd15", tm.text_cond(B, pooled=True), r"does not take conditioning field\(s\) \['pooled_prompt_embeds'\]"),
        ("sdxl", tm.text_cond(B, pooled=True), r"needs conditioning field\(s\) \['time_ids'\]"),
        ("sdxl", tm.text_cond(B), r"needs conditioning field\(s\) \['pooled_prompt_embeds', 'time_ids'\]"),
        ("sd3", tm.text_cond(B), r"SD3Transformer2DModel needs conditioning field\(s\) \['pooled_prompt_embeds'\]"),
        ("dit", None, r"needs conditioning field\(s\) \['class_labels'\]"),
        ("unet2d_class", class_cond(labels=(1, 2, 3)), "Conditioning batch size 3 does not match the input batch 2"),
        ("sdxl", tm.text_cond(3, sdxl=True), "Conditioning batch size 3 does not match the input batch 2"),
    ],
)
def test_conditioning_that_does_not_fit_the_model(name, cond, message, denoisers):
    x, t = inputs(KINDS[name])
    with pytest.raises(ValueError, match=message):
        denoisers[name](x, t, cond)


def test_bad_wrapper_inputs(denoisers):
    schedule = vp_schedule("epsilon")
    with pytest.raises(ValueError, match="Unknown prediction type 'x0'"):
        Denoiser.from_model(tm.TinyCustom(), schedule, prediction_type="x0")
    with pytest.raises(ValueError, match="disagrees with the schedule's 'epsilon'"):
        Denoiser.from_model(tm.TinyCustom(), schedule, prediction_type="v_prediction")
    with pytest.raises(TypeError, match="NoiseSchedule"):
        Denoiser.from_model(tm.TinyCustom(), DDPMScheduler())
    with pytest.raises(TypeError, match="must be callable"):
        CallableDenoiser(42, schedule)
    with pytest.raises(TypeError, match="must be a stepdistill Conditioning"):
        denoisers["unet2d_class"](torch.randn(2, 2, 8, 8), 10, {"class_labels": torch.tensor([1, 2])})
    with pytest.raises(ValueError, match=r"returned shape \(2, 3, 4, 4\) for input \(2, 2, 4, 4\)"):
        Denoiser.from_model(lambda x, t, c: torch.zeros(2, 3, 4, 4), schedule)(torch.zeros(2, 2, 4, 4), 10)
    with pytest.raises(ValueError, match="out of range"):
        denoisers["unet2d"](torch.randn(2, 2, 8, 8), 1000)
    with pytest.raises(ValueError, match="3 timesteps for a batch of 2"):
        denoisers["unet2d"](torch.randn(2, 2, 8, 8), torch.tensor([1, 2, 3]))

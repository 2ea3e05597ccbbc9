"""The lean hot paths: no per-call module walks through diffusers, no host reads in sampling and training steps.

No timings here (they live in ``eval/bench_speed.py``): these tests check what the speed work must not change --
the outputs, bit for bit -- and count the expensive lookups and host reads it removed.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys
import weakref

import pytest
import torch
from diffusers import LCMScheduler, UNet2DModel

from stepdistill import Conditioning, Denoiser, VPSchedule, initial_noise, make_generators
from stepdistill.data.digits_models import teacher_scheduler, teacher_unet
from stepdistill.pipelines import StepDistillPipeline
from stepdistill.trainers.dmd import DMDConfig, DMDTrainer

TINY = dict(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4)


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    model = teacher_unet(**TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _pipe(unet: UNet2DModel) -> StepDistillPipeline:
    pipe = StepDistillPipeline(unet=unet, scheduler=LCMScheduler.from_config(teacher_scheduler().config),
                               null_class_label=10)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def execution_device_reads(monkeypatch) -> dict[str, int]:
    """Count reads of diffusers' ``_execution_device`` (which walks every module of every component)."""
    reads = {"n": 0}
    original = StepDistillPipeline._execution_device

    def counted(self):
        reads["n"] += 1
        return original.fget(self)

    monkeypatch.setattr(StepDistillPipeline, "_execution_device", property(counted))
    return reads


@pytest.mark.parametrize("timesteps", [[999], [999, 749, 499, 249]])
@pytest.mark.parametrize("batch", [1, 16])
def test_output_is_the_network_passes_bit_for_bit(unet, timesteps, batch):
    """The pipeline adds nothing numerically: its output is the plain loop of forwards on the same noise, exactly.

    (Rows of a batch of 16 match single-image calls only to ~1e-6 on a CPU, as conv kernels differ with the batch
    size -- ``test_pipelines.py`` checks that; here each batch size is compared with its own forwards.)
    """
    pipe = _pipe(unet)
    labels = torch.tensor([i % 10 for i in range(batch)])
    out = pipe(class_labels=labels.tolist(), timesteps=timesteps, generator=make_generators(range(batch)),
               output_type="latent").images
    gens = make_generators(range(batch))
    x = initial_noise((batch, 1, 8, 8), gens)
    schedule = pipe.schedule
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            v = unet(x, torch.full((batch,), t, dtype=torch.long), class_labels=labels).sample
            x0, _ = schedule.to_x0_eps(v, x, t)
            if i + 1 < len(timesteps):  # fresh noise for the next step, drawn as the pipeline draws it
                x = schedule.add_noise(x0, initial_noise(x0.shape, gens), timesteps[i + 1]).float()
    assert torch.equal(out, x0.float())


def test_execution_device_is_not_walked_without_hooks(unet, execution_device_reads):
    pipe = _pipe(unet)
    first = pipe(class_labels=[3, 4], generator=make_generators([0, 1]), output_type="latent").images
    assert execution_device_reads["n"] == 0
    assert pipe._device_of(pipe.denoiser) == pipe._execution_device == torch.device("cpu")

    # with an accelerate hook (what CPU offload installs), diffusers' answer is read, once per call
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    add_hook_to_module(unet.conv_in, AlignDevicesHook(execution_device="cpu"))
    try:
        execution_device_reads["n"] = 0
        hooked = pipe(class_labels=[3, 4], generator=make_generators([0, 1]), output_type="latent").images
        assert execution_device_reads["n"] == 1
        assert torch.equal(hooked, first)
    finally:
        remove_hook_from_module(unet.conv_in)


def test_schedule_is_built_once_per_scheduler_config(unet):
    pipe = _pipe(unet)
    assert pipe.schedule is pipe.schedule
    before = pipe.schedule
    pipe.scheduler = LCMScheduler.from_config(teacher_scheduler().config, prediction_type="epsilon")
    assert pipe.schedule is not before and pipe.schedule.prediction_type == "epsilon"


def test_timestep_checks_and_coefficients_run_where_t_lives():
    """Checks run on the host before a move: a 'meta' target (no data, like an accelerator never read) works."""
    schedule = VPSchedule.from_config(dict(teacher_scheduler().config), prediction_type="epsilon")
    t = schedule.as_timesteps(999, batch_size=3, device="meta")
    assert t.device.type == "meta" and t.shape == (3,)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([10.0, 500.0]), device="meta")
    assert alpha.device.type == "meta" and sigma.shape == (2,)
    x = torch.empty(3, 1, 8, 8, device="meta")
    x0, eps = schedule.to_x0_eps(torch.empty_like(x), x, 999)
    assert x0.device.type == "meta" and eps.shape == x.shape
    with pytest.raises(ValueError, match="out of range"):
        schedule.as_timesteps(1000, device="meta")
    # and the host values are the ones the device computes with
    a_host, _ = schedule.alpha_sigma(torch.tensor([10.0, 500.0]))
    a_dev, _ = schedule.alpha_sigma(torch.tensor([10.0, 500.0]), device="cpu")
    assert torch.equal(a_host, a_dev)


def _dmd_config(teacher, out, **overrides) -> DMDConfig:
    base = dict(teacher=str(teacher), output_dir=str(out), max_train_steps=4, train_batch_size=4,
                generator_learning_rate=1e-3, critic_learning_rate=1e-3, lr_warmup_steps=0,
                critic_updates_per_generator_update=2, checkpointing_steps=0, log_every=1, eval_num_samples=0,
                sample_every=0, sample_grid_size=4, seed=3, export=False, student_timesteps=[399])
    base.update(overrides)
    return DMDConfig(**base)


def test_training_step_reads_nothing_back_to_the_host(tiny_teacher, tmp_path, monkeypatch):
    """Metrics and gradient norms stay tensors inside an iteration; the loop reads them at log steps.

    Counts reads made by stepdistill's own code (torch's CPU Adam reads its step counter, a host tensor).
    """
    trainer = DMDTrainer(_dmd_config(tiny_teacher, tmp_path / "run", log_every=0))
    reads: list[str] = []
    for name in ("item", "tolist", "cpu", "numpy", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}stepdistill{os.sep}" in caller:
                reads.append(f"{_name} in {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    keys = set()
    for step in (0, 1):  # a generator turn and a critic-only turn
        metrics = trainer.training_step(step)
        assert all(torch.is_tensor(v) for v in metrics.values())
        keys |= set(metrics)
    monkeypatch.undo()
    assert reads == []
    assert {"loss/dm", "loss/fake_score", "grad_norm/generator", "grad_norm/critic"} <= keys


def test_logged_window_means_are_those_of_every_iteration(tiny_teacher, tmp_path):
    """Reading metrics back once per window logs the same numbers as reading them every iteration."""
    records = {}
    for every in (1, 2):
        out = tmp_path / f"every{every}"
        DMDTrainer(_dmd_config(tiny_teacher, out, log_every=every)).train()
        records[every] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = {r["step"]: r for r in records[1] if "loss/fake_score" in r}
    windows = [r for r in records[2] if "loss/fake_score" in r]
    assert [r["step"] for r in windows] == [2, 4]
    for r in windows:
        a, b = per_step[r["step"] - 1], per_step[r["step"]]
        for key in ("loss/fake_score", "grad_norm/critic"):
            assert r[key] == (a[key] + b[key]) / 2, key
        # loss/dm exists on generator turns (iterations 0 and 2, logged as steps 1 and 3): one value per window
        assert r["loss/dm"] == a["loss/dm"]


def test_conditioning_to_rebuilds_nothing_already_in_place():
    from stepdistill import Conditioning

    neg = Conditioning(prompt_embeds=torch.zeros(2, 3, 4))
    cond = Conditioning(prompt_embeds=torch.ones(2, 3, 4), negative=neg)
    assert cond.to("cpu") is cond and cond.to(torch.device("cpu"), torch.float32) is cond
    moved = cond.to(dtype=torch.float64)
    assert moved is not cond and moved.prompt_embeds.dtype == moved.negative.prompt_embeds.dtype == torch.float64
    labels = Conditioning(class_labels=torch.tensor([1, 2]), null_class_label=10)
    assert labels.to("cpu", torch.float16) is labels  # integer labels are never cast
    assert labels.to("meta") is not labels and labels.to("meta").class_labels.device.type == "meta"


# ----------------------------------------------------------------------------------------------------
# what is kept between calls, and what makes it be rebuilt: each test fails if its cache goes stale or is skipped
def _images(pipe: StepDistillPipeline, **kwargs) -> torch.Tensor:
    return pipe(class_labels=[3, 4], generator=make_generators([0, 1]), output_type="latent", **kwargs).images


def _reweighted(unet: UNet2DModel, seed: int = 1) -> UNet2DModel:
    other = copy.deepcopy(unet)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return other


def test_the_denoiser_is_kept_until_the_network_or_the_scheduler_config_changes(unet):
    pipe = _pipe(unet)
    first = _images(pipe)
    kept = pipe.denoiser_of(pipe.unet, pipe.schedule)
    assert torch.equal(_images(pipe), first) and pipe.denoiser_of(pipe.unet, pipe.schedule) is kept

    other = _reweighted(unet)
    pipe.unet = other  # a new network: its own output, as a pipeline built around it gives
    assert torch.equal(_images(pipe), _images(_pipe(other))) and not torch.equal(_images(pipe), first)
    pipe.register_modules(unet=unet)
    assert torch.equal(_images(pipe), first)

    # a new scheduler, then a config change on the same scheduler object: a new schedule, a new denoiser
    pipe.scheduler = LCMScheduler.from_config(teacher_scheduler().config, prediction_type="sample")
    fresh = StepDistillPipeline(unet=unet, scheduler=pipe.scheduler, null_class_label=10)
    fresh.set_progress_bar_config(disable=True)
    assert torch.equal(_images(pipe), _images(fresh)) and not torch.equal(_images(pipe), first)
    pipe.scheduler.register_to_config(prediction_type=teacher_scheduler().config.prediction_type)
    assert torch.equal(_images(pipe), first)


def test_a_replaced_network_is_not_kept_alive(unet):
    pipe = _pipe(copy.deepcopy(unet))
    _images(pipe)
    old = weakref.ref(pipe.unet)
    pipe.unet = copy.deepcopy(unet)
    gc.collect()
    assert old() is None


def test_the_compute_dtype_follows_the_network_between_calls(unet):
    """The kept denoiser's compute dtype is pinned afresh on every call (a cast or a casting hook in between)."""
    net = copy.deepcopy(unet)
    pipe = _pipe(net)
    _images(pipe)
    net.to(torch.float64)
    got = _images(pipe)
    assert got.dtype == torch.float64 and torch.equal(got, _images(_pipe(net)))
    net.to(torch.float32).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    got = _images(pipe)
    assert pipe.denoiser_of(net, pipe.schedule).compute_dtype == torch.bfloat16
    assert torch.equal(got, _images(_pipe(net)))


def test_coefficients_of_a_number_are_computed_once_and_handed_out_as_copies(monkeypatch):
    schedule = VPSchedule.from_config(dict(teacher_scheduler().config))
    computed = []
    original = VPSchedule._alpha_sigma
    monkeypatch.setattr(VPSchedule, "_alpha_sigma", lambda self, t: computed.append(t) or original(self, t))
    x = torch.randn(2, 1, 8, 8)
    alpha, sigma = schedule.alpha_sigma(749)
    for _ in range(3):
        schedule.alpha_sigma(749.0)
        schedule.add_noise(x, x, 749)
        schedule.to_x0_eps(x, x, 749)
    assert len(computed) == 1
    tensor_alpha, tensor_sigma = schedule.alpha_sigma(torch.tensor(749.0))  # never cached: the same values
    assert len(computed) == 2 and torch.equal(alpha, tensor_alpha) and torch.equal(sigma, tensor_sigma)
    alpha.zero_()  # writing into what alpha_sigma handed out leaves the schedule's copy alone
    assert torch.equal(schedule.alpha_sigma(749)[0], tensor_alpha)


@pytest.mark.parametrize("t", [999, 749.5, 0])
@pytest.mark.parametrize("family", ["vp", "flow"])
def test_a_kept_level_gives_what_a_tensor_timestep_gives(family, t):
    """The network timestep and the (x0, eps) conversion of a number, kept by the schedule, equal a tensor's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stepdistill import NoiseSchedule

    config = teacher_scheduler().config if family == "vp" else FlowMatchEulerDiscreteScheduler(shift=3.0).config
    schedule = NoiseSchedule.from_scheduler_config(dict(config))
    t_vec = schedule.as_timesteps(t, batch_size=3)
    for _ in range(2):  # computed, then kept
        kept = schedule._network_timestep(float(t), 3)
        want = schedule.model_timestep(t_vec)
        assert kept.dtype == want.dtype and torch.equal(kept, want)
        y, x = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
        for got, ref in zip(schedule._to_x0_eps(y, x, float(t), 3), schedule.to_x0_eps(y, x, t_vec)):
            assert torch.equal(got, ref)


def test_the_float64_table_is_built_once_per_device_and_dtype(monkeypatch):
    schedule = VPSchedule.from_config(dict(teacher_scheduler().config))
    builds = []
    original = VPSchedule._build_table
    monkeypatch.setattr(VPSchedule, "_build_table", lambda self, *a: builds.append(a) or original(self, *a))
    t, x = torch.tensor([10.0, 500.5]), torch.randn(2, 1, 8, 8)
    for _ in range(3):
        schedule.alpha_sigma(t)
        schedule.add_noise(x, x, t)
        schedule.to_x0_eps(x, x, t)
    assert builds == [(torch.float64, torch.device("cpu"))]
    schedule.as_timesteps(t)  # and the values are the ones the table gives
    abar = schedule.alphas_cumprod
    assert torch.equal(schedule.alpha_sigma(torch.tensor([10.0]))[0], abar[10:11].sqrt())


def test_a_denoiser_call_checks_its_timesteps_once(unet, monkeypatch):
    """Numbers (what the samplers pass) are checked in Python; a tensor gets the tensor checks once per call."""
    schedule = VPSchedule.from_config(dict(teacher_scheduler().config))
    denoiser = Denoiser.from_model(unet, schedule)
    checks, nan_checks = [], []
    as_timesteps, isnan = schedule.as_timesteps, torch.isnan
    monkeypatch.setattr(schedule, "as_timesteps", lambda *a, **k: checks.append(a) or as_timesteps(*a, **k))
    monkeypatch.setattr(torch, "isnan", lambda t: nan_checks.append(t) or isnan(t))
    x, cond = torch.randn(2, 1, 8, 8), Conditioning(class_labels=torch.tensor([3, 4]), null_class_label=10)
    with torch.no_grad():
        by_number = denoiser(x, 999, cond)
        assert (len(checks), len(nan_checks)) == (0, 0)
        by_tensor = denoiser(x, torch.tensor([999, 999]), cond)
        assert (len(checks), len(nan_checks)) == (1, 1)
        with pytest.raises(ValueError, match="out of range"):
            denoiser(x, 1000, cond)
    assert torch.equal(by_number.x0, by_tensor.x0) and torch.equal(by_number.eps, by_tensor.eps)
    assert torch.equal(by_number.model_output, by_tensor.model_output)


def test_finishing_a_call_reads_no_signature_and_still_resets_and_offloads(unet, monkeypatch):
    net = copy.deepcopy(unet)
    pipe = _pipe(net)
    _images(pipe)  # the component names are read once per pipeline class
    signature_reads, resets, frees = [], [], []
    original = StepDistillPipeline._get_signature_keys.__func__
    monkeypatch.setattr(StepDistillPipeline, "_get_signature_keys",
                        classmethod(lambda cls, obj: signature_reads.append(obj) or original(cls, obj)))
    monkeypatch.setattr(StepDistillPipeline, "maybe_free_model_hooks", lambda self: frees.append(self))
    net._reset_stateful_cache = lambda: resets.append(net)  # a component with a stateful cache (diffusers' CacheMixin)
    _images(pipe)
    assert (signature_reads, len(resets), frees) == ([], 1, [])
    pipe._all_hooks = [object()]  # what enable_model_cpu_offload leaves: diffusers' own method runs
    _images(pipe)
    assert frees == [pipe]


def test_a_disabled_progress_bar_is_not_built(unet, monkeypatch):
    pipe = _pipe(unet)
    bars = []
    original = StepDistillPipeline.progress_bar
    monkeypatch.setattr(StepDistillPipeline, "progress_bar", lambda self, **k: bars.append(k) or original(self, **k))
    first = _images(pipe)
    assert bars == []
    pipe.set_progress_bar_config(disable=False, file=open(os.devnull, "w"))  # noqa: SIM115
    assert torch.equal(_images(pipe), first) and bars == [{"total": 1}]


def test_the_plan_is_kept_until_the_timesteps_or_a_config_change(unet):
    pipe = _pipe(unet)
    first = _images(pipe, timesteps=[999, 499])
    plans = pipe.__dict__["_stepdistill_plans"][1]
    kept = next(iter(plans.values()))
    assert torch.equal(_images(pipe, timesteps=[999, 499]), first) and next(iter(plans.values())) is kept
    other = _images(pipe, timesteps=[999, 249])
    assert not torch.equal(other, first) and len(plans) == 2

    # the trained default timesteps live in the pipeline's config: changing them gives the new ones' images
    pipe.register_to_config(default_timesteps=[999, 249])
    assert torch.equal(_images(pipe), other)
    pipe.register_to_config(default_timesteps=[999, 499])
    assert torch.equal(_images(pipe), first)

    # the scheduler's own spacing is never kept: set_timesteps runs, as diffusers' pipelines run it
    pipe.register_to_config(default_timesteps=None)
    for _ in range(2):
        pipe.scheduler.timesteps = None
        _images(pipe, num_inference_steps=2)
        assert pipe.scheduler.timesteps is not None and len(pipe.scheduler.timesteps) == 2

"""Speed: what a call costs beyond its network passes, measured side by side in one run.

    PYTHONPATH=. python eval/bench_speed.py                 # CPU, 1 thread, ~3 minutes
    PYTHONPATH=. python eval/bench_speed.py --device cuda   # the SD1.5-size items (untested: no GPU was available)
    PYTHONPATH=. python eval/bench_speed.py --clock cpu     # on a shared machine: CPU time, not elapsed time

**Inference.** For each student -- the digits one-step / four-step student (pixel space, built from the shipped
digits teacher's architecture and weights: a student's weights do not change its timing) and a tiny
SD1.5-shaped latent student (``UNet2DConditionModel`` on 4x8x8 latents, random weights from a config) -- and each
batch size, three callables run on the same network, batch and timesteps:

* ``raw``: the network's forward passes alone (``k`` calls of ``unet(x, t, ...)`` under ``no_grad``, inputs
  made beforehand);
* ``stepdistill``: :class:`~stepdistill.pipelines.StepDistillPipeline` (``output_type="latent"``: the state
  the network computes, no decoding), and for the digits student the hybrid pipeline
  (:class:`~stepdistill.pipelines.HybridDiversityPipeline`: one teacher step then the 4-step student's last three);
* ``stock``: the stock diffusers pipeline of the same network. The latent student is exported to a
  ``StableDiffusionPipeline`` with an ``LCMScheduler`` (``prompt_embeds`` given, ``output_type="latent"``); a
  class-conditional ``UNet2DModel`` has no stock text-to-image pipeline (stepdistill exports it as its own
  pipeline), so the reference is diffusers' ``ConsistencyModelPipeline`` (its one-/few-step pipeline for a
  class-conditional ``UNet2DModel``, ``output_type="pt"``; stepdistill's pipeline then also returns ``"pt"``).

Each round times every callable once, in a rotating order, after one untimed warm-up; a callable's time in a
round is the mean of enough calls to last ``--min-time`` seconds. Ratios are formed within a round (paired) and
the table gives their median over ``--rounds`` rounds with the [min, max] range.

**Training.** A DMD2 iteration of the digits one-step recipe (``training_step`` plus the learning-rate schedulers:
the loop body without logging, checkpoints or evaluation), for a generator turn and a critic-only turn
(``critic_updates_per_generator_update`` = 5: one iteration in five steps the generator), against the sum of its
network passes timed alone with the same shapes: generator forward (with grad, or without on critic turns), the
teacher's and the fake score's forwards on the noised samples, the surrogate loss's backward through the
generator, the critic's forward and backward. The optimizer steps (clip, AdamW, EMA), the data draw and the noise
draws are timed alone too; what remains is named ``other`` (conditioning moves, loss arithmetic, metrics,
Python). Modes: full copies, shared-base LoRA (rank 16) and gradient checkpointing.

Writes ``eval/results/bench_speed.json`` (every round's raw times) and ``bench_speed.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
Fn = Callable[[], object]


# ----------------------------------------------------------------------------------------------------
# timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: What the timings read: wall-clock time (``--clock wall``), or this process's CPU time (``--clock cpu``).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def per_call(fn: Fn | tuple[Fn, Callable[[object], object]], device: torch.device, min_time: float) -> float:
    """Mean seconds per call of ``fn`` over enough calls to last ``min_time`` seconds (at least one).

    ``fn`` may be a pair ``(setup, run)``: ``setup()`` runs before the clock of each call (e.g. the forward that
    builds a graph) and ``run(setup())`` is what is timed (its backward).
    """
    setup, run = fn if isinstance(fn, tuple) else (None, None)
    calls, total = 0, 0.0
    while True:
        arg = setup() if setup is not None else None
        _sync(device)
        start = _clock()
        run(arg) if run is not None else fn()
        _sync(device)
        total += _clock() - start
        calls += 1
        if total >= min_time:
            return total / calls


def interleaved(
    fns: dict[str, Fn | tuple], device: torch.device, rounds: int, min_time: float
) -> dict[str, list[float]]:
    """Seconds per call of each callable in each round; one warm-up call each, then rounds in rotating order."""
    names = list(fns)
    for name in names:
        per_call(fns[name], device, 0.0)  # warm-up
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(per_call(fns[name], device, min_time))
    return times


def ratio_summary(num: list[float], den: list[float]) -> dict[str, float]:
    """Median, min and max over rounds of the paired ratio ``num / den``."""
    ratios = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


# ----------------------------------------------------------------------------------------------------
# inference cases
def digits_pipelines(device: torch.device, dtype: torch.dtype):
    """The digits pipelines on one network.

    The shipped teacher's UNet as the student, its StepDistillPipeline, the stock ConsistencyModelPipeline, and the
    hybrid pipeline (a second copy of the teacher as the base, the same network as the student).
    """
    from diffusers import (
        CMStochasticIterativeScheduler,
        ConsistencyModelPipeline,
        DDIMScheduler,
        LCMScheduler,
        UNet2DModel,
    )

    from stepdistill.data.digits_models import teacher_path
    from stepdistill.pipelines import HybridDiversityPipeline, StepDistillPipeline

    unet = UNet2DModel.from_pretrained(str(teacher_path()), subfolder="unet", torch_dtype=dtype).to(device).eval()
    base = UNet2DModel.from_pretrained(str(teacher_path()), subfolder="unet", torch_dtype=dtype).to(device).eval()
    teacher_sched = DDIMScheduler.from_pretrained(str(teacher_path()), subfolder="scheduler")
    ours = StepDistillPipeline(unet=unet, scheduler=LCMScheduler.from_config(teacher_sched.config), null_class_label=10)
    stock = ConsistencyModelPipeline(unet=unet, scheduler=CMStochasticIterativeScheduler())
    hybrid = HybridDiversityPipeline(unet=unet, scheduler=LCMScheduler.from_config(teacher_sched.config),
                                     base_unet=base, base_scheduler=teacher_sched, null_class_label=10)
    for p in (ours, stock, hybrid):
        p.set_progress_bar_config(disable=True)
    return unet, base, ours, stock, hybrid


def latent_pipelines(device: torch.device, dtype: torch.dtype, size: str):
    """A latent student's network and VAE from configs (random weights) and what builds its pipelines.

    ``size="tiny"``: a small SD1.5-shaped UNet on 4x8x8 latents with 16-token prompts; ``"sd15"``: SD1.5's UNet and
    VAE configs with 77-token prompts.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from stepdistill.pipelines import StepDistillPipeline
    from stepdistill.pipelines.export import lcm_scheduler_for_student

    torch.manual_seed(0)
    if size == "tiny":
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4,
        )
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, sample_size=16)
        text_shape = (16, 32)  # a short prompt: 16 tokens
    else:  # SD1.5's UNet and VAE configs (random weights, ~860M UNet parameters)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                            block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2)
        text_shape = (77, 768)
    unet = unet.to(device, dtype).eval()
    vae = vae.to(device, dtype).eval()
    teacher_sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return unet, vae, text_shape, teacher_sched, StepDistillPipeline, StableDiffusionPipeline, lcm_scheduler_for_student


def _forwards(network: torch.nn.Module, x: torch.Tensor, timesteps: list[torch.Tensor], **kwargs) -> Fn:
    """The raw reference: ``network(x, t, **kwargs)`` for each of ``timesteps`` under ``no_grad``."""

    def raw() -> None:
        with torch.no_grad():
            for t in timesteps:
                network(x, t, **kwargs)

    return raw


def _call(pipe: object, seeded: Callable[[], dict], **kwargs) -> Fn:
    """``pipe(**kwargs, **seeded())``: a fresh seeded generator per call, as a user would pass one."""
    return lambda: pipe(**kwargs, **seeded())


def inference_cases(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Every inference row: raw / stepdistill / stock (and hybrid) per student, steps and batch size."""
    from stepdistill.sampling import make_generators

    rows = []
    steps_of = {1: [999], 4: [999, 749, 499, 249]}
    ours_gen = lambda: {"generator": make_generators([0])[0]}  # noqa: E731
    stock_gen = lambda: {"generator": torch.Generator(device).manual_seed(0)}  # noqa: E731

    # -- pixel: digits
    unet, base, ours, stock, hybrid = digits_pipelines(device, dtype)
    for steps in args.steps:
        ts = steps_of[steps]
        for batch in args.batches:
            labels = [i % 10 for i in range(batch)]
            x = torch.randn(batch, 1, 8, 8, device=device, dtype=dtype)
            tt = [torch.full((batch,), t, device=device, dtype=torch.long) for t in ts]
            raw = _forwards(unet, x, tt, class_labels=torch.tensor(labels, device=device))
            fns = {
                "raw": raw,
                "stepdistill": _call(ours, ours_gen, class_labels=labels, timesteps=ts, output_type="pt"),
                "stock": _call(stock, stock_gen, batch_size=batch, class_labels=labels, num_inference_steps=steps,
                               output_type="pt"),
            }
            rows.append(_row("pixel (digits UNet2DModel)", steps, batch, interleaved(fns, device, args.rounds,
                                                                                     args.min_time)))
            print(_fmt_row(rows[-1]), flush=True)
            if steps == 4:  # hybrid: one base (teacher) step at 999, hand-over by re-noising, the student's 3 steps
                hyb = {"raw": raw, "stepdistill": _call(hybrid, ours_gen, class_labels=labels, timesteps=ts,
                                                        base_steps=1, output_type="pt")}
                rows.append(_row("pixel hybrid (1 base + 3 student steps)", steps, batch,
                                 interleaved(hyb, device, args.rounds, args.min_time)))
                print(_fmt_row(rows[-1]), flush=True)

    # -- latent: tiny SD (or SD1.5-size on --device cuda)
    unet, vae, text_shape, teacher_sched, StepDistillPipeline, StableDiffusionPipeline, lcm_for = latent_pipelines(
        device, dtype, args.latent_size)
    compiled = torch.compile(unet) if args.compile else None
    for steps in args.steps:
        ts = steps_of[steps]
        sched = lcm_for(teacher_sched.config, ts)
        ours = StepDistillPipeline(unet=unet, scheduler=sched, vae=vae, default_timesteps=ts)
        stock = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        for p in (ours, stock):
            p.set_progress_bar_config(disable=True)
        size = unet.config.sample_size
        for batch in args.latent_batches:
            emb = torch.randn(batch, *text_shape, device=device, dtype=dtype)
            x = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
            tt = [torch.full((batch,), t, device=device, dtype=torch.long) for t in ts]
            fns = {
                "raw": _forwards(unet, x, tt, encoder_hidden_states=emb),
                "stepdistill": _call(ours, ours_gen, prompt_embeds=emb, timesteps=ts, output_type="latent"),
                "stock": _call(stock, stock_gen, prompt_embeds=emb, timesteps=ts, guidance_scale=0.0,
                               output_type="latent"),
            }
            if compiled is not None:
                fns["raw_compiled"] = _forwards(compiled, x, tt, encoder_hidden_states=emb)
            rows.append(_row(f"latent ({args.latent_size} SD UNet2DConditionModel)", steps, batch,
                             interleaved(fns, device, args.rounds, args.min_time)))
            print(_fmt_row(rows[-1]), flush=True)
    return rows


def _stub(network: torch.nn.Module, sample: torch.Tensor) -> None:
    """Replace ``network``'s forward by one that returns ``sample`` at once (the call's cost without the network)."""
    from types import SimpleNamespace

    def forward(*args, return_dict: bool = True, **kwargs):
        return SimpleNamespace(sample=sample) if return_dict else (sample,)

    network.forward = forward


def overhead_cases(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Milliseconds per call with the network replaced by a stub: what a pipeline costs around its network.

    Independent of the network's size and of how loaded the machine's arithmetic units are, this is the absolute
    figure behind the ratios (overhead / forward time), measured for one-step students at batch 1 and 16.
    """
    from stepdistill.sampling import make_generators

    rows = []
    ours_gen = lambda: {"generator": make_generators([0])[0]}  # noqa: E731
    stock_gen = lambda: {"generator": torch.Generator(device).manual_seed(0)}  # noqa: E731
    for batch in (1, 16):
        unet, _, ours, stock, _ = digits_pipelines(device, dtype)
        _stub(unet, torch.zeros(batch, 1, 8, 8, device=device, dtype=dtype))
        labels = [i % 10 for i in range(batch)]
        fns = {"stepdistill": _call(ours, ours_gen, class_labels=labels, timesteps=[999], output_type="pt"),
               "stock": _call(stock, stock_gen, batch_size=batch, class_labels=labels, num_inference_steps=1,
                              output_type="pt")}
        times = interleaved(fns, device, args.rounds, args.min_time)
        rows.append({"student": "pixel (digits UNet2DModel)", "batch": batch, "seconds": times,
                     "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()}})
        unet, vae, text_shape, teacher_sched, StepDistillPipeline, StableDiffusionPipeline, lcm_for = (
            latent_pipelines(device, dtype, args.latent_size))
        size = unet.config.sample_size
        _stub(unet, torch.zeros(batch, 4, size, size, device=device, dtype=dtype))
        sched = lcm_for(teacher_sched.config, [999])
        ours = StepDistillPipeline(unet=unet, scheduler=sched, vae=vae, default_timesteps=[999])
        stock = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        for pipe in (ours, stock):
            pipe.set_progress_bar_config(disable=True)
        emb = torch.randn(batch, *text_shape, device=device, dtype=dtype)
        fns = {"stepdistill": _call(ours, ours_gen, prompt_embeds=emb, timesteps=[999], output_type="latent"),
               "stock": _call(stock, stock_gen, prompt_embeds=emb, timesteps=[999], guidance_scale=0.0,
                              output_type="latent")}
        times = interleaved(fns, device, args.rounds, args.min_time)
        rows.append({"student": f"latent ({args.latent_size} SD UNet2DConditionModel)", "batch": batch,
                     "seconds": times, "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()}})
    for r in rows:
        print(f"overhead {r['student']} batch={r['batch']}: " + ", ".join(
            f"{k} {v:.3f} ms" for k, v in r["median_ms"].items()), flush=True)
    return rows


def _row(student: str, steps: int, batch: int, times: dict[str, list[float]]) -> dict:
    row = {"student": student, "steps": steps, "batch": batch, "seconds": times,
           "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()}}
    for name in times:
        if name != "raw":
            row[f"{name}/raw"] = ratio_summary(times[name], times["raw"])
    return row


def _fmt_row(row: dict) -> str:
    parts = [f"{row['student']} steps={row['steps']} batch={row['batch']}: raw {row['median_ms']['raw']:.2f} ms"]
    for key in ("stepdistill/raw", "stock/raw", "raw_compiled/raw"):
        if key in row:
            parts.append(f"{key} {row[key]['median']:.3f}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------
# teacher vs student (GPU item): 1-step student vs the 50-step CFG teacher, same network size
def speedup_case(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Latency of the one-step student pipeline vs the 50-step CFG teacher pipeline (100 network calls)."""
    from stepdistill.sampling import make_generators

    unet, vae, text_shape, teacher_sched, StepDistillPipeline, _, lcm_for = latent_pipelines(
        device, dtype, args.latent_size)
    from diffusers import DDIMScheduler

    student = StepDistillPipeline(unet=unet, scheduler=lcm_for(teacher_sched.config, [999]), vae=vae,
                                  default_timesteps=[999])
    teacher = StepDistillPipeline(unet=unet, scheduler=DDIMScheduler.from_config(teacher_sched.config), vae=vae)
    for p in (student, teacher):
        p.set_progress_bar_config(disable=True)
    rows = []
    for batch in args.speedup_batches:
        emb = torch.randn(batch, *text_shape, device=device, dtype=dtype)
        seeded = lambda: {"generator": make_generators([0])[0]}  # noqa: E731
        fns = {
            "student_1step": _call(student, seeded, prompt_embeds=emb, output_type="latent"),
            "teacher_50step_cfg": _call(teacher, seeded, prompt_embeds=emb,
                                        negative_prompt_embeds=torch.zeros_like(emb), num_inference_steps=50,
                                        guidance_scale=4.5, output_type="latent"),
        }
        times = interleaved(fns, device, max(3, args.rounds // 2), args.min_time)
        speed = ratio_summary(times["teacher_50step_cfg"], times["student_1step"])
        rows.append({"batch": batch, "seconds": times, "speedup": speed, "nfe_ratio": 100,
                     "fraction_of_nfe_ratio": speed["median"] / 100})
        print(f"speedup batch={batch}: {speed['median']:.1f}x (NFE ratio 100)", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------
# training
def _trainer(mode: str, batch: int, work: Path, device: str):
    from stepdistill.trainers import DMDConfig, DMDTrainer, parse_config

    extra = {"full": [], "lora": ["--lora_rank", "16"], "checkpointing": ["--gradient_checkpointing", "true"]}[mode]
    argv = ["--config", str(ROOT / "recipes/digits_dmd2_1step.yaml"), *extra, "--output_dir", str(work / mode),
            "--teacher", str(ROOT / "stepdistill/assets/digits/teacher"), "--train_batch_size", str(batch),
            "--log_every", "0", "--checkpointing_steps", "0", "--sample_every", "0", "--eval_num_samples", "0",
            "--num_threads", "0"]
    return DMDTrainer(parse_config(DMDConfig, argv))


def training_case(mode: str, args, device: torch.device) -> dict:
    """One mode: iteration times (generator turn, critic turn) vs their passes timed alone."""
    from stepdistill.denoiser import guided_denoise

    with tempfile.TemporaryDirectory() as tmp:
        tr = _trainer(mode, args.train_batch, Path(tmp), device.type)
        cfg = tr.config
        n = cfg.critic_updates_per_generator_update
        b = cfg.train_batch_size
        gen, critic = tr.trainables["generator"].module, tr.trainables["critic"].module
        fake = tr.unwrap("critic").denoiser
        cond, _ = tr.data.sample(b, torch.Generator().manual_seed(0))
        cond = cond.to(device)
        t_g = tr.student_timesteps[0]
        z = torch.randn(b, *tr.sample_shape, device=device)
        t_dm = tr.schedule.sample_timesteps(b, cfg.min_step_percent, cfg.max_step_percent)
        noise = torch.randn(b, *tr.sample_shape, device=device)
        step = {"i": 0}

        def iteration(gen_turn: bool) -> Fn:
            def run():
                s = step["i"] = step["i"] + 1
                s = s * n if gen_turn else s * n + 1  # step % n == 0 on generator turns only
                tr.training_step(s)
                for t in tr.trainables.values():
                    t.lr_scheduler.step()
            return run

        def x_t() -> torch.Tensor:
            with torch.no_grad():
                x = gen(z, t_g, cond).x0
            return tr.schedule.add_noise(x.float(), noise, t_dm)

        xt = x_t()

        def gen_forward_grad():
            return gen(z, t_g, cond).x0

        def gen_forward_nograd():
            with torch.no_grad():
                return gen(z, t_g, cond).x0

        def teacher_forward():
            with torch.no_grad():
                guided_denoise(tr.teacher, xt, t_dm, cond, tr.guidance_scale)

        def fake_forward():
            with torch.no_grad():
                fake(xt, t_dm, cond)

        def gen_graph():  # untimed: the forward whose graph the timed backward consumes
            x = gen(z, t_g, cond).x0
            return 0.5 * ((x.float() - (x.detach() - 0.01).float()) ** 2).mean()

        def critic_forward():
            critic(xt, t_dm, cond)

        def critic_graph():
            return (critic(xt, t_dm, cond)[2].float() ** 2).mean()

        def backward(name: str) -> Callable[[object], object]:
            def run(loss):
                tr.backward(loss, name)
                tr.zero_grad()
            return run

        def opt(name: str) -> tuple:  # gradients in place (untimed), then clip + AdamW + EMA (timed)
            def setup():
                for p in tr.trainables[name].module.parameters():
                    if p.requires_grad:
                        p.grad = torch.full_like(p, 1e-4)

            return setup, lambda _: tr.optimizer_step_norm(name)

        def data_draw():
            tr.data.sample(b, tr.rng)

        def noise_draws():  # the generator's input, the DM loss's t and noise, the critic's t and noise
            torch.randn(b, *tr.sample_shape, generator=tr.rng).to(device)
            tr.schedule.sample_timesteps(b, cfg.min_step_percent, cfg.max_step_percent, tr.rng)
            torch.randn(b, *tr.sample_shape, generator=tr.rng).to(device)
            tr.schedule.sample_timesteps(b, 0.0, 1.0, tr.rng)
            torch.randn(b, *tr.sample_shape, generator=tr.rng).to(device)

        fns = {
            "iteration_generator_turn": iteration(True),
            "iteration_critic_turn": iteration(False),
            "generator_forward_grad": gen_forward_grad,
            "generator_forward_nograd": gen_forward_nograd,
            "teacher_forward": teacher_forward,
            "fake_score_forward": fake_forward,
            "generator_backward": (gen_graph, backward("generator")),
            "critic_forward": critic_forward,
            "critic_backward": (critic_graph, backward("critic")),
            "optimizer_generator": opt("generator"),
            "optimizer_critic": opt("critic"),
            "data_draw": data_draw,
            "noise_draws": noise_draws,
        }
        times = interleaved(fns, device, args.train_rounds, args.min_time)
    med = {k: statistics.median(v) for k, v in times.items()}
    gen_passes = ["generator_forward_grad", "teacher_forward", "fake_score_forward", "generator_backward",
                  "critic_forward", "critic_backward"]
    critic_passes = ["generator_forward_nograd", "critic_forward", "critic_backward"]
    out = {"mode": mode, "batch": b, "critic_updates_per_generator_update": n, "seconds": times,
           "median_ms": {k: 1e3 * v for k, v in med.items()}}
    for turn, passes, opts in (("generator_turn", gen_passes, ["optimizer_generator", "optimizer_critic"]),
                               ("critic_turn", critic_passes, ["optimizer_critic"])):
        it = times[f"iteration_{turn}"]
        per_round_passes = [sum(times[p][r] for p in passes) for r in range(len(it))]
        per_round_opt = [sum(times[o][r] for o in opts) for r in range(len(it))]
        draws = 2 if cfg.use_gan else 1
        outside = {
            "optimizer_ms": 1e3 * sum(med[o] for o in opts),
            "data_ms": 1e3 * med["data_draw"] * draws,
            "noise_ms": 1e3 * med["noise_draws"],
            # the remainder, paired within each round, then the median over rounds
            "other_ms": 1e3 * statistics.median(
                it[r] - per_round_passes[r] - per_round_opt[r] - draws * times["data_draw"][r]
                - times["noise_draws"][r] for r in range(len(it))),
        }
        out[turn] = {
            "iteration_ms": 1e3 * med[f"iteration_{turn}"],
            "passes_ms": 1e3 * sum(med[p] for p in passes),
            "iteration/passes": ratio_summary(it, per_round_passes),
            "iteration/(passes+optimizer)": ratio_summary(it, [a + o for a, o in zip(per_round_passes, per_round_opt)]),
            "outside_networks": outside,
        }
    print(f"train {mode}: gen turn {out['generator_turn']['iteration/passes']['median']:.3f}x passes, "
          f"critic turn {out['critic_turn']['iteration/passes']['median']:.3f}x passes", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------
# output
def _fmt_ratio(row: dict, key: str) -> str:
    if key not in row:
        return "--"
    r = row[key]
    return f"{r['median']:.3f} [{r['min']:.2f}, {r['max']:.2f}]"


def markdown(result: dict) -> str:
    """The results as markdown tables."""
    env = result["environment"]
    lines = [
        "# bench_speed",
        "",
        f"`{result['command']}` -- device {env['device']}, {env['threads']} thread(s), torch {env['torch']}, "
        f"{env['cpu_count']} CPUs shared with other jobs: load average (1, 5, 15 min) before {env['load_before']}, "
        f"after {env['load_after']}; {result['wall_seconds']:.0f} s.",
        "Ratios are paired within a round (every callable timed once per round, rotating order); median over "
        f"{result['rounds']} rounds, [min, max] in brackets. Times are "
        + ("this process's CPU time (`--clock cpu`)." if result.get("clock") == "cpu" else "wall-clock time."),
        "",
        "## Inference: pipeline call / raw network forward passes (same network, batch, timesteps)",
        "",
        "| student | steps | batch | raw ms | stepdistill / raw | stock diffusers / raw |",
        "|---|---|---|---|---|---|",
    ]
    for r in result.get("inference", []):
        lines.append(f"| {r['student']} | {r['steps']} | {r['batch']} | {r['median_ms']['raw']:.2f} | "
                     f"{_fmt_ratio(r, 'stepdistill/raw')} | {_fmt_ratio(r, 'stock/raw')} |")
    if result.get("overhead"):
        lines += ["", "## Per-call overhead: one-step call with the network replaced by a stub (ms per call)", "",
                  "| student | batch | stepdistill ms | stock diffusers ms |", "|---|---|---|---|"]
        for r in result["overhead"]:
            m = r["median_ms"]
            lines.append(f"| {r['student']} | {r['batch']} | {m['stepdistill']:.3f} | {m['stock']:.3f} |")
    lines += ["", "Stock pipelines: `StableDiffusionPipeline` + `LCMScheduler` for the latent student (the export); "
              "`ConsistencyModelPipeline` for the class-conditional pixel UNet, which has no stock text-to-image "
              "pipeline.", ""]
    if result.get("training"):
        lines += ["## Training: DMD2 iteration (digits, one-step recipe) / its network passes timed alone", "",
                  "| mode | turn | iteration ms | passes ms | iteration / passes | iteration / (passes + optimizer) "
                  "| optimizer ms | data ms | noise ms | other ms |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for t in result["training"]:
            for turn in ("generator_turn", "critic_turn"):
                d = t[turn]
                o = d["outside_networks"]
                a, p = d["iteration/passes"], d["iteration/(passes+optimizer)"]
                lines.append(
                    f"| {t['mode']} (batch {t['batch']}) | {turn.replace('_', ' ')} | {d['iteration_ms']:.1f} | "
                    f"{d['passes_ms']:.1f} | {a['median']:.3f} [{a['min']:.2f}, {a['max']:.2f}] | "
                    f"{p['median']:.3f} [{p['min']:.2f}, {p['max']:.2f}] | {o['optimizer_ms']:.1f} | "
                    f"{o['data_ms']:.2f} | {o['noise_ms']:.2f} | {o['other_ms']:.1f} |")
        lines += ["", "Generator turn passes: generator forward (grad) + teacher forward + fake-score forward + "
                  "generator backward + critic forward + critic backward; critic turn: generator forward (no grad) + "
                  "critic forward + backward. `other` = iteration - passes - optimizer - data - noise (conditioning "
                  "moves, loss arithmetic, metrics, Python); it can be negative within the noise of the timings.", ""]
    if result.get("speedup"):
        lines += ["## One-step student vs 50-step CFG teacher (100 network calls)", "",
                  "| batch | speedup | fraction of the NFE ratio |", "|---|---|---|"]
        for s in result["speedup"]:
            lines.append(f"| {s['batch']} | {s['speedup']['median']:.1f}x | {s['fraction_of_nfe_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the benchmark and write ``bench_speed.{json,md}``."""
    import stepdistill

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the SD1.5-size items (untested).")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1).")
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved rounds per inference case.")
    parser.add_argument("--train-rounds", type=int, default=5, help="Interleaved rounds per training mode.")
    parser.add_argument("--min-time", type=float, default=0.05, help="Seconds each timed measurement lasts at least.")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4], choices=[1, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--latent-batches", type=int, nargs="+", default=None,
                        help="Batches of the latent student (default: --batches; 1 8 on cuda).")
    parser.add_argument("--train-batch", type=int, default=64, help="DMD2 batch (the recipe's 64).")
    parser.add_argument("--train-modes", nargs="*", default=["full", "lora", "checkpointing"],
                        choices=["full", "lora", "checkpointing"])
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (cuda default).")
    parser.add_argument("--compile", action="store_true", help="Also time torch.compile of the latent network.")
    parser.add_argument("--sections", nargs="+", default=["overhead", "inference", "training"],
                        choices=["overhead", "inference", "training"],
                        help="What to run (the overhead section also runs on older stepdistill versions: compare "
                             "them by pointing PYTHONPATH at each checkout).")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall: elapsed time. cpu: this process's CPU time (time.process_time), which leaves out "
                             "the time other jobs hold a shared machine's cores; CPU device with --threads 1 only.")
    parser.add_argument("--out-dir", default=str(ROOT / "eval/results"))
    parser.add_argument("--name", default="bench_speed", help="Output file stem.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.clock == "cpu" and (cuda or args.threads != 1):
        raise ValueError("--clock cpu times one CPU thread: use it with --device cpu --threads 1 (or --clock wall).")
    global _clock
    _clock = CLOCKS[args.clock]
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.latent_size = "sd15" if cuda else "tiny"
    args.latent_batches = args.latent_batches or ([1, 8] if cuda else args.batches)
    args.speedup_batches = [1, 8]
    load_before = os.getloadavg()
    start = time.time()
    result = {
        "command": " ".join(["python eval/bench_speed.py", *sys.argv[1:]]),
        "environment": {"device": str(device) if not cuda else torch.cuda.get_device_name(device),
                        "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                        "cpu_count": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
                        "dtype": str(dtype)},
        "rounds": args.rounds, "min_time": args.min_time, "clock": args.clock,
        "stepdistill": str(Path(stepdistill.__file__).parent),  # which checkout was measured
    }
    if "overhead" in args.sections:
        result["overhead"] = overhead_cases(args, device, dtype)
    if "inference" in args.sections:
        result["inference"] = inference_cases(args, device, dtype)
        if cuda:
            result["speedup"] = speedup_case(args, device, dtype)
    if "training" in args.sections:
        result["training"] = [training_case(m, args, device) for m in args.train_modes]
    result["wall_seconds"] = time.time() - start
    result["environment"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

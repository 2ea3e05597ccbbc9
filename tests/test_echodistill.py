"""EchoDistill on tiny random SD-like pipelines: what trains, the stock export, resume, bad inputs, the metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from cli_helpers import fails_in_one_line
from diffusers import StableDiffusionPipeline
from echo_world import write_echo_world, write_images
from torch import nn

from stepdistill.evaluation import concept_fidelity, prompt_fidelity
from stepdistill.losses import MultiScaleSWDLoss
from stepdistill.networks import DigitsFeatures
from stepdistill.trainers import EchoDistillConfig, EchoDistillTrainer

TEMPLATES = "a photo of {}|{} on a hill"


class TinyExtractor(nn.Module):
    """A small conv feature extractor (random, frozen by the trainer); ``tokens`` returns ``[B, 4, D]``."""

    def __init__(self, seed: int, tokens: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.tokens = tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(images))
        if self.tokens:
            return torch.nn.functional.adaptive_avg_pool2d(h, 2).flatten(2).transpose(1, 2)  # [B, 4, 6]
        return h.mean(dim=(2, 3))


class NoGradExtractor(TinyExtractor):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return super().forward(images)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD1.5-like teacher folder (v-prediction), a one-step student folder, concept images."""
    return write_echo_world(tmp_path_factory.mktemp("echo_world"))


def _config(world, out, **overrides) -> EchoDistillConfig:
    base = dict(teacher=str(world["teacher"]), student=str(world["student"]), concept_images=str(world["concept"]),
                output_dir=str(out), initializer_token="dog", concept_prompts=TEMPLATES, max_train_steps=1,
                train_batch_size=2, teacher_learning_rate=1e-3, token_learning_rate=1e-2, student_learning_rate=1e-3,
                head_learning_rate=1e-3, head_hidden=16, checkpointing_steps=0, log_every=1, eval_num_samples=0,
                sample_grid_size=2, export=False, seed=3, teacher_guidance_scale=2.0, ms_swd_projections=8,
                token_weight_decay=0.0, teacher_weight_decay=0.0, student_weight_decay=0.0, head_weight_decay=0.0)
    base.update(overrides)
    return EchoDistillConfig(**base)


def _extractors():
    return [TinyExtractor(0), TinyExtractor(1, tokens=True)]


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("mode", [dict(), dict(kv_lora_rank=2, echo_loss_weight=1.0, max_train_steps=2,
                                              gradient_checkpointing=True)],
                         ids=["kv_copies", "lora_echo"])
def test_one_step_trains_exactly_the_personalization_parameters(world, tmp_path, mode):
    """No weight decay: a tensor changes only through its gradient (LoRA's A moves from step 2, once B is not 0)."""
    extractors = _extractors()
    trainer = EchoDistillTrainer(_config(world, tmp_path / "run", **mode), extractors=extractors)
    table = trainer.text_encoder.get_input_embeddings().weight
    new_id = trainer.new_token.token_id
    assert new_id == table.shape[0] - 1 == 514
    before = {name: _snapshot(trainer.unwrap(name)) for name in ("teacher", "student", "discriminator")}
    extractors0 = [_snapshot(e) for e in extractors]
    table0, token0 = table.detach().clone(), trainer.new_token.weight.detach().clone()
    frozen_teacher = {k: v.detach().clone() for k, v in trainer.teacher.kv.denoiser.model.named_parameters()
                      if not v.requires_grad}
    vae0 = _snapshot(trainer.vae)
    summary = trainer.train()
    metrics = summary["final_metrics"]
    expected = {"loss/teacher", "loss/latent", "loss/identity", "loss/ms_swd", "loss/adversarial",
                "loss/discriminator"} | ({"loss/echo"} if mode else set())
    assert expected <= set(metrics) and all(np.isfinite(v) for v in metrics.values()), metrics
    for name, state in before.items():  # every trainable tensor changed: K/V (teacher, student), token, heads
        after = trainer.unwrap(name).state_dict()
        trained = {n for n, p in trainer.unwrap(name).named_parameters() if p.requires_grad}
        assert trained, name
        unchanged = [k for k in trained if torch.equal(state[k], after[k])]
        assert not unchanged, (name, unchanged[:4])
    assert not torch.equal(trainer.new_token.weight, token0)
    for e, state in zip(extractors, extractors0):  # the extractors are frozen
        assert all(torch.equal(v, e.state_dict()[k]) for k, v in state.items())
        assert not any(p.requires_grad for p in e.parameters())
    # the table: the new row follows the trained token, no other row moved
    assert torch.equal(table[:new_id], table0[:new_id])
    assert torch.equal(table[new_id], trainer.new_token.weight[0]) and not torch.equal(table[new_id], table0[new_id])
    for k, v in trainer.teacher.kv.denoiser.model.named_parameters():
        if k in frozen_teacher:
            assert torch.equal(v, frozen_teacher[k]), k
    assert all(torch.equal(v, trainer.vae.state_dict()[k]) for k, v in vae0.items())
    if mode:  # LoRA: only adapter weights in the K/V trainables; checkpointed networks still train them
        assert trainer.student.denoiser.model.is_gradient_checkpointing
        assert all("lora_" in n for n, p in trainer.unwrap("student").named_parameters() if p.requires_grad)


@pytest.mark.parametrize("schedule", ["sequential", "student_token"])
def test_baseline_schedules_train_only_their_parts(world, tmp_path, schedule):
    """'sequential': teacher + token in the first half, then student + heads from the frozen teacher;
    'student_token': only the token row moves (through the student), every network weight stays bitwise."""
    trainer = EchoDistillTrainer(_config(world, tmp_path / "run", schedule=schedule, max_train_steps=2),
                                 extractors=_extractors())
    before = {name: _snapshot(trainer.unwrap(name)) for name in ("student", "discriminator")}
    teacher_kv0 = _snapshot(trainer.teacher.kv)
    token0 = trainer.new_token.weight.detach().clone()
    tokens = []
    original = trainer.teacher_update

    def spy(step, noise, add):  # the token after each teacher step
        original(step, noise, add)
        tokens.append((step, trainer.new_token.weight.detach().clone()))
    trainer.teacher_update = spy
    summary = trainer.train()
    assert all(np.isfinite(v) for v in summary["final_metrics"].values())
    assert not torch.equal(trainer.new_token.weight, token0)
    changed = {name: any(not torch.equal(v, trainer.unwrap(name).state_dict()[k]) for k, v in state.items())
               for name, state in before.items()}
    teacher_changed = any(not torch.equal(v, trainer.teacher.kv.state_dict()[k]) for k, v in teacher_kv0.items())
    if schedule == "sequential":
        assert [s for s, _ in tokens] == [0], tokens  # the teacher trains in the first half only
        assert torch.equal(trainer.new_token.weight, tokens[0][1])  # and stays frozen in the second
        assert teacher_changed and changed == {"student": True, "discriminator": True}
    else:
        assert [s for s, _ in tokens] == [0, 1]
        assert not teacher_changed and changed == {"student": False, "discriminator": False}


def test_schedule_is_validated():
    with pytest.raises(ValueError, match="schedule must be one of"):
        EchoDistillConfig(initializer_token="dog", schedule="both")
    with pytest.raises(ValueError, match="The echo stage needs the joint schedule"):
        EchoDistillConfig(initializer_token="dog", schedule="sequential", echo_loss_weight=1.0)


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline

    spec = json.load(open(sys.argv[1]))
    pipe = DiffusionPipeline.from_pretrained(spec["student"])
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in spec["seeds"]]
    images = pipe(spec["prompts"], generator=gens, output_type="np", **spec["call_kwargs"]).images
    teacher = DiffusionPipeline.from_pretrained(spec["teacher"])
    teacher.set_progress_bar_config(disable=True)
    t_img = teacher(spec["prompts"][:1], num_inference_steps=2, guidance_scale=2.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    token = spec["token"]
    ids = [p.tokenizer.convert_tokens_to_ids(token) for p in (pipe, teacher)]
    rows = [p.text_encoder.get_input_embeddings().weight[i].detach().numpy() for p, i in zip((pipe, teacher), ids)]
    np.savez(sys.argv[2], images=images, rows=np.stack(rows), ids=np.array(ids), teacher=t_img,
             pipeline=np.array(type(pipe).__name__))
    assert "stepdistill" not in sys.modules, "the stock side imported stepdistill"
    print("OK")
    """
)


def test_export_loads_without_stepdistill_and_reproduces_its_images(world, tmp_path):
    trainer = EchoDistillTrainer(_config(world, tmp_path / "run", export=True, max_train_steps=2, use_ema=True,
                                         heldout_concept_images=str(world["heldout"]), eval_num_samples=4),
                                 extractors=_extractors())
    summary = trainer.train()
    assert 0.0 <= summary["eval"]["eval/concept_fidelity"] <= 1.0
    student, teacher = tmp_path / "run" / "student", tmp_path / "run" / "teacher"
    assert json.loads((student / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    prompts = ["a photo of <new1>", "<new1> on a hill", "a photo of a dog"]
    seeds = [0, 1, 7]
    expected = trainer.sample_student_images(prompts, seeds)
    spec = dict(student=str(student), teacher=str(teacher), prompts=prompts, seeds=seeds, token="<new1>",
                call_kwargs={"timesteps": [999], "guidance_scale": 0.0})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "spec.json"), str(tmp_path / "out.npz")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    want = ((expected + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert want.std() > 0.01 and out["images"].shape == want.shape == (3, 16, 16, 3)
    assert np.abs(out["images"] - want).max() < 1e-4
    assert out["ids"].tolist() == [514, 514]
    row = trainer.new_token.weight[0].detach().numpy()
    assert np.allclose(out["rows"], row[None], atol=0)  # the trained row in both exported text encoders
    assert np.isfinite(out["teacher"]).all()
    assert (tmp_path / "run" / "samples" / "step-000002.png").is_file()


def test_resume_is_bitwise(world, tmp_path):
    straight = EchoDistillTrainer(_config(world, tmp_path / "a", max_train_steps=3), extractors=_extractors())
    straight.train()
    first = EchoDistillTrainer(_config(world, tmp_path / "b", max_train_steps=2, checkpointing_steps=2),
                               extractors=_extractors())
    first.train()
    resumed = EchoDistillTrainer(_config(world, tmp_path / "b", max_train_steps=3, resume_from_checkpoint="latest"),
                                 extractors=_extractors())
    resumed.train()
    assert resumed.global_step == 3
    for name in ("teacher", "student", "discriminator"):
        a, b = straight.unwrap(name).state_dict(), resumed.unwrap(name).state_dict()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, (name, different[:4])


@pytest.mark.parametrize("case,message", [
    ("token_in_vocab", "already in the tokenizer's vocabulary"),
    ("no_images", "No concept images"),
    ("wrong_size", "resize / convert the concept images to 16x16"),
    ("wrong_channels", "with 1 channel(s), but the model works on 16x16 images with 3"),
    ("not_differentiable", "is not differentiable"),
])
def test_bad_inputs_are_one_line_errors(world, tmp_path, case, message):
    overrides, extractors = {}, _extractors()
    if case == "token_in_vocab":
        overrides["placeholder_token"] = "a</w>"
    elif case == "no_images":
        (tmp_path / "empty").mkdir()
        overrides["concept_images"] = str(tmp_path / "empty")
    elif case == "wrong_size":
        overrides["concept_images"] = str(write_images(tmp_path / "big", 3, size=24))
    elif case == "wrong_channels":
        overrides["concept_images"] = str(write_images(tmp_path / "gray", 3, mode="L"))
    else:
        extractors = [TinyExtractor(0), NoGradExtractor(1)]
    with pytest.raises(ValueError, match=r"^[^\n]*" + message.replace("(", r"\(").replace(")", r"\)")) as err:
        EchoDistillTrainer(_config(world, tmp_path / "run", **overrides), extractors=extractors)
    assert "\n" not in str(err.value)


def test_cli_reports_a_bad_input_in_one_line(world, tmp_path, capsys):
    fails_in_one_line(["train", "echodistill", "--teacher", str(world["teacher"]), "--student", str(world["student"]),
                       "--concept_images", str(tmp_path / "missing"), "--initializer_token", "dog",
                       "--output_dir", str(tmp_path / "run")], capsys, "No concept images")
    fails_in_one_line(["train", "echodistill", "--teacher", str(world["teacher"]), "--concept_prompts", "a photo",
                       "--initializer_token", "dog"], capsys, "concept_prompts must be '|'-separated templates")


def test_metrics_take_any_extractor_and_classifier():
    extractor = TinyExtractor(0)
    g = torch.Generator().manual_seed(0)
    concept = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    others = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    same = concept_fidelity(concept, concept, extractor)
    assert concept_fidelity(others, concept, extractor) < same <= 1.0 + 1e-6
    classifier = lambda x: torch.stack([x.mean(dim=(1, 2, 3)), -x.mean(dim=(1, 2, 3))], dim=1)  # noqa: E731
    bright, dark = torch.ones(2, 3, 4, 4), -torch.ones(3, 3, 4, 4)
    assert prompt_fidelity(torch.cat([bright, dark]), [0, 0, 1, 1, 1], classifier) == 1.0
    assert prompt_fidelity(torch.cat([bright, dark]), [1, 0, 0, 1, 1], classifier) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="asked-for classes"):
        prompt_fidelity(bright, [0], classifier)


def test_ms_swd_and_digits_features_on_small_one_channel_images():
    swd = MultiScaleSWDLoss()
    assert swd.plan(8, 8) == (7, 1) and swd.plan(64, 64) == (11, 3) and swd.plan(512, 512) == (11, 5)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 1, 8, 8, generator=g) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    d = swd(x, y, generator=torch.Generator().manual_seed(1))
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.allclose(swd(y, y, generator=g), torch.zeros(2))
    rgb = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert swd(rgb, rgb.flip(-1), generator=g).shape == (2,)
    from stepdistill.data.digits_models import DigitsClassifier

    torch.manual_seed(0)
    clf = DigitsClassifier()
    for layer, dim in (("penultimate", 64), ("pooled", 128)):
        f = DigitsFeatures(clf, layer)
        assert f.feature_dim == dim and f(rgb).shape == (2, dim)
        assert not f.training and not f.train().training  # stays in eval mode
    centred = DigitsFeatures.centered(clf, rgb)
    assert torch.allclose(centred(rgb).mean(0), torch.zeros(64), atol=1e-5)


def test_cli_trains_with_the_default_digits_extractors(world, tmp_path, capsys):
    from stepdistill.commands import main

    assert main(["train", "echodistill", "--teacher", str(world["teacher"]), "--student", str(world["student"]),
                 "--concept_images", str(world["concept"]), "--initializer_token", "dog", "--concept_prompts",
                 "a photo of {}|{} on a hill", "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1",
                 "--head_hidden", "8", "--ms_swd_projections", "4", "--eval_num_samples", "0", "--export", "false",
                 "--sample_grid_size", "2"]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["global_step"] == 1 and np.isfinite(summary["final_metrics"]["loss/identity"])
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "concept_prompts: a photo of {}|{} on a hill" in config
    from stepdistill.configs import parse_config

    again = parse_config(EchoDistillConfig, ["--config", str(tmp_path / "run" / "config.yaml")])  # a usable recipe
    templates = ["a photo of {}", "{} on a hill"]
    assert again.concept_templates == templates and again.student_templates == templates


def test_pixel_space_teacher_without_vae(world, tmp_path):
    """A pixel-space text UNet (no VAE): the samples are the images; training runs, the export asks for a VAE."""
    from diffusers import UNet2DConditionModel
    from tiny_models import randomize

    folder = tmp_path / "pixel"
    pipe = StableDiffusionPipeline.from_pretrained(world["teacher"], safety_checker=None)
    torch.manual_seed(5)
    unet = randomize(UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2))
    StableDiffusionPipeline(vae=None, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                            scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    trainer = EchoDistillTrainer(_config(world, tmp_path / "run", teacher=str(folder), student=str(folder)),
                                 extractors=_extractors())
    assert trainer.vae is None and trainer.pixel_shape == (3, 16, 16)
    summary = trainer.train()
    assert all(np.isfinite(v) for v in summary["final_metrics"].values())
    assert trainer.sample_student_images(["a photo of <new1>"], [0]).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="needs a VAE"):
        trainer.export(tmp_path / "student")


def test_new_token_on_a_sparse_vocabulary_never_shrinks_the_table(tmp_path):
    """Vocabulary ids with gaps (len(tokenizer) < rows): the table keeps its rows, only the new row is replaced."""
    from tiny_models import clip_text_encoder
    from transformers import CLIPTokenizer

    from stepdistill.data.digits_text import clip_byte_alphabet
    from stepdistill.networks import NewTokenEmbedding

    chars = clip_byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}  # ids 0..511
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    del vocab[chars[40] + "</w>"]  # a gap at id 296: len(tokenizer) = 513 < 514 rows
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=16)
    te = clip_text_encoder(4)
    table0 = te.get_input_embeddings().weight.detach().clone()
    new = NewTokenEmbedding(te, tok, "<new1>", "dog")
    table = te.get_input_embeddings().weight
    assert table.shape[0] >= table0.shape[0] and new.token_id not in vocab.values()
    others = [i for i in range(table0.shape[0]) if i != new.token_id]
    assert torch.equal(table[others], table0[others])
    ids = tok("a photo of <new1>", return_tensors="pt").input_ids
    assert (ids == new.token_id).sum() == 1
    out = te(ids).last_hidden_state
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()  # (LN: sum has no grad)
    assert new.weight.grad is not None and new.weight.grad.abs().sum() > 0 and table.grad is None


def test_concept_augment_masks_the_valid_region():
    from stepdistill.data.concepts import ConceptAugment

    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y, mask = ConceptAugment(fill=-1.0)(x, torch.Generator().manual_seed(1))
    area = mask.mean(dim=(1, 2, 3))
    shrunk = area < 1
    assert 5 < int(shrunk.sum()) < 32  # both branches drawn (shrink with probability 0.66)
    assert (area[shrunk] >= (5 / 16) ** 2 - 1e-6).all()  # sides of at least size / 3
    assert (y[shrunk] * (1 - mask[shrunk]) == -(1 - mask[shrunk])).all()  # the canvas outside holds the fill
    assert not torch.equal(y[~shrunk], x[~shrunk])  # zoomed in (and maybe flipped)
    same, _ = ConceptAugment(hflip=False, shrink_probability=0.0)(x, torch.Generator().manual_seed(1))
    assert torch.equal(same, x)


def test_digit_concepts_are_deterministic_styled_and_round_trip(tmp_path):
    """Slant leans the strokes right at the top, thick adds ink; written PNGs load back as the same images."""
    from stepdistill.data.concepts import (
        digit_concept_images,
        load_concept_captions,
        load_concept_images,
        write_digit_concept,
    )

    slant, thick = digit_concept_images("slant"), digit_concept_images("thick")
    again = digit_concept_images("slant")
    assert all(torch.equal(slant[k], again[k]) for k in slant)
    assert slant["train"].shape == (4, 1, 8, 8) and slant["heldout"].shape == (80, 1, 8, 8)
    assert slant["train_labels"].tolist() == [2, 3, 5, 7]
    assert torch.equal(slant["heldout_labels"], thick["heldout_labels"])
    plain = slant["heldout_plain"]
    ink = lambda x: (x + 1) / 2  # noqa: E731
    cols = torch.arange(8.0)

    def lean(x):  # column centre of mass of the top half minus that of the bottom half
        top, bottom = ink(x)[..., :4, :], ink(x)[..., 4:, :]
        com = lambda part: (part.sum(-2) * cols).sum(-1) / part.sum((-2, -1)).clamp_min(1e-6)  # noqa: E731
        return (com(top) - com(bottom)).mean()
    assert lean(slant["heldout"]) > lean(plain) + 0.5
    assert ink(thick["heldout"]).mean() > ink(plain).mean() * 1.2
    assert thick["heldout"].min() >= -1 and thick["heldout"].max() <= 1
    folders = write_digit_concept("thick", tmp_path, captions=lambda d: f"the digit {d} {{}}|a {d} {{}}")
    loaded = load_concept_images(folders["train"], (1, 8, 8))
    assert torch.allclose(loaded, thick["train"], atol=1 / 127.5)
    assert load_concept_captions(folders["train"]) == [[f"the digit {d} {{}}", f"a {d} {{}}"] for d in (2, 3, 5, 7)]
    (folders["train"] / "captions.json").write_text('{"0.png": "the digit 2"}')
    with pytest.raises(ValueError, match="no templates with"):
        load_concept_captions(folders["train"])
    assert len(list(folders["heldout"].glob("d7_*.png"))) == 8


def test_paired_mean_replicates_and_pixel_features():
    from stepdistill.evaluation import PixelFeatures
    from stepdistill.evaluation.uncertainty import ResamplePlan, compare_paired, mean_replicates

    plan = ResamplePlan.make(n=50, dim=1, num_bootstrap=200, seed=0)
    rng = np.random.default_rng(0)
    base = rng.normal(size=50)
    a = mean_replicates({"concept_fidelity": base + 0.1, "prompt_fidelity": (base > 0).astype(float)}, plan)
    b = mean_replicates({"concept_fidelity": base, "prompt_fidelity": (base > 0).astype(float)}, plan)
    diff = compare_paired(a, b)
    assert diff["concept_fidelity"].verdict == "better" and diff["prompt_fidelity"].verdict == "not resolved"
    assert compare_paired(b, a)["concept_fidelity"].verdict == "worse"
    with pytest.raises(ValueError, match="values for a plan of 50"):
        mean_replicates({"concept_fidelity": base[:10]}, plan)
    center = torch.full((1, 8, 8), -0.5)
    feats = PixelFeatures(center)(torch.zeros(3, 1, 8, 8))
    assert feats.shape == (3, 64) and torch.allclose(feats, torch.full((3, 64), 0.5))

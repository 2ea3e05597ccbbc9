"""The text-conditioned digits world: captions and tokenizer, joint training, the stock pipeline folder.

Training tests use tiny networks built from configs; the shipped folder is only loaded once, in a subprocess
without stepdistill, for a two-step call.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline
from tiny_models import randomize

from stepdistill.data.digits_models import digits_text_encoder, digits_vae, text_teacher_path, text_teacher_unet
from stepdistill.data.digits_text import (
    HELDOUT_TEMPLATES,
    NUMBER_WORDS,
    TRAIN_TEMPLATES,
    caption_words,
    captions_like_reference,
    check_templates,
    digit_of_caption,
    make_caption,
    random_captions,
    vocabulary,
    write_digits_tokenizer,
)
from stepdistill.loading import model_folder
from stepdistill.trainers.digits_text_world import TextTeacherConfig, encode_captions, train_text_teacher

ALL_TEMPLATES = TRAIN_TEMPLATES + HELDOUT_TEMPLATES
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_digits_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tokenizer_dir)  # the files alone, as diffusers loads them


def tiny_text_parts(tokenizer):
    """A tiny VAE (scaling factor set), text encoder and UNet for the digits tokenizer."""
    torch.manual_seed(0)
    vae = randomize(digits_vae(block_out_channels=(8,), norm_num_groups=4))
    vae.register_to_config(scaling_factor=0.5)
    text = digits_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, hidden_size=16,
                               intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    unet = randomize(text_teacher_unet(cross_attention_dim=16, block_out_channels=(8, 8), norm_num_groups=4,
                                       attention_head_dim=2))
    return vae, text.eval(), unet


def test_every_caption_word_is_one_token_and_round_trips(tokenizer):
    stock = tokenizer
    for template in ALL_TEMPLATES:
        for label in range(10):
            caption = make_caption(label, template)
            ids = stock(caption).input_ids
            words = caption_words(caption)
            assert ids[0] == stock.bos_token_id and ids[-1] == stock.eos_token_id and len(ids) == len(words) + 2
            assert stock.unk_token_id not in ids[1:-1]
            assert stock.decode(ids, skip_special_tokens=True).split() == caption.replace(",", " ,").split()
    padded = stock("a handwritten seven", padding="max_length", max_length=stock.model_max_length).input_ids
    assert len(padded) == 16 and stock.model_max_length == 16


def test_heldout_templates_are_new_combinations_of_training_words():
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)
    assert set(vocabulary(HELDOUT_TEMPLATES)) <= set(vocabulary(TRAIN_TEMPLATES))


def test_captions_name_their_digit_and_bad_captions_fail_in_one_line():
    words = vocabulary(ALL_TEMPLATES)
    for template in ALL_TEMPLATES:
        assert [digit_of_caption(make_caption(y, template), words) for y in range(10)] == list(range(10))
    with pytest.raises(ValueError, match=r"uses the word 'scribbled'.*not in the digits-world vocabulary"):
        digit_of_caption("a scribbled seven", words)
    with pytest.raises(ValueError, match="must name exactly one digit"):
        digit_of_caption("the digit 7, written thin seven two", words)
    with pytest.raises(ValueError, match="must name the digit exactly once"):
        check_templates(["a handwritten digit"])
    with pytest.raises(ValueError, match="must name the digit exactly once"):
        check_templates(["{word} {digit}"])


def test_reference_captions_follow_the_heldout_mix_and_dropout_empties_captions():
    captions, labels = captions_like_reference(40, HELDOUT_TEMPLATES)
    assert torch.bincount(labels, minlength=10).tolist() == [4] * 10
    assert captions[0] == make_caption(0, HELDOUT_TEMPLATES[0]) and captions[5] == make_caption(1, HELDOUT_TEMPLATES[1])
    g = torch.Generator().manual_seed(0)
    drawn = random_captions(torch.arange(10).repeat(100), TRAIN_TEMPLATES, 0.1, g)
    empty = sum(c == "" for c in drawn) / len(drawn)
    assert 0.05 < empty < 0.15 and all(NUMBER_WORDS[0] in c or "0" in c for c in drawn[::10] if c)


def test_a_few_training_steps_change_text_encoder_and_unet(tokenizer, tmp_path):
    vae, text, unet = tiny_text_parts(tokenizer)
    text0, unet0, vae0 = copy.deepcopy(text), copy.deepcopy(unet), copy.deepcopy(vae)
    config = TextTeacherConfig(max_train_steps=3, batch_size=8, lr_warmup_steps=1, learning_rate=1e-2,
                               text_encoder_learning_rate=1e-2)
    parts, _, _ = train_text_teacher(config, Accelerator(cpu=True), tmp_path / "tok", vae=vae, text_encoder=text,
                                     unet=unet)
    for trained, init in ((parts["text_encoder"], text0), (parts["unet"], unet0)):
        before = dict(init.named_parameters())
        unchanged = [n for n, p in trained.named_parameters() if torch.equal(p, before[n])
                     and "position_ids" not in n]
        # the caption's own words train; rows of tokens no caption uses (the byte alphabet) get no gradient
        unchanged = [n for n in unchanged if not n.endswith("token_embedding.weight")]
        assert not unchanged, unchanged
    emb0 = text0.get_input_embeddings().weight
    emb1 = parts["text_encoder"].get_input_embeddings().weight
    seven = tokenizer.convert_tokens_to_ids("seven</w>")
    assert not torch.equal(emb0[seven], emb1[seven])
    assert all(torch.equal(a, b) for a, b in zip(vae0.parameters(), parts["vae"].parameters()))  # frozen


def test_encode_captions_matches_the_stock_pipeline(tokenizer):
    vae, text, unet = tiny_text_parts(tokenizer)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    captions = ["a handwritten seven", "", "the digit 3", "a handwritten seven"]
    ours = encode_captions(tokenizer, text, captions, torch.device("cpu"))
    stock, _ = pipe.encode_prompt(captions, "cpu", 1, False)
    torch.testing.assert_close(ours, stock)


def test_cli_writes_a_stock_pipeline_folder(tmp_path):
    """``--only text_teacher`` end to end with default networks, two steps: a folder diffusers loads and samples."""
    from stepdistill.commands.teacher import main

    assert main(["--only", "text_teacher", "--output_dir", str(tmp_path), "--text_teacher_max_train_steps", "2",
                 "--text_teacher_vae_steps", "2", "--text_teacher_batch_size", "4",
                 "--text_teacher_lr_warmup_steps", "1"]) == 0
    folder = tmp_path / "text_teacher"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["text_encoder"][1] == "CLIPTextModel"
    meta = json.loads((folder / "stepdistill_teacher.json").read_text())
    from transformers import CLIPTokenizer

    fast = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    (folder / "tokenizer" / "tokenizer.json").rename(tmp_path / "tokenizer.json")  # the classic files alone
    classic = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    (tmp_path / "tokenizer.json").rename(folder / "tokenizer" / "tokenizer.json")
    for caption in ("a handwritten seven", "number 3, written thin", ""):
        assert classic(caption).input_ids == fast(caption).input_ids
    assert meta["config"]["max_train_steps"] == 2 and meta["vae"]["scaling_factor"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.vae.config.scaling_factor == meta["vae"]["scaling_factor"]
    out = pipe(["a handwritten seven"], num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 8, 8, 1)


def test_bad_text_teacher_config_fails_in_one_line():
    from stepdistill.commands.teacher import parse_args

    with pytest.raises(ValueError, match=r"caption_drop_prob must be in \[0, 1\)"):
        parse_args(["--only", "text_teacher", "--text_teacher_caption_drop_prob", "1.5"])


SUBPROCESS = r"""
import sys, json
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
out = pipe(["a handwritten seven", "the digit 3"], num_inference_steps=2, output_type="np",
           generator=[torch.Generator().manual_seed(k) for k in range(2)]).images
assert not any(m.startswith("stepdistill") for m in sys.modules), "stepdistill was imported"
print(json.dumps({"shape": list(out.shape), "min": float(out.min()), "max": float(out.max()),
                  "scale": pipe.vae_scale_factor}))
"""


def test_shipped_text_teacher_loads_with_stock_diffusers_in_a_clean_process():
    folder = text_teacher_path()
    assert model_folder("digits-text") == folder
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 10_000_000, f"shipped text teacher is {total / 1e6:.2f} MB"
    res = subprocess.run([sys.executable, "-c", SUBPROCESS, str(folder)], capture_output=True, text=True,
                         cwd=str(folder.parent), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["shape"] == [2, 8, 8, 1] and info["scale"] == 1 and 0.0 <= info["min"] <= info["max"] <= 1.0

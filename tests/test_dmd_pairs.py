"""DMD1 regression pairs (generate_pairs command, file format, trainer loading) and regression distances."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from stepdistill import Conditioning, VPSchedule, initial_noise, sample_teacher
from stepdistill.commands.pairs import generate_pairs_main
from stepdistill.data import DigitsSource
from stepdistill.denoiser import CallableDenoiser
from stepdistill.loading import load_denoiser
from stepdistill.losses import FeatureDistance, MSEDistance, build_regression_distance
from stepdistill.trainers.dmd import DMDConfig, DMDTrainer
from stepdistill.trainers.pairs import (
    PairsFileError,
    check_pairs_match_teacher,
    default_pairs_seed,
    generate_regression_pairs,
    load_regression_pairs,
    merge_regression_pairs,
    pair_noise_seed,
    read_pairs_metadata,
    save_regression_pairs,
)

SEED = 3  # trainer seed; the pair set's seed is default_pairs_seed(SEED)


def _config(teacher, out, **overrides) -> DMDConfig:
    base = dict(
        teacher=str(teacher), output_dir=str(out), max_train_steps=1, train_batch_size=4,
        generator_learning_rate=1e-3, critic_learning_rate=1e-3, lr_warmup_steps=0,
        critic_updates_per_generator_update=1, checkpointing_steps=0, log_every=1, eval_num_samples=0,
        sample_grid_size=4, seed=SEED, student_timesteps=[399], regression_loss_weight=0.25,
        num_regression_pairs=6, regression_teacher_steps=2, export=False,
    )
    base.update(overrides)
    return DMDConfig(**base)


def _make_pairs_file(teacher, path, count=6, steps=2, batch_size=256):
    return generate_pairs_main([
        "--teacher", str(teacher), "--num_regression_pairs", str(count), "--regression_teacher_steps", str(steps),
        "--seed", str(SEED), "--num_threads", "1", "--batch_size", str(batch_size), "--output", str(path),
    ])


@pytest.fixture(scope="module")
def pairs_file(tiny_teacher, tmp_path_factory):
    return _make_pairs_file(tiny_teacher, tmp_path_factory.mktemp("pairs") / "pairs.safetensors")


def test_pairs_file_reproduces_sample_teacher_per_index(tiny_teacher, pairs_file, tmp_path):
    # one pair per teacher call, so that pair i is bit-for-bit a batch-of-one sample_teacher call
    single = _make_pairs_file(tiny_teacher, tmp_path / "single.safetensors", batch_size=1)
    pairs = load_regression_pairs(single)
    meta = read_pairs_metadata(single)
    seed = default_pairs_seed(SEED)
    assert meta["count"] == 6 and meta["num_inference_steps"] == 2 and meta["seed"] == seed
    assert meta["guidance_scale"] == 2.0  # the tiny teacher's json: CFG is part of the ODE
    assert meta["sample_shape"] == [1, 8, 8] and meta["conditioning"] == ["class_labels"]
    assert meta["schedule"]["prediction_type"] == "v_prediction" and meta["network"]["class"] == "UNet2DModel"
    assert pairs.noise.shape == pairs.x0.shape == (6, 1, 8, 8) and pairs.index is None
    assert not list(tmp_path.glob(".*")), "temporary files left behind"
    # pair i, made independently from its documented recipe: data-source labels, per-index noise seed
    labels, _ = DigitsSource().sample(6, torch.Generator().manual_seed(seed))
    assert torch.equal(pairs.cond.class_labels, labels.class_labels)
    teacher = load_denoiser(tiny_teacher)
    for i in (0, 5):
        assert pair_noise_seed(seed, i) == 1_000_003 * seed + i  # the documented per-index seed
        z = initial_noise((1, 1, 8, 8), [torch.Generator().manual_seed(1_000_003 * seed + i)])
        cond = Conditioning(class_labels=labels.class_labels[i:i + 1], null_class_label=10)
        y = sample_teacher(teacher, z, cond, num_inference_steps=2, guidance_scale=2.0)
        assert torch.equal(pairs.noise[i:i + 1], z)
        assert torch.equal(pairs.x0[i:i + 1], y)
    # batching changes only float rounding
    torch.testing.assert_close(load_regression_pairs(pairs_file).x0, pairs.x0, rtol=0, atol=1e-5)
    # shards (any split, any batch size) merge into the same set
    shards = [generate_regression_pairs(teacher, DigitsSource(), 6, (1, 8, 8), 2, 2.0, seed, indices=ix, batch_size=3)
              for ix in ([0, 1], [2, 3, 4, 5])]
    merged = merge_regression_pairs(shards[::-1])
    assert torch.equal(merged.noise, pairs.noise) and torch.equal(merged.cond.class_labels, labels.class_labels)
    torch.testing.assert_close(merged.x0, pairs.x0, rtol=0, atol=1e-5)
    with pytest.raises(PairsFileError, match="exactly once"):
        merge_regression_pairs(shards[:1])


def test_trainer_with_pairs_file_matches_in_memory_pairs(tiny_teacher, pairs_file, tmp_path):
    in_memory = DMDTrainer(_config(tiny_teacher, tmp_path / "mem"))
    from_file = DMDTrainer(_config(tiny_teacher, tmp_path / "file", regression_pairs=str(pairs_file)))
    a, b = in_memory.regression_pairs, from_file.regression_pairs
    assert torch.equal(a["z"], b["z"]) and torch.equal(a["cond"].class_labels, b["cond"].class_labels)
    assert torch.equal(a["y"], b["y"])  # same code, same batches
    ma, mb = in_memory.train()["final_metrics"], from_file.train()["final_metrics"]
    for key in ("loss/regression", "loss/dm", "loss/fake_score"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-5, abs=1e-7), key


def test_digits_feature_distance_zero_positive_and_gradient_reaches_generator(tiny_teacher, tmp_path):
    dist = build_regression_distance("digits_features")
    assert isinstance(dist, FeatureDistance)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    assert torch.equal(dist(x, x.clone()), torch.zeros(4))
    y = x + 0.2 * torch.randn(x.shape, generator=g)
    d = dist(x, y)
    assert d.shape == (4,) and (d > 0).all()
    assert torch.all(dist(x, y[[1, 2, 3, 0]]) > d), "unrelated images should be further apart than perturbed ones"
    xg = x.clone().requires_grad_(True)
    dist(xg, y).sum().backward()
    assert xg.grad.abs().sum() > 0
    with_pixel = build_regression_distance("digits_features", pixel_weight=0.5)
    torch.testing.assert_close(with_pixel(x, y), d + 0.5 * ((x - y) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="regression_distance=mse"):
        dist.check_sample_shape((4, 8, 8))
    # through the trainer: the regression term alone (dm weight 0) moves every generator parameter
    trainer = DMDTrainer(_config(tiny_teacher, tmp_path / "feat", regression_distance="digits_features",
                                 dm_loss_weight=0.0))
    assert isinstance(trainer.regression_distance, FeatureDistance)
    cond, _ = trainer.data.sample(4, trainer.rng)
    x, x_reg, y, _ = trainer.generate_with_regression(cond)
    loss, parts = trainer.generator_loss(x, cond, (x_reg, y))
    assert parts["loss/regression"] > 0
    loss.backward()
    gen = trainer.unwrap("generator")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    assert all(p.grad is None and not p.requires_grad for p in trainer.regression_distance.parameters())


def test_mismatched_pairs_file_gives_clear_errors(tiny_teacher, pairs_file, tmp_path):
    from stepdistill.data.digits_models import teacher_unet
    from stepdistill.trainers.digits_world import save_teacher

    teacher = load_denoiser(tiny_teacher)
    example = Conditioning(class_labels=torch.tensor([1]), null_class_label=10)
    pairs = load_regression_pairs(pairs_file)
    check_pairs_match_teacher(pairs, teacher, (1, 8, 8), example, verify=2)  # the right teacher passes
    # wrong sample shape
    schedule = VPSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                                      prediction_type="sample")
    toy = CallableDenoiser(lambda x, t, c: 0.5 * x, schedule)
    small = generate_regression_pairs(toy, DigitsSource(), 3, (1, 4, 4), 2, None, 0)
    save_regression_pairs(small, tmp_path / "small.safetensors")
    with pytest.raises(PairsFileError, match=r"shape \[1, 4, 4\].*\[1, 8, 8\].*stepdistill pairs"):
        DMDTrainer(_config(tiny_teacher, tmp_path / "a", regression_pairs=str(tmp_path / "small.safetensors")))
    # same architecture and schedule, other weights: caught by re-running the ODE on the first pair
    torch.manual_seed(1)
    other = teacher_unet(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                         down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with torch.no_grad():
        for p in other.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    other_dir = save_teacher(other, tmp_path / "other_teacher", {"guidance_scale": 2.0})
    with pytest.raises(PairsFileError, match="does not reproduce"):
        DMDTrainer(_config(other_dir, tmp_path / "b", regression_pairs=str(pairs_file)))
    # another architecture
    with pytest.raises(PairsFileError, match="different teacher network"):
        check_pairs_match_teacher(pairs, load_denoiser(_shipped_teacher()), (1, 8, 8), example)
    # another data source (unconditional) and a missing / foreign file
    with pytest.raises(PairsFileError, match="conditioning fields"):
        check_pairs_match_teacher(pairs, teacher, (1, 8, 8), Conditioning(), verify=0)
    with pytest.raises(PairsFileError, match="No pairs file"):
        load_regression_pairs(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(PairsFileError, match="not written by stepdistill"):
        load_regression_pairs(tmp_path / "foreign.safetensors")


def _shipped_teacher():
    from stepdistill.data.digits_models import teacher_path

    return teacher_path()


def test_regression_distance_and_pairs_config_errors(tiny_teacher, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"regression_distance must be one of \['mse', 'digits_features', 'lpips'\]"):
        _config(tiny_teacher, tmp_path, regression_distance="ssim")
    with pytest.raises(ValueError, match="Unknown regression distance 'ssim'"):
        build_regression_distance("ssim")
    with pytest.raises(ValueError, match="regression_lpips_weights"):
        _config(tiny_teacher, tmp_path, regression_distance="lpips")
    with pytest.raises(ValueError, match="regression_loss_weight is 0"):
        _config(tiny_teacher, tmp_path, regression_loss_weight=0.0, regression_pairs="p.safetensors")
    with pytest.raises(ValueError, match="regression_pixel_weight"):
        _config(tiny_teacher, tmp_path, regression_pixel_weight=0.5)  # with mse
    monkeypatch.setitem(sys.modules, "lpips", None)  # as if not installed
    with pytest.raises(ImportError, match=r"(?s)pip install lpips.*never downloads"):
        build_regression_distance("lpips", tmp_path / "w.pth")
    assert torch.equal(MSEDistance()(torch.ones(2, 3), torch.zeros(2, 3)), torch.ones(2))


def test_lpips_distance_from_local_weights(tmp_path):
    import warnings

    import lpips  # a dev dependency (pyproject [dev]); optional for users (extra "lpips")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False)  # nothing downloaded
    torch.save(model.state_dict(), tmp_path / "lpips.pth")
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("lin")}, tmp_path / "lin_only.pth")
    dist = build_regression_distance("lpips", tmp_path / "lpips.pth")
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    assert torch.equal(dist(x.detach(), x.detach()), torch.zeros(2))
    dist(x, torch.rand(2, 1, 8, 8)).sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not a complete LPIPS"):
        build_regression_distance("lpips", tmp_path / "lin_only.pth")
    assert json.dumps(dist.name) == '"lpips"'

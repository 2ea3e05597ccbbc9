"""The data layer: condition sources and their subsets, and DMD1 pairs that a subset leaves whole."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from stepdistill.data import (
    DataConfig,
    DataSourceError,
    DigitsSource,
    UnconditionalSource,
    UniformLabelSource,
    make_data_source,
)
from stepdistill.trainers.dmd import DMDConfig, DMDTrainer


def below(k: int):
    return lambda cond: cond.class_labels < k


def test_digits_and_label_subsets_keep_only_their_classes():
    full = DigitsSource()
    part = full.subset(below(3))
    assert len(part) < len(full) and set(part.labels.tolist()) == {0, 1, 2}
    cond, images = part.sample(64, torch.Generator().manual_seed(0))
    assert set(cond.class_labels.tolist()) <= {0, 1, 2} and images.shape == (64, 1, 8, 8)
    assert part.grid_conditioning(5).class_labels.tolist() == [0, 1, 2, 0, 1]
    assert full.grid_conditioning(12).class_labels.tolist() == [*range(10), 0, 1]  # the whole split, unchanged
    labels = UniformLabelSource(10, 10).subset(lambda c: c.class_labels % 2 == 1)
    drawn = labels.sample(200, torch.Generator().manual_seed(0))[0].class_labels
    assert set(drawn.tolist()) == {1, 3, 5, 7, 9} and len(labels) == 5
    # the whole source draws exactly what it always drew (same generator consumption)
    same = UniformLabelSource(10, 10).sample(8, torch.Generator().manual_seed(1))[0].class_labels
    assert torch.equal(same, torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1)))


def test_subset_errors_are_clear():
    with pytest.raises(DataSourceError, match="keeps none"):
        DigitsSource().subset(below(0))
    with pytest.raises(ValueError, match="bool tensor"):
        DigitsSource().subset(lambda cond: cond.class_labels)
    with pytest.raises(DataSourceError, match="no finite set"):
        UnconditionalSource().subset(below(1))


def test_dataset_source_subset_by_class_folder(tmp_path, tiny_teacher):
    rng = np.random.default_rng(0)
    for label in ("1", "4", "7"):
        (tmp_path / "d" / label).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
            PIL.Image.fromarray(pixels, "L").save(tmp_path / "d" / label / f"{i}.png")
    from stepdistill.loading import load_denoiser

    source = make_data_source(DataConfig(data="dataset", dataset=str(tmp_path / "d")), tiny_teacher,
                              load_denoiser(tiny_teacher).model, "cpu")
    part = source.subset(lambda cond: cond.class_labels > 1)
    assert len(source) == 6 and len(part) == 4
    cond, images = part.sample(16, torch.Generator().manual_seed(0))
    assert set(cond.class_labels.tolist()) == {4, 7} and images.shape == (16, 1, 8, 8)
    assert part.grid_conditioning(4).class_labels.tolist() == [4, 4, 7, 7]


def test_condition_filter_subsets_the_data_but_not_the_regression_pairs(tiny_teacher, tmp_path):
    cfg = DMDConfig(teacher=str(tiny_teacher), output_dir=str(tmp_path / "run"), max_train_steps=1, train_batch_size=8,
                    regression_loss_weight=0.25, num_regression_pairs=40, regression_teacher_steps=2,
                    critic_updates_per_generator_update=1, lr_warmup_steps=0, checkpointing_steps=0,
                    eval_num_samples=0, export=False, student_timesteps=[399])
    trainer = DMDTrainer(cfg, condition_filter=below(5))
    assert set(trainer.data.labels.tolist()) == {0, 1, 2, 3, 4}
    assert set(trainer.full_data.labels.tolist()) == set(range(10))
    pair_labels = set(trainer.regression_pairs["cond"].class_labels.tolist())
    assert pair_labels - {0, 1, 2, 3, 4}, "the regression pairs were filtered too"
    # the same pairs as without a filter: pairs depend on the whole source only
    plain = DMDTrainer(DMDConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "plain")}))
    assert torch.equal(plain.regression_pairs["y"], trainer.regression_pairs["y"])
    seen = []
    original = trainer.data.sample
    trainer.data.sample = lambda n, g: seen.append(original(n, g)) or seen[-1]
    trainer.training_step(0)
    assert seen and all(set(c.class_labels.tolist()) <= {0, 1, 2, 3, 4} for c, _ in seen)


def test_data_config_validation():
    with pytest.raises(ValueError, match="data must be one of"):
        DataConfig(data="images")
    with pytest.raises(ValueError, match="needs --prompts"):
        DataConfig(data="prompts")
    assert DataConfig(data="dataset", dataset="x").has_images and not DataConfig(data="uniform_labels").has_images

"""Trainable networks besides the student: critics and discriminators.

* :class:`FakeScore` + :class:`GANHead` (DMD2's fake-score critic with a GAN head on its bottleneck);
* :class:`FeatureDiscriminator` (trainable heads on a frozen feature extractor).
"""

from .critic import FakeScore, GANHead, build_gan_head, find_submodule, gan_head_groups
from .discriminator import FeatureDiscriminator

__all__ = ["FakeScore", "FeatureDiscriminator", "GANHead", "build_gan_head", "find_submodule", "gan_head_groups"]

"""Trainable networks besides the student: critics and discriminators.

* :class:`FakeScore` + :class:`GANHead` (DMD2's fake-score critic with a GAN head on its bottleneck);
* :class:`FeatureDiscriminator` / :class:`DiscriminatorSet` (trainable heads on frozen feature extractors);
* personalization parts: :class:`NewTokenEmbedding` (one new token row) and :class:`CrossAttentionKV` (trainable
  cross-attention K/V, Custom Diffusion); :class:`DigitsFeatures` (differentiable digits-classifier features).
"""

from .critic import FakeScore, GANHead, build_gan_head, find_submodule, gan_head_groups
from .discriminator import DiscriminatorSet, FeatureDiscriminator
from .feature_extractors import DigitsFeatures, check_differentiable, digits_feature_extractors
from .personalization import CrossAttentionKV, NewTokenEmbedding, cross_attention_kv_names

__all__ = [
    "CrossAttentionKV",
    "DigitsFeatures",
    "DiscriminatorSet",
    "FakeScore",
    "FeatureDiscriminator",
    "GANHead",
    "NewTokenEmbedding",
    "build_gan_head",
    "check_differentiable",
    "cross_attention_kv_names",
    "digits_feature_extractors",
    "find_submodule",
    "gan_head_groups",
]

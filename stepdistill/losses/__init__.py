"""Loss callables shared by the trainers, each returning **one value per sample** (``[B]``).

The trainer weights
and reduces (the NVlabs/edm habit). Losses that noise their inputs own their noise-level draw and take the
trainer's explicit ``generator``. No Accelerate in here.

* :mod:`.distribution_matching` -- DMD's generator gradient and its stop-gradient surrogate;
* :mod:`.score_matching` -- denoising score matching (fake-score critics, denoisers);
* :mod:`.subinterval` -- Phased DMD's subinterval score matching and boundary DM loss;
* :mod:`.critic` -- DMD's critic objective (score matching + discriminator) in one critic forward;
* :mod:`.gan` -- non-saturating GAN losses and the diffusion-GAN input noise;
* :mod:`.regression` -- DMD1's regression distances (MSE, digits features, LPIPS);
* :mod:`.bootstrap` -- BOOT's bootstrapping and boundary losses on the signal ODE;
* :mod:`.image_similarity` -- EchoDistill's cosine identity loss on frozen features and multi-scale SWD.
"""

from .bootstrap import SignalBootstrapLoss, SignalBoundaryLoss, bootstrap_target
from .critic import CriticTerms, FakeScoreLoss
from .distribution_matching import (
    DistributionMatchingLoss,
    DistributionMatchingResult,
    compute_distribution_matching_loss,
    distribution_matching_gradient,
    distribution_matching_surrogate,
)
from .gan import GANDiscriminatorLoss, GANGeneratorLoss, GANInputNoise
from .image_similarity import CosineIdentityLoss, MultiScaleSWDLoss, srgb_to_lab
from .regression import (
    REGRESSION_DISTANCES,
    FeatureDistance,
    LPIPSDistance,
    MSEDistance,
    RegressionDistance,
    build_regression_distance,
    digits_classifier_activations,
)
from .score_matching import DenoisingScoreMatchingLoss, NoisedBatch
from .subinterval import (
    NaiveSubintervalScoreMatchingLoss,
    SubintervalBatch,
    SubintervalDistributionMatchingLoss,
    SubintervalScoreMatchingLoss,
)

__all__ = [
    "REGRESSION_DISTANCES",
    "CosineIdentityLoss",
    "CriticTerms",
    "DenoisingScoreMatchingLoss",
    "DistributionMatchingLoss",
    "DistributionMatchingResult",
    "FakeScoreLoss",
    "FeatureDistance",
    "GANDiscriminatorLoss",
    "GANGeneratorLoss",
    "GANInputNoise",
    "LPIPSDistance",
    "MSEDistance",
    "MultiScaleSWDLoss",
    "NaiveSubintervalScoreMatchingLoss",
    "NoisedBatch",
    "RegressionDistance",
    "SubintervalBatch",
    "SubintervalDistributionMatchingLoss",
    "SubintervalScoreMatchingLoss",
    "SignalBootstrapLoss",
    "SignalBoundaryLoss",
    "bootstrap_target",
    "build_regression_distance",
    "compute_distribution_matching_loss",
    "digits_classifier_activations",
    "distribution_matching_gradient",
    "distribution_matching_surrogate",
    "srgb_to_lab",
]

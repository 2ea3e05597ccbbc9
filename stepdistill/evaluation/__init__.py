"""Evaluation: extractors, FID / FID∞ / KID / precision-recall / diversity with intervals, paired comparisons.

The same functions serve the ``stepdistill eval`` command, ``eval/bench_digits.py`` and the trainers::

    from stepdistill.evaluation import DigitsClassifierFeatures, ReferenceStats, compute_metrics

    extractor = DigitsClassifierFeatures.from_pretrained()
    ref = ReferenceStats.load("digits_heldout.npz", extractor=extractor)  # raises on an extractor mismatch
    result = compute_metrics(extractor(samples), ref, labels=class_labels)
"""

from .evaluate import (
    MATCH_REFERENCE,
    evaluate_folder,
    evaluate_images,
    evaluate_pipeline,
    labels_matching_reference,
    make_reference,
    parse_int_list,
    resolve_extractor,
)
from .features import (
    CallableFeatures,
    DigitsClassifierFeatures,
    FeatureExtractor,
    FeatureExtractorError,
    InceptionFeatures,
    build_feature_extractor,
    extract_features,
)
from .io import ImageInputError, load_image, scan_image_folder, to_uint8_nhwc
from .metrics import (
    MetricsResult,
    MetricUndefinedError,
    compute_metrics,
    diversity,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    kernel_inception_distance,
    mean_pairwise_distance,
    precision_recall,
    vendi_score,
)
from .personalization import (
    PixelFeatures,
    concept_fidelity,
    concept_similarities,
    prompt_fidelity,
    prompt_matches,
)
from .sources import (
    PipelineCallError,
    dataset_features,
    digits_features,
    folder_features,
    load_pipeline,
    pipeline_features,
    sample_pipeline,
)
from .stats import ReferenceStats, StatsFileError, StatsMismatchError
from .uncertainty import (
    Difference,
    MetricReplicates,
    ResamplePlan,
    SampleFeatures,
    bootstrap_metrics,
    compare_independent,
    compare_paired,
    paired_comparison,
)

__all__ = [
    "MATCH_REFERENCE",
    "CallableFeatures",
    "Difference",
    "DigitsClassifierFeatures",
    "FeatureExtractor",
    "FeatureExtractorError",
    "ImageInputError",
    "InceptionFeatures",
    "MetricUndefinedError",
    "MetricReplicates",
    "MetricsResult",
    "PipelineCallError",
    "PixelFeatures",
    "ReferenceStats",
    "ResamplePlan",
    "SampleFeatures",
    "StatsFileError",
    "StatsMismatchError",
    "bootstrap_metrics",
    "build_feature_extractor",
    "compare_independent",
    "compare_paired",
    "compute_metrics",
    "concept_fidelity",
    "concept_similarities",
    "dataset_features",
    "digits_features",
    "diversity",
    "evaluate_folder",
    "evaluate_images",
    "evaluate_pipeline",
    "extract_features",
    "feature_statistics",
    "fid_from_features",
    "folder_features",
    "frechet_distance",
    "kernel_inception_distance",
    "labels_matching_reference",
    "load_image",
    "load_pipeline",
    "make_reference",
    "mean_pairwise_distance",
    "paired_comparison",
    "parse_int_list",
    "pipeline_features",
    "precision_recall",
    "prompt_fidelity",
    "prompt_matches",
    "resolve_extractor",
    "sample_pipeline",
    "scan_image_folder",
    "to_uint8_nhwc",
    "vendi_score",
]

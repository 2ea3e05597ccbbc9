"""Evaluation module: metrics against clean-fid and closed forms, extractors, statistics files, image input.

No network and no Inception weights: the Inception path is exercised with a tiny TorchScript stand-in that
has the interface of clean-fid's file, and with a download that is made to fail.
"""

from __future__ import annotations

import sys
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
from cleanfid import fid as cleanfid_fid
from PIL import Image

from stepdistill.data.digits import load_digits_split, to_uint8
from stepdistill.data.digits_models import DigitsClassifier
from stepdistill.evaluation import (
    CallableFeatures,
    DigitsClassifierFeatures,
    FeatureExtractorError,
    ImageInputError,
    InceptionFeatures,
    MetricUndefinedError,
    ReferenceStats,
    StatsFileError,
    StatsMismatchError,
    build_feature_extractor,
    compute_metrics,
    diversity,
    evaluate_images,
    extract_features,
    fid_from_features,
    folder_features,
    frechet_distance,
    kernel_inception_distance,
    labels_matching_reference,
    make_reference,
    mean_pairwise_distance,
    parse_int_list,
    precision_recall,
    scan_image_folder,
    to_uint8_nhwc,
    vendi_score,
)
from stepdistill.evaluation.features import INCEPTION_FILENAME

# clean-fid 0.1.35 passes scipy's deprecated `disp` argument to sqrtm
# clean-fid's file format is TorchScript, which torch deprecates
pytestmark = [
    pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning"),
]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _clf() -> DigitsClassifierFeatures:
    torch.manual_seed(0)
    return DigitsClassifierFeatures(DigitsClassifier())


# ---------------------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------------------
def test_fid_equals_closed_form_for_two_gaussians():
    rng = _rng()
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.5, 2.0, size=d), rng.uniform(0.5, 2.0, size=d)
    # commuting covariances (shared eigenvectors): FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-6)
    # general covariances: Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    r1 = scipy.linalg.sqrtm(s1).real
    cross = np.linalg.eigvalsh(r1 @ s2 @ r1)
    closed = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(cross))
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(closed, rel=1e-6)
    assert ours == pytest.approx(cleanfid_fid.frechet_distance(mu1, s1, mu2, s2), rel=1e-12)


def test_fid_from_features_equals_cleanfid():
    rng = _rng(1)
    f1, f2 = rng.normal(size=(300, 8)), rng.normal(0.3, 1.2, size=(250, 8))
    assert fid_from_features(f1, f2) == pytest.approx(cleanfid_fid.fid_from_feats(f1, f2), rel=1e-10)


def test_fid_undefined_with_fewer_samples_than_dimensions():
    rng = _rng(2)
    with pytest.raises(MetricUndefinedError, match=r"FID is undefined.*10 samples for 16-d features"):
        fid_from_features(rng.normal(size=(10, 16)), rng.normal(size=(100, 16)))
    ref = ReferenceStats.from_features(rng.normal(size=(100, 16)), "toy")
    with pytest.raises(MetricUndefinedError, match="at least 17 samples"):
        compute_metrics(rng.normal(size=(16, 16)), ref)


# ---------------------------------------------------------------------------------------------------------
# KID, precision / recall, diversity
# ---------------------------------------------------------------------------------------------------------
def test_kid_matches_cleanfid_and_keeps_the_global_rng():
    rng = _rng(3)
    f1, f2 = rng.normal(size=(60, 5)), rng.normal(0.5, 1.0, size=(50, 5))
    np.random.seed(7)
    expected = cleanfid_fid.kernel_distance(f1, f2, num_subsets=20, max_subset_size=30)
    np.random.seed(123)
    state = np.random.get_state()
    ours = kernel_inception_distance(f1, f2, num_subsets=20, max_subset_size=30, seed=7)
    assert ours == pytest.approx(expected, rel=1e-12)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the caller's numpy RNG did not move
    assert kernel_inception_distance(f1, f2, 20, 30, seed=7) == ours  # reproducible


def test_precision_recall_constructed_cases():
    rng = _rng(4)
    x = rng.normal(size=(50, 4))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0) == (0.0, 0.0)
    # generated = half on the real manifold (copies), half far away: precision 1/2; recall stays 1
    gen = np.concatenate([x[:25], x[:25] + 1000.0])
    precision, recall = precision_recall(x, gen, k=3)
    assert precision == 0.5
    assert recall < 1.0  # only half of the real points are copied: some fall outside the generated balls
    with pytest.raises(MetricUndefinedError, match="1 <= k < N"):
        precision_recall(x[:3], x[:3], k=3)


def test_vendi_and_pairwise_distance():
    n = 7
    same = np.tile(np.array([[1.0, 2.0, 3.0]]), (n, 1))
    orth = np.eye(n)
    assert vendi_score(same) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(orth) == pytest.approx(n, rel=1e-9)
    assert mean_pairwise_distance(same) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_distance(orth) == pytest.approx(1.0)
    assert mean_pairwise_distance(orth, "euclidean") == pytest.approx(np.sqrt(2))
    # n > d uses the d x d matrix: same value as the n x n kernel
    x = _rng(5).normal(size=(40, 3))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    lam = np.clip(np.linalg.eigvalsh(xn @ xn.T / 40), 0, None)
    lam = lam[lam > 1e-15]
    assert vendi_score(x) == pytest.approx(np.exp(-np.sum(lam * np.log(lam))), rel=1e-9)
    with pytest.raises(MetricUndefinedError, match="all zeros"):
        vendi_score(np.zeros((3, 2)))


def test_diversity_is_per_condition():
    feats = np.concatenate([np.tile([[1.0, 0.0, 0.0, 0.0]], (4, 1)), np.eye(4)])
    labels = [0] * 4 + [1] * 4
    div = diversity(feats, labels)
    assert div["groups"] == 2
    assert div["per_group"]["0"]["vendi"] == pytest.approx(1.0)
    assert div["per_group"]["1"]["vendi"] == pytest.approx(4.0)
    assert div["vendi"] == pytest.approx(2.5)
    assert diversity(feats)["groups"] == 1


def test_compute_metrics_and_per_class():
    rng = _rng(6)
    ref_feats = rng.normal(size=(80, 4))
    ref_labels = np.repeat([0, 1], 40)
    ref = ReferenceStats.from_features(ref_feats, "toy", labels=ref_labels)
    gen = ref_feats + 0.01
    result = compute_metrics(gen, ref, labels=ref_labels, extractor="toy", kid_subsets=5, per_class=True)
    d = result.to_dict()
    assert d["fid"] == pytest.approx(4 * 0.01**2, abs=1e-9)  # a pure mean shift
    assert (d["precision"], d["recall"]) == (1.0, 1.0)
    assert set(result.per_class) == {"0", "1"} and "fid" in result.per_class["0"]
    with pytest.raises(StatsMismatchError, match="'toy'.*'other'"):
        compute_metrics(gen, ref, extractor="other")


def test_helpers():
    assert parse_int_list("0-3,7, 10-11") == [0, 1, 2, 3, 7, 10, 11]
    labels = labels_matching_reference(np.repeat([0, 1, 2], [10, 20, 10]), 8)
    assert labels.tolist() == [0, 0, 1, 1, 1, 1, 2, 2]


# ---------------------------------------------------------------------------------------------------------
# Reference statistics
# ---------------------------------------------------------------------------------------------------------
def test_stats_roundtrip_and_mismatch(tmp_path):
    feats = _rng(7).normal(size=(30, 4)).astype(np.float32).astype(np.float64)
    stats = ReferenceStats.from_features(feats, "net@sha256:abc", source="toy", labels=np.arange(30) % 3)
    path = stats.save(tmp_path / "ref.npz")
    loaded = ReferenceStats.load(path, extractor="net@sha256:abc")
    assert np.array_equal(loaded.features, feats) and np.allclose(loaded.sigma, stats.sigma)
    assert loaded.labels.tolist() == (np.arange(30) % 3).tolist() and loaded.source == "toy"
    with np.load(path) as data:
        assert data["feats"].dtype == np.float32  # float32 features are stored losslessly as float32
    with pytest.raises(StatsMismatchError, match="net@sha256:abc.*net@sha256:def"):
        ReferenceStats.load(path, extractor="net@sha256:def")
    np.savez(tmp_path / "cleanfid.npz", mu=stats.mu, sigma=stats.sigma)
    with pytest.raises(StatsFileError, match="not a stepdistill reference statistics file"):
        ReferenceStats.load(tmp_path / "cleanfid.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(StatsFileError, match="Cannot read"):
        ReferenceStats.load(tmp_path / "junk.npz")
    with pytest.raises(StatsFileError, match="not found"):
        ReferenceStats.load(tmp_path / "missing.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cleanfid.npz", "junk.npz", "ref.npz"]  # no temp files


# ---------------------------------------------------------------------------------------------------------
# Feature extractors
# ---------------------------------------------------------------------------------------------------------
def test_digits_classifier_features():
    ex = _clf()
    images = load_digits_split("heldout").images[:12]
    f_float = ex(images)
    assert f_float.shape == (12, 64) and f_float.dtype == np.float64
    assert np.array_equal(f_float, ex(to_uint8(images)))  # float input is quantized like uint8 input
    rgb = np.repeat(to_uint8(images), 3, axis=-1)
    assert np.array_equal(f_float, ex(rgb))  # grayscale-as-RGB converts back exactly
    assert ex.name.startswith("digits_classifier@sha256:") and ex.name != _other_clf().name
    with pytest.raises(ImageInputError, match=r"16x16 \(HxW\).*8x8"):
        ex(torch.zeros(2, 1, 16, 16))
    assert ex.predict(images).shape == (12,)
    assert np.allclose(extract_features(ex, images, batch_size=5), f_float, rtol=1e-5, atol=1e-6)


def _other_clf() -> DigitsClassifierFeatures:
    torch.manual_seed(1)
    return DigitsClassifierFeatures(DigitsClassifier())


def test_digits_extractor_from_folder_and_build(tmp_path):
    torch.manual_seed(0)
    DigitsClassifier().save_pretrained(tmp_path / "clf")
    ex = build_feature_extractor(f"digits:{tmp_path / 'clf'}")
    assert ex.name == _clf().name and ex.spec == f"digits:{(tmp_path / 'clf').resolve()}"
    with pytest.raises(FeatureExtractorError, match="No digits classifier"):
        build_feature_extractor(f"digits:{tmp_path / 'nothing'}")
    with pytest.raises(FeatureExtractorError, match="Unknown feature extractor"):
        build_feature_extractor("vgg")


class _StandInInception(torch.nn.Module):
    """Shape-compatible stand-in for clean-fid's TorchScript file: ``.layers`` maps [B,3,299,299] -> [B,2048]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 2048))

    def forward(self, x):
        return self.layers(x)


def test_inception_path_with_a_stand_in_torchscript(tmp_path):
    torch.jit.save(torch.jit.script(_StandInInception()), str(tmp_path / INCEPTION_FILENAME))
    ex = InceptionFeatures(tmp_path)  # a folder holding the file (or the file itself)
    assert ex.dim == 2048 and ex.name.startswith("inception_v3[clean-fid clean]@sha256:")
    # preprocessing is clean-fid's own clean resize, grayscale replicated to RGB
    gray = _rng(8).integers(0, 256, size=(8, 8, 1), dtype=np.uint8)
    from cleanfid.resize import build_resizer

    expected = build_resizer("clean")(np.repeat(gray, 3, axis=-1)).transpose(2, 0, 1)
    prepared = ex.prepare_batch(gray[None])[0].numpy()
    assert prepared.shape == (3, 299, 299) and np.array_equal(prepared, expected)
    feats = ex(gray[None])
    assert feats.shape == (1, 2048)
    # a folder of mixed sizes and modes is fine for a resizing extractor
    Image.fromarray(gray[..., 0]).save(tmp_path / "a.png")
    Image.fromarray(_rng(9).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    feats, folder = folder_features(tmp_path, ex, progress=False)
    assert feats.shape == (2, 2048) and set(folder.modes) == {"L", "RGB"} and len(folder.sizes) == 2
    assert np.allclose(feats[0], ex(gray[None])[0], rtol=1e-5, atol=1e-6)  # float32 batch-size jitter only


def test_inception_missing_weights_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FeatureExtractorError, match="Inception weights not found.*--inception_weights"):
        InceptionFeatures(tmp_path / "nowhere" / INCEPTION_FILENAME)

    import cleanfid.downloads_helper as dl

    def offline(fpath):  # what clean-fid does offline: opens the file, then urlopen fails
        open(f"{fpath}/{INCEPTION_FILENAME}", "wb").close()
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(dl, "check_download_inception", offline)
    with pytest.raises(FeatureExtractorError, match="Could not download.*no internet"):
        InceptionFeatures(tmp_path, download=True)
    assert not (tmp_path / INCEPTION_FILENAME).exists()  # the partial file is removed
    (tmp_path / INCEPTION_FILENAME).write_bytes(b"garbage")
    with pytest.raises(FeatureExtractorError, match="not clean-fid's TorchScript Inception"):
        InceptionFeatures(tmp_path)


def test_callable_features_and_module_spec(tmp_path, monkeypatch):
    ex = CallableFeatures(lambda x: x.mean(dim=(2, 3)), name="mean_rgb")
    images = _rng(10).integers(0, 256, size=(4, 5, 6, 3), dtype=np.uint8)
    assert np.allclose(ex(images), images.reshape(4, -1, 3).mean(1) / 127.5 - 1.0)
    assert ex.dim == 3
    resized = CallableFeatures(lambda x: x.flatten(1), name="px", resize=(2, 2), input_range="[0,255]")
    assert resized(images).shape == (4, 12)
    with pytest.raises(FeatureExtractorError, match="needs a name"):
        CallableFeatures(lambda x: x, name="")
    bad = CallableFeatures(lambda x: x, name="bad")
    with pytest.raises(FeatureExtractorError, match=r"must return \[B, D\]"):
        bad(images)
    (tmp_path / "my_feats.py").write_text("def feats(x):\n    return x.amax(dim=(2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ex = build_feature_extractor("my_feats:feats")
    assert ex.name == "my_feats:feats" and ex(images).shape == (4, 3)
    sys.modules.pop("my_feats", None)


# ---------------------------------------------------------------------------------------------------------
# Image input
# ---------------------------------------------------------------------------------------------------------
def test_float_images_quantize_like_saved_pngs(tmp_path):
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    u8 = to_uint8_nhwc(x)
    assert np.array_equal(u8, to_uint8(x))
    for i, im in enumerate(u8):
        Image.fromarray(im[..., 0]).save(tmp_path / f"{i}.png")
    ex = _clf()
    feats, _ = folder_features(tmp_path, ex, progress=False)
    assert np.array_equal(feats, ex(x))  # in memory == saved to PNG and read back
    with pytest.raises(ImageInputError, match="NaN"):
        to_uint8_nhwc(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ImageInputError, match="ambiguous"):
        to_uint8_nhwc(np.zeros((1, 2, 2, 1), dtype=np.int32))


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageInputError, match="No images.*it is empty"):
        scan_image_folder(empty)
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(ImageInputError, match=r"No images.*'\.txt': 1"):
        scan_image_folder(empty)
    with pytest.raises(ImageInputError, match="does not exist"):
        scan_image_folder(tmp_path / "missing")

    bad = tmp_path / "bad"
    (bad / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad / "ok.png")
    (bad / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ImageInputError, match=r"Cannot read image .*sub/broken\.png"):
        scan_image_folder(bad)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    Image.fromarray(_rng(11).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated / "t.png")
    data = (truncated / "t.png").read_bytes()
    (truncated / "t.png").write_bytes(data[: len(data) // 2])  # valid header, truncated data
    scan_image_folder(truncated)  # headers are fine...
    ex = CallableFeatures(lambda x: x.mean(dim=(2, 3)), name="m")
    with pytest.raises(ImageInputError, match=r"Cannot read image .*t\.png.*corrupt or truncated"):
        folder_features(truncated, ex, progress=False)  # ...decoding names the file


def test_modes_and_sizes_policy(tmp_path):
    ex = _clf()
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    px = np.zeros((8, 8, 4), np.uint8)
    px[..., 3] = 255
    Image.fromarray(px, "RGBA").save(rgba / "opaque.png")
    feats, folder = folder_features(rgba, ex, progress=False)  # opaque alpha is dropped
    assert feats.shape == (1, 64) and folder.modes == {"RGBA": 1}
    px[0, 0, 3] = 10
    Image.fromarray(px, "RGBA").save(rgba / "translucent.png")
    with pytest.raises(ImageInputError, match="translucent alpha"):
        folder_features(rgba, ex, progress=False)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "b.jpg")
    feats, folder = folder_features(mixed, ex, progress=False)  # grayscale + RGB: converted explicitly
    assert feats.shape == (2, 64) and folder.modes == {"L": 1, "RGB": 1}
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(mixed / "c.png")
    with pytest.raises(ImageInputError, match=r"c\.png' is 8x9 \(WxH\).*does not resize"):
        folder_features(mixed, ex, progress=False)
    deep = tmp_path / "deep"
    deep.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(deep / "d.png")  # 16-bit grayscale PNG
    with pytest.raises(ImageInputError, match=r"d\.png' has image mode 'I;16'.*Convert it to RGB or L"):
        scan_image_folder(deep)


def test_evaluate_images_for_trainers():
    ex = _clf()
    ref = make_reference("digits:heldout", ex)
    assert ref.n == 400 and ref.labels.tolist() == load_digits_split("heldout").labels.tolist()
    train = load_digits_split("train")
    result = evaluate_images(train.images[:100], ref, ex, labels=train.labels[:100], kid_subsets=5)
    assert result.num_generated == 100 and result.diversity_groups == 10 and result.fid > 0
    with pytest.raises(StatsMismatchError):
        evaluate_images(train.images[:100], ref, _other_clf())
    with pytest.raises(ImageInputError, match="Unknown digits split 'test'"):
        make_reference("digits:test", ex)
    with pytest.raises(ImageInputError, match="neither"):
        make_reference("/no/such/folder", ex)

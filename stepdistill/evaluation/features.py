"""Feature extractors behind one interface: clean-fid's Inception, the digits classifier, any callable.

A :class:`FeatureExtractor` turns a batch of images into ``[B, D]`` float64 features. It owns its
preprocessing, split in two so that folders can be read in parallel workers:

* :meth:`FeatureExtractor.prepare` -- one uint8 image ``[H, W, C]`` (already converted to the
  extractor's channel count by :mod:`stepdistill.evaluation.io`) -> the network's input ``[C', H', W']``
  (e.g. clean-fid's anti-aliased resize to 299 for Inception; nothing for the native 8x8 classifier);
* :meth:`FeatureExtractor.embed` -- a batch of prepared inputs -> features.

Its :attr:`~FeatureExtractor.name` is an *identity*: the network and a hash of its weights. Reference
statistics record it and refuse to be compared with features from another extractor.
"""

from __future__ import annotations

import hashlib
import importlib
import platform
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .io import ImageInputError, convert_channels, to_uint8_nhwc

#: File name of clean-fid's TorchScript Inception-v3 (NVIDIA's port of the TF FID graph).
INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_DIM = 2048


class FeatureExtractorError(ValueError):
    """A feature extractor cannot be built or used as asked (missing weights, bad output, ...)."""


def default_inception_dir() -> Path:
    """Where clean-fid itself downloads and looks for the Inception weights (``/tmp``; ``.`` on Windows)."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_state_dict(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class FeatureExtractor(ABC):
    """The interface every feature extractor implements.

    Subclasses set the attributes in ``__init__`` and implement :meth:`embed` (and :meth:`prepare`
    when the network needs more than scaling to ``[-1, 1]``).

    Args:
        name: Identity string (network + weights hash), stored in reference statistics.
        spec: How to rebuild it with :func:`build_feature_extractor` (``"inception:/path"``,
            ``"digits"``, ``"module:attr"``), or ``""`` when it cannot be rebuilt from a string.
        dim: Feature dimension ``D`` (``None`` until the first call for callables of unknown width).
        channels: Channels the network takes: 1 (grayscale) or 3 (RGB).
        input_size: ``(H, W)`` the network takes without resizing, or ``None`` when
            :meth:`prepare` resizes any image.
        device: Device of the network.

    Example:
        >>> extractor = DigitsClassifierFeatures.from_pretrained(classifier_path())
        >>> feats = extractor(images)  # [B, 1, 8, 8] floats in [-1, 1] or uint8 -> [B, 64] float64
    """

    def __init__(
        self,
        name: str,
        spec: str,
        dim: int | None,
        channels: int,
        input_size: tuple[int, int] | None,
        device: torch.device | str = "cpu",
    ) -> None:
        if channels not in (1, 3):
            raise FeatureExtractorError(f"channels must be 1 or 3, got {channels}.")
        self.name = name
        self.spec = spec
        self.dim = dim
        self.channels = channels
        self.input_size = tuple(input_size) if input_size is not None else None
        self.device = torch.device(device)

    # ------------------------------------------------------------------------------------------------
    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """One uint8 image ``[H, W, C]`` -> network input ``[C, H, W]`` float32 in ``[-1, 1]`` (default)."""
        return torch.from_numpy(np.array(image.transpose(2, 0, 1), dtype=np.float32)) / 127.5 - 1.0

    @abstractmethod
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Prepared inputs ``[B, C, H, W]`` (on :attr:`device`) -> features ``[B, D]``."""

    def to(self, device: torch.device | str) -> FeatureExtractor:
        """Move the network to ``device`` (returns ``self``)."""
        self.device = torch.device(device)
        return self

    def describe(self) -> dict:
        """A JSON-able description: identity, dimension, channels and preprocessing."""
        return {
            "name": self.name,
            "spec": self.spec,
            "dim": self.dim,
            "channels": self.channels,
            "input_size": list(self.input_size) if self.input_size else None,
            "preprocessing": self.preprocessing,
        }

    @property
    def preprocessing(self) -> str:
        """Human-readable preprocessing, reported next to the numbers."""
        return "none (native resolution), uint8 -> [-1, 1]"

    # ------------------------------------------------------------------------------------------------
    def check_size(self, height: int, width: int, source: str = "the images") -> None:
        """Raise when a native-resolution extractor gets another size."""
        if self.input_size is not None and (height, width) != self.input_size:
            raise ImageInputError(
                f"{source} are {height}x{width} (HxW) but {self.name} takes {self.input_size[0]}x{self.input_size[1]} "
                "images and does not resize. Resize them first, or use an extractor that resizes (Inception)."
            )

    def prepare_batch(self, images: np.ndarray | torch.Tensor, source: str = "the images") -> torch.Tensor:
        """Any image batch (see :func:`~stepdistill.evaluation.io.to_uint8_nhwc`) -> stacked network input."""
        u8 = convert_channels(to_uint8_nhwc(images), self.channels, source)
        self.check_size(u8.shape[1], u8.shape[2], source)
        return torch.stack([self.prepare(im) for im in u8])

    @torch.no_grad()
    def embed_prepared(self, batch: torch.Tensor) -> np.ndarray:
        """Run :meth:`embed` on a prepared batch, check the output, return ``[B, D]`` float64."""
        feats = self.embed(batch.to(self.device))
        feats = torch.as_tensor(feats) if not isinstance(feats, torch.Tensor) else feats
        if feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
            raise FeatureExtractorError(
                f"{self.name} returned features of shape {tuple(feats.shape)} for a batch of {batch.shape[0]}; "
                "a feature extractor must return [B, D]."
            )
        if self.dim is None:
            self.dim = int(feats.shape[1])
        elif feats.shape[1] != self.dim:
            raise FeatureExtractorError(
                f"{self.name} returned {feats.shape[1]}-d features but declares dim={self.dim}."
            )
        out = feats.detach().cpu().double().numpy()
        if not np.isfinite(out).all():
            raise FeatureExtractorError(f"{self.name} returned NaN or infinite features.")
        return out

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Features of a batch: uint8 (``[0, 255]``) or float (``[-1, 1]``) images -> ``[B, D]`` float64.

        Tensors are ``[B, C, H, W]``, arrays ``[B, H, W, C]``; float images are quantized to uint8 first
        (as saving a PNG would), so in-memory and on-disk evaluation agree.
        """
        return self.embed_prepared(self.prepare_batch(images))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


# ---------------------------------------------------------------------------------------------------
class InceptionFeatures(FeatureExtractor):
    """clean-fid's standard FID features: TorchScript Inception-v3 pool3 (2048-d), ``clean`` mode.

    Preprocessing is clean-fid's ``clean`` mode exactly: grayscale is replicated to RGB, each channel is
    resized to 299x299 with PIL bicubic on float32 (anti-aliased, no re-quantization), and the network
    normalizes ``(x - 128) / 128``.

    Args:
        weights: The ``inception-2015-12-05.pt`` file, or a folder holding it. ``None`` looks where
            clean-fid keeps it (:func:`default_inception_dir`).
        download: When the file is missing, let clean-fid download it (needs internet). Off by default:
            stepdistill never downloads unless asked.
        device: Device to run on.

    Raises:
        FeatureExtractorError: when the weights are missing (and not downloaded) or not a TorchScript
            Inception.

    Example:
        >>> extractor = InceptionFeatures("/models/inception-2015-12-05.pt", device="cuda")
        >>> feats = extractor(images)  # any size; [B, 2048]
    """

    def __init__(
        self, weights: str | Path | None = None, download: bool = False, device: torch.device | str = "cpu"
    ) -> None:
        path = self.resolve_weights(weights, download)
        try:
            with warnings.catch_warnings():  # clean-fid ships TorchScript; torch deprecates the format, not the file
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(str(path), map_location="cpu").eval()
            self._layers = model.layers
        except Exception as err:  # noqa: BLE001 -- any load failure means "not the expected file"
            raise FeatureExtractorError(
                f"{str(path)!r} is not clean-fid's TorchScript Inception ({type(err).__name__}: {err}). "
                f"Get {INCEPTION_FILENAME} from clean-fid's download URL."
            ) from err
        self.model = model
        self.weights = path
        super().__init__(
            name=f"inception_v3[clean-fid clean]@sha256:{_sha256_file(path)[:16]}",
            spec="inception" if path == default_inception_dir() / INCEPTION_FILENAME else f"inception:{path.resolve()}",
            dim=INCEPTION_DIM,
            channels=3,
            input_size=None,
            device=device,
        )
        self.to(device)
        from cleanfid.resize import build_resizer

        self._resize = build_resizer("clean")

    @staticmethod
    def resolve_weights(weights: str | Path | None, download: bool = False) -> Path:
        """The path of the Inception TorchScript file; download it with clean-fid only if ``download``."""
        if weights is None:
            folder, path = default_inception_dir(), default_inception_dir() / INCEPTION_FILENAME
        else:
            path = Path(weights).expanduser()
            folder = path if path.is_dir() else path.parent
            if path.is_dir():
                path = path / INCEPTION_FILENAME
        if path.is_file():
            return path
        if not download or path.name != INCEPTION_FILENAME:
            raise FeatureExtractorError(
                f"Inception weights not found at {str(path)!r}. FID with Inception needs clean-fid's "
                f"{INCEPTION_FILENAME} (about 100 MB): pass its path (CLI: --inception_weights PATH), or allow "
                "clean-fid to download it on a machine with internet (CLI: --download). Offline, the digits "
                "world uses --features digits."
            )
        from cleanfid.downloads_helper import check_download_inception

        try:
            check_download_inception(fpath=str(folder))
        except Exception as err:  # noqa: BLE001 -- network errors come in many types
            if path.is_file():
                path.unlink()  # it was missing before: clean-fid opened it, so it holds a partial download
            raise FeatureExtractorError(
                f"Could not download the Inception weights to {str(path)!r} ({type(err).__name__}: {err}). "
                "Without internet, copy inception-2015-12-05.pt there or pass --inception_weights PATH."
            ) from err
        return path

    @property
    def preprocessing(self) -> str:
        """Human-readable preprocessing."""
        return "clean-fid clean: PIL bicubic float resize to 299x299 per channel, (x - 128) / 128"

    def to(self, device: torch.device | str) -> InceptionFeatures:
        """Move the network to ``device``."""
        self.model = self.model.to(device)
        self._layers = self.model.layers
        return super().to(device)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """uint8 ``[H, W, 3]`` -> clean-resized float32 ``[3, 299, 299]`` in ``[0, 255]``."""
        resized = self._resize(image)
        return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Inception pool3 features of a clean-resized batch (as clean-fid's ``InceptionV3W``)."""
        if batch.shape[-2:] != (299, 299):
            raise FeatureExtractorError(f"Inception expects 299x299 inputs, got {tuple(batch.shape[-2:])}.")
        return self._layers.forward((batch - 128) / 128).reshape(batch.shape[0], -1)


# ---------------------------------------------------------------------------------------------------
class DigitsClassifierFeatures(FeatureExtractor):
    """The digits world's offline FID features: the penultimate 64-d layer of the digits classifier.

    Native 8x8 grayscale, no resizing; uint8 images are mapped back to ``[-1, 1]``.

    Args:
        model: A :class:`~stepdistill.data.digits_models.DigitsClassifier`.
        path: Where it was loaded from (recorded in :attr:`spec`; ``None`` for an in-memory model).
        device: Device to run on.

    Example:
        >>> extractor = DigitsClassifierFeatures.from_pretrained()  # the shipped classifier
        >>> extractor(load_digits_split("heldout").images).shape
        (400, 64)
    """

    def __init__(self, model: nn.Module, path: str | Path | None = None, device: torch.device | str = "cpu") -> None:
        from ..data.digits import RESOLUTION

        self.model = model.eval()
        digest = _sha256_state_dict(model)[:16]
        super().__init__(
            name=f"digits_classifier@sha256:{digest}",
            spec=f"digits:{Path(path).resolve()}" if path is not None else "",
            dim=int(model.config.feature_dim),
            channels=1,
            input_size=(RESOLUTION, RESOLUTION),
            device=device,
        )
        self.to(device)

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, device: torch.device | str = "cpu"
    ) -> DigitsClassifierFeatures:
        """Load the classifier saved in ``path`` (default: the shipped one)."""
        from ..data.digits_models import DigitsClassifier, classifier_path

        path = Path(path) if path is not None else classifier_path()
        if not (path / "config.json").is_file():
            raise FeatureExtractorError(
                f"No digits classifier at {str(path)!r} (config.json missing). Train it with "
                "training_scripts/train_teacher.py or pass --features digits:PATH."
            )
        extractor = cls(DigitsClassifier.from_pretrained(path), path=path, device=device)
        if path.resolve() == classifier_path().resolve():
            extractor.spec = "digits"  # the shipped classifier: portable across installs
        return extractor

    def to(self, device: torch.device | str) -> DigitsClassifierFeatures:
        """Move the classifier to ``device``."""
        self.model = self.model.to(device)
        return super().to(device)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Penultimate activations."""
        return self.model.features(batch)

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted class (argmax of the logits) of each image, for class accuracy."""
        batch = self.prepare_batch(images).to(self.device)
        return self.model(batch).argmax(dim=1).cpu().numpy()


# ---------------------------------------------------------------------------------------------------
class CallableFeatures(FeatureExtractor):
    """Any function ``fn(batch) -> [B, D]`` as a feature extractor (DINOv2, CLIP, your own network).

    Args:
        fn: Called with a float32 ``[B, C, H, W]`` batch on ``device``; returns a tensor or array.
        name: Identity recorded in reference statistics. Make it specific (network and weights):
            statistics are only compared with features of the same name.
        dim: Feature dimension, or ``None`` to learn it at the first call.
        channels: 1 or 3.
        input_size: ``(H, W)`` the function takes as is; ``None`` accepts any size (or see ``resize``).
        resize: Resize every image to this ``(H, W)`` with clean-fid's anti-aliased bicubic float resize
            first (then any input size is accepted).
        input_range: ``"[-1,1]"`` (default) or ``"[0,255]"`` for the values ``fn`` receives.
        device: Device the batch is moved to.

    Example:
        >>> extractor = CallableFeatures(dino, name="dinov2_vits14", resize=(224, 224), input_range="[0,255]")
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor | np.ndarray],
        name: str,
        dim: int | None = None,
        channels: int = 3,
        input_size: tuple[int, int] | None = None,
        resize: tuple[int, int] | None = None,
        input_range: str = "[-1,1]",
        device: torch.device | str = "cpu",
        spec: str = "",
    ) -> None:
        if not callable(fn):
            raise FeatureExtractorError(f"fn must be callable, got {type(fn).__name__}.")
        if not name:
            raise FeatureExtractorError("A callable feature extractor needs a name (its identity in the statistics).")
        if input_range not in ("[-1,1]", "[0,255]"):
            raise FeatureExtractorError(f"input_range must be '[-1,1]' or '[0,255]', got {input_range!r}.")
        self.fn = fn
        self.resize = tuple(resize) if resize is not None else None
        self.input_range = input_range
        super().__init__(
            name=name,
            spec=spec,
            dim=dim,
            channels=channels,
            input_size=None if resize is not None else input_size,
            device=device,
        )
        if self.resize is not None:
            from cleanfid.resize import make_resizer

            self._resize = make_resizer("PIL", False, "bicubic", (self.resize[1], self.resize[0]))

    @property
    def preprocessing(self) -> str:
        """Human-readable preprocessing."""
        size = f"clean bicubic float resize to {self.resize[0]}x{self.resize[1]}, " if self.resize else ""
        return f"{size}values in {self.input_range}"

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """uint8 ``[H, W, C]`` -> ``[C, H', W']`` float32 in the declared range, resized if asked."""
        x = image.astype(np.float32)
        if self.resize is not None:
            x3 = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
            x = self._resize(x3)[..., : image.shape[-1]]
        t = torch.from_numpy(np.array(x.transpose(2, 0, 1), dtype=np.float32))
        return t / 127.5 - 1.0 if self.input_range == "[-1,1]" else t

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Call the function."""
        out = self.fn(batch)
        return torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out

    def to(self, device: torch.device | str) -> CallableFeatures:
        """Move the function's module (when it is one) to ``device``."""
        if isinstance(self.fn, nn.Module):
            self.fn = self.fn.to(device)
        return super().to(device)


# ---------------------------------------------------------------------------------------------------
#: Extractors that can be rebuilt from the spec a statistics file stores: stepdistill's own classes, no import.
BUILTIN_EXTRACTORS = ("inception", "digits")


def builtin_feature_extractor(
    spec: str,
    device: torch.device | str = "cpu",
    inception_weights: str | Path | None = None,
    download: bool = False,
    source: str = "the reference statistics",
) -> FeatureExtractor:
    """Rebuild a built-in extractor from a spec read in a file; never imports or builds anything the file names.

    Only :data:`BUILTIN_EXTRACTORS` are rebuilt: ``digits`` / ``digits:PATH`` load weights (safetensors) into
    stepdistill's own classifier class; ``inception`` loads clean-fid's Inception from ``inception_weights`` or
    clean-fid's default location -- a path recorded in the file is only named in the error, never loaded, since
    the TorchScript file is a program. The caller checks the result's identity against the file's
    (:meth:`~stepdistill.evaluation.stats.ReferenceStats.check_extractor`).

    Args:
        spec: The spec stored in the file (``ReferenceStats.extractor_spec``).
        device: Device to run on.
        inception_weights: Inception weights chosen by the caller.
        download: Allow clean-fid to download the Inception weights when they are missing.
        source: What the spec was read from, for error messages.

    Raises:
        FeatureExtractorError: for a custom extractor (it must be passed by the caller) or missing weights.
    """
    kind, _, arg = str(spec).partition(":")
    if kind == "digits":
        return DigitsClassifierFeatures.from_pretrained(arg or None, device=device)
    if kind == "inception":
        try:
            return InceptionFeatures(inception_weights, download=download, device=device)
        except FeatureExtractorError as err:
            if not arg or inception_weights is not None:
                raise
            raise FeatureExtractorError(
                f"{source} were made with clean-fid's Inception from {arg!r}; stepdistill does not load a network "
                f"from a path a data file names: pass --inception_weights {arg} (Python: the extractor itself)."
            ) from err
    raise FeatureExtractorError(
        f"{source} name a custom feature extractor in their field `extractor_spec` ({spec!r}); stepdistill never "
        "imports code named by a data file. Pass the extractor yourself: --features MODULE:ATTR on the command line "
        "or extractor=<object> in Python (its identity is checked against the file's)."
    )


def build_feature_extractor(
    spec: str,
    device: torch.device | str = "cpu",
    inception_weights: str | Path | None = None,
    download: bool = False,
) -> FeatureExtractor:
    """Build an extractor from a short string the CALLER chose (the command line's ``--features``).

    Specs read from files go through :func:`builtin_feature_extractor` instead, which imports nothing.

    Args:
        spec: ``"inception"`` or ``"inception:PATH"`` (clean-fid Inception); ``"digits"`` (the shipped
            digits classifier) or ``"digits:PATH"``; or ``"package.module:attr"`` where ``attr`` is a
            :class:`FeatureExtractor` instance, a :class:`FeatureExtractor` subclass (built with no
            arguments), or a plain function ``fn(batch[-1,1]) -> [B, D]`` on RGB images (named by ``spec``).
        device: Device to run on.
        inception_weights: Inception weights path (overrides the one in ``spec``).
        download: Allow clean-fid to download the Inception weights when they are missing.

    Raises:
        FeatureExtractorError: for an unknown spec, missing weights or a bad import.
    """
    kind, _, arg = spec.partition(":")
    if kind == "inception":
        return InceptionFeatures(inception_weights or (arg or None), download=download, device=device)
    if kind in BUILTIN_EXTRACTORS:
        return builtin_feature_extractor(spec, device, inception_weights, download)
    if not arg:
        raise FeatureExtractorError(
            f"Unknown feature extractor {spec!r}: use 'inception', 'inception:PATH', 'digits', 'digits:PATH' "
            "or 'package.module:attr' for your own."
        )
    try:
        obj = getattr(importlib.import_module(kind), arg)
    except (ImportError, AttributeError) as err:
        raise FeatureExtractorError(f"Cannot import feature extractor {spec!r}: {err}.") from err
    if isinstance(obj, type) and issubclass(obj, FeatureExtractor):
        obj = obj()
    if isinstance(obj, FeatureExtractor):
        obj.spec = obj.spec or spec
        return obj.to(device)
    if callable(obj):
        return CallableFeatures(obj, name=spec, spec=spec, device=device)
    raise FeatureExtractorError(f"{spec!r} is a {type(obj).__name__}, not a feature extractor or a function.")


def extract_features(
    extractor: FeatureExtractor,
    images: np.ndarray | torch.Tensor | Sequence[Image.Image] | Iterable[np.ndarray | torch.Tensor],
    batch_size: int = 256,
) -> np.ndarray:
    """Features of in-memory images (a batch, a list of PIL images, or an iterable of batches), in chunks.

    Example:
        >>> feats = extract_features(extractor, samples)  # samples: [N, C, H, W] in [-1, 1]
    """
    one_batch = isinstance(images, (np.ndarray, torch.Tensor)) or (
        isinstance(images, (list, tuple)) and bool(images) and isinstance(images[0], Image.Image)
    )
    batches = [images] if one_batch else images
    out = []
    for batch in batches:
        for i in range(0, len(batch), batch_size):
            out.append(extractor(batch[i : i + batch_size]))
    if not out:
        raise ImageInputError("No images to extract features from.")
    return np.concatenate(out)


__all__ = [
    "BUILTIN_EXTRACTORS",
    "INCEPTION_FILENAME",
    "CallableFeatures",
    "DigitsClassifierFeatures",
    "FeatureExtractor",
    "FeatureExtractorError",
    "InceptionFeatures",
    "build_feature_extractor",
    "builtin_feature_extractor",
    "default_inception_dir",
    "extract_features",
]

"""DMD1's regression loss distances ``d(G(z), y)`` (Yin et al., DMD, CVPR 2024, Eq. 9), one value per sample.

:class:`MSEDistance`, :class:`FeatureDistance` (the digits classifier's activations, LPIPS-style without
learned weights) and :class:`LPIPSDistance` (the ``lpips`` package with local weights), built by name with
:func:`build_regression_distance`. The two perceptual ones hold a frozen network that the caller's samples
are pushed through (the gradient reaches the samples, never the network).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._common import per_sample_mean

#: Names accepted by :func:`build_regression_distance` (``DMDConfig.regression_distance``).
REGRESSION_DISTANCES = ("mse", "digits_features", "lpips")


class RegressionDistance(nn.Module):
    """The interface of DMD1's regression distance ``d(G(z), y)`` (DMD Eq. 9): one value per sample.

    Subclasses implement :meth:`distance` on float32 tensors of equal shape. Calling the module checks
    the shapes and adds ``pixel_weight * MSE`` when ``pixel_weight > 0`` (an absolute-intensity anchor for
    the perceptual distances, which compare normalised activations). A frozen network inside a distance
    stays in eval mode and never receives gradient; the gradient reaches ``prediction`` only.

    Args:
        pixel_weight: Weight of the added per-sample pixel MSE (0: none).

    Example:
        >>> distance = build_regression_distance("digits_features")
        >>> loss = distance(student_x0, teacher_y).mean()  # [B] -> scalar
    """

    name = "base"

    def __init__(self, pixel_weight: float = 0.0) -> None:
        super().__init__()
        if pixel_weight < 0:
            raise ValueError(f"pixel_weight must be >= 0, got {pixel_weight}.")
        self.pixel_weight = float(pixel_weight)

    def distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample distance ``[B]`` between float32 batches of the same shape."""
        raise NotImplementedError

    def check_sample_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` when samples of shape ``[C, H, W]`` cannot be measured (default: any shape)."""

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return ``[B]`` distances between ``prediction`` (keeps its graph) and ``target``."""
        if prediction.shape != target.shape:
            raise ValueError(
                f"Regression distance {self.name!r}: prediction {tuple(prediction.shape)} and target "
                f"{tuple(target.shape)} differ in shape."
            )
        prediction, target = prediction.float(), target.detach().float()
        out = self.distance(prediction, target)
        if self.pixel_weight > 0:
            out = out + self.pixel_weight * per_sample_mean((prediction - target) ** 2)
        return out

    def train(self, mode: bool = True) -> RegressionDistance:
        """Frozen networks stay in eval mode (no dropout, fixed normalisation statistics)."""
        return super().train(False)


class MSEDistance(RegressionDistance):
    """Per-sample mean squared distance, the default distance of DMD1's regression loss."""

    name = "mse"

    def __init__(self) -> None:
        super().__init__(pixel_weight=0.0)

    def distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return ``[B]`` per-sample MSE."""
        return per_sample_mean((prediction - target) ** 2)


def _unit_normalise(features: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale every feature vector (dim 1, at each spatial position) to unit L2 norm."""
    return features / features.norm(dim=1, keepdim=True).clamp_min(eps)


class FeatureDistance(RegressionDistance):
    """LPIPS-style distance in a frozen network's activations, with uniform (not learned) layer weights.

    For each activation ``[B, C, ...]`` returned by ``activations``: unit-normalise the channel vector
    at every position, take the squared difference summed over channels, average over positions;
    then average over layers. Each layer's term lies in ``[0, 4]``; the distance is 0 for identical
    inputs. The target's activations are computed without gradient.

    Args:
        activations: ``fn(images) -> sequence of [B, C, ...]`` activations (differentiable in ``images``).
        network: The frozen module ``activations`` runs (registered so ``.to(device)`` moves it), or ``None``.
        input_shape: The ``[C, H, W]`` the network takes, or ``None`` for any.
        pixel_weight: See :class:`RegressionDistance`.
        eps: Lower clamp of the feature norms.
        name: Name reported in errors.
    """

    name = "features"

    def __init__(
        self,
        activations: Callable[[torch.Tensor], list[torch.Tensor]],
        network: nn.Module | None = None,
        input_shape: tuple[int, int, int] | None = None,
        pixel_weight: float = 0.0,
        eps: float = 1e-8,
        name: str = "features",
    ) -> None:
        super().__init__(pixel_weight)
        self.activations = activations
        self.network = network.requires_grad_(False).eval() if network is not None else None
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.eps = eps
        self.name = name

    @classmethod
    def digits(cls, path: str | Path | None = None, pixel_weight: float = 0.0) -> FeatureDistance:
        """The digits classifier's four GELU activations (conv 32x8x8, 64x8x8, 128x4x4; the 64-d features).

        Args:
            path: A :class:`~stepdistill.data.digits_models.DigitsClassifier` folder (default: the shipped one).
            pixel_weight: See :class:`RegressionDistance`.
        """
        from ..data.digits import RESOLUTION
        from ..data.digits_models import DigitsClassifier, classifier_path

        path = Path(path) if path is not None else classifier_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"regression_distance=digits_features needs the digits classifier, but {str(path)!r} has no "
                "config.json. Reinstall stepdistill (it ships the classifier) or retrain it with "
                "training_scripts/train_teacher.py."
            )
        clf = DigitsClassifier.from_pretrained(path)
        return cls(digits_classifier_activations(clf), clf, (1, RESOLUTION, RESOLUTION), pixel_weight,
                   name="digits_features")

    def check_sample_shape(self, shape: tuple[int, ...]) -> None:
        """Raise unless samples have the network's input shape."""
        if self.input_shape is not None and tuple(shape) != self.input_shape:
            raise ValueError(
                f"regression_distance={self.name!r} measures {list(self.input_shape)} images, but the teacher "
                f"works on {list(shape)}: use regression_distance=mse (or lpips for pixel-space RGB teachers)."
            )

    def distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over layers of the per-position squared distance of unit-normalised activations."""
        self.check_sample_shape(tuple(prediction.shape[1:]))
        feats_p = self.activations(prediction)
        with torch.no_grad():
            feats_t = self.activations(target)
        terms = []
        for fp, ft in zip(feats_p, feats_t):
            diff = (_unit_normalise(fp.float(), self.eps) - _unit_normalise(ft.float(), self.eps)) ** 2
            terms.append(per_sample_mean(diff.sum(dim=1, keepdim=True)))
        return torch.stack(terms, dim=1).mean(dim=1)


def digits_classifier_activations(classifier: nn.Module) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """A function returning the outputs of every ``GELU`` in ``classifier.body`` (in eval mode).

    For the shipped :class:`~stepdistill.data.digits_models.DigitsClassifier` these are the three conv
    activations (32x8x8, 64x8x8, 128x4x4) and the 64-d penultimate features (the digits FID space).
    """
    body = classifier.body

    def activations(images: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = images.to(next(classifier.parameters()).dtype)
        for module in body:
            h = module(h)
            if isinstance(module, nn.GELU):
                out.append(h)
        if not out:
            raise ValueError(f"{type(classifier).__name__}.body has no GELU layers to read activations from.")
        return out

    return activations


_LPIPS_HOWTO = (
    "On a machine with internet access: `pip install lpips` and run\n"
    "  python -c \"import lpips, torch; torch.save(lpips.LPIPS(net='alex').state_dict(), 'lpips_alex.pth')\"\n"
    "(this downloads torchvision's AlexNet once and saves backbone + calibrated linear layers together), copy "
    "lpips_alex.pth here and pass --regression_lpips_weights lpips_alex.pth. stepdistill never downloads weights."
)


class LPIPSDistance(RegressionDistance):
    """LPIPS (Zhang et al. 2018) from the ``lpips`` package, with every weight read from a local file.

    The file is a full ``lpips.LPIPS(...).state_dict()`` (backbone ``net.*`` and linear layers
    ``lin*``); the backbone (alex / vgg / squeeze) is recognised from it. The network is built with a
    random backbone and no calibrated layers (nothing is downloaded) and then loaded strictly. Inputs in
    ``[-1, 1]``; grayscale is repeated to RGB; images are resized bilinearly to ``resize`` (224, as the
    DMD1 EDM port does) when their size differs. Pixel-space teachers only (1 or 3 channels).

    Args:
        weights: Path to the saved LPIPS state dict.
        pixel_weight: See :class:`RegressionDistance`.
        resize: Side length images are resized to (``None``: keep their size; AlexNet needs >= 32 or so).

    Raises:
        ImportError: when ``lpips`` is not installed.
        FileNotFoundError / ValueError: for a missing or incomplete weights file.
    """

    name = "lpips"

    def __init__(self, weights: str | Path | None, pixel_weight: float = 0.0, resize: int | None = 224) -> None:
        super().__init__(pixel_weight)
        try:
            import lpips
        except ImportError as err:
            raise ImportError(
                "regression_distance=lpips needs the `lpips` package, which is not installed: "
                "`pip install lpips` (needs torchvision). " + _LPIPS_HOWTO
            ) from err
        if not weights:
            raise ValueError("regression_distance=lpips needs local weights (--regression_lpips_weights). "
                             + _LPIPS_HOWTO)
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights {str(path)!r} do not exist. " + _LPIPS_HOWTO)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        backbone = _lpips_backbone(state, path)
        import warnings

        with warnings.catch_warnings():  # torchvision's deprecated `pretrained=` argument inside lpips
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(pretrained=False, net=backbone, pnet_rand=True, verbose=False)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{str(path)!r} is not a complete LPIPS ({backbone}) state dict: missing {missing[:4]}, unexpected "
                f"{unexpected[:4]}. The files inside the lpips package (weights/v0.1/*.pth) hold only the linear "
                "layers, not the backbone. " + _LPIPS_HOWTO
            )
        self.network = model.requires_grad_(False).eval()
        self.resize = resize

    def check_sample_shape(self, shape: tuple[int, ...]) -> None:
        """LPIPS compares RGB (or grayscale) images, not latents."""
        if shape[0] not in (1, 3):
            raise ValueError(
                f"regression_distance=lpips compares 1- or 3-channel images, but the teacher's samples have shape "
                f"{list(shape)} (latents?). Decode them first or use regression_distance=mse."
            )

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if self.resize is not None and tuple(x.shape[-2:]) != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return x

    def distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """LPIPS per sample."""
        self.check_sample_shape(tuple(prediction.shape[1:]))
        return self.network(self._prepare(prediction), self._prepare(target)).reshape(prediction.shape[0])


def _lpips_backbone(state: dict, path: Path) -> str:
    """``alex`` / ``vgg`` / ``squeeze`` from the linear layers' input widths in an LPIPS state dict."""
    widths = {}
    for key, value in state.items():
        match = re.fullmatch(r"lin(\d+)\..*weight", key)  # lin0.model.1.weight (lins.0.* is an alias)
        if match and torch.is_tensor(value) and value.ndim == 4:
            widths[int(match.group(1))] = int(value.shape[1])
    chans = [widths[k] for k in sorted(widths)]
    known = {(64, 192, 384, 256, 256): "alex", (64, 128, 256, 512, 512): "vgg",
             (64, 128, 256, 384, 384, 512, 512): "squeeze"}
    if tuple(chans) not in known:
        raise ValueError(
            f"{str(path)!r} does not look like an LPIPS state dict (linear-layer widths {chans}). " + _LPIPS_HOWTO
        )
    return known[tuple(chans)]


def build_regression_distance(
    name: str,
    lpips_weights: str | Path | None = None,
    pixel_weight: float = 0.0,
) -> RegressionDistance:
    """The regression distance called ``name`` (one of :data:`REGRESSION_DISTANCES`).

    * ``mse`` -- per-sample pixel (or latent) MSE;
    * ``digits_features`` -- :meth:`FeatureDistance.digits`, the digits classifier's activations;
    * ``lpips`` -- :class:`LPIPSDistance` from ``lpips_weights`` (never downloads).

    Args:
        name: The distance.
        lpips_weights: Local LPIPS state dict (``lpips`` only).
        pixel_weight: Added pixel MSE weight (perceptual distances only).

    Raises:
        ValueError: for an unknown name, or ``pixel_weight > 0`` with ``mse``.
    """
    if name not in REGRESSION_DISTANCES:
        raise ValueError(f"Unknown regression distance {name!r}: choose one of {list(REGRESSION_DISTANCES)}.")
    if name == "mse":
        if pixel_weight > 0:
            raise ValueError("regression_pixel_weight adds a pixel MSE to a perceptual distance; with "
                             "regression_distance=mse it would only rescale the loss. Set it to 0.")
        return MSEDistance()
    if name == "digits_features":
        return FeatureDistance.digits(pixel_weight=pixel_weight)
    return LPIPSDistance(lpips_weights, pixel_weight=pixel_weight)


__all__ = [
    "REGRESSION_DISTANCES",
    "FeatureDistance",
    "LPIPSDistance",
    "MSEDistance",
    "RegressionDistance",
    "build_regression_distance",
    "digits_classifier_activations",
]

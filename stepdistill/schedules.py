"""Noise schedules and prediction-type conversions: the one place where eps / v / x0 / flow meet.

Every schedule writes the forward process as ``x_t = alpha_t * x0 + sigma_t * eps`` and exposes the
same small API, so samplers and losses never branch on the teacher family:

* :meth:`NoiseSchedule.alpha_sigma` -- ``(alpha_t, sigma_t)`` for a timestep;
* :meth:`NoiseSchedule.add_noise` -- draw ``x_t`` from ``x0`` and ``eps``;
* :meth:`NoiseSchedule.to_x0_eps` -- convert a network output into ``(x0, eps)``;
* :meth:`NoiseSchedule.target` -- the training target of the network for ``(x0, eps)``;
* :meth:`NoiseSchedule.model_timestep` -- the value the network is fed as ``timestep``;
* :meth:`NoiseSchedule.conditional_kernel` -- ``x_t | x_s`` between two noise levels;
* :meth:`NoiseSchedule.signal_step_size`, :meth:`NoiseSchedule.signal_to_x`, :meth:`NoiseSchedule.x_to_signal`,
  :meth:`NoiseSchedule.signal_grid` -- BOOT's signal ODE;
* :meth:`NoiseSchedule.add_noise_from`, :meth:`NoiseSchedule.subinterval_x0_eps` -- Phased DMD's conditional
  noising and unbiased ``(x0, eps)`` stand-ins from ``x_s``;
* :meth:`NoiseSchedule.log_snr`, :meth:`NoiseSchedule.inference_timesteps`,
  :meth:`NoiseSchedule.validate_timesteps`.

Timesteps are always in the teacher scheduler's own units: discrete indices ``0..T-1`` for VP (DDPM)
models, and ``sigma * num_train_timesteps`` in ``[0, T]`` for rectified-flow models (what diffusers'
``FlowMatchEulerDiscreteScheduler`` passes to SD3 / Flux transformers). ``t = 0`` is clean data.

Conversions are computed in float64 (DMD2 does the same: dividing by ``alpha_999`` amplifies error).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTION_TYPES = ("flow",)
PREDICTION_TYPES = VP_PREDICTION_TYPES + FLOW_PREDICTION_TYPES

TimestepLike = int | float | Sequence[int] | Sequence[float] | torch.Tensor


def check_prediction_type(prediction_type: str) -> str:
    """Return ``prediction_type`` if stepdistill knows it, else raise a ``ValueError`` naming the choices.

    Args:
        prediction_type: One of ``epsilon``, ``v_prediction``, ``sample`` (x0) or ``flow``
            (rectified-flow velocity ``eps - x0``).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"Unknown prediction type {prediction_type!r}. Use one of {list(PREDICTION_TYPES)}: "
            "'epsilon' (noise), 'v_prediction' (alpha*eps - sigma*x0), 'sample' (x0) or "
            "'flow' (rectified-flow velocity eps - x0)."
        )
    return prediction_type


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class _Level(NamedTuple):
    """What a single timestep given as a number always gives (0-d float64 tensors on the host; read only)."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    alpha_is_zero: bool  # an epsilon model cannot give x0 there
    norm: torch.Tensor | None  # the denominator of the v / flow conversions (``a*a + s*s``, ``a + s``)
    timestep: torch.Tensor  # 0-d :meth:`NoiseSchedule.model_timestep`


def _is_number(t: Any) -> bool:
    """A single Python (or NumPy floating) number, the timestep samplers pass; bools and tensors are not."""
    return isinstance(t, (int, float)) and not isinstance(t, bool)


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for x in tensors:
        if x.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def _init_kwargs(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``config`` that ``cls.__init__`` accepts (diffusers configs carry extra keys)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in params and k != "self"}


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample coefficient ``[B]`` (or scalar) against ``like`` ``[B, ...]``."""
    coef = coef.to(like.device)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


class NoiseSchedule(ABC):
    """A forward process ``x_t = alpha_t x0 + sigma_t eps`` with the network's prediction type.

    Subclasses define ``alpha_sigma`` and the timestep units; everything else (noising, conversions,
    targets, SNR, conditional kernels) is shared and written once here.

    Args:
        prediction_type: What the network predicts (see :func:`check_prediction_type`).
        num_train_timesteps: ``T``, the scheduler's number of training timesteps.
    """

    family: str = "base"

    def __init__(self, prediction_type: str, num_train_timesteps: int = 1000) -> None:
        self.prediction_type = check_prediction_type(prediction_type)
        self.num_train_timesteps = int(num_train_timesteps)
        # what single timesteps given as numbers give (:meth:`_level`): a sampler asks for the same few levels on
        # every call (schedules are immutable, so nothing is ever invalidated; the size is capped)
        self._levels: dict[float, _Level] = {}

    # ----------------------------------------------------------------------------------------------
    # what subclasses define
    @abstractmethod
    def _alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return float64 ``(alpha, sigma)`` for float64 timesteps ``t`` (already validated)."""

    @abstractmethod
    def inference_timesteps(self, num_inference_steps: int) -> list[float]:
        """Return the teacher's own decreasing sampling timesteps for ``num_inference_steps`` steps."""

    @abstractmethod
    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Map stepdistill timesteps to the ``timestep`` value the network was trained with."""

    @property
    @abstractmethod
    def max_timestep(self) -> float:
        """Largest valid timestep (the pure-noise end)."""

    # ----------------------------------------------------------------------------------------------
    def as_timesteps(self, t: TimestepLike, batch_size: int | None = None, device=None) -> torch.Tensor:
        """Turn ``t`` into a float64 tensor of shape ``[]`` or ``[B]``, checking it lies in range.

        Args:
            t: Scalar, sequence or tensor of timesteps in the schedule's units.
            batch_size: When given, a scalar is expanded to ``[batch_size]``.
            device: Device of the returned tensor.
        """
        if _is_number(t):  # one number (what samplers pass): checked in Python, no tensor op
            t = torch.as_tensor(self._checked(t), dtype=torch.float64)
            t = t.to(_work_dtype(torch.device(device) if device is not None else t.device))
            t = t if batch_size is None else t.expand(batch_size)
            return t if device is None else t.to(device)
        if not torch.is_tensor(t):
            t = torch.as_tensor(t, dtype=torch.float64)
        device = torch.device(device) if device is not None else t.device
        # Cast before moving: MPS has no float64, so a float64 tensor cannot be sent there first. The checks run
        # before the move, where ``t`` lives (the host, for numbers and CPU tensors): no accelerator sync.
        t = t.to(_work_dtype(device))
        if t.ndim > 1:
            raise ValueError(f"Timesteps must be a scalar or a 1-D tensor, got shape {tuple(t.shape)}.")
        if torch.isnan(t).any():
            raise ValueError("Timesteps contain NaN.")
        if (t < 0).any() or (t > self.max_timestep).any():
            raise self._range_error(t.tolist())
        if batch_size is not None:
            if t.ndim == 0 or t.shape[0] == 1:
                t = t.reshape(()).expand(batch_size)
            elif t.shape[0] != batch_size:
                raise ValueError(
                    f"Got {t.shape[0]} timesteps for a batch of {batch_size}: give one timestep, or one per sample."
                )
        return t.to(device)

    def _range_error(self, shown: Any) -> ValueError:
        return ValueError(
            f"Timestep(s) {shown} out of range: this {self.family} schedule accepts "
            f"0 <= t <= {self.max_timestep:g} (t=0 is clean data)."
        )

    def _checked(self, t: TimestepLike) -> float | torch.Tensor:
        """``t`` checked as :meth:`as_timesteps` checks it.

        A number stays a float (checked in Python, no tensor op); anything else becomes :meth:`as_timesteps`' float64
        tensor, where ``t`` lives.
        """
        if not _is_number(t):
            return self.as_timesteps(t)
        value = float(t)
        if math.isnan(value):
            raise ValueError("Timesteps contain NaN.")
        if not 0 <= value <= self.max_timestep:
            raise self._range_error(value)
        return value

    def _level(self, t: float) -> _Level:
        """What the :meth:`_checked` number ``t`` gives, computed once (a sampler asks for the same few levels).

        Everything is computed by the same code a tensor argument runs (:meth:`_alpha_sigma`, :meth:`model_timestep`,
        the conversions' denominators), on 0-d tensors, so the values are exactly those of a tensor argument.
        """
        level = self._levels.get(t)
        if level is None:
            if len(self._levels) >= 4096:  # continuous levels (a caller's random draws): start over
                self._levels.clear()
            alpha, sigma = self._alpha_sigma(torch.tensor(t, dtype=torch.float64))
            norm = {"v_prediction": alpha * alpha + sigma * sigma, "flow": alpha + sigma}.get(self.prediction_type)
            timestep = self.model_timestep(torch.tensor(t, dtype=torch.float64))
            level = self._levels[t] = _Level(alpha, sigma, bool(alpha == 0), norm, timestep)
        return level

    def _coefficients(
        self, t: float | torch.Tensor, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 ``(alpha, sigma)`` of :meth:`_checked` timesteps, moved to ``device``.

        A number's are the 0-d tensors :meth:`_level` keeps: on the host they come back themselves, so read them,
        never write into them (:meth:`alpha_sigma` hands out copies).
        """
        if torch.is_tensor(t):
            alpha, sigma = self._alpha_sigma(t)
        else:
            alpha, sigma, *_ = self._level(t)
        if device is None:
            return alpha, sigma
        return alpha.to(device), sigma.to(device)

    def _network_timestep(self, t: float, batch_size: int) -> torch.Tensor:
        """``model_timestep`` of the :meth:`_checked` number ``t`` for a batch: ``[batch_size]``, on the host."""
        return self._level(t).timestep.repeat(batch_size)

    def _alpha_sigma_on(self, t: TimestepLike, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`alpha_sigma` for stepdistill's own arithmetic, which only reads the result (no copies)."""
        device = torch.device(device) if device is not None else None
        if device is not None and _work_dtype(device) != torch.float64:
            return self._alpha_sigma(self.as_timesteps(t, device=device))
        return self._coefficients(self._checked(t), device)

    def alpha_sigma(self, t: TimestepLike, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(alpha_t, sigma_t)`` as float64 tensors with the shape of ``t``.

        Args:
            t: Timesteps in the schedule's units.
            device: Device of the result. The coefficients are computed where ``t`` lives (the host for numbers
                and CPU tensors, so no accelerator sync and no table copy) and then moved, except on devices
                without float64 (MPS), where they are computed there in float32.
        """
        alpha, sigma = self._alpha_sigma_on(t, device)
        if _is_number(t):  # the schedule's cached pair: the caller gets its own tensors
            alpha, sigma = alpha.clone(), sigma.clone()
        return alpha, sigma

    def log_snr(self, t: TimestepLike) -> torch.Tensor:
        """Return ``log(alpha_t^2 / sigma_t^2)`` (``+inf`` at clean data)."""
        alpha, sigma = self._alpha_sigma_on(t)
        return 2.0 * (torch.log(alpha) - torch.log(sigma))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """Return ``x_t = alpha_t * x0 + sigma_t * noise`` in the dtype of ``x0``.

        Args:
            x0: Clean samples ``[B, ...]``.
            noise: Standard Gaussian noise of the same shape.
            t: One timestep, or one per sample ``[B]``.
        """
        alpha, sigma = self._alpha_sigma_on(t, device=x0.device)
        wd = alpha.dtype
        out = _expand(alpha, x0) * x0.to(wd) + _expand(sigma, x0) * noise.to(wd)
        return out.to(x0.dtype)

    def to_x0_eps(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: TimestepLike
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a network output at ``(x_t, t)`` into ``(x0, eps)`` estimates.

        Formulas hold for any ``(alpha, sigma)``, with ``v = alpha eps - sigma x0`` (Salimans & Ho 2022) and
        ``flow = eps - x0`` (rectified flow, Liu et al. 2023).

        Args:
            model_output: Raw network prediction of type ``self.prediction_type``.
            x_t: The noisy input the network saw.
            t: Its timestep(s).

        Returns:
            ``(x0, eps)`` in float32 (float64 if an input was float64).
        """
        return self._to_x0_eps(model_output, x_t, self._checked(t))

    def _to_x0_eps(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: float | torch.Tensor, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`to_x0_eps` of :meth:`_checked` timesteps (a :class:`~stepdistill.Denoiser` checks them once).

        ``batch_size``: the batch the timesteps are for (a number's coefficients on MPS take the shape ``[B]``).
        """
        out_dtype = _out_dtype(model_output, x_t)
        level = None
        if _work_dtype(x_t.device) != torch.float64:  # no float64 there (MPS): computed there in float32, in [B]
            t = torch.as_tensor(t, dtype=torch.float64)
            t = t.expand(batch_size) if batch_size is not None and t.ndim == 0 else t
            alpha, sigma = self._alpha_sigma(t.to(torch.float32).to(x_t.device))
        elif torch.is_tensor(t):
            alpha, sigma = self._alpha_sigma(t)
        else:  # a number's: 0-d, kept (broadcasting gives the values a [B] tensor gives)
            level = self._level(t)
            alpha, sigma = level.alpha, level.sigma
        wd = alpha.dtype
        a, s = _expand(alpha, x_t), _expand(sigma, x_t)  # moved to x_t's device here; the check below reads alpha
        y, x = model_output.to(wd), x_t.to(wd)  # where t lives (the host for numbers): no accelerator sync
        kind = self.prediction_type
        if kind == "epsilon":
            if level.alpha_is_zero if level is not None else bool((alpha == 0).any()):
                raise ValueError(
                    "An epsilon-prediction model cannot give x0 where alpha_t = 0 (a zero-terminal-SNR schedule "
                    "at its last timestep). Use a v_prediction or sample model there, or a timestep below the end."
                )
            eps = y
            x0 = (x - s * eps) / a
        elif kind == "sample":
            x0 = y
            eps = (x - a * x0) / s
        elif kind == "v_prediction":
            norm = _expand(level.norm, x_t) if level is not None else a * a + s * s
            x0 = (a * x - s * y) / norm
            eps = (s * x + a * y) / norm
        else:  # flow: y = eps - x0
            norm = _expand(level.norm, x_t) if level is not None else a + s
            x0 = (x - s * y) / norm
            eps = (x + a * y) / norm
        return x0.to(out_dtype), eps.to(out_dtype)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """Return what the network should output for clean ``x0`` noised with ``eps`` at ``t``.

        This is the regression target of denoising score matching in the network's own
        parameterization (and the inverse of :meth:`to_x0_eps`).
        """
        kind = self.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "sample":
            return x0
        if kind == "flow":
            return eps - x0
        alpha, sigma = self._alpha_sigma_on(t, device=x0.device)
        wd = alpha.dtype
        v = _expand(alpha, x0) * eps.to(wd) - _expand(sigma, x0) * x0.to(wd)
        return v.to(_out_dtype(x0, eps))

    def from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """Alias of :meth:`target`: the network output that corresponds to ``(x0, eps)``."""
        return self.target(x0, eps, t)

    def conditional_kernel(self, t: TimestepLike, s: TimestepLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(alpha_{t|s}, sigma_{t|s})`` of ``q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I)``.

        ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2``
        (Phased DMD's subinterval kernel). Requires ``s <= t``.
        """
        ts, ss = self.as_timesteps(t), self.as_timesteps(s)
        if (ss > ts).any():
            raise ValueError(f"conditional_kernel needs s <= t (s is the cleaner level); got t={t}, s={s}.")
        a_t, s_t = self._alpha_sigma(ts)
        a_s, s_s = self._alpha_sigma(ss)
        a_ts = a_t / a_s
        var = (s_t * s_t - a_ts * a_ts * s_s * s_s).clamp_min(0.0)
        return a_ts, var.sqrt()

    # ----------------------------------------------------------------------------------------------
    # BOOT's signal ODE (Gu et al. 2023, arXiv 2306.05544): y_t = (x_t - sigma_t eps) / alpha_t for a fixed eps
    def signal_step_size(self, t: TimestepLike, s: TimestepLike) -> torch.Tensor:
        """BOOT's exact step coefficient ``delta = 1 - (sigma_s alpha_t) / (alpha_s sigma_t)`` from ``t`` to ``s < t``.

        One DDIM (probability-flow; Euler for rectified flow) step of an x0-predictor ``f`` from ``t`` to ``s``,
        written in signal space with the same ``eps``, is ``y_s = y_t + delta (f - y_t)``. With BOOT's
        ``lambda_t = -log(alpha_t / sigma_t)``, ``delta = 1 - exp(lambda_s - lambda_t)`` (``~ lambda_t - lambda_s``
        for small steps). It lies in ``(0, 1]``: ``1`` where ``alpha_t = 0`` (pure noise) or ``sigma_s = 0``.

        Raises:
            ValueError: ``s >= t`` somewhere, or ``alpha_s = 0`` / ``sigma_t = 0`` (the ratio divides by zero).
        """
        ts, ss = self.as_timesteps(t), self.as_timesteps(s)
        if (ss >= ts).any():
            raise ValueError(f"signal_step_size needs s < t (s is the cleaner level); got t={t}, s={s}.")
        a_t, s_t = self._alpha_sigma(ts)
        a_s, s_s = self._alpha_sigma(ss)
        if bool((a_s == 0).any()) or bool((s_t == 0).any()):
            raise ValueError(f"The signal step from t={t} to s={s} divides by zero (alpha_s = 0 or sigma_t = 0).")
        return 1.0 - (s_s * a_t) / (a_s * s_t)

    def signal_to_x(self, y: torch.Tensor, eps: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """The trajectory point ``x_t = alpha_t y_t + sigma_t eps`` of signal ``y_t`` (dtype of ``y``)."""
        return self.add_noise(y, eps, t)

    def x_to_signal(self, x_t: torch.Tensor, eps: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """The signal ``y_t = (x_t - sigma_t eps) / alpha_t`` of a trajectory point (float64 inside).

        Raises:
            ValueError: where ``alpha_t = 0`` (the signal is undefined at pure noise).
        """
        alpha, sigma = self._alpha_sigma_on(t, device=x_t.device)
        if bool((alpha == 0).any()):
            raise ValueError(f"The signal y_t = (x_t - sigma_t eps) / alpha_t is undefined at t={t} (alpha_t = 0).")
        y = (x_t.to(alpha.dtype) - _expand(sigma, x_t) * eps.to(alpha.dtype)) / _expand(alpha, x_t)
        return y.to(_out_dtype(x_t, eps))

    def signal_grid(self, num_steps: int, end: float | None = None) -> torch.Tensor:
        """``num_steps + 1`` increasing timesteps from ``0`` to ``end`` (default: the noise end), evenly spaced.

        BOOT bootstraps between neighbours of this grid (``s = grid[k - 1]``, ``t = grid[k]``).
        """
        end = self.max_timestep if end is None else float(end)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        grid = self._grid_values(torch.linspace(0.0, end, num_steps + 1, dtype=torch.float64))
        if bool((grid[1:] <= grid[:-1]).any()):
            raise ValueError(f"{num_steps} steps up to t={end:g} repeat a timestep of this {self.family} schedule: "
                             "use fewer steps.")
        return self.as_timesteps(grid)

    def _grid_values(self, grid: torch.Tensor) -> torch.Tensor:
        """Snap an evenly spaced grid to the schedule's natural timesteps (continuous: unchanged)."""
        return grid

    def add_noise_from(self, x_s: torch.Tensor, noise: torch.Tensor, t: TimestepLike, s: TimestepLike) -> torch.Tensor:
        """Return ``x_t = alpha_{t|s} x_s + sigma_{t|s} noise`` (:meth:`conditional_kernel`) in the dtype of ``x_s``."""
        a_ts, s_ts = self.conditional_kernel(t, s)
        wd = _work_dtype(x_s.device)
        out = _expand(a_ts.to(wd), x_s) * x_s.to(wd) + _expand(s_ts.to(wd), x_s) * noise.to(wd)
        return out.to(x_s.dtype)

    def subinterval_x0_eps(
        self, x_s: torch.Tensor, noise: torch.Tensor, t: TimestepLike, s: TimestepLike
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise ``x_s`` to ``t`` with the conditional kernel and give unbiased stand-ins for ``(x0, eps)``.

        Phased DMD (Fan et al., "Phased DMD", CVPR 2026, Sec. 3.3, Eq. 11-12): with only ``x_s`` (no clean
        sample), ``x_t = alpha_{t|s} x_s + sigma_{t|s} noise`` and the conditional score
        ``-noise / sigma_{t|s}`` replaces the marginal one in Tweedie's formula, which gives

        * ``eps_hat = (sigma_t / sigma_{t|s}) noise``,
        * ``x0_hat = (x_t - sigma_t eps_hat) / alpha_t
          = x_s / alpha_s - alpha_t sigma_s^2 / (alpha_s^2 sigma_{t|s}) noise`` (Eq. 12).

        ``E[x0_hat | x_t] = E[x0 | x_t]`` and ``E[eps_hat | x_t] = E[eps | x_t]``, so any target linear in
        ``(x0, eps)`` (:meth:`target`: eps, v, x0 or flow ``eps - x0``, which reproduces Eq. 11) built from them
        has the full-interval target's regression on ``x_t``. With ``s = 0`` they are ``(x_s, noise)``.

        Args:
            x_s: Samples at the cleaner level ``s``.
            noise: Standard Gaussian noise like ``x_s``.
            t: Noisier level(s), ``t > s`` (``sigma_{t|s} > 0``).
            s: The level of ``x_s``.

        Returns:
            ``(x_t, x0_hat, eps_hat)`` in the dtype of ``x_s``.
        """
        wd = _work_dtype(x_s.device)
        _, s_ts = self.conditional_kernel(t, s)
        if bool((s_ts <= 0).any()):
            raise ValueError("subinterval_x0_eps needs t > s (sigma_{t|s} > 0); draw t above s, e.g. with "
                             "sample_subinterval_timesteps.")
        s_ts = s_ts.to(wd).to(x_s.device)
        a_t, sig_t = self._alpha_sigma_on(t, device=x_s.device)
        x, n = x_s.to(wd), noise.to(wd)
        x_t = self.add_noise_from(x, n, t, s)
        eps_hat = _expand(sig_t / s_ts, x) * n
        x0_hat = (x_t - _expand(sig_t, x) * eps_hat) / _expand(a_t, x)
        return x_t.to(x_s.dtype), x0_hat.to(x_s.dtype), eps_hat.to(x_s.dtype)

    def sample_subinterval_timesteps(
        self,
        batch_size: int,
        s: float,
        high: float | None = None,
        margin: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Re-noise levels ``[B]`` (float64) above a phase boundary ``s``: uniform over ``(s + margin, high]``.

        Phased DMD draws the re-noise ``t`` in ``(t_k, T]`` ("reverse nested"; ``high`` = the previous boundary
        gives the disjoint ablation). ``margin`` (timestep units) keeps ``t`` away from the ``sigma_{t|s} -> 0``
        singularity, LightX2V's alternative to the clamp of Eq. 13. The base rule is continuous (flow);
        :class:`VPSchedule` draws integer indices.

        Args:
            batch_size: Number of levels.
            s: The boundary (exclusive).
            high: Upper end (inclusive); default ``max_timestep``.
            margin: Extra gap above ``s``.
            generator: The caller's explicit generator.
        """
        lo, hi = self._subinterval_range(s, high, margin)
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return hi - (hi - lo) * u  # (lo, hi]

    def _subinterval_range(self, s: float, high: float | None, margin: float) -> tuple[float, float]:
        hi = self.max_timestep if high is None else float(high)
        lo = float(s) + float(margin)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}.")
        if not 0 <= float(s) < hi <= self.max_timestep or not lo < hi:
            raise ValueError(f"No re-noise level in ({lo:g}, {hi:g}]: need 0 <= s + margin < high <= "
                             f"{self.max_timestep:g} (s={float(s):g}, margin={float(margin):g}).")
        return lo, hi

    def validate_timesteps(self, timesteps: Sequence[float] | torch.Tensor) -> list[float]:
        """Check a sampling timestep list: non-empty, strictly decreasing, inside the valid range.

        Returns the list as Python floats. Raises ``ValueError`` saying which rule failed.
        """
        values = [float(v) for v in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
        if not values:
            raise ValueError("The timestep list is empty: give at least one timestep, e.g. [999].")
        for v in values:
            if not (0 <= v <= self.max_timestep) or math.isnan(v):
                raise ValueError(
                    f"Timestep {v:g} in {values} is out of range: this {self.family} schedule accepts "
                    f"0 <= t <= {self.max_timestep:g}."
                )
        for a, b in zip(values, values[1:]):
            if not b < a:
                raise ValueError(
                    f"Timesteps must be strictly decreasing (noisiest first), got {values}. "
                    "Sort them in descending order, e.g. [999, 749, 499, 249]."
                )
        return values

    def sample_timesteps(
        self, batch_size: int, low: float = 0.0, high: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training timesteps ``[B]`` (float64), uniform over the fraction ``[low, high]`` of the schedule.

        The base rule is continuous: ``(low + (high - low) * u) * max_timestep`` with ``u ~ U[0, 1)``;
        :class:`VPSchedule` draws integer indices instead. Every loss that noises samples draws its levels
        here, with the trainer's explicit ``generator``.
        """
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return (low + (high - low) * u) * self.max_timestep

    def config(self) -> dict[str, Any]:
        """A JSON-serialisable description of this schedule."""
        return {"family": self.family, "prediction_type": self.prediction_type,
                "num_train_timesteps": self.num_train_timesteps}

    @staticmethod
    def from_scheduler_config(config: dict[str, Any], prediction_type: str | None = None) -> NoiseSchedule:
        """Build the schedule described by a diffusers scheduler config.

        Flow-matching configs (``FlowMatch*`` class names, or a ``shift`` key with no betas) give a
        :class:`FlowSchedule`; anything with betas gives a :class:`VPSchedule`.

        Args:
            config: A diffusers scheduler config (``scheduler.config`` or ``scheduler_config.json``).
            prediction_type: Override the config's prediction type (e.g. for custom modules).
        """
        config = dict(config)
        name = str(config.get("_class_name", ""))
        if name.startswith("FlowMatch") or ("shift" in config and "beta_start" not in config):
            if config.get("use_dynamic_shifting"):
                raise ValueError(
                    "Dynamic (resolution-dependent) shifting is not supported yet: pass a scheduler config "
                    "with use_dynamic_shifting=False and the fixed `shift` you want."
                )
            return FlowSchedule(
                num_train_timesteps=config.get("num_train_timesteps", 1000),
                shift=config.get("shift", 1.0),
                prediction_type=prediction_type or "flow",
                scheduler_config=config,
            )
        return VPSchedule.from_config(config, prediction_type=prediction_type)


class VPSchedule(NoiseSchedule):
    """Variance-preserving DDPM schedule: ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``.

    Timesteps are the scheduler's discrete indices ``0..T-1``; fractional timesteps are allowed and
    interpolate ``abar`` linearly. The network is fed the timestep itself.

    Args:
        alphas_cumprod: ``abar_t`` for ``t = 0..T-1`` (e.g. ``DDPMScheduler(...).alphas_cumprod``).
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
        scheduler_config: The diffusers config it came from (used for sampling timesteps).

    Example:
        >>> from diffusers import DDPMScheduler
        >>> sched = VPSchedule.from_config(DDPMScheduler(beta_schedule="scaled_linear").config)
        >>> x0, eps = sched.to_x0_eps(model_output, x_t, 999)
    """

    family = "vp"

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        if prediction_type not in VP_PREDICTION_TYPES:
            check_prediction_type(prediction_type)
            raise ValueError(
                f"Prediction type {prediction_type!r} does not fit a VP (DDPM) schedule; "
                f"use one of {list(VP_PREDICTION_TYPES)}, or a flow-matching scheduler config for 'flow'."
            )
        super().__init__(prediction_type, num_train_timesteps=len(alphas_cumprod))
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clone()
        self.scheduler_config = dict(scheduler_config or {})
        self._tables: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: dict[str, Any], prediction_type: str | None = None) -> VPSchedule:
        """Build from a diffusers DDPM / DDIM / Euler / LCM scheduler config (betas are computed by diffusers)."""
        from diffusers import DDPMScheduler

        kwargs = _init_kwargs(DDPMScheduler, config)
        pt = prediction_type or config.get("prediction_type", "epsilon")
        check_prediction_type(pt)
        kwargs["prediction_type"] = pt if pt in VP_PREDICTION_TYPES else "epsilon"
        ddpm = DDPMScheduler(**kwargs)
        return cls(ddpm.alphas_cumprod, prediction_type=pt, scheduler_config=dict(config))

    @property
    def max_timestep(self) -> float:
        """The noisiest index, ``T - 1``."""
        return float(self.num_train_timesteps - 1)

    def _table(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``alphas_cumprod`` in ``dtype`` on ``device``, built once per pair (the schedule never changes)."""
        table = self._tables.get((dtype, device))
        if table is None:
            table = self._tables[(dtype, device)] = self._build_table(dtype, device)
        return table

    def _build_table(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.alphas_cumprod.to(dtype).to(device)  # cast on CPU first: MPS has no float64

    def _alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._table(t.dtype, t.device)
        lo = t.floor().long().clamp(0, self.num_train_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        frac = t - lo.to(t.dtype)
        abar = table[lo] * (1 - frac) + table[hi] * frac
        return abar.sqrt(), (1 - abar).clamp_min(0).sqrt()

    def sample_timesteps(
        self, batch_size: int, low: float = 0.0, high: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Integer indices ``UniformInt[int(low*T), int(high*T)]`` inclusive, clipped to ``T - 1`` (float64).

        DMD's default fractions 0.02 / 0.98 give indices 20..980; ``0, 1`` gives every index ``0..T-1``.
        """
        T = self.num_train_timesteps
        lo, hi = int(low * T), min(int(high * T), T - 1)
        return torch.randint(lo, hi + 1, (batch_size,), generator=generator).double()

    def _grid_values(self, grid: torch.Tensor) -> torch.Tensor:
        """VP grids are rounded to the discrete indices the network was trained on."""
        return grid.round()

    def sample_subinterval_timesteps(
        self,
        batch_size: int,
        s: float,
        high: float | None = None,
        margin: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Integer indices uniform over ``(s + margin, high]`` (:meth:`NoiseSchedule.sample_subinterval_timesteps`)."""
        lo, hi = self._subinterval_range(s, high, margin)
        first, last = math.floor(lo) + 1, math.floor(hi)
        if first > last:
            raise ValueError(f"No integer timestep in ({lo:g}, {hi:g}]: lower the margin or widen the interval.")
        return torch.randint(first, last + 1, (batch_size,), generator=generator).double()

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """VP networks take the discrete index itself: a long tensor when integral, else float32.

        Fractional timesteps go out as float32 (as diffusers' Euler schedulers pass them), never float64,
        which custom modules and some backends do not accept.
        """
        t = torch.as_tensor(t)
        if torch.is_floating_point(t):
            return t.round().long() if torch.equal(t, t.round()) else t.float()
        return t

    def inference_timesteps(self, num_inference_steps: int) -> list[float]:
        """Timesteps of diffusers' ``DDIMScheduler.set_timesteps`` for this config (its spacing rule)."""
        from diffusers import DDIMScheduler

        kwargs = _init_kwargs(DDIMScheduler, self.scheduler_config)
        kwargs.pop("prediction_type", None)
        if "trained_betas" not in kwargs:
            # alphas_cumprod is all DDIM needs: pass it through trained betas to keep exotic schedules.
            abar = self.alphas_cumprod
            prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
            kwargs["trained_betas"] = (1 - abar / prev).tolist()
        kwargs["num_train_timesteps"] = self.num_train_timesteps
        sched = DDIMScheduler(**kwargs)
        sched.set_timesteps(num_inference_steps)
        return [float(v) for v in sched.timesteps.tolist()]

    def config(self) -> dict[str, Any]:
        """JSON description, including the diffusers scheduler config it came from."""
        out = super().config()
        out["scheduler_config"] = {k: v for k, v in self.scheduler_config.items()}
        return out


class FlowSchedule(NoiseSchedule):
    """Rectified-flow schedule (SD3, Flux-style): ``alpha = 1 - sigma``, ``sigma = t / T``.

    Timesteps are ``sigma * T`` in ``[0, T]``, exactly what diffusers' ``FlowMatchEulerDiscreteScheduler``
    passes to the transformer. ``shift`` warps the *sampling* sigmas as
    ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``; training-time noising is unshifted in
    ``sigma`` (pass shifted timesteps if you want shifted noise levels).

    Args:
        num_train_timesteps: ``T`` (1000 for SD3 / Flux).
        shift: Timestep shift used when building sampling timesteps.
        prediction_type: ``flow`` (velocity ``eps - x0``), or ``sample`` / ``epsilon`` for custom nets.
        scheduler_config: The diffusers config it came from.
    """

    family = "flow"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        prediction_type: str = "flow",
        scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(prediction_type, num_train_timesteps=num_train_timesteps)
        if shift <= 0:
            raise ValueError(f"Flow shift must be positive, got {shift}.")
        self.shift = float(shift)
        self.scheduler_config = dict(scheduler_config or {})

    @property
    def max_timestep(self) -> float:
        """``T``: sigma = 1, pure noise."""
        return float(self.num_train_timesteps)

    def shift_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Apply the timestep shift to sigmas in ``[0, 1]``."""
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def _alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = t / self.num_train_timesteps
        return 1 - sigma, sigma

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Flow transformers take ``sigma * T`` as a float."""
        return torch.as_tensor(t).float()

    def inference_timesteps(self, num_inference_steps: int) -> list[float]:
        """Timesteps of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (shift included)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        kwargs = _init_kwargs(FlowMatchEulerDiscreteScheduler, self.scheduler_config)
        kwargs.update(num_train_timesteps=self.num_train_timesteps, shift=self.shift, use_dynamic_shifting=False)
        sched = FlowMatchEulerDiscreteScheduler(**kwargs)  # keeps e.g. shift_terminal, karras sigmas
        sched.set_timesteps(num_inference_steps)
        return [float(v) for v in sched.timesteps.tolist()]

    def config(self) -> dict[str, Any]:
        """JSON description including ``shift``."""
        out = super().config()
        out["shift"] = self.shift
        return out

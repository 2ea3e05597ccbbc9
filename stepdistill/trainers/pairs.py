"""DMD1 regression pairs (Yin et al., DMD, CVPR 2024): teacher ODE samples on fixed noise, made once and stored.

A pair set is fixed by ``(teacher, data source, count, steps, guidance, seed)``. Pair ``i``:

* conditioning: row ``i % 256`` of ``source.sample(n, torch.Generator().manual_seed(seed + 7919 * c))``
  for chunk ``c = i // 256`` (chunks of :data:`COND_CHUNK`, the last one shorter);
* noise: ``initial_noise((1, C, H, W), make_generators([pair_noise_seed(seed, i)]))``;
* target: ``sample_teacher(teacher, noise, cond, num_inference_steps, guidance_scale=guidance)``
  (deterministic DDIM / Euler with the teacher's CFG).

Every pair therefore depends only on its index, so any subset can be made on its own (one shard per
process) and the shards merge into the same set, whatever the world size or batch size.

The file (:func:`save_regression_pairs`) is one safetensors file, written atomically:

* ``noise`` ``[N, C, H, W]`` float32, ``x0`` ``[N, C, H, W]`` float32 (the teacher's outputs);
* ``cond.<field>`` for each conditioning field present (``class_labels``, ``prompt_embeds``,
  ``pooled_prompt_embeds``, ``time_ids``) and ``negative.<field>`` for an explicit unconditional twin;
* ``index`` ``[N]`` (int64) only in per-process shards;
* header metadata ``stepdistill_pairs``: JSON with the format version, teacher path, network class and
  config, schedule identity, sample shape, steps, timesteps, guidance, seed, count, data source,
  conditioning fields and null class (:func:`read_pairs_metadata`).

The trainer (``DMDConfig.regression_pairs``) loads it with :func:`load_regression_pairs` and checks it
against its teacher with :func:`check_pairs_match_teacher`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..conditioning import Conditioning
from ..data.sources import ConditionSource
from ..denoiser import Denoiser
from ..sampling import initial_noise, make_generators, sample_teacher
from ..schedules import NoiseSchedule, VPSchedule
from ..utils import atomic_write_file

PAIRS_FORMAT = "stepdistill.regression_pairs"
PAIRS_VERSION = 1
METADATA_KEY = "stepdistill_pairs"
#: Conditions are drawn from the data source in chunks of this many pairs (one generator per chunk).
COND_CHUNK = 256
#: Relative RMS error above which a re-generated pair says "this is not the teacher that made the file".
VERIFY_TOLERANCE = 0.1

_COND_FIELDS = ("class_labels", "prompt_embeds", "pooled_prompt_embeds", "time_ids")
_FIX = "regenerate the file with `stepdistill pairs --config <your recipe> --output PATH`"


class PairsFileError(ValueError):
    """A pairs file that is malformed or was made for another teacher; the message names the fix."""


def pair_noise_seed(seed: int, index: int) -> int:
    """Seed of pair ``index``'s noise generator in the pair set with ``seed``."""
    return 1_000_003 * int(seed) + int(index)


def default_pairs_seed(train_seed: int) -> int:
    """The pair-set seed a trainer with ``seed = train_seed`` uses (``stepdistill pairs`` uses the same)."""
    return int(train_seed) + 4242


def schedule_identity(schedule: NoiseSchedule) -> dict[str, Any]:
    """What must agree between the teacher that made a pair set and the one that uses it.

    Family, prediction type, ``T``, and (VP) ``alpha_bar`` at five timesteps or (flow) the shift.
    """
    out: dict[str, Any] = {"family": schedule.family, "prediction_type": schedule.prediction_type,
                           "num_train_timesteps": int(schedule.num_train_timesteps)}
    if isinstance(schedule, VPSchedule):
        T = len(schedule.alphas_cumprod)
        points = [0, T // 4, T // 2, (3 * T) // 4, T - 1]
        out["alphas_cumprod_at"] = {str(t): round(float(schedule.alphas_cumprod[t]), 8) for t in points}
    elif hasattr(schedule, "shift"):
        out["shift"] = float(schedule.shift)
    return out


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def network_identity(network: nn.Module) -> dict[str, Any]:
    """The network's class name and (diffusers) config without private keys, JSON-normalised."""
    out: dict[str, Any] = {"class": type(network).__name__}
    config = getattr(network, "config", None)
    if config is not None:
        out["config"] = _json_safe({k: v for k, v in dict(config).items() if not str(k).startswith("_")})
    return out


def _first_parameter(teacher: Denoiser) -> torch.Tensor:
    """A parameter of the teacher's network (its device and dtype); the network itself, not LoRA views."""
    model = getattr(teacher, "model", teacher)
    return next(iter(model.parameters()), torch.empty(0))


def _identities_differ(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-6) -> list[str]:
    """Keys whose values differ (floats compared with an absolute tolerance)."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += [f"{key}.{k}" for k in _identities_differ(va, vb, tol)]
        elif isinstance(va, float) and isinstance(vb, (int, float)):
            if not math.isclose(va, vb, rel_tol=0, abs_tol=tol):
                diffs.append(key)
        elif va != vb:
            diffs.append(key)
    return diffs


# --------------------------------------------------------------------------------------------------
@dataclass
class RegressionPairs:
    """A set (or shard) of teacher ODE pairs ``(noise, cond, x0)``.

    Args:
        noise: ``[N, C, H, W]`` float32 starting noise.
        x0: ``[N, C, H, W]`` float32 teacher samples from that noise.
        cond: Their conditioning (batch ``N``; empty for unconditional teachers).
        metadata: How they were made (see the module docstring).
        index: Pair indices ``[N]`` (int64) within the full set.
    """

    noise: torch.Tensor
    x0: torch.Tensor
    cond: Conditioning
    metadata: dict[str, Any] = field(default_factory=dict)
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.noise.shape[0])

    def trainer_pairs(self) -> dict[str, Any]:
        """The ``{"z", "cond", "y"}`` dict :class:`~stepdistill.trainers.dmd.DMDTrainer` samples from."""
        return {"z": self.noise, "cond": self.cond, "y": self.x0}


def _chunk_conditions(source: ConditionSource, count: int, seed: int, chunk: int) -> Conditioning:
    """The conditioning of pairs ``chunk*COND_CHUNK ...`` (one generator per chunk), on the CPU."""
    start = chunk * COND_CHUNK
    n = min(COND_CHUNK, count - start)
    cond = source.sample_conditions(n, torch.Generator().manual_seed(int(seed) + 7919 * chunk))
    if cond.batch_size not in (None, n):
        raise ValueError(f"The data source returned {cond.batch_size} conditions for {n} requested.")
    return cond.to("cpu")


def pair_conditions(source: ConditionSource, count: int, seed: int, indices: Sequence[int]) -> Conditioning:
    """The conditioning of pairs ``indices`` (drawing only the chunks they fall in)."""
    rows: dict[int, list[int]] = {}
    for i in indices:
        rows.setdefault(int(i) // COND_CHUNK, []).append(int(i) % COND_CHUNK)
    if not rows:
        return Conditioning()
    parts = []
    for c in sorted(rows):
        chunk = _chunk_conditions(source, count, seed, c)
        parts.append(chunk if chunk.is_empty else chunk.select(rows[c]))
    return parts[0] if len(parts) == 1 else Conditioning.cat(parts)


@torch.no_grad()
def generate_regression_pairs(
    teacher: Denoiser,
    source: ConditionSource,
    count: int,
    sample_shape: Sequence[int],
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = False,
) -> RegressionPairs:
    """Run the teacher ODE on the fixed noise and conditions of pairs ``indices`` (default: all ``count``).

    Args:
        teacher: The teacher denoiser (already on ``device``, in the dtype it should run in).
        source: Where conditions come from (the trainer's data source).
        count: Size of the full pair set (fixes the condition chunks).
        sample_shape: ``[C, H, W]`` of one sample.
        num_inference_steps: Teacher sampler steps.
        guidance_scale: The teacher's CFG ``w`` (``None`` / 1: none).
        seed: Pair-set seed (see :func:`pair_noise_seed`).
        indices: The pairs to make (a shard); sorted, unique, in ``[0, count)``.
        batch_size: Pairs per teacher call.
        device: Where to run (default: the teacher's device).
        metadata: Extra metadata entries (e.g. the teacher path, the data source name).
        progress: Show a tqdm bar.

    Returns:
        The pairs on the CPU, with ``index`` set and the metadata filled in.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    idx = list(range(count)) if indices is None else [int(i) for i in indices]
    if idx != sorted(set(idx)) or (idx and not 0 <= idx[0] <= idx[-1] < count):
        raise ValueError(f"indices must be sorted, unique and in [0, {count}).")
    if device is None:
        device = _first_parameter(teacher).device
    shape = tuple(int(s) for s in sample_shape)
    cond_all = pair_conditions(source, count, seed, idx)
    noise = initial_noise((len(idx), *shape), make_generators([pair_noise_seed(seed, i) for i in idx]))
    outs = []
    starts = range(0, len(idx), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="teacher ODE pairs", unit="batch")
    for s in starts:
        sl = slice(s, s + batch_size)
        c = None if cond_all.is_empty else cond_all.select(sl).to(device)
        y = sample_teacher(teacher, noise[sl].to(device), c, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale)
        outs.append(y.float().cpu())
    x0 = torch.cat(outs) if outs else torch.empty(0, *shape)
    meta = {
        "format": PAIRS_FORMAT,
        "version": PAIRS_VERSION,
        "count": int(count),
        "seed": int(seed),
        "num_inference_steps": int(num_inference_steps),
        "timesteps": teacher.schedule.inference_timesteps(num_inference_steps),
        "guidance_scale": None if guidance_scale is None else float(guidance_scale),
        "sample_shape": list(shape),
        "schedule": schedule_identity(teacher.schedule),
        "network": network_identity(teacher.model),
        "conditioning": cond_all.present(),
        "negative": cond_all.negative.present() if cond_all.negative is not None else [],
        "null_class_label": cond_all.null_class_label,
        "teacher_dtype": str(_first_parameter(teacher).dtype).replace("torch.", ""),
        "noise_seeds": "pair i: torch.Generator().manual_seed(1000003 * seed + i), diffusers randn_tensor",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    meta.update(metadata or {})
    return RegressionPairs(noise, x0, cond_all, meta, torch.tensor(idx, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# files
def _tensors(pairs: RegressionPairs, with_index: bool) -> dict[str, torch.Tensor]:
    out = {"noise": pairs.noise.float().contiguous(), "x0": pairs.x0.float().contiguous()}
    for name in pairs.cond.present():
        out[f"cond.{name}"] = getattr(pairs.cond, name).contiguous()
    if pairs.cond.negative is not None:
        for name in pairs.cond.negative.present():
            out[f"negative.{name}"] = getattr(pairs.cond.negative, name).contiguous()
    if with_index and pairs.index is not None:
        out["index"] = pairs.index.long().contiguous()
    return out


def save_regression_pairs(pairs: RegressionPairs, path: str | Path, shard: bool = False) -> Path:
    """Write ``pairs`` to one safetensors file atomically (temporary sibling, then rename).

    Args:
        pairs: The pairs.
        path: Target file.
        shard: Also store ``index`` (per-process shards that :func:`merge_regression_pairs` joins).
    """
    from safetensors.torch import save_file

    tensors = _tensors(pairs, with_index=shard)
    meta = dict(pairs.metadata, count_in_file=len(pairs))
    header = {METADATA_KEY: json.dumps(meta)}
    return atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def read_pairs_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a pairs file (without reading its tensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PairsFileError(f"No pairs file at {str(path)!r}: make it with `stepdistill pairs --config <your "
                             "recipe> --output PATH` (or unset regression_pairs to generate pairs in memory at start).")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for non-safetensors files
        raise PairsFileError(f"{str(path)!r} is not a safetensors file ({err}); {_FIX}.") from err
    if METADATA_KEY not in header:
        raise PairsFileError(f"{str(path)!r} is a safetensors file without {METADATA_KEY!r} metadata: it was not "
                             f"written by stepdistill's generate_pairs; {_FIX}.")
    meta = json.loads(header[METADATA_KEY])
    if meta.get("format") != PAIRS_FORMAT or int(meta.get("version", -1)) > PAIRS_VERSION:
        raise PairsFileError(f"{str(path)!r} has format {meta.get('format')!r} version {meta.get('version')}; this "
                             f"stepdistill reads {PAIRS_FORMAT!r} up to version {PAIRS_VERSION}; {_FIX}.")
    return meta


def load_regression_pairs(path: str | Path) -> RegressionPairs:
    """Read a pairs file (or shard) written by :func:`save_regression_pairs`, checking its internal shapes."""
    from safetensors.torch import load_file

    meta = read_pairs_metadata(path)
    tensors = load_file(str(path))
    for key in ("noise", "x0"):
        if key not in tensors:
            raise PairsFileError(f"{str(path)!r} has no {key!r} tensor; {_FIX}.")
    noise, x0 = tensors["noise"], tensors["x0"]
    shape = list(meta.get("sample_shape", []))
    if noise.shape != x0.shape or list(noise.shape[1:]) != shape:
        raise PairsFileError(f"{str(path)!r} is inconsistent: noise {tuple(noise.shape)}, x0 {tuple(x0.shape)}, "
                             f"metadata sample_shape {shape}; {_FIX}.")

    def cond_from(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and k[len(prefix):] in
                _COND_FIELDS}

    fields = cond_from("cond.")
    neg_fields = cond_from("negative.")
    null = meta.get("null_class_label")
    negative = Conditioning(**neg_fields, null_class_label=null) if neg_fields else None
    cond = Conditioning(**fields, null_class_label=null, negative=negative)
    if cond.batch_size not in (None, noise.shape[0]):
        raise PairsFileError(f"{str(path)!r}: {cond.batch_size} conditions for {noise.shape[0]} pairs; {_FIX}.")
    return RegressionPairs(noise, x0, cond, meta, tensors.get("index"))


def merge_regression_pairs(shards: Sequence[RegressionPairs]) -> RegressionPairs:
    """Join per-process shards into the full set (ordered by index; every index exactly once)."""
    if not shards:
        raise ValueError("No shards to merge.")
    count = int(shards[0].metadata["count"])
    index = torch.cat([s.index for s in shards])
    order = torch.argsort(index)
    if not torch.equal(index[order], torch.arange(count)):
        raise PairsFileError(f"The shards do not hold each of the {count} pairs exactly once "
                             f"(got {index.numel()} indices); rerun generate_pairs with the same settings.")
    conds = [s.cond for s in shards if len(s)]
    cond = conds[0] if len(conds) == 1 else Conditioning.cat(conds)
    cond = cond if cond.is_empty else cond.select(order)
    meta = dict(shards[0].metadata)
    meta.pop("count_in_file", None)
    return RegressionPairs(torch.cat([s.noise for s in shards])[order], torch.cat([s.x0 for s in shards])[order],
                           cond, meta, None)


# --------------------------------------------------------------------------------------------------
# checks
def check_pairs_match_teacher(
    pairs: RegressionPairs,
    teacher: Denoiser,
    sample_shape: Sequence[int],
    example_cond: Conditioning,
    verify: int = 1,
    where: str = "the pairs file",
) -> None:
    """Raise :class:`PairsFileError` unless ``pairs`` were made by this teacher for this data source.

    Checks, in order: the sample shape, the schedule identity, the network class and config, the
    conditioning fields (and their per-sample shapes, against ``example_cond`` from the data source) and
    the null class; then re-generates the first ``verify`` pairs with the file's own steps and guidance
    and requires a relative RMS error of at most :data:`VERIFY_TOLERANCE` (a different teacher of the same
    architecture fails here).

    Args:
        pairs: Loaded pairs.
        teacher: The trainer's teacher.
        sample_shape: ``[C, H, W]`` the teacher works on.
        example_cond: A conditioning drawn from the trainer's data source.
        verify: Pairs to re-generate (0: skip).
        where: How to name the file in errors.
    """
    meta = pairs.metadata
    shape = [int(s) for s in sample_shape]
    if list(meta.get("sample_shape", [])) != shape:
        raise PairsFileError(f"{where} holds samples of shape {meta.get('sample_shape')} but the teacher works on "
                             f"{shape}: it was made for another teacher; {_FIX}.")
    diffs = _identities_differ(meta.get("schedule", {}), schedule_identity(teacher.schedule))
    if diffs:
        raise PairsFileError(f"{where} was made with another noise schedule (differs in {diffs}: file "
                             f"{meta.get('schedule')}, teacher {schedule_identity(teacher.schedule)}); {_FIX}.")
    ours = network_identity(teacher.model)
    diffs = _identities_differ(meta.get("network", {}), ours)
    if diffs:
        raise PairsFileError(f"{where} was made by a different teacher network ({meta.get('network', {}).get('class')}"
                             f" vs {ours['class']}; differs in {diffs[:6]}); {_FIX}.")
    want = example_cond.present()
    if sorted(meta.get("conditioning", [])) != sorted(want):
        raise PairsFileError(f"{where} has conditioning fields {meta.get('conditioning')} but the data source gives "
                             f"{want}: it was made for another data source or teacher; {_FIX} (same data options).")
    for name in want:
        a, b = getattr(pairs.cond, name), getattr(example_cond, name)
        if tuple(a.shape[1:]) != tuple(b.shape[1:]):
            raise PairsFileError(f"{where}: {name} has per-sample shape {tuple(a.shape[1:])}, the data source gives "
                                 f"{tuple(b.shape[1:])}; {_FIX}.")
    if "class_labels" in want and meta.get("null_class_label") != example_cond.null_class_label:
        raise PairsFileError(f"{where} uses null class {meta.get('null_class_label')}, the data source "
                             f"{example_cond.null_class_label}; {_FIX} (same null_class_label).")
    n = min(int(verify), len(pairs))
    if n <= 0:
        return
    device = _first_parameter(teacher).device
    cond = None if pairs.cond.is_empty else pairs.cond.select(slice(0, n)).to(device)
    y = sample_teacher(teacher, pairs.noise[:n].to(device), cond, num_inference_steps=int(meta["num_inference_steps"]),
                       guidance_scale=meta.get("guidance_scale")).float().cpu()
    ref = pairs.x0[:n].float()
    err = float((y - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12))
    if not err <= VERIFY_TOLERANCE:
        raise PairsFileError(
            f"This teacher does not reproduce {where}: re-running the teacher ODE on its first {n} pair(s) gives a "
            f"relative RMS error of {err:.3g} (> {VERIFY_TOLERANCE}). It was made by another teacher "
            f"({meta.get('teacher')!r}) or other weights; {_FIX}. (If only the dtype differs on purpose, set "
            "regression_pairs_verify: 0.)"
        )


def regression_pairs_for_training(
    config: Any,
    teacher: Denoiser,
    source: ConditionSource,
    sample_shape: Sequence[int],
    guidance_scale: float,
    device: torch.device | str,
) -> RegressionPairs:
    """The DMD1 pairs a trainer uses: read from ``config.regression_pairs`` (and checked), or generated now.

    With ``regression_pairs`` they are read from that file and checked against this teacher and data source
    (:func:`check_pairs_match_teacher`; a warning when its guidance or data option differ); otherwise the same
    :func:`generate_regression_pairs` that ``stepdistill pairs`` runs makes ``num_regression_pairs`` of them
    (seed :func:`default_pairs_seed`), so a file made from the same recipe holds exactly these pairs.

    Args:
        config: The trainer config (a :class:`~stepdistill.trainers.dmd.DMDConfig`).
        teacher: The frozen teacher.
        source: The data source the conditions come from (the whole one, never a student's subset).
        sample_shape: ``[C, H, W]``.
        guidance_scale: The teacher CFG weight the pairs are made with.
        device: Where the teacher runs.
    """
    import warnings

    if config.regression_pairs:
        pairs = load_regression_pairs(config.regression_pairs)
        example, _ = source.sample(1, torch.Generator().manual_seed(0))
        check_pairs_match_teacher(pairs, teacher, sample_shape, example, config.regression_pairs_verify,
                                  where=f"regression_pairs={config.regression_pairs!r}")
        made_with = pairs.metadata.get("guidance_scale")
        if made_with is not None and not math.isclose(float(made_with), guidance_scale):
            warnings.warn(f"regression_pairs were made with teacher guidance {made_with} but the real score "
                          f"uses {guidance_scale}.", stacklevel=2)
        if pairs.metadata.get("data") not in (None, config.data):
            warnings.warn(f"regression_pairs were made with data={pairs.metadata['data']!r} conditions but this "
                          f"run uses data={config.data!r}.", stacklevel=2)
        return pairs
    return generate_regression_pairs(
        teacher, source, config.num_regression_pairs, sample_shape, config.regression_teacher_steps,
        guidance_scale, default_pairs_seed(config.seed), device=device,
        metadata={"teacher": str(config.teacher), "data": config.data},
    )


__all__ = [
    "COND_CHUNK",
    "PAIRS_FORMAT",
    "PairsFileError",
    "RegressionPairs",
    "check_pairs_match_teacher",
    "default_pairs_seed",
    "generate_regression_pairs",
    "load_regression_pairs",
    "merge_regression_pairs",
    "network_identity",
    "pair_conditions",
    "pair_noise_seed",
    "read_pairs_metadata",
    "regression_pairs_for_training",
    "save_regression_pairs",
    "schedule_identity",
]

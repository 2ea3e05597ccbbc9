"""A partition of the conditioning space among K students (multi-student distillation).

MSD (Song et al., "Multi-student Diffusion Distillation for Better One-step Generators", ICML 2025) splits the
conditions into K disjoint parts and distills one student per part; at inference each condition is routed to
exactly one student. The same :class:`ConditionPartition` object routes at training (each student's data
subset, :meth:`ConditionPartition.predicate`) and at inference (:meth:`ConditionPartition.route`), and it is
saved beside the students (``partition.json`` + ``partition.safetensors``, no pickles) with the identity of the
teacher (and text encoder) it was made for, checked on load.

Kinds:

* ``class_ranges``: consecutive class ids, as equal as possible (the paper's ImageNet split: 250 classes each);
* ``class_kmeans``: k-means on the teacher's class-embedding vectors (the paper's ablation);
* ``text_kmeans``: k-means on pooled text embeddings of the training prompts;
* ``text_quadrants``: the sign pattern of the pooled embedding's projection on its two principal axes, thresholded
  at the medians of the training prompts (four parts; the paper routes SD1.5 prompts to "quadrants" of the pooled
  embedding without saying which axes -- this is our reading, recorded in the file).

Pooling: ``pooled_prompt_embeds`` when the conditioning has them (SDXL / SD3), else the mean of ``prompt_embeds``
over tokens (SD1.5).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..conditioning import Conditioning

PARTITION_KINDS = ("class_ranges", "class_kmeans", "text_kmeans", "text_quadrants")
PARTITION_JSON = "partition.json"
PARTITION_TENSORS = "partition.safetensors"
FORMAT_VERSION = 1
_TENSOR_KEYS = ("assignment", "centroids", "mean", "axes", "thresholds")


class PartitionError(ValueError):
    """A partition that is malformed, leaves a condition unassigned or a part empty, or is another teacher's.

    Also raised for a partition of another text encoder; the message names the fix.
    """


def tensor_fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    """A short sha256 of the tensors' float32 bytes (an identity of weights, not of their names)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def network_fingerprint(network: nn.Module) -> dict[str, Any]:
    """Class, config (diffusers networks) and a fingerprint of the first and last parameters of ``network``."""
    out: dict[str, Any] = {"class": type(network).__name__}
    config = getattr(network, "config", None)
    if config is not None:
        out["config"] = json.loads(json.dumps({k: v for k, v in dict(config).items() if not str(k).startswith("_")},
                                              default=str))
    params = list(network.parameters())
    out["weights"] = tensor_fingerprint([params[0], params[-1]]) if params else ""
    return out


def pooled_text_embedding(cond: Conditioning) -> torch.Tensor:
    """``[N, D]`` float32: ``pooled_prompt_embeds`` when present, else ``prompt_embeds`` averaged over tokens."""
    if cond.pooled_prompt_embeds is not None:
        return cond.pooled_prompt_embeds.detach().float().cpu()
    if cond.prompt_embeds is not None:
        return cond.prompt_embeds.detach().float().mean(dim=1).cpu()
    raise PartitionError("A text partition routes prompts, but this conditioning has no prompt embeddings: use a "
                         "class partition (class_ranges / class_kmeans) for a class-conditional teacher.")


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 100) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on ``x [N, D]``; returns the ``[k, D]`` centroids (float64).

    Deterministic for a given ``generator`` state. An empty cluster is re-seeded at the point farthest from its
    centroid, so every centroid owns at least one point when ``N >= k`` distinct points exist.
    """
    x = x.double()
    n = x.shape[0]
    if n < k:
        raise PartitionError(f"k-means into {k} parts needs at least {k} points, got {n}: use fewer students.")
    centroids = [x[int(torch.randint(0, n, (1,), generator=generator))]]
    for _ in range(1, k):  # k-means++: draw proportional to the squared distance to the nearest centroid
        d2 = torch.cdist(x, torch.stack(centroids)).min(dim=1).values ** 2
        if float(d2.sum()) == 0:
            raise PartitionError(f"k-means into {k} parts: the points have fewer than {k} distinct values.")
        centroids.append(x[int(torch.multinomial(d2 / d2.sum(), 1, generator=generator))])
    c = torch.stack(centroids)
    for _ in range(iterations):
        dist = torch.cdist(x, c)
        assign = dist.argmin(dim=1)
        new = c.clone()
        for j in range(k):
            members = assign == j
            if members.any():
                new[j] = x[members].mean(dim=0)
            else:  # re-seed an empty cluster at the worst-served point
                new[j] = x[dist.min(dim=1).values.argmax()]
        if torch.equal(new, c):
            break
        c = new
    return c


@dataclass
class ConditionPartition:
    """A saved, checked split of the conditions into ``num_parts`` parts; routes a batch to parts.

    Build one with :meth:`class_ranges`, :meth:`class_kmeans`, :meth:`text_kmeans` or :meth:`text_quadrants`;
    save it with :meth:`save` and read it with :meth:`load` (which checks the teacher / encoder identity).

    Args:
        kind: One of :data:`PARTITION_KINDS`.
        num_parts: ``K``.
        identity: What it was made for: ``{"teacher": network_fingerprint(...), "encoder": ... (text kinds)}``.
        assignment: Class kinds: ``[num_classes]`` part of each class (the null class is never routed).
        centroids: ``text_kmeans``: ``[K, D]`` centroids (nearest wins).
        mean: ``text_quadrants``: ``[D]`` mean of the training prompts' pooled embeddings.
        axes: ``text_quadrants``: ``[2, D]`` principal axes.
        thresholds: ``text_quadrants``: ``[2]`` medians of the projections (part = 2 * bit0 + bit1).
        null_class_label: The teacher's null class (class kinds).
        balance: Share of the training conditions in each part, recorded when the partition was built.

    Example:
        >>> part = ConditionPartition.class_ranges(num_classes=10, num_parts=4, null_class_label=10)
        >>> part.route(Conditioning(class_labels=torch.tensor([0, 3, 9]), null_class_label=10))
        tensor([0, 1, 3])
    """

    kind: str
    num_parts: int
    identity: dict[str, Any] = field(default_factory=dict)
    assignment: torch.Tensor | None = None
    centroids: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    axes: torch.Tensor | None = None
    thresholds: torch.Tensor | None = None
    null_class_label: int | None = None
    balance: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in PARTITION_KINDS:
            raise PartitionError(f"Partition kind must be one of {list(PARTITION_KINDS)}, got {self.kind!r}.")
        if self.num_parts < 1:
            raise PartitionError(f"A partition needs at least one part, got num_parts={self.num_parts}.")
        if self.is_class_partition:
            if self.assignment is None or self.assignment.ndim != 1:
                raise PartitionError(f"A {self.kind} partition needs a [num_classes] assignment tensor.")
            self.assignment = self.assignment.long().cpu()
            bad = [c for c, p in enumerate(self.assignment.tolist()) if not 0 <= p < self.num_parts]
            if bad:
                raise PartitionError(f"Classes {bad} are assigned to no part (parts are 0..{self.num_parts - 1}): "
                                     "rebuild the partition so that every class has a part.")
            counts = torch.bincount(self.assignment, minlength=self.num_parts)
            empty = (counts == 0).nonzero().flatten().tolist()
            if empty:
                raise PartitionError(f"Parts {empty} of the {self.kind} partition hold no class: use fewer students "
                                     f"(num_students <= {int((counts > 0).sum())}) or another partition.")
        elif self.kind == "text_kmeans":
            if self.centroids is None or tuple(self.centroids.shape[:1]) != (self.num_parts,):
                raise PartitionError(f"A text_kmeans partition needs [{self.num_parts}, D] centroids.")
        else:
            if self.num_parts != 4:
                raise PartitionError(f"text_quadrants has 4 parts, got num_parts={self.num_parts}: use 4 students "
                                     "or text_kmeans.")
            if self.mean is None or self.axes is None or self.thresholds is None:
                raise PartitionError("A text_quadrants partition needs mean, axes and thresholds tensors.")

    # ------------------------------------------------------------------------------------------------
    # builders
    @property
    def is_class_partition(self) -> bool:
        """Whether conditions are class labels (``class_*`` kinds) rather than prompts."""
        return self.kind.startswith("class_")

    @classmethod
    def class_ranges(cls, num_classes: int, num_parts: int, null_class_label: int | None = None,
                     identity: dict[str, Any] | None = None) -> ConditionPartition:
        """Consecutive class ids in ``num_parts`` ranges whose sizes differ by at most one (larger ones first)."""
        if num_parts > num_classes:
            raise PartitionError(f"{num_parts} parts of {num_classes} classes would leave a part empty: use at most "
                                 f"{num_classes} students.")
        assignment = torch.div(torch.arange(num_classes) * num_parts, num_classes, rounding_mode="floor")
        part = cls("class_ranges", num_parts, identity or {}, assignment=assignment,
                   null_class_label=null_class_label)
        part.balance = part.class_balance()
        return part

    @classmethod
    def class_kmeans(cls, embeddings: torch.Tensor, num_parts: int, null_class_label: int | None = None,
                     identity: dict[str, Any] | None = None, seed: int = 0) -> ConditionPartition:
        """k-means on the ``[num_classes, D]`` class-embedding vectors (the null class's row excluded)."""
        c = kmeans(embeddings, num_parts, torch.Generator().manual_seed(seed))
        assignment = torch.cdist(embeddings.double(), c).argmin(dim=1)
        part = cls("class_kmeans", num_parts, identity or {}, assignment=assignment, null_class_label=null_class_label)
        part.balance = part.class_balance()
        return part

    @classmethod
    def text_kmeans(cls, pooled: torch.Tensor, num_parts: int, identity: dict[str, Any] | None = None,
                    seed: int = 0) -> ConditionPartition:
        """k-means on ``[N, D]`` pooled text embeddings of the training prompts."""
        c = kmeans(pooled, num_parts, torch.Generator().manual_seed(seed)).float()
        part = cls("text_kmeans", num_parts, identity or {}, centroids=c)
        part.balance = part.pooled_balance(pooled)
        part.check_parts_used(pooled)
        return part

    @classmethod
    def text_quadrants(cls, pooled: torch.Tensor, identity: dict[str, Any] | None = None) -> ConditionPartition:
        """Four parts from the signs of the projections on the two principal axes, thresholded at their medians."""
        x = pooled.double()
        if x.shape[0] < 4:
            raise PartitionError(f"text_quadrants needs at least 4 prompts, got {x.shape[0]}.")
        mean = x.mean(dim=0)
        _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
        axes = v[:2]
        axes = axes * torch.where(axes.sum(dim=1, keepdim=True) < 0, -1.0, 1.0).double()  # a fixed sign per axis
        thresholds = ((x - mean) @ axes.T).median(dim=0).values
        part = cls("text_quadrants", 4, identity or {}, mean=mean.float(), axes=axes.float(),
                   thresholds=thresholds.float())
        part.balance = part.pooled_balance(pooled)
        part.check_parts_used(pooled)
        return part

    # ------------------------------------------------------------------------------------------------
    # routing
    def route(self, cond: Conditioning) -> torch.Tensor:
        """``[N]`` long: the part of each condition (the same rule at training and at inference)."""
        if self.is_class_partition:
            if cond.class_labels is None:
                raise PartitionError(f"A {self.kind} partition routes class labels, but the conditioning has none.")
            labels = cond.class_labels.long().cpu()
            n = len(self.assignment)
            bad = sorted({int(v) for v in labels.tolist() if not 0 <= v < n})
            if bad:
                raise PartitionError(f"Class labels {bad} have no part in this partition (classes 0..{n - 1}): the "
                                     "partition does not cover these conditions; rebuild it for this teacher.")
            return self.assignment[labels]
        return self.route_pooled(pooled_text_embedding(cond))

    def route_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[N]`` long parts of ``[N, D]`` pooled text embeddings (text kinds)."""
        x = pooled.float().cpu()
        if self.kind == "text_kmeans":
            if x.shape[1] != self.centroids.shape[1]:
                raise PartitionError(f"Pooled embeddings of width {x.shape[1]} do not fit this partition's "
                                     f"{self.centroids.shape[1]}: it was made for another text encoder.")
            return torch.cdist(x, self.centroids.float()).argmin(dim=1)
        if x.shape[1] != self.mean.shape[0]:
            raise PartitionError(f"Pooled embeddings of width {x.shape[1]} do not fit this partition's "
                                 f"{self.mean.shape[0]}: it was made for another text encoder.")
        bits = (((x - self.mean) @ self.axes.T) > self.thresholds).long()
        return 2 * bits[:, 0] + bits[:, 1]

    def predicate(self, part: int):
        """``fn(Conditioning) -> [N] bool``: the items of part ``part`` (a data-source subset predicate)."""
        if not 0 <= part < self.num_parts:
            raise PartitionError(f"student_index {part} is outside 0..{self.num_parts - 1}.")
        return lambda cond: self.route(cond) == part

    def classes_of(self, part: int) -> list[int]:
        """The class ids of part ``part`` (class kinds)."""
        return (self.assignment == part).nonzero().flatten().tolist()

    # ------------------------------------------------------------------------------------------------
    # balance and checks
    def class_balance(self, class_weights: torch.Tensor | None = None) -> list[float]:
        """Share of the classes (weighted by ``class_weights``, e.g. data counts) in each part."""
        w = torch.ones(len(self.assignment)) if class_weights is None else class_weights.float()
        shares = torch.zeros(self.num_parts).index_add_(0, self.assignment, w)
        return (shares / shares.sum()).tolist()

    def pooled_balance(self, pooled: torch.Tensor) -> list[float]:
        """Share of the given prompts (pooled embeddings) in each part."""
        counts = torch.bincount(self.route_pooled(pooled), minlength=self.num_parts).float()
        return (counts / counts.sum()).tolist()

    def check_parts_used(self, pooled: torch.Tensor) -> None:
        """Refuse a text partition that leaves a part without any training prompt."""
        counts = torch.bincount(self.route_pooled(pooled), minlength=self.num_parts)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise PartitionError(f"Parts {empty} of the {self.kind} partition hold none of the {pooled.shape[0]} "
                                 "training prompts: use fewer students, more prompts, or text_quadrants.")

    def check_identity(self, identity: dict[str, Any], where: str = "The partition") -> None:
        """Refuse a partition made for another teacher or text encoder (compares the recorded identities)."""
        for key in ("teacher", "encoder"):
            mine, theirs = self.identity.get(key), identity.get(key)
            if mine is not None and theirs is not None and mine != theirs:
                what = "text encoder" if key == "encoder" else "teacher"
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise PartitionError(f"{where} was made for another {what} (differs in {diff}): rebuild it with "
                                     f"this {what}, or use the students trained with it.")

    # ------------------------------------------------------------------------------------------------
    # files
    def save(self, folder: str | Path) -> Path:
        """Write ``partition.json`` (kind, parts, identity, balance) and ``partition.safetensors`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "num_parts": self.num_parts,
                "null_class_label": self.null_class_label, "identity": self.identity, "balance": self.balance}
        if self.kind == "text_quadrants":
            meta["rule"] = "part = 2 * [(pooled - mean) . axes[0] > thresholds[0]] + [(pooled - mean) . axes[1] > " \
                           "thresholds[1]]; pooled = pooled_prompt_embeds, else the token mean of prompt_embeds"
        tensors = {k: getattr(self, k).contiguous() for k in _TENSOR_KEYS if getattr(self, k) is not None}
        save_file(tensors, str(folder / PARTITION_TENSORS), metadata={"stepdistill_partition": json.dumps(meta)})
        (folder / PARTITION_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, identity: dict[str, Any] | None = None) -> ConditionPartition:
        """Read a partition written by :meth:`save`; with ``identity``, check it was made for that teacher / encoder."""
        from safetensors import safe_open

        folder = Path(folder)
        json_path, tensor_path = folder / PARTITION_JSON, folder / PARTITION_TENSORS
        if not json_path.is_file() or not tensor_path.is_file():
            raise PartitionError(f"{str(folder)!r} has no {PARTITION_JSON} + {PARTITION_TENSORS}: pass the folder the "
                                 "MSD run (or ConditionPartition.save) wrote.")
        meta = json.loads(json_path.read_text())
        tensors = {}
        with safe_open(str(tensor_path), framework="pt") as fh:
            stored = json.loads((fh.metadata() or {}).get("stepdistill_partition", "{}"))
            for key in fh.keys():
                if key not in _TENSOR_KEYS:
                    raise PartitionError(f"{str(tensor_path)!r} holds an unknown tensor {key!r}.")
                tensors[key] = fh.get_tensor(key)
        if stored != meta:
            raise PartitionError(f"{str(json_path)!r} and {str(tensor_path)!r} disagree (one was edited or copied from "
                                 "another run): save the partition again.")
        if meta.get("format_version") != FORMAT_VERSION:
            raise PartitionError(f"{str(json_path)!r} has format version {meta.get('format_version')}, expected "
                                 f"{FORMAT_VERSION}.")
        part = cls(meta["kind"], int(meta["num_parts"]), meta.get("identity", {}), **tensors,
                   null_class_label=meta.get("null_class_label"), balance=list(meta.get("balance", [])))
        if identity is not None:
            part.check_identity(identity, f"The partition in {str(folder)!r}")
        return part


__all__ = [
    "PARTITION_KINDS",
    "ConditionPartition",
    "PartitionError",
    "kmeans",
    "network_fingerprint",
    "pooled_text_embedding",
    "tensor_fingerprint",
]

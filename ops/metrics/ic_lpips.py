"""Intra-cluster LPIPS (IC-LPIPS) in the two reference variants of DESIGN §4, over an injected distance.

Both variants cluster the generated images of one defect type around the support (training) images of that type:
each generated image joins the centre at the smallest distance (ties: the lowest centre index, as ``argmin``).

``ic_ad`` (AnomalyDiffusion / Ojha et al. protocol), reported as ``ic_lpips_ad``:
  per cluster, the members (in generation order) are shuffled with ``numpy.random.default_rng(seed + k)`` for
  cluster ``k`` and the first ``max_members`` (50) kept; the cluster value is the mean distance over pairs i<j;
  clusters with fewer than 2 members have no pair and are dropped; the result is the mean over the remaining
  clusters (NaN when none remains).
``ic_dfm`` (DFMGAN ``compute_clpips``), reported as ``ic_lpips_dfm`` / ``ic_lpips_dfm_rz``:
  generated images are assigned in generation order and a cluster stops accepting members once it holds ``cap``
  (200) — later images closest to a full centre are not counted anywhere, as in the reference code; the cluster
  value is the mean over all ordered pairs i != j; clusters with <= 1 member count as 0. ``clpips`` is the mean
  over all centres; ``clpips_rz`` the mean over clusters whose value is not exactly 0 (the reference drops zero
  scores, not only small clusters), NaN when every cluster is 0.
Symmetric distances make the ordered-pair mean equal to the i<j mean; both are computed as specified anyway.

The distance is any object with ``embed(items) -> features`` and ``pairwise(fa, fb) -> ndarray (len a, len b)``
(:class:`ops.metrics.features.PerceptualDistance` for LPIPS / EfficientNet-Lite0; tests inject exact ones).

Memory is bounded by ``budget_bytes`` (``QualityConfig.ic_feature_mb``), not by the partition or cluster size:
features are large (VGG at 256 px: ~32 MB an image, so a 50-member cluster held whole is 1.6 GB), so items are
embedded a block at a time. The block is sized from one item's measured features so that two blocks and one
pairwise temporary fit the budget, in whole embedding batches (:data:`EMBED_BATCH`), so every image is embedded in
the same batch company as when the set is embedded whole. A cluster that does not fit is computed block pair by
block pair, re-embedding the column blocks (up to (blocks + 1) / 2 times the embedding work; entries agree with
the whole-set matrix to float64 rounding, ~1e-13); one that fits is embedded once. Items are read from their sequence only when embedded.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np


class Distance(Protocol):
    def embed(self, items: Sequence[Any]) -> Any: ...

    def pairwise(self, fa: Any, fb: Any) -> np.ndarray: ...


@dataclass(frozen=True)
class ICResult:
    value: float
    value_rz: float = math.nan  # DFMGAN's clpips_rz; NaN for the AnomalyDiffusion variant
    sizes: tuple[int, ...] = ()  # members per centre that entered the computation
    cluster_values: tuple[float, ...] = ()  # NaN for dropped clusters
    n_generated: int = 0
    n_centers: int = 0
    details: dict = field(default_factory=dict)


EMBED_BATCH = 8  # embedding batch of a distance without a ``batch_size`` (PerceptualDistance has one: 8)
DEFAULT_BUDGET = 512 * 2 ** 20
_ITEM_BYTES: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _nbytes(features: Any) -> int:
    if isinstance(features, (list, tuple)):
        return sum(_nbytes(f) for f in features)
    return int(getattr(features, "nbytes", 0))


def _item_bytes(items: Sequence[Any], distance: Distance) -> int:
    """Feature bytes of one item, measured once per distance and item shape (images of a partition share one)."""
    first = items[0]
    key = getattr(first, "shape", None)
    try:
        known = _ITEM_BYTES.setdefault(distance, {})
    except TypeError:  # not weak-referenceable: measure every time
        known = {}
    if key not in known:
        known[key] = max(_nbytes(distance.embed([first])), 1)
    return known[key]


def block_size(items: Sequence[Any], distance: Distance, budget_bytes: int) -> int:
    """Items per block: two blocks' features and the embedding's temporaries of one within ``budget_bytes``, in
    whole embedding batches. At least one batch: where one batch alone exceeds a third of the budget (VGG-LPIPS at
    256 px: 8 x 32 MB), the IC metrics hold about three batches' features, more than the budget."""
    batch = int(getattr(distance, "batch_size", EMBED_BATCH))
    if len(items) <= batch:
        return max(len(items), 1)
    return max(batch, int(budget_bytes // (3 * _item_bytes(items, distance))) // batch * batch)


class Picked(Sequence):
    """``items[indices]`` without reading them: an index or a slice reads only what it names."""

    def __init__(self, items: Sequence[Any], indices: Sequence[int]):
        self._items, self._indices = items, list(indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._items[j] for j in self._indices[i]]
        return self._items[self._indices[i]]


def assign_clusters(generated: Sequence[Any], centers: Sequence[Any], distance: Distance,
                    chunk: int | None = None, budget_bytes: int = DEFAULT_BUDGET) -> np.ndarray:
    """Index of the nearest centre for every generated item (ties -> lowest centre index); ``chunk`` items are
    embedded at a time (default: as many as ``budget_bytes`` allows)."""
    if not len(centers):
        raise ValueError("IC-LPIPS needs at least one cluster centre (support image) per defect type")
    chunk = chunk or block_size(generated, distance, budget_bytes)
    fc = distance.embed(centers)
    out = []
    for i in range(0, len(generated), chunk):
        d = np.asarray(distance.pairwise(distance.embed(generated[i:i + chunk]), fc), dtype=np.float64)
        out.append(np.argmin(d, axis=1))
    return np.concatenate(out) if out else np.zeros(0, dtype=int)


def pair_matrix(items: Sequence[Any], distance: Distance, budget_bytes: int = DEFAULT_BUDGET,
                block: int | None = None) -> np.ndarray:
    """d(items[i], items[j]) for all i, j, holding at most two blocks' features (``block`` items each; default
    from ``budget_bytes``); entries agree with the whole-set computation to float64 rounding."""
    n = len(items)
    block = block or block_size(items, distance, budget_bytes)
    if block >= n:
        f = distance.embed(items[:n])
        return np.asarray(distance.pairwise(f, f), dtype=np.float64)
    d = np.empty((n, n), dtype=np.float64)
    starts = range(0, n, block)
    for i in starts:
        rows = slice(i, min(i + block, n))
        fi = distance.embed(items[rows])
        d[rows, rows] = distance.pairwise(fi, fi)
        for j in (s for s in starts if s > i):
            cols = slice(j, min(j + block, n))
            fj = distance.embed(items[cols])
            d[rows, cols] = distance.pairwise(fi, fj)
            d[cols, rows] = distance.pairwise(fj, fi)  # not assumed symmetric (ordered pairs, as specified)
            del fj
    return d


def ic_ad(generated: Sequence[Any], centers: Sequence[Any], distance: Distance, max_members: int = 50,
          seed: int = 0, assignment: np.ndarray | None = None, budget_bytes: int = DEFAULT_BUDGET) -> ICResult:
    labels = (assign_clusters(generated, centers, distance, budget_bytes=budget_bytes) if assignment is None
              else np.asarray(assignment))
    sizes, values = [], []
    for k in range(len(centers)):
        members = np.flatnonzero(labels == k)
        members = np.random.default_rng(seed + k).permutation(members)[:max_members]
        sizes.append(len(members))
        if len(members) < 2:
            values.append(math.nan)
            continue
        d = pair_matrix(Picked(generated, members), distance, budget_bytes)
        iu = np.triu_indices(len(members), k=1)
        values.append(float(d[iu].mean()))
    kept = [v for v in values if not math.isnan(v)]
    return ICResult(value=float(np.mean(kept)) if kept else math.nan, sizes=tuple(sizes),
                    cluster_values=tuple(values), n_generated=len(generated), n_centers=len(centers),
                    details={"variant": "ad", "max_members": max_members, "seed": seed,
                             "clusters_used": len(kept)})


def ic_dfm(generated: Sequence[Any], centers: Sequence[Any], distance: Distance, cap: int = 200,
           assignment: np.ndarray | None = None, budget_bytes: int = DEFAULT_BUDGET) -> ICResult:
    labels = (assign_clusters(generated, centers, distance, budget_bytes=budget_bytes) if assignment is None
              else np.asarray(assignment))
    sizes, values = [], []
    for k in range(len(centers)):
        members = np.flatnonzero(labels == k)[:cap]  # generation order: the first `cap` arrivals are kept
        sizes.append(len(members))
        if len(members) <= 1:
            values.append(0.0)
            continue
        d = pair_matrix(Picked(generated, members), distance, budget_bytes)
        off = ~np.eye(len(members), dtype=bool)
        values.append(float(d[off].sum() / (len(members) * (len(members) - 1))))
    nonzero = [v for v in values if v != 0.0]
    return ICResult(value=float(np.mean(values)), value_rz=float(np.mean(nonzero)) if nonzero else math.nan,
                    sizes=tuple(sizes), cluster_values=tuple(values), n_generated=len(generated),
                    n_centers=len(centers), details={"variant": "dfm", "cap": cap, "clusters_nonzero": len(nonzero)})

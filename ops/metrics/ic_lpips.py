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
Generated items are embedded in chunks for the assignment and re-embedded per cluster, so memory holds at most one
cluster's features (VGG features at 256 px are ~32 MB per image).
"""
from __future__ import annotations

import math
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


def assign_clusters(generated: Sequence[Any], centers: Sequence[Any], distance: Distance,
                    chunk: int = 32) -> np.ndarray:
    """Index of the nearest centre for every generated item (ties -> lowest centre index)."""
    if not len(centers):
        raise ValueError("IC-LPIPS needs at least one cluster centre (support image) per defect type")
    fc = distance.embed(centers)
    out = []
    for i in range(0, len(generated), chunk):
        d = np.asarray(distance.pairwise(distance.embed(generated[i:i + chunk]), fc), dtype=np.float64)
        out.append(np.argmin(d, axis=1))
    return np.concatenate(out) if out else np.zeros(0, dtype=int)


def _pair_matrix(items: Sequence[Any], distance: Distance) -> np.ndarray:
    f = distance.embed(items)
    return np.asarray(distance.pairwise(f, f), dtype=np.float64)


def ic_ad(generated: Sequence[Any], centers: Sequence[Any], distance: Distance, max_members: int = 50,
          seed: int = 0, assignment: np.ndarray | None = None) -> ICResult:
    labels = assign_clusters(generated, centers, distance) if assignment is None else np.asarray(assignment)
    sizes, values = [], []
    for k in range(len(centers)):
        members = np.flatnonzero(labels == k)
        members = np.random.default_rng(seed + k).permutation(members)[:max_members]
        sizes.append(len(members))
        if len(members) < 2:
            values.append(math.nan)
            continue
        d = _pair_matrix([generated[i] for i in members], distance)
        iu = np.triu_indices(len(members), k=1)
        values.append(float(d[iu].mean()))
    kept = [v for v in values if not math.isnan(v)]
    return ICResult(value=float(np.mean(kept)) if kept else math.nan, sizes=tuple(sizes),
                    cluster_values=tuple(values), n_generated=len(generated), n_centers=len(centers),
                    details={"variant": "ad", "max_members": max_members, "seed": seed,
                             "clusters_used": len(kept)})


def ic_dfm(generated: Sequence[Any], centers: Sequence[Any], distance: Distance, cap: int = 200,
           assignment: np.ndarray | None = None) -> ICResult:
    labels = assign_clusters(generated, centers, distance) if assignment is None else np.asarray(assignment)
    sizes, values = [], []
    for k in range(len(centers)):
        members = np.flatnonzero(labels == k)[:cap]  # generation order: the first `cap` arrivals are kept
        sizes.append(len(members))
        if len(members) <= 1:
            values.append(0.0)
            continue
        d = _pair_matrix([generated[i] for i in members], distance)
        off = ~np.eye(len(members), dtype=bool)
        values.append(float(d[off].sum() / (len(members) * (len(members) - 1))))
    nonzero = [v for v in values if v != 0.0]
    return ICResult(value=float(np.mean(values)), value_rz=float(np.mean(nonzero)) if nonzero else math.nan,
                    sizes=tuple(sizes), cluster_values=tuple(values), n_generated=len(generated),
                    n_centers=len(centers), details={"variant": "dfm", "cap": cap, "clusters_nonzero": len(nonzero)})

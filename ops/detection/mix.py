"""Detector training variants for box-labelled methods (AnoGen, papers/anogen.md section 6):

- ``segmenter`` with the weak loss at ``weak_tau`` (0.9, the paper's best) on the box labels;
- ``segmenter-tau1``: the same data with τ = 1, i.e. ordinary box supervision (the paper's ablation row);
- ``segmenter-perlin``: one training set of the method's anomalies (weak loss on their boxes) plus as many
  DRAEM-style Perlin anomalies (exact masks, plain loss), the combination the paper found best (Table 4).

A variant's name is ``<detector>-<suffix>``: its folder, its ``detector`` column, and the key of the demo table;
:func:`base_detector` gives the model to build.

Choices: the Perlin anomalies are made by this project's ``perlin`` method (DRAEM's generator restricted to a
target mask) on the same split's normals, affine targets from the support masks, the detection seed, as many as
the method has synthetic rows; they are written under the detector folder
(``detectors/<category>/<method>/mix-perlin/``) by the ordinary generation stage on a sub-storage, so they never
touch the perlin partition's own files.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

MIX_SOURCE = "perlin"
MIX_SUFFIX = "-perlin"


def base_detector(name: str) -> str:
    """``segmenter-tau1`` -> ``segmenter`` (detector names have no '-')."""
    return name.split("-", 1)[0]


def tau_variant(detector: str, tau: float) -> str:
    return f"{detector}-tau{tau:g}"


def mixed_synthetic(storage: Any, category: str, method: str, split_df: pd.DataFrame, synthetic_df: pd.DataFrame,
                    mask_column: str, seed: int) -> pd.DataFrame:
    """The method's synthetic rows plus as many Perlin anomalies, paths relative to ``storage``."""
    from ops.generation import fit_adapter, synthesize_partition
    from ops.methods.base import no_progress
    from ops.storage import Storage

    rel = f"detectors/{category}/{method}/mix-{MIX_SOURCE}"
    sub = Storage(str(storage.path(rel)))
    adapter = fit_adapter(sub, category, MIX_SOURCE, split_df, None, None, progress=no_progress)
    extra = synthesize_partition(sub, category, MIX_SOURCE, split_df, adapter, None, len(synthetic_df), seed, None,
                                 progress=no_progress, target_mode="affine")
    for col in ("image_path", "mask_path", "target_path"):
        extra[col] = rel + "/" + extra[col]
    extra[mask_column] = extra["mask_path"]  # Perlin masks are exact
    extra["index"] = extra["index"] + (int(synthetic_df["index"].max()) + 1 if len(synthetic_df) else 0)
    return pd.concat([synthetic_df, extra[[c for c in synthetic_df.columns if c in extra.columns]]],
                     ignore_index=True)

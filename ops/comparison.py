"""The method comparison (asset ``method_comparison``): generation quality and detector scores side by side.

``compare_methods(quality_summary_df, detector_summary_df) -> DataFrame[COMPARISON_SCHEMA]``: one row per
category x method x detector of ``detector_summary`` (the per-method mean rows included, ``category == "__mean__"``)
with that method's pooled quality metrics from ``quality_summary`` joined on (category, method).

Choices:
- The join is a left join from the detector side: the question is which data makes the better detector, and a
  detector row without quality metrics (the "no synthetic data" reference, method ``none``) is still a row; its
  quality columns are blank and ``quality_note`` says why.
- Only the headline columns are kept (both stages' full tables are their own assets); the quality columns keep
  the backbone in their names (``fid`` = InceptionV3, ``fid_effl0`` = EfficientNet-Lite0).
- Rows are ordered as in ``detector_summary``: ranked mean rows first, then per category.
"""
from __future__ import annotations

import pandas as pd
import pyarrow as pa

from ops.detection.summary import MEAN
from ops.manifest import to_table

QUALITY_COLS = ("n_generated", "fid", "fid_effl0", "kid_mean", "kid_effl0_mean", "ic_lpips_ad", "ic_effl0_ad",
                "bg_ssim", "mask_iou_mean")
DETECTION_COLS = ("image_auroc", "image_auroc_std", "pixel_ap", "pixel_ap_std", "aupro", "aupro_std")
_F = pa.float64()
COMPARISON_SCHEMA = pa.schema(
    [("category", pa.string()), ("method", pa.string()), ("row_label", pa.string()), ("detector", pa.string()),
     ("rank", pa.int64()), ("n_categories", pa.int64())]
    + [(c, _F) for c in DETECTION_COLS]
    + [(c, _F) for c in QUALITY_COLS]  # n_generated too: blank on the reference rows
    + [("detection_note", pa.string()), ("quality_note", pa.string())])


def compare_methods(quality_summary_df: pd.DataFrame, detector_summary_df: pd.DataFrame) -> pd.DataFrame:
    """Detector rows with their method's quality metrics (see the module docstring)."""
    if detector_summary_df.empty:
        raise ValueError("detector_summary is empty: materialize detector_evaluation and detector_summary first")
    quality = quality_summary_df.reindex(columns=["category", "method", *QUALITY_COLS, "not_computed"])
    det = detector_summary_df[["category", "method", "row_label", "detector", "rank", "n_categories",
                               *DETECTION_COLS, "note"]]
    df = det.merge(quality, on=["category", "method"], how="left", validate="many_to_one", indicator=True)
    df["quality_note"] = [
        (nc if isinstance(nc, str) else "") if found == "both"
        else "no synthetic data: nothing to measure" if label == "no synthetic data"
        else "quality_metrics not materialized for this partition"
        for nc, found, label in zip(df["not_computed"], df["_merge"], df["row_label"])]
    df = df.rename(columns={"note": "detection_note"}).drop(columns=["not_computed", "_merge"])
    df["n_generated"] = df["n_generated"].astype(float)
    df["rank"] = df["rank"].astype("Int64")
    df = df[COMPARISON_SCHEMA.names]
    to_table(df, COMPARISON_SCHEMA, "method_comparison")
    return df


def headline(comparison_df: pd.DataFrame) -> pd.DataFrame:
    """The ranked mean rows only: one line per method x detector, what a person reads first."""
    return comparison_df[comparison_df["category"] == MEAN].drop(columns=["category"]).reset_index(drop=True)

"""The cross-partition detector summary (asset ``detector_summary``): the answer to "does this method's synthetic
data make a better detector on my product?" in one table.

``summarize_detectors(evaluation_df) -> DataFrame[DETECTOR_SUMMARY_SCHEMA]``: every category x method x detector
row of ``detector_evaluation`` (the one-class "no synthetic data" reference once per category), plus one ranked
row per method x detector (``category == MEAN``) with the mean over categories, the spread and the count.

Choices:
- Spread = the sample standard deviation over categories (``ddof=1``); with one category it is NaN and the row's
  ``note`` says so, because a 0 would claim a stability nobody measured.
- Ranking: by the mean ``image_auroc`` (the most quoted detector number), ties broken by the mean ``pixel_ap``
  (the papers' segmentation headline); a method x detector whose mean is undefined ranks last. Ranks are dense
  1..n over the mean rows; per-category rows have no rank.
- A metric the test set cannot define (no defective or no good test image) stays NaN and ``note`` names the
  reason in a few words, so a blank cell is never unexplained.
- Mean rows average only the categories where that method x detector was evaluated (``n_categories`` says how
  many); compare methods on equal counts.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa

from ops.detection.evaluate import IMAGE_METRICS, METRIC_COLUMNS, PIXEL_METRICS
from ops.detection.report import ordered_rows
from ops.manifest import to_table

MEAN = "__mean__"
RANK_BY = ("image_auroc", "pixel_ap")
_F = pa.float64()
DETECTOR_SUMMARY_SCHEMA = pa.schema(
    [("category", pa.string()), ("method", pa.string()), ("row_label", pa.string()), ("detector", pa.string()),
     ("is_baseline", pa.bool_()), ("trained_on", pa.string()), ("rank", pa.int64()), ("n_categories", pa.int64())]
    + [(m, _F) for m in METRIC_COLUMNS] + [(f"{m}_std", _F) for m in METRIC_COLUMNS]
    + [("n_test_good", pa.int64()), ("n_test_defective", pa.int64()), ("backbone_source", pa.string()),
       ("note", pa.string())])
GROUP = ["method", "row_label", "detector", "is_baseline", "trained_on"]


def undefined_note(n_good: int, n_defective: int) -> str:
    """Why the metrics of a test set with these counts are NaN ('' when they are all defined)."""
    if n_defective and n_good:
        return ""
    missing = " and ".join(w for w, n in (("defective", n_defective), ("good", n_good)) if not n)
    return f"metrics undefined: no {missing} test image"


def summarize_detectors(evaluation_df: pd.DataFrame) -> pd.DataFrame:
    """Per-category rows plus the ranked per-method mean rows (see the module docstring)."""
    if evaluation_df.empty:
        raise ValueError("no detector_evaluation rows to summarize: materialize detector_evaluation for some "
                         "category x method partitions first")
    rows = ordered_rows(evaluation_df).copy()
    rows["rank"] = pd.array([None] * len(rows), dtype="Int64")
    rows["n_categories"] = 1
    for m in METRIC_COLUMNS:
        rows[f"{m}_std"] = np.nan
    notes = rows["metric_note"] if "metric_note" in rows.columns else [""] * len(rows)
    rows["note"] = ["; ".join(n for n in (undefined_note(g, d), m) if n)
                    for g, d, m in zip(rows["n_test_good"], rows["n_test_defective"], notes)]
    means = []
    for key, group in rows.groupby(GROUP, sort=True, dropna=False):
        row = dict(zip(GROUP, key))
        n = group["category"].nunique()
        row.update({"category": MEAN, "n_categories": n, "n_test_good": int(group["n_test_good"].sum()),
                    "n_test_defective": int(group["n_test_defective"].sum()),
                    "backbone_source": "; ".join(sorted({s for s in group["backbone_source"] if s}))})
        for m in METRIC_COLUMNS:
            values = group[m].dropna()
            row[m] = float(values.mean()) if len(values) else math.nan
            row[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        notes = []
        if n < 2:
            notes.append("spread needs >= 2 categories")
        undefined = [m for m in (*IMAGE_METRICS[:1], *PIXEL_METRICS[:1]) if math.isnan(row[m])]
        if undefined:
            notes.append(f"{', '.join(undefined)} undefined in every category")
        row["note"] = "; ".join(notes)
        means.append(row)
    ranked = pd.DataFrame(means)
    keys = [ranked[m].fillna(-math.inf) for m in RANK_BY]
    order = np.lexsort([-k.to_numpy() for k in reversed(keys)])  # descending, first key most significant
    ranked = ranked.iloc[order].reset_index(drop=True)
    ranked["rank"] = pd.array(range(1, len(ranked) + 1), dtype="Int64")
    df = pd.concat([ranked, rows], ignore_index=True)[DETECTOR_SUMMARY_SCHEMA.names]
    df["rank"] = df["rank"].astype("Int64")
    to_table(df, DETECTOR_SUMMARY_SCHEMA, "detector_summary")  # fail here on a schema slip, not in the IO manager
    return df


def ranking(summary_df: pd.DataFrame) -> pd.DataFrame:
    """The ranked mean rows, with the columns a person compares (mean +- spread of the headline metrics)."""
    ranked = summary_df[summary_df["category"] == MEAN].sort_values("rank")
    cols = ["rank", "row_label", "detector", "n_categories"]
    for m in ("image_auroc", "pixel_ap", "aupro"):
        cols += [m, f"{m}_std"]
    return ranked[cols + ["note"]].reset_index(drop=True)


def ranking_plot(summary_df: pd.DataFrame, title: str = "detectors: mean over categories") -> bytes:
    """PNG: the headline metrics of every ranked row as bars with the spread over categories as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ops.detection.report import PLOTTED, row_colour
    from ops.viz import figure_png

    df = summary_df[summary_df["category"] == MEAN].sort_values("rank")
    labels = [f"{r.replace('synthetic: ', '').replace('baseline: ', '')}/{d}"
              for r, d in zip(df["row_label"], df["detector"])]
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(max(6.0, 0.45 * len(df) * len(PLOTTED)), 3.2),
                             squeeze=False)
    for ax, metric in zip(axes[0], PLOTTED):
        ax.bar(range(len(df)), df[metric].to_numpy(dtype=float), yerr=df[f"{metric}_std"].fillna(0).to_numpy(),
               color=[row_colour(r) for r in df["row_label"]], capsize=2)
        ax.set_ylim(0, 1)
        ax.set_title(metric, fontsize=9)
        ax.set_xticks(range(len(df)), labels, rotation=60, ha="right", fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)

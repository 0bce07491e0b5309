"""The detector report: one table of every category x method x detector row, a plot, and the caveats.

``write_report(storage, evaluation_df) -> path`` writes ``reports/detectors.md`` (Markdown the demo prints),
``reports/detectors.png`` and ``reports/detectors.parquet`` under the storage root.

Choices:
- The one-class reference ("no synthetic data") is stored once per category but evaluated in every method
  partition; identical rows (same checkpoint) are shown once.
- Rows are ordered per category: the reference first, then the baselines, then the generation methods, so each
  method reads against "no synthetic data" and "cutpaste / perlin baselines" directly above it.
- The plot shows the three headline metrics (image AUROC, pixel AP, AUPRO) as grouped bars.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from ops.detection.evaluate import METRIC_COLUMNS
from ops.manifest import write_manifest
from ops.viz import figure_png

REPORT_MD = "reports/detectors.md"
REPORT_PNG = "reports/detectors.png"
REPORT_PARQUET = "reports/detectors.parquet"
PLOTTED = ("image_auroc", "pixel_ap", "aupro")
REFERENCE_LABEL = "no synthetic data"  # ops.detection.stage.row_label of the one-class reference
CAVEAT = ("Detectors are trained on the normal images plus the synthetic anomalies of one method and scored on the "
          "held-out REAL defects and test/good images of the split, never seen in training or checkpoint selection. "
          "The diffusion methods' rows describe the backbone they ran on (forge-base in the demo: a small model "
          "trained on a CPU, not Stable Diffusion; the untrained `tiny` one makes noise-like defects); the "
          "cutpaste / perlin baselines and the one-class reference do not use the backbone.")


def ordered_rows(evaluation_df: pd.DataFrame) -> pd.DataFrame:
    """Deduplicated rows (every column) in report order."""
    order = {REFERENCE_LABEL: 0}
    df = evaluation_df.drop_duplicates(subset=["category", "method", "detector", "checkpoint_path"]).copy()
    df["_rank"] = [order.get(label, 1 if base else 2) for label, base in zip(df["row_label"], df["is_baseline"])]
    df = df.sort_values(["category", "_rank", "method", "detector"], kind="stable")
    return df.drop(columns="_rank").reset_index(drop=True)


def summary_table(evaluation_df: pd.DataFrame) -> pd.DataFrame:
    """Deduplicated rows in report order, with the columns worth reading."""
    cols = ["category", "row_label", "detector", "weak_tau", *METRIC_COLUMNS, "n_test_defective", "n_test_good",
            "train_seconds"]
    return ordered_rows(evaluation_df)[cols]


def row_colour(label: str) -> str:
    """Plot colour of a row: grey reference, orange baselines, blue generation methods."""
    return "#bbbbbb" if label == REFERENCE_LABEL else "#ee7733" if label.startswith("baseline") else "#4477aa"


def metrics_plot(evaluation_df: pd.DataFrame, title: str = "") -> bytes:
    """PNG: one panel per headline metric, one bar per category / row / detector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = summary_table(evaluation_df)
    labels = [f"{c}/{r.replace('synthetic: ', '').replace('baseline: ', '')}/{d}"
              for c, r, d in zip(df["category"], df["row_label"], df["detector"])]
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(max(6.0, 0.35 * len(df) * len(PLOTTED)), 3.2), squeeze=False)
    colours = [row_colour(r) for r in df["row_label"]]
    for ax, metric in zip(axes[0], PLOTTED):
        ax.bar(range(len(df)), df[metric].to_numpy(dtype=float), color=colours)
        ax.set_ylim(0, 1)
        ax.set_title(metric, fontsize=9)
        ax.set_xticks(range(len(df)), labels, rotation=60, ha="right", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def report_markdown(evaluation_df: pd.DataFrame, image_name: str = "detectors.png") -> str:
    from ops.viz import markdown_table

    # no train_seconds here: the report is rewritten by every run, and timings live only in the manifests' timing
    # columns, so identical runs write identical reports
    table = summary_table(evaluation_df).drop(columns="train_seconds")
    fpr = sorted(set(evaluation_df["aupro_fpr_limit"]))
    sources = sorted(s for s in set(evaluation_df["backbone_source"]) if s)
    lines = ["# Detector evaluation", "", f"> {CAVEAT}", "",
             f"Metrics: anomalib AUROC / AUPR (AP) / F1Max at image and pixel level, AUPRO up to FPR "
             f"{', '.join(map(str, fpr))}; pixel metrics at the ground-truth mask resolution.", "",
             markdown_table(table, max_rows=1000), "", f"![detector metrics]({image_name})", ""]
    if sources:
        lines += ["Pretrained backbones: " + "; ".join(f"`{s}`" for s in sources), ""]
    return "\n".join(lines)


def write_report(storage: Any, evaluation_df: pd.DataFrame) -> Any:
    """Write the Markdown report (+ plot + the concatenated rows) under ``reports/``; returns the .md path."""
    from ops.detection.stage import EVALUATION_SCHEMA

    if evaluation_df.empty:
        raise ValueError("write_report: no detector_evaluation rows; materialize detector_evaluation first")
    storage.write_bytes(REPORT_PNG, metrics_plot(evaluation_df, "detectors on held-out real defects"))
    write_manifest(storage.path(REPORT_PARQUET), evaluation_df, EVALUATION_SCHEMA, "detector_report")
    storage.write_bytes(REPORT_MD, report_markdown(evaluation_df).encode())
    return storage.path(REPORT_MD)

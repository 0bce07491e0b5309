"""Detection assets: ``anomaly_detectors`` and ``detector_evaluation`` (category x method), with checks.

Choices:
- Options come from ``ForgeSettings.detection_options`` (``ops.detection.stage.DetectionConfig`` fields, unknown
  keys fail the run); the settings' ``seed`` is the default seed.
- Both assets take the GPU pool: training and inference run the networks (on CPU where there is no GPU).
- Plots are written to ``previews/detector_evaluation/<category>/<method>.png`` and embedded in the Markdown
  metadata as a base64 data URI.
"""
from typing import Any

import dagster as dg
import pandas as pd

from assets.generation import SPLITS_BY_CATEGORY, log_progress
from assets.metadata import image_metadata
from assets.partitions import GPU_POOL, GPU_TAGS, category_method_partitions, split_key
from resources.settings import ForgeSettings
from resources.storage import StorageResource

TRAIN_SHOWN = ["detector", "method", "trained_on", "mask_column", "weak_tau", "val_score", "selected_step", "steps",
               "n_train_normal", "n_train_anomalous", "n_val_anomalous", "seconds", "reused", "backbone_source"]


def _config(settings: ForgeSettings) -> Any:
    from ops.detection.stage import DetectionConfig

    return DetectionConfig.from_dict({"seed": settings.seed, **(settings.detection_options or {})})


@dg.asset(partitions_def=category_method_partitions, ins={"few_shot_splits": SPLITS_BY_CATEGORY},
          pool=GPU_POOL, op_tags=GPU_TAGS, group_name="detection", kinds={"pytorch", "parquet"})
def anomaly_detectors(context: dg.AssetExecutionContext, few_shot_splits: pd.DataFrame,
                      synthetic_anomalies: pd.DataFrame, refined_masks: pd.DataFrame, settings: ForgeSettings,
                      storage: StorageResource) -> dg.Output[pd.DataFrame]:
    """Detectors trained on normal images + this method's synthetic anomalies (and the one-class reference)."""
    from ops.detection.stage import train_detectors
    from ops.viz import markdown_table

    category, method = split_key(context.partition_key)
    df = train_detectors(storage.get(), category, method, few_shot_splits, synthetic_anomalies, refined_masks,
                         _config(settings), progress=log_progress(context))
    return dg.Output(df, metadata={
        "detectors": len(df), "retrained": int((~df["reused"]).sum()),
        "train_seconds": float(df.loc[~df["reused"], "seconds"].sum()),
        "table": dg.MetadataValue.md(markdown_table(df[TRAIN_SHOWN]))})


@dg.asset_check(asset=anomaly_detectors, partitions_def=category_method_partitions, blocking=True,
                additional_ins={"few_shot_splits": SPLITS_BY_CATEGORY})
def anomaly_detectors_valid(anomaly_detectors: pd.DataFrame, few_shot_splits: pd.DataFrame,
                            storage: StorageResource) -> dg.AssetCheckResult:
    """Every detector has its checkpoint, export and config; none saw a test image in training or selection."""
    from ops.detection.stage import check_detectors

    problems = check_detectors(storage.get(), anomaly_detectors, few_shot_splits)
    return dg.AssetCheckResult(passed=bool(len(anomaly_detectors)) and not problems, metadata={
        "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none")})


@dg.asset(partitions_def=category_method_partitions, ins={"few_shot_splits": SPLITS_BY_CATEGORY},
          pool=GPU_POOL, op_tags=GPU_TAGS, group_name="detection", kinds={"pytorch", "parquet"})
def detector_evaluation(context: dg.AssetExecutionContext, few_shot_splits: pd.DataFrame,
                        anomaly_detectors: pd.DataFrame, settings: ForgeSettings,
                        storage: StorageResource) -> dg.Output[pd.DataFrame]:
    """Image / pixel AUROC, AP, F1-max and AUPRO of each detector on the held-out real defects + test/good."""
    from ops.detection.report import metrics_plot, summary_table
    from ops.detection.stage import evaluate_detectors
    from ops.viz import markdown_table

    category, method = split_key(context.partition_key)
    store = storage.get()
    df = evaluate_detectors(store, few_shot_splits, anomaly_detectors, _config(settings),
                            progress=log_progress(context))
    png = metrics_plot(df, f"{category} / {method}")
    return dg.Output(df, metadata={
        "rows": len(df), "n_test_defective": int(df["n_test_defective"].max()) if len(df) else 0,
        "table": dg.MetadataValue.md(markdown_table(summary_table(df))),
        "plot": image_metadata(store, f"previews/detector_evaluation/{category}/{method}.png", png,
                               "detector metrics")})


@dg.asset_check(asset=detector_evaluation, partitions_def=category_method_partitions, blocking=False)
def detector_evaluation_complete(detector_evaluation: pd.DataFrame) -> dg.AssetCheckResult:
    """Every metric defined by the test set is a number in [0, 1]."""
    from ops.detection.stage import check_evaluation

    problems = check_evaluation(detector_evaluation)
    return dg.AssetCheckResult(passed=bool(len(detector_evaluation)) and not problems, metadata={
        "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none")})


ASSETS = [anomaly_detectors, detector_evaluation]
CHECKS = [anomaly_detectors_valid, detector_evaluation_complete]

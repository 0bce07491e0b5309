"""Detection assets: ``anomaly_detectors`` and ``detector_evaluation`` (category x method), with checks, and the
unpartitioned ``detector_summary`` (every evaluation row, ranked per method) and ``method_comparison`` (quality and
detection side by side).

Choices:
- Options come from ``ForgeSettings.detection_options`` (``ops.detection.stage.DetectionConfig`` fields, unknown
  keys fail the run); the settings' ``seed`` is the default seed.
- Both assets take the GPU pool: training and inference run the networks (on CPU where there is no GPU).
- Plots are written to ``previews/detector_evaluation/<category>/<method>.png`` and embedded in the Markdown
  metadata as a base64 data URI.
- The summaries read every partition that exists (``allow_missing_partitions``), like ``quality_summary``; being
  unpartitioned and downstream of the evaluations, they land in the summary stage job that the demo, the CLI
  and the sensor run after the category x method stage. ``detector_summary`` also rewrites the Markdown report
  ``reports/detectors.md`` (+ plot, + all rows as Parquet) under the storage root, so every path that refreshes
  the summary refreshes the report.
"""
from typing import Any

import dagster as dg
import pandas as pd

from assets.generation import SPLITS_BY_CATEGORY, log_progress
from assets.metadata import check_result, image_metadata, number, table_metadata
from assets.partitions import GPU_POOL, GPU_TAGS, category_method_partitions, split_key
from resources.settings import ForgeSettings
from resources.storage import ALLOW_MISSING, StorageResource

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

    category, method = split_key(context.partition_key)
    df = train_detectors(storage.get(), category, method, few_shot_splits, synthetic_anomalies, refined_masks,
                         _config(settings), progress=log_progress(context))
    return dg.Output(df, metadata={
        "detectors": len(df), "retrained": int((~df["reused"]).sum()),
        "train_seconds": number(df.loc[~df["reused"], "seconds"].sum()),
        "table": table_metadata(df[TRAIN_SHOWN])})


@dg.asset_check(asset=anomaly_detectors, partitions_def=category_method_partitions, blocking=True,
                additional_ins={"few_shot_splits": SPLITS_BY_CATEGORY})
def anomaly_detectors_valid(anomaly_detectors: pd.DataFrame, few_shot_splits: pd.DataFrame,
                            storage: StorageResource) -> dg.AssetCheckResult:
    """Every detector has its checkpoint, export and config; none saw a test image in training or selection."""
    from ops.detection.stage import check_detectors

    problems = check_detectors(storage.get(), anomaly_detectors, few_shot_splits)
    return check_result(problems or ([] if len(anomaly_detectors) else ["no detector rows"]),
                        detectors=len(anomaly_detectors))


@dg.asset(partitions_def=category_method_partitions, ins={"few_shot_splits": SPLITS_BY_CATEGORY},
          pool=GPU_POOL, op_tags=GPU_TAGS, group_name="detection", kinds={"pytorch", "parquet"})
def detector_evaluation(context: dg.AssetExecutionContext, few_shot_splits: pd.DataFrame,
                        anomaly_detectors: pd.DataFrame, settings: ForgeSettings,
                        storage: StorageResource) -> dg.Output[pd.DataFrame]:
    """Image / pixel AUROC, AP, F1-max and AUPRO of each detector on the held-out real defects + test/good."""
    from ops.detection.report import metrics_plot, ordered_rows, summary_table
    from ops.detection.stage import evaluate_detectors
    from ops.detection.summary import undefined_note

    category, method = split_key(context.partition_key)
    store = storage.get()
    df = evaluate_detectors(store, few_shot_splits, anomaly_detectors, _config(settings),
                            progress=log_progress(context))
    png = metrics_plot(df, f"{category} / {method}")
    table = summary_table(df).drop(columns=["category"])
    table["note"] = ["; ".join(n for n in (undefined_note(g, d), m) if n)
                     for g, d, m in zip(table["n_test_good"], table["n_test_defective"],
                                        ordered_rows(df)["metric_note"])]
    return dg.Output(df, metadata={
        "rows": len(df), "n_test_defective": int(df["n_test_defective"].max()) if len(df) else 0,
        "n_test_good": int(df["n_test_good"].max()) if len(df) else 0,
        "table": table_metadata(table),
        "plot": image_metadata(store, f"previews/detector_evaluation/{category}/{method}.png", png,
                               "detector metrics")})


@dg.asset_check(asset=detector_evaluation, partitions_def=category_method_partitions, blocking=False)
def detector_evaluation_complete(detector_evaluation: pd.DataFrame) -> dg.AssetCheckResult:
    """Every metric defined by the test set is a number in [0, 1]."""
    from ops.detection.stage import check_evaluation

    problems = check_evaluation(detector_evaluation)
    return check_result(problems or ([] if len(detector_evaluation) else ["no evaluation rows"]),
                        rows=len(detector_evaluation))


@dg.asset(partitions_def=category_method_partitions, pool=GPU_POOL, op_tags=GPU_TAGS, group_name="detection",
          kinds={"pytorch", "parquet"})
def deployed_detector(context: dg.AssetExecutionContext, anomaly_detectors: pd.DataFrame,
                      detector_evaluation: pd.DataFrame, settings: ForgeSettings,
                      storage: StorageResource) -> dg.Output[pd.DataFrame]:
    """The partition's best detector (chosen on validation, never on test) exported as anomalib deploys it: torch,
    ONNX and OpenVINO where those packages are installed; its deploy.json records input size and normalisation.
    Score new images with: anomaly-forge predict --detector <deploy folder> IMAGES."""
    import json

    from ops.detection.deploy import export_best

    category, method = split_key(context.partition_key)
    store = storage.get()
    df = export_best(store, category, method, anomaly_detectors, detector_evaluation,
                     formats=_config(settings).deploy_formats)
    row = df.iloc[0]
    skipped = json.loads(row["skipped_json"])
    return dg.Output(df, metadata={
        "detector": f"{row['row_label']} / {row['detector']}", "selected_by": row["selected_by"],
        "val_score": number(row["val_score"]), "test_image_auroc": number(row["image_auroc"]),
        "input_size": f"{row['input_height']}x{row['input_width']}", "input_format": row["input_format"],
        "normalization": row["normalization_json"] if row["normalization_json"] != "{}" else "none",
        "formats": ", ".join(f for f in ("torch", "onnx", "openvino") if row[f"{f}_path"]),
        "skipped_formats": "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "none",
        "deploy": dg.MetadataValue.path(str(store.path(row["deploy_path"])))})


ALL_EVALUATIONS = dg.AssetIn("detector_evaluation", partition_mapping=dg.AllPartitionMapping(),
                             metadata={ALLOW_MISSING: True})


@dg.asset(ins={"detector_evaluation": ALL_EVALUATIONS}, group_name="detection", kinds={"parquet"})
def detector_summary(detector_evaluation: pd.DataFrame, storage: StorageResource) -> dg.Output[pd.DataFrame]:
    """Every category x method x detector score with the no-synthetic-data reference, and each method's mean and
    spread over categories, ranked: does this method's synthetic data make a better detector?"""
    from ops.detection.report import write_report
    from ops.detection.summary import MEAN, ranking, ranking_plot, summarize_detectors

    store = storage.get()
    df = summarize_detectors(detector_evaluation)
    report = write_report(store, detector_evaluation)
    ranked = ranking(df)
    best = ranked.iloc[0]
    per_row = df[df["category"] != MEAN]
    return dg.Output(df, metadata={
        "rows": len(per_row), "categories": int(per_row["category"].nunique()),
        "methods": int(per_row["method"].nunique()),
        "best": f"{best['row_label']} / {best['detector']}",
        "best_image_auroc": number(best["image_auroc"]),
        "ranking": table_metadata(ranked),
        "plot": image_metadata(store, "previews/detector_summary.png", ranking_plot(df), "ranking"),
        "report": dg.MetadataValue.path(str(report))})


@dg.asset(ins={"quality_summary": dg.AssetIn("quality_summary"), "detector_summary": dg.AssetIn("detector_summary")},
          group_name="detection", kinds={"parquet"})
def method_comparison(quality_summary: pd.DataFrame, detector_summary: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """Detector scores next to the generation quality of the data they were trained on, per method and category."""
    from ops.comparison import compare_methods, headline

    df = compare_methods(quality_summary, detector_summary)
    return dg.Output(df, metadata={"rows": len(df), "per_method": table_metadata(headline(df))})


ASSETS = [anomaly_detectors, detector_evaluation, deployed_detector, detector_summary, method_comparison]
CHECKS = [anomaly_detectors_valid, detector_evaluation_complete]

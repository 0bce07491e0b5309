"""Detectors trained on synthetic anomalies and scored on held-out real defects (issue 7).

Stage functions (``ops.detection.stage``): ``train_detectors(storage, category, method, split_df, synthetic_df,
refined_df, cfg, progress) -> DataFrame[DETECTOR_SCHEMA]`` and ``evaluate_detectors(storage, split_df,
detector_df, cfg, progress) -> DataFrame[EVALUATION_SCHEMA]``; ``ops.detection.report.write_report(storage,
evaluation_df) -> path``. Nothing is imported here so that importing the package stays cheap.
"""

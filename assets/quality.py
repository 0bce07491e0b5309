"""Quality assets: ``refined_masks`` and ``quality_metrics`` (category x method) and ``quality_summary`` (all).

Choices:
- Options come from ``ForgeSettings.quality_options``: the key ``refine`` holds ``RefineConfig`` fields (e.g.
  ``{"refine": {"final": {"anogen": "attention"}}}``), every other key is a ``QualityConfig`` field (``weights_dir``,
  ``device``, ``real_reference``, ...). Unknown keys fail the run (``from_dict``), so a typo is never ignored.
- ``refined_masks`` runs on the CPU (pixel arithmetic only); ``quality_metrics`` runs feature networks and takes
  the GPU pool. Metric networks are loaded once per process and shared by the partitions of a run.
- ``quality_summary`` reads every quality_metrics partition that exists (``allow_missing_partitions``): a demo on a
  subset of the methods still gets its comparison.
- Plots are written to ``previews/quality_metrics/<category>/<method>.png`` (``previews/quality_summary.png``) and
  embedded in the Markdown metadata as a base64 data URI.
"""
from typing import Any

import dagster as dg
import pandas as pd

from assets.generation import SPLITS_BY_CATEGORY, log_progress
from assets.metadata import check_result, image_metadata, number, table_metadata
from assets.partitions import GPU_POOL, GPU_TAGS, category_method_partitions, split_key
from resources.settings import ForgeSettings
from resources.storage import ALLOW_MISSING, WRITTEN_BY_ASSET, StorageResource

SHOWN = ["defect_type", "n_generated", "n_real", "fid", "fid_effl0", "kid_mean", "kid_effl0_mean", "is_mean",
         "is_effl0_mean", "ic_lpips_ad", "ic_lpips_dfm", "ic_effl0_ad", "ic_effl0_dfm", "ic_effl0_a", "bg_psnr",
         "bg_ssim", "bg_lpips", "bg_effl0", "mask_iou_mean"]


def _options(settings: ForgeSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    opts = dict(settings.quality_options or {})
    refine = opts.pop("refine", {}) or {}
    if not isinstance(refine, dict):
        raise ValueError(f"ForgeSettings.quality_options['refine'] must be a dict of RefineConfig options, got "
                         f"{refine!r}")
    return refine, opts


@dg.asset(partitions_def=category_method_partitions, group_name="quality", kinds={"parquet"})
def refined_masks(context: dg.AssetExecutionContext, synthetic_anomalies: pd.DataFrame, settings: ForgeSettings,
                  storage: StorageResource) -> dg.Output[pd.DataFrame]:
    """Difference / attention / localization refinements of every synthetic mask, and the final mask."""
    from ops.masks.refine import refine_partition

    df = refine_partition(storage.get(), synthetic_anomalies, _options(settings)[0], progress=log_progress(context))
    stats = df.groupby(["defect_type", "final_kind"]).agg(
        images=("index", "size"), final_area=("final_area", "mean"), final_iou=("final_iou", "mean"),
        diff_iou=("diff_iou", "mean"), attention_iou=("attention_iou", "mean"),
        localization_iou=("localization_iou", "mean")).reset_index()
    return dg.Output(df, metadata={
        "images": len(df), "fallbacks": int((df["final_note"] != "").sum()),
        "per_type": table_metadata(stats)})


@dg.asset_check(asset=refined_masks, partitions_def=category_method_partitions, blocking=True)
def refined_masks_valid(context: dg.AssetCheckExecutionContext, refined_masks: pd.DataFrame,
                        settings: ForgeSettings, storage: StorageResource) -> dg.AssetCheckResult:
    """No empty final mask, every mask the size of its image, final areas within (0, max_area_fraction]."""
    from ops.masks.refine import RefineConfig, check_refined

    cfg = RefineConfig.from_dict(_options(settings)[0])
    problems = check_refined(storage.get(), refined_masks, cfg.max_area_fraction)
    frac = refined_masks["final_area"] / (refined_masks["width"] * refined_masks["height"])
    return check_result(problems or ([] if len(refined_masks) else ["no refined masks"]), rows=len(refined_masks),
                        final_area_fraction_min=frac.min() if len(frac) else None,
                        final_area_fraction_median=frac.median() if len(frac) else None,
                        final_area_fraction_max=frac.max() if len(frac) else None)


@dg.asset(partitions_def=category_method_partitions, ins={"few_shot_splits": SPLITS_BY_CATEGORY},
          pool=GPU_POOL, op_tags=GPU_TAGS, group_name="quality", kinds={"pytorch", "parquet"})
def quality_metrics(context: dg.AssetExecutionContext, few_shot_splits: pd.DataFrame,
                    synthetic_anomalies: pd.DataFrame, refined_masks: pd.DataFrame, settings: ForgeSettings,
                    storage: StorageResource) -> dg.Output[pd.DataFrame]:
    """IS / FID / KID / IC-LPIPS / background preservation / mask fidelity per defect type and pooled."""
    import json

    from ops.metrics.quality import QualityConfig, cached_backbones, not_computed, quality_partition, quality_plot

    category, method = split_key(context.partition_key)
    cfg = QualityConfig.from_dict(_options(settings)[1])
    nets = cached_backbones(cfg.weights_dir, cfg.device, cfg.ic_size)
    store = storage.get()
    df = quality_partition(store, few_shot_splits, synthetic_anomalies, refined_masks, nets, cfg,
                           progress=log_progress(context))
    sources = json.loads(df["sources_json"].iloc[0])
    skipped = {k: v for k, v in sources.items() if v.startswith("skipped")}
    table = df[SHOWN].assign(not_computed=[not_computed(s, SHOWN) for s in df["sources_json"]])
    return dg.Output(df, metadata={
        "rows": len(df), "seconds": number(df["seconds"].iloc[0]),
        "not_computed": not_computed(df["sources_json"].iloc[0], SHOWN) or "none",
        "table": table_metadata(table),
        "plot": image_metadata(store, f"previews/quality_metrics/{category}/{method}.png",
                               quality_plot(df, f"{category} / {method}"), "quality"),
        "backbones": dg.MetadataValue.json(nets.describe()),
        "skipped_metrics": dg.MetadataValue.md("\n".join(f"- {k}: {v}" for k, v in sorted(skipped.items()))
                                               or "none")})


@dg.asset_check(asset=quality_metrics, partitions_def=category_method_partitions, blocking=False)
def quality_metrics_complete(quality_metrics: pd.DataFrame) -> dg.AssetCheckResult:
    """Every defect type has a row, the offline metrics are finite, and every metric names its source."""
    from ops.metrics.quality import check_quality

    return check_result(check_quality(quality_metrics), rows=len(quality_metrics))


@dg.asset(ins={"quality_metrics": dg.AssetIn(partition_mapping=dg.AllPartitionMapping(),
                                             metadata={ALLOW_MISSING: True})},
          group_name="quality", kinds={"parquet"}, metadata={WRITTEN_BY_ASSET: True})
def quality_summary(context: dg.AssetExecutionContext, quality_metrics: pd.DataFrame,
                    storage: StorageResource) -> dg.Output[pd.DataFrame]:
    """Cross-method comparison: one row per category x method plus each method's mean over categories."""
    import pyarrow as pa

    from ops.atomic import write_parquet_atomic
    from ops.locks import storage_lock
    from ops.manifest import read_existing
    from ops.metrics.quality import quality_plot, summarize

    store = storage.get()
    # Rebuilt under a lock from the partitions present NOW (not the input loaded at step start): of two runs
    # finishing together, the one that writes last has seen both partitions.
    with storage_lock(store, "manifests/quality_summary"):
        current = read_existing(store, "quality_metrics", context.asset_partition_keys_for_input("quality_metrics"))
        df = summarize(quality_metrics if current is None else current)
        write_parquet_atomic(store.manifest_path("quality_summary", None),
                             pa.Table.from_pandas(df, preserve_index=False))
        per_pair = df[df["category"] != "__mean__"]
        plot = image_metadata(store, "previews/quality_summary.png", quality_plot(per_pair, "quality summary"),
                              "summary")
    return dg.Output(df, metadata={
        "pairs": len(per_pair), "per_method": table_metadata(df[df["category"] == "__mean__"]),
        "table": table_metadata(df), "plot": plot})


ASSETS = [refined_masks, quality_metrics, quality_summary]
CHECKS = [refined_masks_valid, quality_metrics_complete]

"""Generation assets: ``anomaly_adapters`` and ``synthetic_anomalies``, one partition per category x method.

Choices:
- ``few_shot_splits`` is partitioned by category only; both assets read the category's split through a
  ``MultiToSingleDimensionPartitionMapping`` on the ``category`` dimension.
- The synthesis seed is ``ForgeSettings.seed`` unless the run carries an ``anomaly_forge/seed`` tag (a
  ``per_round`` regeneration, ``pipelines.schedules``); every row records the seed it was drawn with.
- The backbone is loaded only for methods that declare ``needs_backbone`` (the baselines never touch torch).
- Progress from the ops layer goes to the Dagster log at most every ``PROGRESS_EVERY_S`` seconds and at the end,
  so a long adapter training shows up in the UI without flooding the event log.
- The preview (at most ``PREVIEW_N`` images, round-robin over defect types so every type shows) is written to
  ``previews/synthetic_anomalies/<category>/<method>.png`` (outside the image folders that anomalib reads and that
  the generation stage prunes) and embedded in the Markdown metadata as a base64 data URI, which the Dagster UI
  renders inline; the metadata also carries its path.
"""
import io
import json
import time
from typing import Any, Callable

import dagster as dg
import pandas as pd

from assets.metadata import image_metadata
from assets.partitions import CATEGORY, GPU_POOL, GPU_TAGS, SEED_TAG, category_method_partitions, split_key
from resources.backbone import DiffusionBackbone
from resources.settings import ForgeSettings
from resources.storage import StorageResource

PROGRESS_EVERY_S = 10.0
PREVIEW_N = 16
SPLITS_BY_CATEGORY = dg.AssetIn(
    "few_shot_splits", partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=CATEGORY))


def log_progress(context: dg.AssetExecutionContext,
                 every_s: float = PROGRESS_EVERY_S) -> Callable[[str, int, int], None]:
    """An ``ops.methods.base.Progress`` callback that logs to Dagster, throttled."""
    last = [0.0]

    def report(desc: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or (total and done >= total):
            last[0] = now
            context.log.info(f"{desc}: {done}/{total or '?'}")

    return report


def run_seed(context: dg.AssetExecutionContext, settings: ForgeSettings) -> int:
    """``settings.seed``, or the run's ``anomaly_forge/seed`` tag (a ``per_round`` regeneration's fresh seed)."""
    tag = context.run.tags.get(SEED_TAG)
    return int(tag) if tag is not None else settings.seed


def _backbone_for(method: str, backbone: DiffusionBackbone) -> Any:
    from ops.methods.registry import get_method

    return backbone.get() if get_method(method).needs_backbone else None


@dg.asset(partitions_def=category_method_partitions, ins={"few_shot_splits": SPLITS_BY_CATEGORY},
          pool=GPU_POOL, op_tags=GPU_TAGS, group_name="generation", kinds={"pytorch", "parquet"})
def anomaly_adapters(context: dg.AssetExecutionContext, few_shot_splits: pd.DataFrame, settings: ForgeSettings,
                     storage: StorageResource, backbone: DiffusionBackbone) -> dg.Output[pd.DataFrame]:
    """The per-category adapter of one method, fitted on the support set only (LoRA, tokens, ... or nothing)."""
    from ops.generation import fit_adapter

    category, method = split_key(context.partition_key)
    df = fit_adapter(storage.get(), category, method, few_shot_splits, _backbone_for(method, backbone),
                     settings.method_config(method), progress=log_progress(context))
    row = df.iloc[0]
    return dg.Output(df, metadata={
        "adapter_path": str(row["adapter_path"]) if row["adapter_path"] is not None else "none (training-free)",
        "n_support": int(row["n_support"]), "seconds": float(row["seconds"]),
        "meta": dg.MetadataValue.json(json.loads(row["meta_json"])),
        "config": dg.MetadataValue.json(json.loads(row["config_json"])),
    })


@dg.asset(partitions_def=category_method_partitions, ins={"few_shot_splits": SPLITS_BY_CATEGORY},
          pool=GPU_POOL, op_tags=GPU_TAGS, group_name="generation", kinds={"pytorch", "parquet"})
def synthetic_anomalies(context: dg.AssetExecutionContext, few_shot_splits: pd.DataFrame,
                        anomaly_adapters: pd.DataFrame, settings: ForgeSettings, storage: StorageResource,
                        backbone: DiffusionBackbone) -> dg.Output[pd.DataFrame]:
    """``n_per_partition`` synthetic defect images with masks (PNG) and their manifest."""
    from ops.generation import synthesize_partition
    from ops.viz import markdown_table

    category, method = split_key(context.partition_key)
    store = storage.get()
    df = synthesize_partition(store, category, method, few_shot_splits, anomaly_adapters,
                              _backbone_for(method, backbone), settings.n_per_partition, run_seed(context, settings),
                              settings.method_config(method), progress=log_progress(context),
                              target_mode=settings.target_mode)
    counts = df.groupby("defect_type").agg(images=("index", "size"), mean_mask_px=("mask_area", "mean"),
                                           seconds=("seconds", "sum")).reset_index()
    meta: dict[str, Any] = {"images": len(df), "seconds": float(df["seconds"].sum()),
                            "counts": dg.MetadataValue.md(markdown_table(counts))}
    if len(df):
        rel = f"previews/synthetic_anomalies/{category}/{method}.png"
        meta["preview"] = image_metadata(store, rel, preview_png(store, df), "preview")
        meta["preview_path"] = dg.MetadataValue.path(str(store.path(rel)))
    return dg.Output(df, metadata=meta)


def preview_png(store: Any, df: pd.DataFrame, n: int = PREVIEW_N) -> bytes:
    """Grid of up to ``n`` synthetic images with their mask outlines, round-robin over defect types."""
    from ops.samples import read_mask, read_rgb
    from ops.viz import preview_grid

    by_type = [g.sort_values("index") for _, g in df.groupby("defect_type", sort=True)]
    picked = []
    for i in range(max(len(g) for g in by_type)):
        picked += [g.iloc[i] for g in by_type if i < len(g)]
    picked = picked[:n]
    images = [read_rgb(io.BytesIO(store.read_bytes(r["image_path"]))) for r in picked]
    masks = [read_mask(io.BytesIO(store.read_bytes(r["mask_path"]))) for r in picked]
    return preview_grid(images, masks, ncols=8, cell=96)


ASSETS = [anomaly_adapters, synthetic_anomalies]
CHECKS: list = []

"""One Dagster asset backfill per category: the whole lineage of a category (new or changed) in one request.

The lineage mixes three partitionings (category; category x method; none). A job run has one partition key, but
an *asset backfill* does not: Dagster's backfill daemon walks the target subset in dependency order across the
partitionings (through the partition mappings of the asset graph), launches one run per ready partition, and
records failed and downstream-of-failed partitions in the backfill's status (the UI's Backfills page).

Choices:
- The target of a category's backfill is every asset of the code location: its ``category`` partition, its
  ``category|method`` partitions for the configured methods (``ForgeSettings.methods``), and every unpartitioned
  asset (the summaries, which read "whatever exists" and so are refreshed last, once their parents are done).
- Backfills are tagged ``anomaly_forge/category`` (and ``anomaly_forge/listing``, the folder listing hash the
  sensor saw), so the sensor and the CLI can find the backfill of a category and report its status.
- The sensor launches the backfill with ``RunRequest.for_asset_graph_subset`` (the daemon stores it); the CLI,
  which has no sensor tick, stores the same backfill with ``PartitionBackfill.from_asset_graph_subset`` (what the
  sensor daemon calls; not a public API, so this is the one place that imports it).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.definitions.events import AssetKeyPartitionKey

from pipelines.jobs import CATEGORY_KIND, CATEGORY_METHOD_KIND, partition_kind

CATEGORY_TAG = "anomaly_forge/category"
LISTING_TAG = "anomaly_forge/listing"
TRIGGER_TAG = "anomaly_forge/trigger"


def lineage_partitions(asset_graph: Any, categories: Sequence[str],
                       methods: Sequence[str]) -> set[AssetKeyPartitionKey]:
    """(asset key, partition key) of every asset of ``asset_graph`` for ``categories`` x ``methods``."""
    out: set[AssetKeyPartitionKey] = set()
    for key in asset_graph.materializable_asset_keys:
        kind = partition_kind(asset_graph.get(key))
        if kind == CATEGORY_KIND:
            out.update(AssetKeyPartitionKey(key, c) for c in categories)
        elif kind == CATEGORY_METHOD_KIND:
            out.update(AssetKeyPartitionKey(key, str(dg.MultiPartitionKey({"category": c, "method": m})))
                       for c in categories for m in methods)
        else:
            out.add(AssetKeyPartitionKey(key, None))
    return out


def lineage_subset(asset_graph: Any, categories: Sequence[str], methods: Sequence[str]) -> AssetGraphSubset:
    return AssetGraphSubset.from_asset_partition_set(lineage_partitions(asset_graph, categories, methods),
                                                     asset_graph)


def backfill_tags(category: str, trigger: str, listing: str | None = None) -> dict[str, str]:
    tags = {TRIGGER_TAG: trigger, CATEGORY_TAG: category}
    if listing:
        tags[LISTING_TAG] = listing
    return tags


def backfill_request(asset_graph: Any, category: str, methods: Sequence[str], trigger: str,
                     listing: str | None = None) -> dg.RunRequest:
    """A sensor RunRequest that the sensor daemon turns into one asset backfill of ``category``'s lineage."""
    return dg.RunRequest.for_asset_graph_subset(lineage_subset(asset_graph, [category], methods),
                                                tags=backfill_tags(category, trigger, listing))


def submit_backfill(instance: dg.DagsterInstance, asset_graph: Any, category: str, methods: Sequence[str],
                    trigger: str) -> str:
    """Store one asset backfill of ``category``'s lineage in ``instance`` (the daemon executes it); its id."""
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    backfill_id = make_new_backfill_id()
    instance.add_backfill(PartitionBackfill.from_asset_graph_subset(
        backfill_id=backfill_id, backfill_timestamp=time.time(), tags=backfill_tags(category, trigger),
        dynamic_partitions_store=instance, asset_graph_subset=lineage_subset(asset_graph, [category], methods),
        title=f"lineage of category {category}", description=f"methods: {', '.join(methods)}", run_config=None))
    return backfill_id


def category_backfills(instance: dg.DagsterInstance, category: str) -> list[Any]:
    """The backfills tagged with ``category``, newest first."""
    from dagster._core.execution.backfill import BulkActionsFilter

    return list(instance.get_backfills(filters=BulkActionsFilter(tags={CATEGORY_TAG: category})))


def _partitions_str(subset: Any, limit: int = 4) -> str:
    items = sorted(f"{p.asset_key.to_user_string()}[{p.partition_key}]" if p.partition_key
                   else p.asset_key.to_user_string() for p in subset.iterate_asset_partitions())
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def backfill_summary(backfill: Any) -> str:
    """One line: id, status, progress and the failed (or downstream-of-failed) partitions by name."""
    status = backfill.status.value
    data = backfill.asset_backfill_data
    if data is None:
        return f"backfill {backfill.backfill_id} {status}"
    done = data.materialized_subset.num_partitions_and_non_partitioned_assets
    total = data.target_subset.num_partitions_and_non_partitioned_assets
    line = f"backfill {backfill.backfill_id} {status}, {done}/{total} asset partitions materialized"
    if not data.failed_and_downstream_subset.is_empty:
        line += f"; failed or blocked: {_partitions_str(data.failed_and_downstream_subset)}"
    return line

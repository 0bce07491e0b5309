"""The new-category sensor: a new (or changed) category folder becomes ONE asset backfill of its whole lineage.

Choices:
- Categories are discovered by ``ops.ingest.discover_categories`` (through ``assets.ingest.find_categories``).
  Each folder is fingerprinted by a *listing hash* (relative path, size and mtime of every file under it; on an
  object store, s3://..., path, size and ETag from one recursive listing).
- A folder is acted on only once it is *stable*: the same listing on two consecutive ticks, or a marker file
  named ``.ready`` in the category folder (written by the copier when it is done; then the first tick acts).
  A folder still being copied therefore waits, and the skip reason says so.
- A new folder: the tick adds the ``category`` partition and requests one asset backfill of the whole lineage
  (``pipelines.backfill``), which Dagster's backfill daemon executes in dependency order across the three
  partitionings and shows under Backfills. A known folder whose listing changed (files added, replaced, removed):
  the same backfill again, so ingest re-reads it and everything downstream is refreshed.
- A category that is already a partition when the sensor first sees it (added by ``anomaly-forge add-category``,
  the demo or the UI) is taken as ingested with its current listing; only later changes trigger a backfill.
  A partition an operator deleted after the sensor backfilled it is not re-added behind their back (the skip
  reason says how to bring it back).
- The cursor keeps, per category, the last listing seen, how many ticks it has been unchanged, and the listing
  last backfilled; backfill requests carry no run key (Dagster does not dedupe them), so the cursor is the guard.
- Ticks that launch nothing say why, per category: waiting for a folder to settle, a backfill still running
  (with its progress), or a backfill that failed or was cancelled (with the failed partitions); unreadable
  dataset roots are named too. A fresh deployment's default root (``demo_out/data``) may not exist yet, and one
  bad root must not stop the others from being watched.
- The methods come from ``ForgeSettings.methods`` (empty: every registered method), read at every tick.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import dagster as dg

from assets.partitions import CATEGORY, category_partitions
from pipelines.backfill import backfill_request, backfill_summary, category_backfills
from resources.settings import ForgeSettings

READY_MARKER = ".ready"
STABLE_TICKS = 2
SENSOR = "new_category_sensor"
_RUNNING = ("REQUESTED", "CANCELING", "FAILING")
_STALLED = ("COMPLETED_FAILED", "FAILED", "CANCELED")


def listing_hash(folder: str | Path) -> tuple[str, int]:
    """(hash of every file's relative path, size and mtime under ``folder``, number of files); marker excluded."""
    from ops.cache import is_remote

    if is_remote(folder):
        return _remote_listing_hash(str(folder))
    folder = Path(folder)
    entries = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if rel == READY_MARKER:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:  # removed while we walked: the next tick sees the new listing
                continue
            entries.append(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16], len(entries)


def _remote_listing_hash(url: str) -> tuple[str, int]:
    from ops.cache import upath

    p = upath(url.rstrip("/"))
    prefix = p.path.rstrip("/") + "/"
    entries = [f"{key[len(prefix):]}\t{info.get('size')}\t{info.get('ETag') or info.get('LastModified')}"
               for key, info in sorted(p.fs.find(p.path, detail=True).items())
               if info.get("type") != "directory" and key[len(prefix):] != READY_MARKER]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16], len(entries)


def _has_marker(folder: str) -> bool:
    from ops.cache import is_remote, join, upath

    return upath(join(folder, READY_MARKER)).exists() if is_remote(folder) else (Path(folder) / READY_MARKER).exists()


def _backfill_status(instance: dg.DagsterInstance, category: str) -> str | None:
    """A line for a category whose latest backfill is running or stalled; None when it succeeded (or none)."""
    backfills = category_backfills(instance, category)
    if not backfills:
        return None
    latest = max(backfills, key=lambda b: b.backfill_timestamp)
    status = latest.status.value
    if status in _RUNNING:
        return f"{category}: {backfill_summary(latest)}"
    if status in _STALLED:
        return (f"{category}: {backfill_summary(latest)}; re-execute it from the Backfills page, or change the "
                f"folder to trigger a new one")
    return None


def evaluate(context: dg.SensorEvaluationContext, settings: ForgeSettings) -> dg.SensorResult:
    from assets.ingest import find_categories  # here: importing asset modules is pipelines.definitions' job
    from ops.cache import is_remote, join
    from ops.image_level import plan, summary_line
    from ops.ingest.image_level import NAME as IMAGE_LEVEL

    state: dict[str, Any] = json.loads(context.cursor) if context.cursor else {}
    known: dict[str, dict[str, Any]] = state.get("categories", {})
    problems: list[str] = []
    found = find_categories(settings.dataset_roots, problems)
    for problem in problems:
        context.log.warning(problem)
    existing = set(context.instance.get_dynamic_partitions(CATEGORY))
    methods = settings.active_methods()
    asset_graph = context.repository_def.asset_graph
    requests, new, waiting = [], [], []
    for category, (root, layout) in sorted(found.items()):
        folder = join(root, category)
        listing, n_files = listing_hash(folder)
        entry = known.get(category)
        if entry is None and category in existing:
            known[category] = {"listing": listing, "ticks": STABLE_TICKS, "backfilled": listing}
            continue
        if entry is None or entry["listing"] != listing:
            entry = {"listing": listing, "ticks": 1, "backfilled": (entry or {}).get("backfilled")}
        else:
            entry["ticks"] += 1
        known[category] = entry
        if listing == entry["backfilled"]:
            continue
        if category not in existing and entry["backfilled"] is not None:
            waiting.append(f"{category}: its partition was deleted after a backfill; not re-adding it "
                           f"(`anomaly-forge add-category {category} --root {root}` brings it back)")
            continue
        if not _has_marker(folder) and entry["ticks"] < STABLE_TICKS:
            what = "new folder" if entry["backfilled"] is None else "changed folder"
            waiting.append(f"{category}: {what} with {n_files} files, waiting until its listing stays unchanged "
                           f"for one more tick (or a {READY_MARKER} file in it)")
            continue
        if category not in existing:
            new.append(category)
        trigger = "new category" if entry["backfilled"] is None else "changed folder"
        runnable = methods
        if layout == IMAGE_LEVEL:  # only what needs no mask; the line says what is skipped and why
            runnable = plan(methods)[0]
            test = None if is_remote(folder) else Path(folder) / "test"  # remote: the line names no types
            types = sorted(p.name for p in test.iterdir() if p.is_dir() and p.name != "good") if test else []
            context.log.info(summary_line(category, types, methods))
        context.log.info(f"{category}: {trigger} ({n_files} files, listing {listing}): one backfill of its "
                         f"lineage for methods {runnable}")
        requests.append(backfill_request(asset_graph, category, runnable, SENSOR, listing))
        entry["backfilled"] = listing
    statuses = [line for c in sorted(known) if c in existing and (line := _backfill_status(context.instance, c))]
    for line in statuses:
        context.log.info(line)
    cursor = json.dumps({"categories": known}, sort_keys=True)
    if requests:
        return dg.SensorResult(run_requests=requests, cursor=cursor,
                               dynamic_partitions_requests=[category_partitions.build_add_request(new)] if new else [])
    reasons = waiting + statuses + problems
    if not reasons:
        reasons = [f"no new or changed category folder under {settings.dataset_roots} "
                   f"({len(known)} known, all backfilled)"]
    return dg.SensorResult(skip_reason="; ".join(reasons), cursor=cursor)


def build_new_category_sensor(minimum_interval_seconds: int = 60) -> dg.SensorDefinition:
    @dg.sensor(name=SENSOR, asset_selection=dg.AssetSelection.all(), minimum_interval_seconds=minimum_interval_seconds,
               description="Adds a category partition for each new, stable folder under the dataset roots and "
                           "launches one asset backfill of its lineage; re-runs it when the folder changes")
    def new_category_sensor(context: dg.SensorEvaluationContext, settings: ForgeSettings):
        return evaluate(context, settings)

    return new_category_sensor

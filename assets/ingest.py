"""Ingest assets: ``raw_defect_sets`` (validated manifest of one category) and ``few_shot_splits`` (support/holdout).

Choices:
- A category partition is looked up across every configured dataset root; a name found under two roots is an
  error (the rows would silently depend on the order of the roots).
- Rejected files are written next to the manifests as ``manifests/raw_defect_rejects/<category>.parquet``, and
  the notes on kept files (alpha dropped, grayscale converted, odd names, skipped hidden entries) as
  ``manifests/raw_defect_notes/<category>.parquet`` (not assets: nothing downstream reads them; the check and the
  UI do), and union masks of multi-mask layouts go to
  ``cache/ingest/<category>`` under the storage root, because dataset roots may be read-only.
- A category with image-level labels only (no masks) gets no support set; ``few_shot_splits`` then says in one line
  (metadata ``image_level``) what runs and lists each skipped method and metric group with its reason
  (``skipped``; ``ops.image_level``).
- Both checks are blocking: a category with too many unusable files, or a split that leaks held-out images into
  the support set, must not reach adapter training. The reject fraction counts rejected files over all files seen.
- ``raw_defect_sets`` returns a content data version (``content_version``): Dagster marks the category's lineage
  stale when the images change, not when a folder is merely re-read (``pipelines.versions`` has the code side).
- ops modules are imported inside the asset bodies so that loading the definitions (``dagster dev``) stays fast.
"""
import warnings
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from assets.metadata import check_result, table_metadata
from assets.partitions import category_partitions
from resources.settings import ForgeSettings
from resources.storage import StorageResource

REJECTS = "raw_defect_rejects"
NOTES = "raw_defect_notes"  # files kept after a normalisation, and skipped hidden entries (ops.ingest.collect)


def find_categories(dataset_roots: list[str], problems: list[str] | None = None) -> dict[str, tuple[str, str]]:
    """category -> (dataset root, layout) over all roots; a category under two roots is an error.

    With a ``problems`` list, a root that cannot be read and a duplicated category are appended to it and
    skipped instead of raised (the sensor must keep watching the other roots)."""
    from ops.ingest import discover_categories

    found: dict[str, tuple[str, str]] = {}
    for root in dataset_roots:
        try:
            listed = discover_categories(root)
        except (FileNotFoundError, ValueError) as e:
            if problems is None:
                raise
            problems.append(str(e))
            continue
        for category, layout in listed:
            if category in found and found[category][0] != root:
                msg = (f"category {category!r} exists under two dataset roots, {found[category][0]} and {root}; "
                       f"rename one folder or remove one root from ForgeSettings.dataset_roots")
                if problems is None:
                    raise ValueError(msg)
                problems.append(msg)
                continue
            found[category] = (root, layout)
    return found


def _locate(settings: ForgeSettings, category: str) -> tuple[str, str]:
    from ops.ingest import detect_layout, no_layout_message

    for root in settings.dataset_roots:
        # the folder may exist and match no layout: say what it holds rather than "not a folder"
        cat_dir = Path(root) / category
        if cat_dir.is_dir() and detect_layout(Path(root)) is None and detect_layout(cat_dir) is None:
            raise ValueError(no_layout_message(cat_dir))
    found = find_categories(settings.dataset_roots)
    if category not in found:
        raise FileNotFoundError(f"category {category!r} is not a folder under any dataset root "
                                f"{settings.dataset_roots}; add it there or fix ForgeSettings.dataset_roots")
    return found[category]


def _counts(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return df.groupby(by, sort=True).size().rename("images").reset_index()


@dg.asset(partitions_def=category_partitions, group_name="ingest", kinds={"python", "parquet"})
def raw_defect_sets(context: dg.AssetExecutionContext, settings: ForgeSettings,
                    storage: StorageResource) -> dg.Output[pd.DataFrame]:
    """Every readable image of one category with its mask, validated; rejected files listed with a fix."""
    from ops.ingest import NOTE_SCHEMA, REJECT_SCHEMA, ingest_category
    from ops.manifest import write_manifest

    category = context.partition_key
    root, layout = _locate(settings, category)
    store = storage.get()
    # union masks (LOCO) need a local folder: the storage root's cache, or this machine's cache on a remote root
    from ops.cache import cache_dir

    masks_dir = store.path(f"cache/ingest/{category}") if store.is_local else cache_dir() / "ingest" / category
    result = ingest_category(root, category, layout=layout, cache_dir=masks_dir)
    write_manifest(store.manifest_path(REJECTS, category), result.rejects, REJECT_SCHEMA, REJECTS)
    write_manifest(store.manifest_path(NOTES, category), result.notes, NOTE_SCHEMA, NOTES)
    rows = result.rows
    meta: dict[str, Any] = {
        "dataset_root": root, "layout": layout, "images": len(rows), "rejects": len(result.rejects),
        "notes": len(result.notes),
        "defect_types": ", ".join(sorted(set(rows["defect_type"]) - {"good"})),
        "counts": table_metadata(_counts(rows, ["split", "defect_type"])),
    }
    if len(result.rejects):
        meta["rejected_files"] = table_metadata(result.rejects[["path", "reason", "fix"]])
    if len(result.notes):
        meta["notes_table"] = table_metadata(result.notes[["path", "note"]])
    return versioned_output(rows, meta)


def versioned_output(rows: pd.DataFrame, meta: dict[str, Any]) -> dg.Output[pd.DataFrame]:
    """The Output with its content data version. ``Output(data_version=...)`` is beta in the pinned Dagster and
    would print a BetaWarning into every ingest run's log; the project relies on it knowingly (as on the beta
    APIs silenced at load in pipelines.definitions)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Output(rows, metadata=meta, data_version=dg.DataVersion(content_version(rows)))


CONTENT_COLUMNS = ["image_id", "split", "defect_type", "image_path", "width", "height", "sha256", "mask_area",
                   "mask_count"]  # not mask_path: union masks live under the storage root, which may move


def content_version(rows: pd.DataFrame) -> str:
    """Hash of what a category's images are (ids, bytes' sha256, mask areas), not of where the root lives: an
    unchanged re-ingest keeps its data version, so nothing downstream becomes stale."""
    import hashlib

    text = rows[CONTENT_COLUMNS].sort_values("image_id").to_csv(sep="\t", index=False, float_format="%.9g")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dg.asset(partitions_def=category_partitions, group_name="ingest", kinds={"python", "parquet"})
def few_shot_splits(raw_defect_sets: pd.DataFrame, settings: ForgeSettings) -> dg.Output[pd.DataFrame]:
    """Support / holdout / train_good / test_good roles under the configured protocol (DESIGN §4)."""
    from ops.image_level import is_image_level, skipped_table, summary_line
    from ops.splits import make_split

    split = make_split(raw_defect_sets, protocol=settings.split_protocol, k=settings.k_shot, seed=settings.seed)
    roles = _counts(split, ["defect_type", "role"]).pivot(index="defect_type", columns="role", values="images")
    roles = roles.fillna(0).astype(int).reset_index()
    meta: dict[str, Any] = {
        "protocol": settings.split_protocol, "seed": settings.seed,
        "support": int((split["role"] == "support").sum()), "holdout": int((split["role"] == "holdout").sum()),
        "roles": table_metadata(roles),
    }
    if is_image_level(split):  # what runs without masks, and a reason for each thing that does not
        types = sorted(set(split["defect_type"]) - {"good"})
        meta["image_level"] = summary_line(str(split["category"].iloc[0]), types, settings.active_methods())
        meta["skipped"] = table_metadata(skipped_table(settings.active_methods()))
    return dg.Output(split, metadata=meta)


@dg.asset_check(asset=raw_defect_sets, partitions_def=category_partitions, blocking=True)
def reject_fraction(context: dg.AssetCheckExecutionContext, raw_defect_sets: pd.DataFrame,
                    settings: ForgeSettings, storage: StorageResource) -> dg.AssetCheckResult:
    """Rejected files over all files seen stays within ForgeSettings.max_reject_fraction."""
    from ops.manifest import read_manifest

    path = storage.get().manifest_path(REJECTS, context.partition_key)
    rejects = read_manifest(path)
    total = len(raw_defect_sets) + len(rejects)
    fraction = len(rejects) / total if total else 1.0
    problems = [] if total else ["no files found for this category"]
    if total and fraction > settings.max_reject_fraction:
        problems.append(f"{len(rejects)} of {total} files rejected ({fraction:.1%} > max_reject_fraction "
                        f"{settings.max_reject_fraction:.1%}); see the rejects manifest for each file's fix")
    return check_result(problems, reject_fraction=fraction, rejects=len(rejects), images=len(raw_defect_sets),
                        max_reject_fraction=settings.max_reject_fraction,
                        rejects_manifest=dg.MetadataValue.path(str(path)))


@dg.asset_check(asset=few_shot_splits, partitions_def=category_partitions, blocking=True)
def no_holdout_in_support(few_shot_splits: pd.DataFrame) -> dg.AssetCheckResult:
    """No held-out (or test/good) image reaches the support set that adapters train on."""
    from ops.splits import check_no_leakage

    return check_result(check_no_leakage(few_shot_splits), rows=len(few_shot_splits))


ASSETS = [raw_defect_sets, few_shot_splits]
CHECKS = [reject_fraction, no_holdout_in_support]

"""The storage root as a Dagster resource, and the Parquet IO manager that moves manifests between assets.

Choices:
- Layout is ``ops.storage.Storage.manifest_path``: ``<root>/manifests/<asset>/<partition key>.parquet``,
  ``all.parquet`` for unpartitioned assets, Dagster's ``"category|method"`` string for multi-partition keys
  (dimension names sort alphabetically, so ``category`` always comes first). Asset key prefixes become folders.
- Writes go through ``ops.atomic`` (temp file + ``os.replace`` locally, one put on object stores), so a crashed
  step leaves the previous manifest, never a truncated one.
- An output that spans several partitions (a single-run backfill) must be a ``{partition key: DataFrame}`` dict:
  a single frame cannot be split without knowing which column holds the key.
- An input that spans several partitions is the concatenation of their frames in sorted key order (stable across runs).
  A missing file is an error naming the file and the asset to materialize, unless the input declares
  ``metadata={"allow_missing_partitions": True}`` (summaries over "whatever exists", e.g. a demo run on a subset
  of the methods); then missing partitions are skipped with a warning, and an input with none present is an error.
- An asset with ``metadata={"written_by_asset": True}`` writes its own manifest (a summary rebuilt under a lock
  from the manifests present at write time, so that two runs finishing together cannot overwrite a complete
  summary with a stale one); the IO manager then only records the path, and loads it as usual.
- The IO manager does not know stage schemas; stages validate their frames with ``ops.manifest.to_table`` before
  returning them, and pandas' own Arrow metadata restores dtypes on load.
"""
from __future__ import annotations

import os
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow as pa

from ops.atomic import write_parquet_atomic
from ops.manifest import read_manifest
from ops.storage import Storage

ALLOW_MISSING = "allow_missing_partitions"
WRITTEN_BY_ASSET = "written_by_asset"


def storage_root_from_env() -> str:
    """``$ANOMALY_FORGE_STORAGE``, else ``$ANOMALY_FORGE_HOME/storage`` (see resources.settings)."""
    from resources.settings import forge_home

    return os.environ.get("ANOMALY_FORGE_STORAGE") or str(forge_home() / "storage")


class StorageResource(dg.ConfigurableResource):
    """Where images, adapters, detectors and manifests live: a local path or an fsspec URL (s3://bucket/prefix)."""

    root: str

    def get(self) -> Storage:
        return Storage(self.root)


def _asset_dir(key: dg.AssetKey) -> str:
    return "/".join(key.path)


class ParquetIOManager(dg.ConfigurableIOManager):
    """pandas DataFrames <-> one Parquet file per asset partition under ``<root>/manifests``."""

    root: str

    def _storage(self) -> Storage:
        return Storage(self.root)

    def path_for(self, asset_key: dg.AssetKey, partition_key: str | None) -> Any:
        return self._storage().manifest_path(_asset_dir(asset_key), str(partition_key) if partition_key else None)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if context.has_asset_partitions and len(context.asset_partition_keys) > 1:
            keys = [str(k) for k in context.asset_partition_keys]
            if not isinstance(obj, dict) or set(map(str, obj)) != set(keys):
                raise TypeError(
                    f"asset {context.asset_key.to_user_string()} materialized {len(keys)} partitions in one run; "
                    f"return a dict {{partition key: DataFrame}} with exactly the keys {keys[:5]}...")
            frames = {str(k): v for k, v in obj.items()}
        else:
            key = str(context.asset_partition_key) if context.has_asset_partitions else None
            frames = {key: obj}
        rows = 0
        paths = []
        if (context.definition_metadata or {}).get(WRITTEN_BY_ASSET):
            frames = {}
            rows, paths = len(obj), [str(self.path_for(context.asset_key, None))]
        for key, df in frames.items():
            if not isinstance(df, pd.DataFrame):
                raise TypeError(f"asset {context.asset_key.to_user_string()} (partition {key}) returned "
                                f"{type(df).__name__}; the Parquet IO manager stores pandas DataFrames only")
            path = self.path_for(context.asset_key, key)
            write_parquet_atomic(path, pa.Table.from_pandas(df, preserve_index=False))
            rows += len(df)
            paths.append(str(path))
        meta: dict[str, Any] = {"dagster/row_count": rows}
        meta["path"] = dg.MetadataValue.path(paths[0]) if len(paths) == 1 else dg.MetadataValue.json(paths)
        context.add_output_metadata(meta)

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        asset = context.asset_key
        # sorted: Dagster may hand partition subsets over in set order, and concatenation order must be stable
        keys: list[str | None] = (sorted(str(k) for k in context.asset_partition_keys)
                                  if context.has_asset_partitions else [None])
        allow_missing = bool((context.definition_metadata or {}).get(ALLOW_MISSING, False))
        frames, missing = [], []
        for key in keys:
            path = self.path_for(asset, key)
            if not path.exists():
                missing.append((key, path))
                continue
            frames.append(read_manifest(path))
        if missing and (not allow_missing or not frames):
            key, path = missing[0]
            which = f"partition {key!r} of " if key else ""
            more = f" (and {len(missing) - 1} more missing partitions)" if len(missing) > 1 else ""
            raise FileNotFoundError(
                f"{path} does not exist{more}: materialize {which}asset {asset.to_user_string()!r} first "
                f"(Dagster UI, or `dagster asset materialize -m pipelines.definitions --select "
                f"{asset.to_user_string()}{f' --partition {key}' if key else ''}`)")
        if missing:
            context.log.warning(f"{asset.to_user_string()}: skipping {len(missing)} unmaterialized partitions "
                                f"({', '.join(str(k) for k, _ in missing[:5])}...)")
        if len(frames) == 1:
            return frames[0]
        return pd.concat(frames, ignore_index=True)

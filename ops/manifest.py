"""Parquet manifests with declared pyarrow schemas.

Every stage declares its schema as a ``pa.schema`` next to the code that fills it; ``to_table`` checks a
DataFrame against it (missing columns and wrong types are errors, extra columns are errors too, so a typo
cannot slip through) and ``write_manifest`` writes it atomically with the schema name in the file metadata.

Reruns with the same inputs give byte-identical files everywhere except in the declared timing columns
(``TIMING_COLUMNS``: measured wall-clock seconds); nothing else (config files, checkpoints, adapter metadata)
may carry a time.
"""
from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ops.atomic import write_parquet_atomic

SCHEMA_KEY = b"anomaly_forge.schema"
TIMING_COLUMNS = ("seconds", "train_seconds", "eval_seconds")


def to_table(df: pd.DataFrame, schema: pa.Schema, name: str = "") -> pa.Table:
    missing = [f.name for f in schema if f.name not in df.columns]
    extra = [c for c in df.columns if c not in schema.names]
    if missing or extra:
        raise ValueError(f"manifest {name!r} does not match its schema: missing={missing} extra={extra}")
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    meta = dict(schema.metadata or {})
    meta[SCHEMA_KEY] = name.encode()
    return table.replace_schema_metadata(meta)


def write_manifest(path: Any, df: pd.DataFrame, schema: pa.Schema, name: str = "") -> None:
    write_parquet_atomic(path, to_table(df, schema, name))


def read_manifest(path: Any) -> pd.DataFrame:
    """A manifest from a local path or a UPath; remote ones are read through fsspec (one GET), never through
    pyarrow's own S3 client, which would need its own endpoint and credential settings."""
    from ops.cache import is_remote

    if is_remote(path):
        import io

        from ops.cache import upath

        return pq.read_table(io.BytesIO(upath(str(path)).read_bytes())).to_pandas()
    return pq.read_table(str(path)).to_pandas()


def read_existing(storage: Any, asset: str, keys: Any) -> pd.DataFrame | None:
    """The manifests of ``asset`` for the partition ``keys`` that exist now, concatenated in key order."""
    paths = [storage.manifest_path(asset, str(k)) for k in sorted(map(str, keys))]
    frames = [read_manifest(p) for p in paths if p.exists()]
    return pd.concat(frames, ignore_index=True) if frames else None


def empty_frame(schema: pa.Schema) -> pd.DataFrame:
    return schema.empty_table().to_pandas()


def dumps(obj: Any) -> str:
    """Stable JSON for parameter columns (sorted keys, so equal parameters give equal strings)."""
    return json.dumps(obj, sort_keys=True, default=_default)


def _default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)

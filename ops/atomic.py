"""Atomic writes: a reader sees either the old file or the complete new one, never a half-written file.

Local paths use a temp file in the same directory + ``os.replace`` (atomic on POSIX). Remote fsspec/UPath
URLs (s3://, gs://, ...) are written with one ``put`` of the finished bytes, which object stores commit
atomically.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def _is_local(path: Any) -> bool:
    if isinstance(path, Path) and type(path).__module__.startswith("pathlib"):
        return True
    s = str(path)
    return "://" not in s or s.startswith("file://")


def write_bytes_atomic(path: Any, data: bytes) -> None:
    if not _is_local(path):
        from upath import UPath

        p = UPath(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return
    p = Path(str(path).removeprefix("file://"))
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_parquet_atomic(path: Any, table: pa.Table) -> None:
    write_bytes_atomic(path, table_to_parquet_bytes(table))

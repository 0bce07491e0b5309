"""Atomic writes: a reader sees either the old file or the complete new one, never a half-written file.

Local paths use a temp file in the same directory + ``os.replace`` (atomic on POSIX). Remote fsspec/UPath
URLs (s3://, gs://, ...) are written with one ``put`` of the finished bytes, which object stores commit
atomically.

Permissions: ``mkstemp`` creates 0600 files and ``mkdtemp`` 0700 folders, and the mode survives the rename,
so a Dagster UI, a worker running as another user or a shared (NFS) storage root could not read what was
written. Files therefore get ``0666 & ~umask`` (0644 under the usual 022) and folders made with ``mkdtemp``
``0777 & ~umask``, exactly what ``open()`` / ``mkdir`` would have given.

Failures (read-only root, no permission, full disk) raise the original OSError type and errno, naming the target
file; the temp file is removed, so the old file (or none) stays.
"""
from __future__ import annotations

import io
import json
import os
import struct
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


def process_umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` is set-and-restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(folder: bool = False) -> int:
    return (0o777 if folder else 0o666) & ~process_umask()


def make_temp_dir(parent: Any, prefix: str) -> Path:
    """``mkdtemp`` under ``parent`` with the mode ``mkdir`` would give (it is renamed into place later)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, default_mode(folder=True))
    return tmp


def write_bytes_atomic(path: Any, data: bytes) -> None:
    if not _is_local(path):
        from upath import UPath

        p = UPath(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return
    p = Path(str(path).removeprefix("file://"))
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise _naming(e, p) from None
    try:
        os.fchmod(fd, default_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _naming(e, p) from None
        raise


def _naming(e: OSError, target: Path) -> OSError:
    """The same error (errno kept, so callers can tell a full disk from a read-only root) naming the file the
    caller asked for rather than the temp file; nothing partial is left behind by the caller above."""
    return type(e)(e.errno, f"{e.strerror or e} (writing {target}; nothing was written there)", str(target))


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_parquet_atomic(path: Any, table: pa.Table) -> None:
    write_bytes_atomic(path, table_to_parquet_bytes(table))


def canonical_safetensors(data: bytes, fix_metadata: Any = None) -> bytes:
    """The same safetensors file with its JSON header written with sorted keys, no spaces and 8-byte padding.

    The Rust writer serialises ``__metadata__`` from a hash map whose order changes per process, so the same
    tensors and metadata gave different bytes on every run; tensor data and offsets are untouched.
    ``fix_metadata(dict) -> dict`` may normalise the metadata values themselves."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    if fix_metadata is not None and "__metadata__" in header:
        header["__metadata__"] = fix_metadata(header["__metadata__"])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]

"""The storage root: manifests, images, adapters and detectors under one (local or fsspec/UPath) root.

Layout::

    <root>/manifests/<asset name>/<partition key>.parquet   (multi-partition keys in Dagster's "a|b" form)
    <root>/images/<asset name>/<category>/<method>/...       (PNG images and masks)
    <root>/adapters/<category>/<method>/...                  (adapter weights, checkpoints)
    <root>/detectors/<category>/<method>/<detector>/...
    <root>/cache/...                                         (latent / embedding caches keyed by content hash)

Manifests hold paths relative to the root, so a root can be moved or synced to object storage as a whole.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from ops.atomic import write_bytes_atomic

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, what: str = "name") -> str:
    """Reject names that could escape the storage root or break partition keys ("..", "/", "|", ...)."""
    if not isinstance(name, str) or not _SAFE.match(name) or ".." in name:
        raise ValueError(
            f"invalid {what} {name!r}: use 1-128 characters from letters, digits, '.', '_' and '-', starting with "
            f"a letter or digit and without '..' (it becomes a folder name under the storage root and a Dagster "
            f"partition key); rename the folder")
    return name


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Any) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Storage:
    """A storage root. ``root`` is a local path or an fsspec URL (s3://bucket/prefix)."""

    def __init__(self, root: Any):
        s = str(root)
        if "://" in s and not s.startswith("file://"):
            from upath import UPath

            self.root = UPath(s)
        else:
            self.root = Path(s.removeprefix("file://")).expanduser().resolve()

    def __repr__(self) -> str:
        return f"Storage({str(self.root)!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self.root, Path) and type(self.root).__module__.startswith("pathlib")

    def path(self, rel: str) -> Any:
        p = self.root / rel
        if self.is_local and not Path(p).resolve().is_relative_to(self.root):
            raise ValueError(f"path {rel!r} escapes the storage root {self.root}")
        return p

    def rel(self, path: Any) -> str:
        return Path(str(path)).relative_to(Path(str(self.root))).as_posix()

    def manifest_path(self, asset: str, partition_key: str | None) -> Any:
        key = partition_key if partition_key else "all"
        return self.path(f"manifests/{asset}/{key}.parquet")

    def write_bytes(self, rel: str, data: bytes) -> str:
        write_bytes_atomic(self.path(rel), data)
        return rel

    def read_bytes(self, rel: str) -> bytes:
        p = self.path(rel)
        return p.read_bytes()

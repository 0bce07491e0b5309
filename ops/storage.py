"""The storage root: manifests, images, adapters and detectors under one (local or fsspec/UPath) root.

Layout::

    <root>/manifests/<asset name>/<partition key>.parquet   (multi-partition keys in Dagster's "a|b" form)
    <root>/images/<asset name>/<category>/<method>/...       (PNG images and masks)
    <root>/adapters/<category>/<method>/...                  (adapter weights, checkpoints)
    <root>/detectors/<category>/<method>/<detector>/...
    <root>/cache/...                                         (latent / embedding caches keyed by content hash)

Manifests hold paths relative to the root, so a root can be moved or synced to object storage as a whole.

A remote root (s3://bucket/prefix) is written one object per file (``write_bytes``: one put, atomic) and a folder
at a time (``workdir``: a private local folder, uploaded when the block ends); it is read by stages that need real
files through ``local_file`` / ``local_tree``, which go through the machine's content-hash cache (``ops.cache``).
On a local root those are the files themselves, so nothing is copied.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ops import cache
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
    with open(cache.local_file(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Storage:
    """A storage root. ``root`` is a local path or an fsspec URL (s3://bucket/prefix)."""

    def __init__(self, root: Any):
        s = str(root)
        if "://" in s and not s.startswith("file://"):
            self.root = cache.upath(s)
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

    def local_file(self, rel: str) -> Path:
        """A local file with the content of ``rel`` (the file itself on a local root; module doc)."""
        return cache.local_file(self.path(rel))

    def local_tree(self, rel: str) -> Path:
        """A local folder with the content of the folder ``rel`` (itself on a local root; read-only copies else)."""
        return cache.local_tree(self.path(rel))

    def list_files(self, rel: str) -> list[str]:
        """Every file under the folder ``rel``, as root-relative paths, sorted; [] when there is none."""
        p = self.path(rel)
        if self.is_local:
            return sorted(self.rel(f) for f in Path(p).rglob("*") if f.is_file()) if Path(p).is_dir() else []
        prefix = self.root.path.rstrip("/") + "/"
        found = p.fs.find(p.path, detail=True)
        return sorted(k[len(prefix):] for k, info in found.items()
                      if info.get("type") != "directory" and k.startswith(prefix))

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if self.is_local:
            Path(p).unlink(missing_ok=True)
        else:
            p.fs.rm_file(p.path)

    @contextmanager
    def workdir(self, rel: str) -> Iterator[Path]:
        """A local folder holding the folder ``rel`` for code that writes files itself (trainers, exporters).

        Local root: the folder itself. Remote root: a private temp folder seeded with the folder's current
        objects (so resumable code finds its checkpoints); when the block ends without an error, changed and new
        files are uploaded and objects whose file was deleted are removed, so the prefix mirrors the folder."""
        if self.is_local:
            p = Path(self.path(rel))
            p.mkdir(parents=True, exist_ok=True)
            yield p
            return
        before = {r[len(rel) + 1:]: r for r in self.list_files(rel)}
        tmp = Path(tempfile.mkdtemp(prefix="workdir-"))
        try:
            seeded = {}
            if before:
                mirror = self.local_tree(rel)
                for sub in before:
                    (tmp / sub).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(mirror / sub, tmp / sub)  # a writable copy: blobs are shared and read-only
                    seeded[sub] = sha256_file(tmp / sub)
            yield tmp
            after = sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file())
            for sub in after:
                data = (tmp / sub).read_bytes()
                if seeded.get(sub) != sha256_bytes(data):
                    self.write_bytes(f"{rel}/{sub}", data)
            for sub in sorted(set(before) - set(after)):
                self.remove(before[sub])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

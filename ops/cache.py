"""The local content-hash cache through which torch, PIL and anomalib read objects of a remote (s3://, gs://, ...)
storage or dataset root: they need real files, and no step may assume another step's local disk.

Layout under ``cache_dir()`` (``$ANOMALY_FORGE_STORAGE_CACHE``, else ``$ANOMALY_FORGE_CACHE/storage``, default
``~/.cache/anomaly_forge/storage``; put it on a fast local disk)::

    blobs/<sha256[:2]>/<sha256><suffix>     one read-only file per distinct content (the key is the content hash)
    index/<id[:2]>/<id>                     remote identity -> content hash; id = sha256(url, ETag, size)
    trees/<id>/                             a folder mirrored from a remote prefix: hard links to blobs;
                                            id = sha256(url, every (relative path, ETag, size) under it)
    locks/<id>.lock                         flock files (see below)

Choices:
- An object is identified by its URL + ETag + size (one HEAD request, no download); the index maps that to the
  hash of the bytes, which is computed on download. A changed object has a new ETag, so it gets a new index entry
  and, for new content, a new blob: a cache entry is never stale, and equal content is stored once. The suffix
  stays on blobs because some readers dispatch on it.
- Concurrency (runs, threads, processes on one machine): a miss holds an ``flock`` on ``locks/<id>.lock`` while
  it downloads, so two readers of one object download it once; files and trees are written to a temp name and
  renamed into place, so a reader never sees a partial entry, and a killed downloader leaves at most a temp file
  (the kernel drops its lock). Between machines nothing is shared: each has its own cache.
- Eviction: ``prune(max_bytes)`` removes the least recently used entries (a hit refreshes the mtime) that were
  not used in the last ``keep_seconds`` (an hour by default, so a running step keeps what it was handed). It
  runs once per process on the first miss with ``$ANOMALY_FORGE_CACHE_MAX_GB`` (default 20); deleting the
  folder while no run is active is always safe.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import fcntl

MAX_GB_ENV = "ANOMALY_FORGE_CACHE_MAX_GB"
_pruned: set[str] = set()


def cache_dir() -> Path:
    """``$ANOMALY_FORGE_STORAGE_CACHE``, else ``$ANOMALY_FORGE_CACHE/storage`` (``~/.cache/anomaly_forge/storage``)."""
    own = os.environ.get("ANOMALY_FORGE_STORAGE_CACHE")
    if own:
        return Path(own).expanduser()
    base = os.environ.get("ANOMALY_FORGE_CACHE") or str(Path.home() / ".cache" / "anomaly_forge")
    return Path(base).expanduser() / "storage"


def is_remote(location: Any) -> bool:
    s = str(location)
    return "://" in s and not s.startswith("file://")


def _hash(*parts: Any) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()


def upath(url: str) -> Any:
    """``UPath(url)`` without fsspec's listing cache on object stores: another machine may have written since a
    listing was cached, and listings here decide what is missing or stale."""
    from upath import UPath

    options = {"use_listings_cache": False} if url.split("://", 1)[0] in ("s3", "s3a", "gs", "gcs", "az", "abfs") else {}
    return UPath(url, **options)


def _fs(url: str) -> tuple[Any, str]:
    p = upath(url)
    return p.fs, p.path


def _identity(info: dict) -> str:
    # S3 and most object stores give an ETag; others a checksum or a modification time
    for key in ("ETag", "etag", "md5", "checksum", "LastModified", "mtime", "updated"):
        if info.get(key):
            return f"{key}={info[key]}"
    raise OSError(f"{info.get('name')}: the object store gives no ETag, checksum or modification time, so a "
                  f"cached copy could not be told from a changed object")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ContentCache:
    """Local copies of remote objects, keyed by content hash (module doc)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_dir()

    def blob_path(self, sha: str, suffix: str = "") -> Path:
        return self.root / "blobs" / sha[:2] / f"{sha}{suffix}"

    def _touch(self, path: Path) -> Path:
        try:
            os.utime(path)
        except OSError:
            pass
        return path

    def _put_blob(self, data: bytes, suffix: str) -> Path:
        sha = hashlib.sha256(data).hexdigest()
        blob = self.blob_path(sha, suffix)
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".blob-", dir=blob.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o444)  # shared by every tree that links it: nobody may edit it in place
            os.replace(tmp, blob)
        return blob

    def _write_small(self, path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".idx-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def _fetch(self, fs: Any, path: str, info: dict, url: str) -> Path:
        suffix = PurePosixPath(path).suffix
        key = _hash(url, _identity(info), info.get("size"))
        index = self.root / "index" / key[:2] / key
        hit = self._lookup(index, suffix)
        if hit is not None:
            return hit
        self._maybe_prune()
        with _locked(self.root / "locks" / f"{key}.lock"):
            hit = self._lookup(index, suffix)  # the reader we waited for fetched it
            if hit is not None:
                return hit
            blob = self._put_blob(fs.cat_file(path), suffix)
            self._write_small(index, blob.name.removesuffix(suffix) if suffix else blob.name)
            return blob

    def _lookup(self, index: Path, suffix: str) -> Path | None:
        try:
            sha = index.read_text().strip()
        except FileNotFoundError:
            return None
        blob = self.blob_path(sha, suffix)
        return self._touch(blob) if blob.exists() else None

    def file(self, url: str) -> Path:
        """A local, read-only copy of the object at ``url`` (FileNotFoundError naming the URL if absent)."""
        fs, path = _fs(url)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{url} does not exist") from None
        if info.get("type") == "directory":
            raise IsADirectoryError(f"{url} is a folder; expected a file")
        return self._fetch(fs, path, info, url)

    def tree(self, url: str, name: str | None = None) -> Path:
        """A local mirror of every object under the prefix ``url``; under ``<mirror>/<name>/`` when ``name`` is
        given (for readers that need the folder's own name). Read-only files; an empty prefix is an error."""
        fs, path = _fs(url)
        path = path.rstrip("/")
        listing = fs.find(path, detail=True)
        files = sorted((PurePosixPath(p).relative_to(path).as_posix(), info) for p, info in listing.items()
                       if info.get("type") != "directory")
        if not files:
            raise FileNotFoundError(f"{url} holds no objects")
        key = _hash(url, name, *[f"{rel}|{_identity(info)}|{info.get('size')}" for rel, info in files])
        final = self.root / "trees" / key
        if final.exists():
            return self._touch(final) / name if name else self._touch(final)
        with _locked(self.root / "locks" / f"{key}.lock"):
            if not final.exists():
                tmp = Path(tempfile.mkdtemp(prefix=".tree-", dir=self._mkdir(self.root / "trees")))
                base = tmp / name if name else tmp
                for rel, info in files:
                    blob = self._fetch(fs, f"{path}/{rel}", info, f"{url.rstrip('/')}/{rel}")
                    target = base / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(blob, target)
                    except OSError:  # another file system or no hard links: a copy does as well
                        shutil.copyfile(blob, target)
                os.rename(tmp, final)
        return final / name if name else final

    def _mkdir(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _maybe_prune(self) -> None:
        if str(self.root) in _pruned:
            return
        _pruned.add(str(self.root))
        max_gb = float(os.environ.get(MAX_GB_ENV, "20"))
        self.prune(int(max_gb * 1e9))

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, path) of every blob and tree."""
        out = []
        for kind in ("blobs", "trees"):
            top = self.root / kind
            if not top.exists():
                continue
            for entry in (top.iterdir() if kind == "trees" else top.glob("*/*")):
                if entry.name.startswith("."):
                    continue
                st = entry.stat()
                size = (sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) if entry.is_dir()
                        else st.st_size)
                out.append((st.st_mtime, size, entry))
        return out

    def prune(self, max_bytes: int, keep_seconds: float = 3600.0) -> int:
        """Remove least recently used entries until at most ``max_bytes`` remain (module doc); bytes freed."""
        entries = sorted(self.entries(), key=lambda e: e[0])
        total = sum(size for _, size, _ in entries)
        freed, now = 0, time.time()
        for used, size, path in entries:
            if total - freed <= max_bytes:
                break
            if now - used < keep_seconds:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            freed += size
        return freed


def local_file(location: Any) -> Path:
    """A local path to read ``location``: itself when local, a cached copy of a remote object otherwise."""
    if is_remote(location):
        return ContentCache().file(str(location))
    return Path(str(location).removeprefix("file://"))


def local_tree(location: Any, name: str | None = None) -> Path:
    """A local folder with the content of ``location``: itself when local, a cached mirror of a remote prefix."""
    if is_remote(location):
        return ContentCache().tree(str(location), name)
    return Path(str(location).removeprefix("file://"))


def join(root: Any, rel: str) -> str:
    """``root/rel`` as a string for a local path or a URL (``pathlib`` would fold ``s3://`` into ``s3:/``)."""
    return f"{str(root).rstrip('/')}/{rel}" if is_remote(root) else str(Path(str(root)) / rel)

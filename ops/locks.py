"""Cross-process locks on the storage root, so that two runs of one partition (or two partitions sharing an
output) take turns instead of writing the same files at once.

Choices:
- ``fcntl.flock`` on a ``.lock`` file next to what it guards: the kernel drops the lock when the holder dies
  (kill -9 included), so a crashed run never leaves a stale lock behind; it works across processes and, since
  every ``open`` is its own file description, across threads of one process too. NFS v4 honours it; a storage
  root on an object store (s3://) has no such lock, so there a partition must have one writer at a time
  (Dagster's own run queue gives that); the guard is then a no-op.
- The waiter simply blocks; what it does after (reuse the winner's result) is the caller's business.
"""
from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ops.storage import Storage

LOCK_NAME = ".lock"


@contextmanager
def exclusive(folder: Path) -> Iterator[Path]:
    """Hold the lock of a local ``folder`` (created if missing) while the block runs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def storage_lock(storage: Storage, rel: str) -> Iterator[None]:
    """The lock of the folder ``rel`` under a local storage root; nothing on remote roots (module doc)."""
    if not storage.is_local:
        yield
        return
    with exclusive(Path(storage.path(rel))):
        yield

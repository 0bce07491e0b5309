"""Cross-process locks on the storage root, so that two runs of one partition (or two partitions sharing an
output) take turns instead of writing the same files at once.

Choices:
- ``fcntl.flock`` on a ``.lock`` file next to what it guards: the kernel drops the lock when the holder dies
  (kill -9 included), so a crashed run never leaves a stale lock behind; it works across processes and, since
  every ``open`` is its own file description, across threads of one process too. NFS v4 honours it.
- An object store (s3://) has no lock an flock could stand for, and a lease emulated with objects would be
  neither safe nor simple. The rule there is ONE WRITER PER GUARDED FOLDER ACROSS MACHINES: Dagster launches one
  run per partition and the ``gpu`` pool / run queue keep a second run of a partition from starting while one is
  running (do not launch the same partition by hand on two machines at once). On one machine the guard is still
  real: an flock on ``<cache>/locks/<hash of the folder URL>.lock``, so runs sharing a machine take turns as on
  a local root. What a second writer on another machine could do is bounded: every file is one atomic put and the
  guarded outputs are deterministic, so the last writer's files equal the first's.
- The waiter simply blocks; what it does after (reuse the winner's result) is the caller's business.
"""
from __future__ import annotations

import fcntl
import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ops.cache import cache_dir
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
    """The lock of the folder ``rel``: an flock next to it on a local root, a machine-local one for a remote
    root (module doc: one writer per folder across machines)."""
    if not storage.is_local:
        key = hashlib.sha256(str(storage.path(rel)).encode()).hexdigest()
        with exclusive(cache_dir() / "locks" / key):
            yield
        return
    with exclusive(Path(storage.path(rel))):
        yield

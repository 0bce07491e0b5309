"""Progress bars for long loops, on stderr when it is a terminal.

Choices:
- Off when stderr is not a TTY (``dagster dev``'s log, a CI log, a file): there a bar is hundreds of ``\r``
  fragments interleaved with the log lines; the assets report progress through the Dagster log instead.
  ``ANOMALY_FORGE_PROGRESS=1`` forces bars on, ``ANOMALY_FORGE_NO_PROGRESS=1`` forces them off.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm


def bars_disabled() -> bool:
    if os.environ.get("ANOMALY_FORGE_NO_PROGRESS") == "1":
        return True
    if os.environ.get("ANOMALY_FORGE_PROGRESS") == "1":
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return not (isatty is not None and isatty())


@contextmanager
def progress_bar(desc: str, total: int | None = None, unit: str = "it") -> Iterator[tqdm]:
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False, disable=bars_disabled())
    try:
        yield bar
    finally:
        bar.close()

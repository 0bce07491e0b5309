"""Progress bars for long loops (stderr, so they show in the terminal and in Dagster's compute logs)."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm


@contextmanager
def progress_bar(desc: str, total: int | None = None, unit: str = "it") -> Iterator[tqdm]:
    disable = os.environ.get("ANOMALY_FORGE_NO_PROGRESS") == "1"
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False, disable=disable)
    try:
        yield bar
    finally:
        bar.close()

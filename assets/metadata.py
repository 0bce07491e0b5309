"""Images in materialization metadata: written to the storage root and shown inline in the Dagster UI."""
from __future__ import annotations

from typing import Any

import dagster as dg


def image_metadata(store: Any, rel: str, png: bytes, title: str) -> dg.MetadataValue:
    """Write ``png`` to ``<storage root>/<rel>`` and return Markdown that shows it inline plus its path."""
    from ops.viz import png_markdown

    store.write_bytes(rel, png)
    return dg.MetadataValue.md(f"{png_markdown(png, title)}\n\n`{store.path(rel)}`")

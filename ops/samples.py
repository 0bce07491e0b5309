"""Loading manifest rows into :class:`~ops.types.Sample` objects.

Raw manifest rows hold ``dataset_root`` + ``image_path``/``mask_path`` relative to it (see ``ops.ingest``);
masks on disk are 8-bit PNGs where any non-zero pixel is defect.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from ops.types import Sample


def read_rgb(path: Any) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_mask(path: Any) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 0


def dataset_file(root: Any, rel: str) -> Path:
    """A local path to read ``rel`` of a dataset root (a cached copy when the root is a URL, ``ops.cache``);
    absolute ``rel`` (union masks written at ingest) is taken as is."""
    from ops.cache import join, local_file

    return local_file(rel if rel.startswith("/") or "://" in rel else join(root, rel))


def load_sample(row: Mapping[str, Any]) -> "Sample":
    from ops.cache import join
    from ops.types import Sample

    root = str(row["dataset_root"])
    image = read_rgb(dataset_file(root, row["image_path"]))
    mask_rel = row.get("mask_path")
    mask = None
    if isinstance(mask_rel, str) and mask_rel:
        mask = read_mask(dataset_file(root, mask_rel))
    elif row.get("defect_type") != "good":
        mask = np.zeros(image.shape[:2], dtype=bool)
    return Sample(image_id=str(row["image_id"]), category=str(row["category"]), defect_type=str(row["defect_type"]),
                  image=image, mask=mask, source=join(root, row["image_path"]))


def encode_png(array: np.ndarray) -> bytes:
    import io

    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()

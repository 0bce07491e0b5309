"""MVTec-style tree with image-level labels only (layout ``mvtec-image-level``), as many inspection lines keep::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect_type>/*.png      labelled defective, but no ground_truth/ folder

Defect rows get ``mask_path`` null, ``mask_count`` 0 and ``mask_area`` NaN (unknown, not zero). What can run on
such a category, and why the rest cannot, is decided in :mod:`ops.image_level`.
"""
from __future__ import annotations

from pathlib import Path

from ops.ingest import validate as v
from ops.ingest.collect import Listing
from ops.ingest.mvtec import walk

NAME = "mvtec-image-level"
MASK_RULE: v.MaskRule = "none"


def detect(cat_dir: Path) -> bool:
    # a ground_truth/ folder, even an incomplete one, makes it MVTec AD (missing masks are then rejects)
    return ((cat_dir / "train" / "good").is_dir() and (cat_dir / "test").is_dir()
            and not (cat_dir / "ground_truth").exists())


def list_entries(root: Path, category: str) -> Listing:
    return walk(root / category, [("train", "train"), ("test", "test")], lambda _key: [])

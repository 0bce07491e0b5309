"""MVTec LOCO AD layout::

    <root>/<category>/train/good/*.png
    <root>/<category>/validation/good/*.png                         (read as split "train")
    <root>/<category>/test/{good,logical_anomalies,structural_anomalies}/<stem>.png
    <root>/<category>/ground_truth/<defect_type>/<stem>/000.png, 001.png, ...   (one file per defect region)

Each defect region has its own mask file whose foreground value encodes the defect class (not always
255), so masks are binary in the {0, v} sense. The regions of one image are unioned; an image with one mask
file points at it directly, one with several at the union written under ``cache_dir``.
``validation/good`` becomes split "train" (image ids keep the ``validation/`` prefix): the raw manifest
knows only train and test, and LOCO's validation images are defect-free training-time data.
"""
from __future__ import annotations

from pathlib import Path

from ops.ingest import validate as v
from ops.ingest.collect import Listing
from ops.ingest.mvtec import detect as detect_mvtec_like
from ops.ingest.mvtec import walk

MASK_RULE: v.MaskRule = "binary"


def detect(cat_dir: Path) -> bool:
    if not detect_mvtec_like(cat_dir):
        return False
    if (cat_dir / "validation").is_dir():
        return True
    gt = cat_dir / "ground_truth"
    return any(p.is_dir() for t in gt.iterdir() if t.is_dir() for p in t.iterdir())


def find_masks(key: Path) -> list[Path]:
    """All region masks of the defect image ``key`` = ground_truth/<type>/<image stem>/."""
    if not key.is_dir():
        return []
    return [p for p in sorted(key.iterdir()) if p.is_file() and not v.is_hidden(p) and v.is_image_file(p)]


def list_entries(root: Path, category: str) -> Listing:
    return walk(root / category, [("train", "train"), ("validation", "train"), ("test", "test")], find_masks)

"""Plain folder layout, for a user's own data::

    <root>/<category>/good/*.png                       normal images (split "train")
    <root>/<category>/test_good/*.png                  optional normal images kept for evaluation (split "test")
    <root>/<category>/defects/<defect_type>/<stem>.png defect images (split "test")
    <root>/<category>/masks/<defect_type>/<stem>.png   one mask per defect image, 0 = good, 255 = defect
                                                       (``<stem>_mask.png`` is accepted too)

Image ids follow the MVTec pattern (``train/good/<stem>``, ``test/good/<stem>``, ``test/<type>/<stem>``)
so that every later stage sees one naming scheme.
"""
from __future__ import annotations

import glob
from pathlib import Path

from ops.ingest import validate as v
from ops.ingest.collect import Listing, check_type_name, list_folder, reject_orphans

MASK_RULE: v.MaskRule = "binary"


def detect(cat_dir: Path) -> bool:
    return (cat_dir / "good").is_dir() and (cat_dir / "defects").is_dir()


def find_masks(key: Path) -> list[Path]:
    """Mask of the defect image ``key`` = masks/<type>/<image stem>: a same-stem image, else ``<stem>_mask.png``."""
    same = [p for p in sorted(key.parent.glob(f"{glob.escape(key.name)}.*")) if v.is_image_file(p)]
    suffixed = key.with_name(f"{key.name}_mask.png")
    return same[:1] or ([suffixed] if suffixed.is_file() else [])


def list_entries(root: Path, category: str) -> Listing:
    cat_dir = root / category
    listing = Listing()
    list_folder(listing, cat_dir / "good", "train", "good", "train/good")
    if (cat_dir / "test_good").is_dir():
        list_folder(listing, cat_dir / "test_good", "test", "good", "test/good")
    for type_dir in listing.visible(cat_dir / "defects"):
        if not type_dir.is_dir():
            listing.reject(type_dir, v.UNSUPPORTED, "file directly in defects/",
                           "defect images go into defects/<defect type>/; move or delete it")
        elif check_type_name(listing, type_dir):
            list_folder(listing, type_dir, "test", type_dir.name, f"test/{type_dir.name}",
                        lambda img, t=type_dir.name: find_masks(cat_dir / "masks" / t / img.stem))
    reject_orphans(listing, cat_dir / "masks")
    return listing

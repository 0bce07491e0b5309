"""MVTec AD layout::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect_type>/<stem>.png
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png   (0/255)

Also accepted (MVTec-like releases such as BTAD use it): ``ground_truth/<defect_type>/<stem>.<image ext>``.
``train/`` must hold only ``good/``; any other folder there is reported, not read as training data.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Callable

from ops.ingest import validate as v
from ops.ingest.collect import Listing, check_type_name, list_folder, reject_orphans

MASK_RULE: v.MaskRule = "binary"


def detect(cat_dir: Path) -> bool:
    return all((cat_dir / d).is_dir() for d in ("train/good", "test", "ground_truth"))


def find_masks(key: Path) -> list[Path]:
    """Mask of the defect image ``key`` = ground_truth/<type>/<image stem>: ``<stem>_mask.png``, else
    a same-stem image file."""
    mvtec = key.with_name(f"{key.name}_mask.png")
    if mvtec.is_file():
        return [mvtec]
    return [p for p in sorted(key.parent.glob(f"{glob.escape(key.name)}.*")) if v.is_image_file(p)][:1]


def walk(cat_dir: Path, folders: list[tuple[str, str]], masks_of: Callable[[Path], list[Path]]) -> Listing:
    """Shared by the MVTec AD and LOCO layouts: ``folders`` = (folder name, split) pairs under ``cat_dir``."""
    listing = Listing()
    for folder, split in folders:
        base = cat_dir / folder
        if not base.is_dir():
            continue
        for type_dir in listing.visible(base):
            if not type_dir.is_dir():
                listing.reject(type_dir, v.UNSUPPORTED, f"file directly in {folder}/",
                               f"images go into {folder}/<defect type>/; move or delete it")
            elif split == "train" and type_dir.name != "good":
                listing.reject(type_dir, v.UNEXPECTED_FOLDER, f"{folder}/ may only hold good/",
                               "move defect images to test/<defect type>/ with their masks in ground_truth/")
            elif check_type_name(listing, type_dir):
                list_folder(listing, type_dir, split, type_dir.name, f"{folder}/{type_dir.name}",
                            lambda img, t=type_dir.name: masks_of(cat_dir / "ground_truth" / t / img.stem))
    reject_orphans(listing, cat_dir / "ground_truth")
    return listing


def list_entries(root: Path, category: str) -> Listing:
    return walk(root / category, [("train", "train"), ("test", "test")], find_masks)

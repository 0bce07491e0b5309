"""VisA layout (as released, with its split file)::

    <root>/split_csv/1cls.csv          columns object,split,label,image,mask
                                       split in {train, test}; label in {normal, anomaly};
                                       image/mask relative to <root>, mask empty for normal rows
    <root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png   label maps: 0 = background, 1, 2, ... = defect classes

Choices: the csv is the authority on the split; images the csv does not list are ignored. The csv has no
defect types (VisA's per-image descriptions in image_anno.csv are free text, often several per image), so
every VisA defect image gets the defect type "anomaly". Masks follow the "labels" rule (any non-zero pixel
is defect). A category is listed only when its ``<category>/Data/Images`` folder exists (a partial
download). csv paths that point outside the root are rejected, not followed.
"""
from __future__ import annotations

import csv
from pathlib import Path

from ops.ingest import validate as v
from ops.ingest.collect import Entry, Listing

MASK_RULE: v.MaskRule = "labels"
SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
DEFECT_TYPE = "anomaly"


def detect(root: Path) -> bool:
    return (root / SPLIT_CSV).is_file()


def read_csv(root: Path) -> list[dict[str, str]]:
    path = root / SPLIT_CSV
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; VisA's split file has the header "
                             f"{','.join(COLUMNS)}: restore the original split_csv/1cls.csv")
        return [{c: (row.get(c) or "").strip() for c in COLUMNS} for row in reader]


def categories(root: Path) -> list[str]:
    return sorted({r["object"] for r in read_csv(root) if (root / r["object"] / "Data" / "Images").is_dir()})


def _inside(root: Path, rel: str) -> Path | None:
    p = root / rel
    return p if p.resolve().is_relative_to(root.resolve()) else None


def list_entries(root: Path, category: str) -> Listing:
    listing = Listing()
    csv_path = root / SPLIT_CSV
    for n, r in enumerate(read_csv(root), start=2):
        if r["object"] != category:
            continue
        where = f"{csv_path.name} line {n}"
        if r["split"] not in ("train", "test") or r["label"] not in ("normal", "anomaly") or not r["image"]:
            listing.reject(csv_path, v.BAD_CSV_ROW, f"{where}: split={r['split']!r} label={r['label']!r} "
                           f"image={r['image']!r}", "split must be train/test, label normal/anomaly, image a path")
            continue
        image = _inside(root, r["image"])
        if image is None:
            listing.reject(csv_path, v.OUTSIDE_ROOT, f"{where}: {r['image']!r}",
                           "csv paths must be relative to the dataset root and stay inside it")
            continue
        if not image.is_file():
            listing.reject(image, v.MISSING_FILE, f"listed in {where}", "restore the file or remove its csv row")
            continue
        defect_type = "good" if r["label"] == "normal" else DEFECT_TYPE
        masks: tuple[Path, ...] = ()
        if defect_type != "good" and r["mask"]:
            mask = _inside(root, r["mask"])
            if mask is None:
                listing.reject(csv_path, v.OUTSIDE_ROOT, f"{where}: {r['mask']!r}",
                               "csv paths must be relative to the dataset root and stay inside it")
                continue
            masks = (mask,) if mask.is_file() else ()
        listing.entries.append(Entry(r["split"], defect_type, f"{r['split']}/{defect_type}/{image.stem}", image,
                                     masks))
    return listing

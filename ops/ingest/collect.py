"""What every layout module produces (a listing of entries) and how a listing becomes manifest rows.

Layout modules only walk folders (cheap); :func:`process` decodes every file, so it owns validation, the
progress bar, unions of multi-mask images and the reject rows.

Hostile inputs, decided per case (each visible in ``rejects`` or ``notes``, ``NOTE_SCHEMA``):
- hidden entries (names starting with "."; including one named ``..%2Fescape``): skipped, one note each (OS
  droppings such as .DS_Store and ._* resource forks too: a skipped file should never be a surprise);
- alpha channels, grayscale / palette / CMYK images among RGB ones: kept, converted to RGB on load, one note each;
- names with spaces or non-ASCII characters: kept (outputs are named by index, never by the source name), noted
  so that tools downstream that split on spaces are warned;
- an image whose pixel count is more than ``SIZE_OUTLIER_FACTOR`` times off the category's median (one 4096^2
  scan among 64^2 crops): rejected, because every later stage works at one resolution and the outlier would
  cost memory and be squashed; the fix names the median size.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from ops.atomic import write_bytes_atomic
from ops.ingest import validate as v
from ops.progress import progress_bar
from ops.samples import encode_png
from ops.storage import check_name

RAW_SCHEMA = pa.schema([
    ("image_id", pa.string()),      # "<folder>/<defect_type>/<stem>", unique within a category
    ("category", pa.string()),
    ("split", pa.string()),         # "train" | "test"
    ("defect_type", pa.string()),   # "good" or the defect type
    ("dataset_root", pa.string()),  # absolute
    ("layout", pa.string()),        # mvtec | loco | visa | folder | mvtec-image-level
    ("image_path", pa.string()),    # relative to dataset_root, posix
    ("mask_path", pa.string()),     # relative to dataset_root, or absolute (union masks in the cache); null for good and for image-level defects
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("sha256", pa.string()),        # of the image file bytes
    ("mask_area", pa.float64()),    # defect fraction of the image, 0.0 for good, NaN without a mask
    ("mask_count", pa.int32()),     # mask files unioned into mask_path, 0 for good
])

NOTE_SCHEMA = pa.schema([
    ("category", pa.string()),
    ("path", pa.string()),  # relative to dataset_root where possible
    ("note", pa.string()),  # what was found and what was done about it
])
SIZE_OUTLIER_FACTOR = 16.0

REJECT_SCHEMA = pa.schema([
    ("category", pa.string()),
    ("path", pa.string()),    # relative to dataset_root where possible
    ("reason", pa.string()),  # "<code>: <detail>", codes in ops.ingest.validate
    ("fix", pa.string()),
])


@dataclass(frozen=True)
class IngestResult:
    rows: pd.DataFrame     # RAW_SCHEMA
    rejects: pd.DataFrame  # REJECT_SCHEMA
    notes: pd.DataFrame = field(default_factory=lambda: NOTE_SCHEMA.empty_table().to_pandas())  # NOTE_SCHEMA


@dataclass(frozen=True)
class Entry:
    split: str
    defect_type: str
    image_id: str
    image: Path
    masks: tuple[Path, ...] = ()


@dataclass
class Listing:
    entries: list[Entry] = field(default_factory=list)
    rejects: list[tuple[Path, str, str]] = field(default_factory=list)  # (path, reason, fix)
    notes: list[tuple[Path, str]] = field(default_factory=list)  # (path, note)

    def reject(self, path: Path, code: str, detail: str, fix: str) -> None:
        self.rejects.append((path, f"{code}: {detail}", fix))

    def visible(self, folder: Path) -> list[Path]:
        """The entries of ``folder`` that are data, sorted; hidden ones are skipped with a note each."""
        entries = sorted(folder.iterdir())
        for p in entries:
            if v.is_hidden(p):
                self.notes.append((p, f"hidden {'folder' if p.is_dir() else 'file'} skipped"))
        return [p for p in entries if not v.is_hidden(p)]


def list_folder(listing: Listing, folder: Path, split: str, defect_type: str, id_prefix: str,
                find_masks: Callable[[Path], list[Path]] | None = None) -> None:
    """Add every image of ``folder`` as an entry; non-images and an empty folder become rejects.

    ``find_masks(image_path) -> list[Path]`` is called for defect folders.
    """
    files = listing.visible(folder)
    images = [p for p in files if p.is_file() and v.is_image_file(p)]
    for p in files:
        if p.is_dir():
            listing.reject(p, v.UNEXPECTED_FOLDER, "folder inside an image folder",
                           "image folders hold image files only; move or delete it")
        elif not v.is_image_file(p):
            listing.reject(p, v.UNSUPPORTED, f"extension {p.suffix or '(none)'!r}",
                           f"use one of {', '.join(sorted(v.IMAGE_EXTS))} or move the file out of the dataset")
    if not images:
        listing.reject(folder, v.EMPTY_FOLDER, "no image files",
                       "add images to the folder or delete it")
        return
    for img in images:
        masks = tuple(find_masks(img)) if find_masks and defect_type != "good" else ()
        listing.entries.append(Entry(split, defect_type, f"{id_prefix}/{img.stem}", img, masks))


def check_type_name(listing: Listing, folder: Path) -> bool:
    try:
        check_name(folder.name, "defect type")
        return True
    except ValueError:
        # The name becomes a folder under the storage root and part of image ids; skip just this type.
        listing.reject(folder, v.BAD_NAME, repr(folder.name),
                       "rename the folder: 1-128 letters, digits, '.', '_' or '-', no '..'")
        return False


def reject_orphans(listing: Listing, mask_root: Path) -> None:
    """Mask files under ``mask_root`` that no entry uses are reported (usually a renamed or deleted image)."""
    if not mask_root.is_dir():
        return
    used = {m for e in listing.entries for m in e.masks}
    for p in sorted(mask_root.rglob("*")):
        if p.is_file() and not v.is_hidden(p) and p not in used:
            listing.reject(p, v.ORPHAN_MASK, "no image of this name",
                           "delete the mask or restore the image it belongs to")


def process(root: Path, category: str, layout: str, listing: Listing, rule: v.MaskRule,
            cache_dir: Path | None = None) -> IngestResult:
    rows: list[dict] = []
    rejects = list(listing.rejects)
    notes = list(listing.notes)
    seen: set[str] = set()
    with progress_bar(f"ingest {category}", total=len(listing.entries), unit="img") as bar:
        for e in listing.entries:
            bar.update(1)
            if e.image_id in seen:
                rejects.append((e.image, f"{v.DUPLICATE_ID}: {e.image_id}",
                                "two files share a name stem (e.g. 000.png and 000.jpg); keep one"))
                continue
            try:
                row, image_notes = _row(root, category, layout, e, rule, cache_dir)
            except v.Problem as p:
                rejects.append((p.path or e.image, p.reason, p.fix))
                continue
            seen.add(e.image_id)
            rows.append(row)
            notes += [(e.image, n) for n in image_notes]
            if not e.image.name.isascii() or " " in e.image.name:
                notes.append((e.image, "name with spaces or non-ASCII characters: kept (outputs are named by index)"))
    rows = _drop_size_outliers(root, rows, rejects)
    return IngestResult(_frame(rows, RAW_SCHEMA, ["category", "split", "defect_type", "image_id"]),
                        _frame([{"category": category, "path": _rel(root, p), "reason": r, "fix": f}
                                for p, r, f in rejects], REJECT_SCHEMA, ["path", "reason"]),
                        _frame([{"category": category, "path": _rel(root, p), "note": n} for p, n in notes],
                               NOTE_SCHEMA, ["path", "note"]))


def _drop_size_outliers(root: Path, rows: list[dict], rejects: list) -> list[dict]:
    if not rows:
        return rows
    pixels = np.array([r["width"] * r["height"] for r in rows], dtype=np.float64)
    median = float(np.median(pixels))
    typical = rows[int(np.argmin(np.abs(pixels - median)))]
    kept = []
    for row, n in zip(rows, pixels):
        if max(n / median, median / n) > SIZE_OUTLIER_FACTOR:
            rejects.append((root / row["image_path"], f"{v.SIZE_OUTLIER}: {row['width']}x{row['height']} among images "
                            f"of about {typical['width']}x{typical['height']}",
                            f"resize it (and its mask) to about {typical['width']}x{typical['height']} or move it "
                            f"to its own category"))
        else:
            kept.append(row)
    return kept


def _row(root: Path, category: str, layout: str, e: Entry, rule: v.MaskRule,
         cache_dir: Path | None) -> tuple[dict, tuple[str, ...]]:
    info = v.read_image(e.image)
    row = {"image_id": e.image_id, "category": category, "split": e.split, "defect_type": e.defect_type,
           "dataset_root": str(root), "layout": layout, "image_path": _rel(root, e.image), "mask_path": None,
           "width": info.width, "height": info.height, "sha256": info.sha256, "mask_area": 0.0, "mask_count": 0}
    if e.defect_type == "good":
        return row, info.notes
    if rule == "none":  # image-level labels (ops.ingest.image_level): defective, region unknown
        row["mask_area"] = float("nan")
        return row, info.notes
    if not e.masks:
        raise _at(v.Problem(v.MISSING_MASK, "defect image without a mask file",
                            "add its mask (see the layout in ops.ingest) or move the image to good/"), e.image)
    masks = []
    for m in e.masks:
        try:
            masks.append(v.read_mask(m, (info.width, info.height), rule))
        except v.Problem as p:
            raise _at(p, m) from None
    union = np.logical_or.reduce(masks)
    row["mask_area"] = float(union.mean())
    row["mask_count"] = len(masks)
    row["mask_path"] = _rel(root, e.masks[0]) if len(masks) == 1 else _write_union(root, category, e, union,
                                                                                      cache_dir)
    return row, info.notes


def _write_union(root: Path, category: str, e: Entry, union: np.ndarray, cache_dir: Path | None) -> str:
    if cache_dir is None:
        raise ValueError(f"{e.image}: this image has {len(e.masks)} mask files whose union must be written "
                         f"somewhere; dataset roots may be read-only, so pass cache_dir= (a writable local folder, "
                         f"e.g. <storage root>/cache) to ingest_category")
    # Keyed by the dataset root as well: two roots may hold a category of the same name.
    key = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    path = Path(cache_dir).expanduser().resolve() / "ingest_masks" / category / key / f"{e.image_id}.png"
    write_bytes_atomic(path, encode_png(union))
    return str(path)


def _at(problem: v.Problem, path: Path) -> v.Problem:
    problem.path = path  # the reject row names the offending file, which may be the mask rather than the image
    return problem


def _rel(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _frame(records: list[dict], schema: pa.Schema, order: list[str]) -> pd.DataFrame:
    df = pa.Table.from_pylist(records, schema=schema).to_pandas()
    return df.sort_values(order, kind="stable", ignore_index=True) if len(df) else df

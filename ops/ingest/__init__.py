"""Ingest: read a dataset root in any supported layout into a raw manifest (``RAW_SCHEMA``) plus rejects.

Layouts (auto-detected per category folder; each module's docstring has the full tree):

- ``mvtec`` (MVTec AD): ``<cat>/train/good``, ``<cat>/test/<type>``, ``<cat>/ground_truth/<type>/<stem>_mask.png``
- ``loco`` (MVTec LOCO AD): as mvtec plus ``<cat>/validation/good``, masks in
  ``ground_truth/<type>/<stem>/NNN.png`` (one file per defect region, unioned)
- ``mvtec-image-level``: the MVTec AD tree without ``ground_truth/`` (image-level labels only); defect rows have
  no mask, and only what needs none runs on them (``ops.image_level``)
- ``visa`` (VisA): ``<root>/split_csv/1cls.csv`` + ``<cat>/Data/Images``, ``<cat>/Data/Masks``
- ``folder`` (plain, for your own data)::

      <root>/<category>/good/*.png                        normal images (split "train")
      <root>/<category>/test_good/*.png                   optional normal images for evaluation (split "test")
      <root>/<category>/defects/<defect_type>/<stem>.png  defect images (split "test")
      <root>/<category>/masks/<defect_type>/<stem>.png    their masks: 0 = good, 255 = defect

Detection order: a root with ``split_csv/1cls.csv`` is VisA; otherwise each sub-folder is ``loco`` when it
has the MVTec folders and ``validation/`` or per-image mask folders, ``mvtec`` when it has
``train/good``, ``test`` and ``ground_truth``, ``mvtec-image-level`` when it has ``train/good`` and ``test`` but no
``ground_truth``, ``folder`` when it has ``good`` and ``defects``.
Sub-folders that match no layout are skipped with a warning (a typo should not pass unnoticed); a root
where none matches is an error.

Errors: structural problems raise (missing root or category: FileNotFoundError; unknown layout, unsafe
category name, wrong explicit layout, multi-mask images without ``cache_dir``: ValueError), each message
naming the path and the fix. Per-file problems (unreadable or truncated images, mask/image size mismatch,
non-binary or empty masks, defect images without a mask, empty folders, stray files, orphan masks) become
rows of ``rejects`` (``REJECT_SCHEMA``: category, path, reason, fix) and the file is left out of ``rows``;
files kept after a normalisation (alpha dropped, grayscale converted, odd names, skipped hidden entries) get a
row in ``notes`` (``NOTE_SCHEMA``; see ``ops.ingest.collect`` for the decision on each hostile input).

Every image and mask is decoded completely (truncated files are caught here, not in a training loop);
``sha256`` is of the image file bytes; ``mask_area`` is the defect fraction of the (unioned) mask.
Rows are sorted by (category, split, defect_type, image_id); rejects by (path, reason).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ops.ingest import folder, image_level, loco, mvtec, visa
from ops.ingest.collect import NOTE_SCHEMA, REJECT_SCHEMA, RAW_SCHEMA, IngestResult, process
from ops.samples import load_sample
from ops.storage import check_name

__all__ = ["discover_categories", "ingest_category", "IngestResult", "RAW_SCHEMA", "REJECT_SCHEMA", "NOTE_SCHEMA",
           "LAYOUTS",
           "load_sample"]

# Order matters: loco is a refinement of mvtec.
_FOLDER_LAYOUTS = {"loco": loco, "mvtec": mvtec, image_level.NAME: image_level, "folder": folder}
LAYOUTS = ("mvtec", "loco", image_level.NAME, "visa", "folder")
_HINT = ("expected one of: MVTec AD (<category>/train/good, test/, ground_truth/), MVTec LOCO (the same with "
         "ground_truth/<type>/<stem>/ folders), MVTec without ground_truth/ (image-level labels only), VisA (<root>/split_csv/1cls.csv) or the plain layout "
         "(<category>/good/, defects/<type>/, masks/<type>/) described in ops/ingest/__init__.py")


def _root(dataset_root: Any) -> Path:
    root = Path(dataset_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder; check the path "
                                f"(settings: dataset roots) or build the demo with `anomaly-forge demo`")
    return root.resolve()


def no_layout_message(cat_dir: Path) -> str:
    """What a category folder that matches no layout holds, and which layouts were tried (one line)."""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in cat_dir.iterdir() if not p.name.startswith("."))
    shown = ", ".join(entries[:12]) + (f", ... ({len(entries)} entries)" if len(entries) > 12 else "")
    return (f"{cat_dir} matches no dataset layout: it holds {shown or 'nothing'}; tried "
            f"{', '.join(_FOLDER_LAYOUTS)} ({_HINT})")


def _detect_folder(cat_dir: Path) -> str | None:
    return next((name for name, mod in _FOLDER_LAYOUTS.items() if mod.detect(cat_dir)), None)


def detect_layout(folder: Any) -> str | None:
    """"visa" for a VisA root, the layout of a category folder, or None."""
    folder = Path(folder)
    return "visa" if visa.detect(folder) else _detect_folder(folder)


def _mirror(dataset_root: str, category: str | None = None) -> Path:
    """A local copy of a remote dataset root (``ops.cache``: only new or changed objects are downloaded): of the
    category's folder alone when one is named and the root is not VisA (whose split CSV sits at the root)."""
    from ops.cache import join, local_tree, upath

    url = dataset_root.rstrip("/")
    try:
        if category is None or upath(join(url, visa.SPLIT_CSV.as_posix())).exists():
            return local_tree(url)
        return local_tree(join(url, category), name=category).parent
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset root {url}{f' has no category folder {category!r}' if category else ''} "
                                f"holds no objects; check the URL (settings: dataset roots) and the credentials' "
                                f"bucket") from None


def _with_root(result: IngestResult, local: Path, url: str) -> IngestResult:
    """Rows read from a mirror name the remote root they came from, so any machine can read them again."""
    rows = result.rows.copy()
    rows["dataset_root"] = [url if r == str(local) else r for r in rows["dataset_root"]]
    return IngestResult(rows, result.rejects, result.notes)


def discover_categories(dataset_root: Any) -> list[tuple[str, str]]:
    """(category, layout) for every category folder under ``dataset_root``, sorted by category."""
    from ops.cache import is_remote

    if is_remote(dataset_root):
        return discover_categories(_mirror(str(dataset_root)))
    root = _root(dataset_root)
    if visa.detect(root):
        return [(_safe(c, root / c), "visa") for c in visa.categories(root)]
    found, skipped = [], []
    hidden = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("."))
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        layout = _detect_folder(d)
        if layout is None:
            skipped.append(d.name)
        else:
            found.append((_safe(d.name, d), layout))
    if not found:
        own = _detect_folder(root)
        if own:
            raise ValueError(f"{root} is itself a category folder ({own} layout); pass its parent {root.parent} "
                             f"as the dataset root")
        raise ValueError(f"no category folder with a known layout under {root}; {_HINT}")
    if skipped:
        warnings.warn(f"{root}: skipped folders that match no dataset layout: {skipped}; {_HINT}", stacklevel=2)
    if hidden:
        warnings.warn(f"{root}: skipped hidden folders {hidden} (names starting with '.' are never categories)",
                      stacklevel=2)
    return found


def _safe(name: str, path: Path) -> str:
    try:
        return check_name(name, "category")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def ingest_category(dataset_root: Any, category: str, layout: str = "auto",
                    cache_dir: Any = None) -> IngestResult:
    """Read one category. ``cache_dir``: writable local folder for union masks (LOCO images with several
    mask files); needed only when such images exist. A remote root (s3://...) is read through a local mirror
    and recorded as its URL."""
    from ops.cache import is_remote

    check_name(category, "category")
    if is_remote(dataset_root):
        local = _mirror(str(dataset_root), category).resolve()
        return _with_root(ingest_category(local, category, layout, cache_dir), local, str(dataset_root).rstrip("/"))
    root = _root(dataset_root)
    if layout not in LAYOUTS + ("auto",):
        raise ValueError(f"unknown layout {layout!r}; use 'auto' or one of {LAYOUTS}")
    if layout in ("auto", "visa") and visa.detect(root):
        if category not in {r["object"] for r in visa.read_csv(root)}:
            raise ValueError(f"category {category!r} is not listed in {root / visa.SPLIT_CSV}; "
                             f"listed: {sorted({r['object'] for r in visa.read_csv(root)})}")
        return process(root, category, "visa", visa.list_entries(root, category), visa.MASK_RULE, cache_dir)
    if layout == "visa":
        raise ValueError(f"{root} has no {visa.SPLIT_CSV} and so is not a VisA root; {_HINT}")
    cat_dir = root / category
    if not cat_dir.is_dir():
        raise FileNotFoundError(f"category folder {cat_dir} does not exist; folders there: "
                                f"{sorted(p.name for p in root.iterdir() if p.is_dir())}")
    detected = _detect_folder(cat_dir)
    if detected is None:
        raise ValueError(no_layout_message(cat_dir))
    if layout not in ("auto", detected):
        raise ValueError(f"{cat_dir} does not look like the {layout!r} layout (it looks like {detected!r}); "
                         f"pass layout='auto' or fix the folder structure ({_HINT})")
    chosen = detected if layout == "auto" else layout
    mod = _FOLDER_LAYOUTS[chosen]
    return process(root, category, chosen, mod.list_entries(root, category), mod.MASK_RULE, cache_dir)

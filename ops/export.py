"""Synthetic data anywhere: one category x method partition written out as an MVTec AD folder tree.

``export_mvtec(storage, category, method, out_dir, mask="final") -> Path`` writes::

    <out_dir>/<category>/train/good/<name>.<ext>              the split's train_good normal images (as ingested)
    <out_dir>/<category>/test/good/<name>.<ext>               the split's test_good normal images
    <out_dir>/<category>/test/<defect_type>/<index>.png       every synthetic defect image of the partition
    <out_dir>/<category>/ground_truth/<defect_type>/<index>_mask.png   its mask, 0 / 255
    <out_dir>/<category>/anomaly_forge_export.json            provenance: each exported file -> its manifest row

so that anomalib's ``MVTecAD`` / ``Folder``, other MVTec tools and this project's own MVTec AD ingest read it as is.

Choices:
- Masks: ``final`` (default) = the refined final mask of ``refined_masks``, the one the detectors train on;
  ``method`` = the method's own mask (``synthetic_anomalies.mask_path``). Written as 0/255 PNG either way.
- Normal images keep their bytes and extension; their names are the raw ``image_id`` with ``/`` turned into ``_``
  (unique within a category, unlike bare stems). Synthetic files are named by their partition ``index``.
- The split's held-out REAL defects are not exported: the copy is synthetic data to train on, and real defects
  stay the user's evaluation set.
- Nothing half-written: the tree is built in a temporary sibling folder and renamed into place; an existing
  ``<out_dir>/<category>`` is replaced only with ``overwrite=True``. No timestamps anywhere: reruns give identical
  bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ops.cache import join
from ops.manifest import read_manifest
from ops.samples import dataset_file, encode_png, read_mask
from ops.storage import Storage, check_name

MASKS = ("final", "method")
PROVENANCE = "anomaly_forge_export.json"


def _manifest(storage: Storage, asset: str, key: str, hint: str) -> pd.DataFrame:
    path = storage.manifest_path(asset, key)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: materialize {asset} for partition {key!r} first ({hint})")
    return read_manifest(path)


def export_mvtec(storage: Storage, category: str, method: str, out_dir: Any, mask: str = "final",
                 overwrite: bool = False) -> Path:
    """Write the partition as an MVTec AD tree under ``out_dir``; returns ``<out_dir>/<category>``."""
    import io

    check_name(category, "category")
    check_name(method, "method")
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    key = f"{category}|{method}"
    materialize = f"anomaly-forge materialize --categories {category} --methods {method}"
    synthetic = _manifest(storage, "synthetic_anomalies", key, materialize)
    split = _manifest(storage, "few_shot_splits", category, materialize)
    if synthetic.empty:
        raise ValueError(f"synthetic_anomalies {key} has no rows; nothing to export")
    mask_col = "mask_path"
    if mask == "final":
        refined = _manifest(storage, "refined_masks", key, f"{materialize}, or export with --mask method")
        synthetic = synthetic.merge(refined[["index", "final_path"]], on="index", how="left", validate="one_to_one")
        if synthetic["final_path"].isna().any():
            raise ValueError(f"refined_masks {key} lacks rows for synthetic indices "
                             f"{synthetic.loc[synthetic['final_path'].isna(), 'index'].tolist()[:5]}; "
                             f"rematerialize refined_masks, or export with --mask method")
        mask_col = "final_path"
    out = Path(out_dir).expanduser().resolve()
    target = out / category
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; choose another --out or pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{category}.export-", dir=out))
    try:
        files: dict[str, dict[str, Any]] = {}
        for role, folder in (("train_good", "train/good"), ("test_good", "test/good")):
            for row in split[split["role"] == role].sort_values("image_id").itertuples(index=False):
                src = join(str(row.dataset_root), row.image_path)  # a path, or a URL on a remote dataset root
                rel = f"{folder}/{str(row.image_id).replace('/', '_')}{Path(row.image_path).suffix.lower()}"
                _write(tmp / rel, dataset_file(row.dataset_root, row.image_path).read_bytes())
                files[rel] = {"source": src, "image_id": row.image_id}
        for row in synthetic.sort_values("index").itertuples(index=False):
            stem = f"{int(row.index):05d}"
            rel = f"test/{row.defect_type}/{stem}.png"
            _write(tmp / rel, storage.read_bytes(row.image_path))
            binary = read_mask(io.BytesIO(storage.read_bytes(getattr(row, mask_col))))
            mask_rel = f"ground_truth/{row.defect_type}/{stem}_mask.png"
            _write(tmp / mask_rel, encode_png(np.asarray(binary, dtype=bool)))
            files[rel] = {"index": int(row.index), "seed": int(row.seed), "image_path": row.image_path,
                          "mask_path": getattr(row, mask_col), "mask": mask_rel, "normal_id": row.normal_id}
        meta = {"category": category, "method": method, "mask": mask, "storage_root": str(storage.root),
                "n_synthetic": len(synthetic), "files": files}
        _write(tmp / PROVENANCE, json.dumps(meta, indent=1, sort_keys=True).encode())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{category}.old-", dir=out))
            os.replace(target, old / category)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)

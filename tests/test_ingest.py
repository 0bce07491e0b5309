import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ops.ingest import RAW_SCHEMA, discover_categories, ingest_category
from ops.manifest import read_manifest, write_manifest
from ops.samples import load_sample, read_mask
from tests.fixtures import SHAPE, build_folder, build_loco, build_mvtec, build_visa, loco_union, rect_mask

H, W = SHAPE


def _row(rows: pd.DataFrame, image_id: str) -> dict:
    hit = rows[rows["image_id"] == image_id]
    assert len(hit) == 1, f"{image_id} not in {list(rows['image_id'])}"
    return hit.iloc[0].to_dict()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mvtec_every_column(tmp_path):
    root = build_mvtec(tmp_path)
    assert discover_categories(root) == [("widget", "mvtec")]
    res = ingest_category(root, "widget")
    assert res.rejects.empty
    rows = res.rows
    assert list(rows.columns) == RAW_SCHEMA.names and len(rows) == 3 + 2 + 3 + 2
    assert rows["image_id"].is_unique
    assert list(rows["image_id"]) == sorted(rows["image_id"], key=lambda i: (i.split("/")[0], i.split("/")[1], i))

    r = _row(rows, "test/hole/001")
    assert {k: r[k] for k in ("category", "split", "defect_type", "layout", "width", "height", "mask_count")} == {
        "category": "widget", "split": "test", "defect_type": "hole", "layout": "mvtec", "width": W, "height": H,
        "mask_count": 1}
    assert r["dataset_root"] == str(tmp_path.resolve())
    assert r["image_path"] == "widget/test/hole/001.png"
    assert r["mask_path"] == "widget/ground_truth/hole/001_mask.png"
    assert r["sha256"] == _sha(root / r["image_path"])
    assert r["mask_area"] == pytest.approx(rect_mask(1).mean())
    sample = load_sample(r)
    assert sample.image.shape == (H, W, 3) and np.array_equal(sample.mask, rect_mask(1))

    g = _row(rows, "train/good/002")
    assert (g["split"], g["defect_type"], g["mask_area"], g["mask_count"]) == ("train", "good", 0.0, 0)
    assert pd.isna(g["mask_path"]) and load_sample(g).mask is None
    assert _row(rows, "test/good/000")["split"] == "test"


def test_rows_round_trip_through_the_manifest_schema(tmp_path):
    rows = ingest_category(build_mvtec(tmp_path / "d"), "widget").rows
    write_manifest(tmp_path / "raw.parquet", rows, RAW_SCHEMA, "raw")
    back = read_manifest(tmp_path / "raw.parquet")
    assert str(back["width"].dtype) == "int32" and str(back["mask_count"].dtype) == "int32"
    pd.testing.assert_frame_equal(back, rows)


def test_loco_union_count_and_cache(tmp_path):
    root = build_loco(tmp_path / "data")
    cache = tmp_path / "cache"
    assert discover_categories(root) == [("juice", "loco")]
    res = ingest_category(root, "juice", cache_dir=cache)
    assert res.rejects.empty
    rows = res.rows
    assert set(rows["image_id"]) == {"train/good/000", "train/good/001", "validation/good/000", "test/good/000",
                                     "test/logical_anomalies/000", "test/logical_anomalies/001",
                                     "test/structural_anomalies/000"}
    assert _row(rows, "validation/good/000")["split"] == "train"

    two = _row(rows, "test/logical_anomalies/000")
    assert two["mask_count"] == 2 and two["layout"] == "loco"
    union_path = Path(two["mask_path"])
    assert union_path.is_absolute() and union_path.is_relative_to(cache.resolve())
    assert np.array_equal(load_sample(two).mask, loco_union(0, 2))
    assert two["mask_area"] == pytest.approx(loco_union(0, 2).mean())
    assert loco_union(0, 2).sum() > rect_mask(0).sum()  # the fixture's regions really differ

    one = _row(rows, "test/logical_anomalies/001")
    assert one["mask_count"] == 1 and one["mask_path"] == "juice/ground_truth/logical_anomalies/001/000.png"
    assert np.array_equal(load_sample(one).mask, rect_mask(10))

    three = _row(rows, "test/structural_anomalies/000")
    assert three["mask_count"] == 3 and np.array_equal(read_mask(three["mask_path"]), loco_union(0, 3))

    before = union_path.read_bytes()
    again = ingest_category(root, "juice", cache_dir=cache)
    pd.testing.assert_frame_equal(again.rows, rows)
    assert union_path.read_bytes() == before
    assert not list(cache.rglob("*.tmp"))


def test_loco_multi_mask_without_cache_dir_is_a_clear_error(tmp_path):
    root = build_loco(tmp_path)
    with pytest.raises(ValueError, match=r"logical_anomalies/000\.png.*cache_dir"):
        ingest_category(root, "juice")
    single = build_loco(tmp_path / "single", defects={"structural_anomalies": [1, 1]})
    assert len(ingest_category(single, "juice").rows) == 2 + 1 + 1 + 2


def test_loco_detected_by_mask_folders_without_validation(tmp_path):
    root = build_loco(tmp_path, n_validation=0)
    assert not (root / "juice" / "validation").exists()
    assert discover_categories(root) == [("juice", "loco")]


def test_visa_csv_split_and_label_masks(tmp_path):
    root = build_visa(tmp_path, categories=("candle", "pcb1"), n_train=3, n_test_good=2, n_anomaly=3)
    assert discover_categories(root) == [("candle", "visa"), ("pcb1", "visa")]
    rows = ingest_category(root, "pcb1").rows
    assert (rows["category"] == "pcb1").all() and (rows["layout"] == "visa").all()
    counts = rows.groupby(["split", "defect_type"]).size().to_dict()
    assert counts == {("train", "good"): 3, ("test", "good"): 2, ("test", "anomaly"): 3}
    a = _row(rows, "test/anomaly/001")
    assert a["image_path"] == "pcb1/Data/Images/Anomaly/001.JPG"
    assert a["mask_path"] == "pcb1/Data/Masks/Anomaly/001.png"
    assert a["mask_area"] == pytest.approx(rect_mask(1).mean()) and a["mask_count"] == 1
    assert np.array_equal(load_sample(a).mask, rect_mask(1))  # label value 2 counts as defect
    assert _row(rows, "test/good/0004")["image_path"] == "pcb1/Data/Images/Normal/0004.JPG"
    assert _row(rows, "train/good/0000")["sha256"] == _sha(root / "pcb1/Data/Images/Normal/0000.JPG")


def test_visa_lists_only_downloaded_categories(tmp_path):
    root = build_visa(tmp_path, categories=("candle", "pcb1"))
    for p in sorted((root / "pcb1").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (root / "pcb1").rmdir()
    assert discover_categories(root) == [("candle", "visa")]


def test_folder_layout(tmp_path):
    root = build_folder(tmp_path, defects={"dent": 3, "burr": 2})
    assert discover_categories(root) == [("part", "folder")]
    rows = ingest_category(root, "part").rows
    assert set(rows["image_id"]) == {"train/good/000", "train/good/001", "train/good/002", "test/good/000",
                                     "test/dent/000", "test/dent/001", "test/dent/002", "test/burr/000",
                                     "test/burr/001"}
    d = _row(rows, "test/dent/002")
    assert (d["split"], d["layout"], d["mask_path"]) == ("test", "folder", "part/masks/dent/002.png")
    assert d["mask_area"] == pytest.approx(rect_mask(2).mean())
    assert _row(rows, "test/good/000")["image_path"] == "part/test_good/000.png"


def test_mixed_root_and_explicit_layouts(tmp_path):
    build_mvtec(tmp_path, category="widget")
    build_folder(tmp_path, category="part")
    (tmp_path / "notes").mkdir()
    with pytest.warns(UserWarning, match="notes"):
        assert discover_categories(tmp_path) == [("part", "folder"), ("widget", "mvtec")]
    assert ingest_category(tmp_path, "widget", layout="mvtec").rows["layout"].eq("mvtec").all()
    with pytest.raises(ValueError, match=r"widget does not look like the 'folder' layout"):
        ingest_category(tmp_path, "widget", layout="folder")

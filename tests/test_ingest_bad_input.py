"""The bad-input corpus: each broken tree gives the right reject row or exception message."""
import csv
import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from ops.ingest import REJECT_SCHEMA, discover_categories, ingest_category
from ops.ingest import validate as v
from tests.fixtures import SHAPE, build_loco, build_mvtec, build_visa, image, rect_mask, write_png


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _non_binary(cat):
    m = rect_mask(1).astype(np.uint8) * 255
    m[0, 0] = 128
    return write_png(cat / "ground_truth" / "scratch" / "001_mask.png", m)


def _colour_mask(cat):
    m = np.zeros(SHAPE + (3,), np.uint8)
    m[rect_mask(1)] = (255, 0, 0)
    return write_png(cat / "ground_truth" / "scratch" / "001_mask.png", m)


def _small_mask(cat):
    return write_png(cat / "ground_truth" / "scratch" / "001_mask.png", np.ones((16, 16), bool))


def _empty_mask(cat):
    return write_png(cat / "ground_truth" / "scratch" / "001_mask.png", np.zeros(SHAPE, bool))


def _no_mask(cat):
    (cat / "ground_truth" / "scratch" / "001_mask.png").unlink()
    return cat / "test" / "scratch" / "001.png"


def _empty_folder(cat):
    (cat / "test" / "crack").mkdir()
    return cat / "test" / "crack"


def _truncated_image(cat):
    _truncate(cat / "test" / "scratch" / "001.png")
    return cat / "test" / "scratch" / "001.png"


def _garbage_image(cat):
    (cat / "train" / "good" / "001.png").write_bytes(b"not an image at all")
    return cat / "train" / "good" / "001.png"


def _sixteen_bit(cat):
    p = cat / "train" / "good" / "001.png"
    Image.fromarray((image(1)[..., 0].astype(np.uint16) * 256)).save(p)
    return p


def _orphan_mask(cat):
    return write_png(cat / "ground_truth" / "scratch" / "009_mask.png", rect_mask(0))


def _stray_file(cat):
    p = cat / "test" / "scratch" / "notes.txt"
    p.write_text("inspected by bob")
    return p


def _duplicate_stem(cat):
    p = cat / "train" / "good" / "001.tif"  # sorts after 001.png, so it is the one left out
    Image.fromarray(image(77)).save(p, format="TIFF")
    return p


def _bad_type_name(cat):
    p = cat / "test" / "bad type"
    write_png(p / "000.png", image(5))
    return p


def _defects_in_train(cat):
    p = cat / "train" / "scratch"
    write_png(p / "000.png", image(6))
    return p


# (break the tree, expected reason code, rows left of the 10): a bad image or mask costs exactly its image.
CORPUS = [
    (_truncated_image, v.UNREADABLE, 9), (_garbage_image, v.UNREADABLE, 9), (_sixteen_bit, v.BAD_MODE, 9),
    (_small_mask, v.SIZE_MISMATCH, 9), (_non_binary, v.NON_BINARY, 9), (_colour_mask, v.NON_BINARY, 9),
    (_empty_mask, v.EMPTY_MASK, 9), (_no_mask, v.MISSING_MASK, 9), (_empty_folder, v.EMPTY_FOLDER, 10),
    (_orphan_mask, v.ORPHAN_MASK, 10), (_stray_file, v.UNSUPPORTED, 10), (_duplicate_stem, v.DUPLICATE_ID, 10),
    (_bad_type_name, v.BAD_NAME, 10), (_defects_in_train, v.UNEXPECTED_FOLDER, 10),
]


@pytest.mark.parametrize("breaker,code,n_rows", CORPUS, ids=[b.__name__.strip("_") for b, _, _ in CORPUS])
def test_per_file_problem_becomes_one_reject(tmp_path, breaker, code, n_rows):
    root = build_mvtec(tmp_path)
    bad_path = breaker(root / "widget")
    res = ingest_category(root, "widget")
    assert list(res.rejects.columns) == REJECT_SCHEMA.names
    assert len(res.rejects) == 1, res.rejects.to_dict("records")
    rej = res.rejects.iloc[0]
    assert rej["reason"].startswith(code + ": ")
    assert rej["path"] == bad_path.relative_to(tmp_path).as_posix()
    assert rej["category"] == "widget" and len(rej["fix"]) > 10
    assert len(res.rows) == n_rows
    assert bad_path.relative_to(tmp_path).as_posix() not in set(res.rows["image_path"])


def test_jpeg_mask_is_non_binary(tmp_path):
    root = build_mvtec(tmp_path)
    cat = root / "widget"
    (cat / "ground_truth" / "scratch" / "001_mask.png").unlink()
    buf = io.BytesIO()
    Image.fromarray(rect_mask(1).astype(np.uint8) * 255).save(buf, format="JPEG", quality=70)
    (cat / "ground_truth" / "scratch" / "001.jpg").write_bytes(buf.getvalue())  # same-stem fallback
    rej = ingest_category(root, "widget").rejects
    assert list(rej["reason"].str.split(":").str[0]) == [v.NON_BINARY]
    assert rej.iloc[0]["path"] == "widget/ground_truth/scratch/001.jpg"


def test_truncation_is_caught_even_if_pil_was_told_to_tolerate_it(tmp_path, monkeypatch):
    root = build_mvtec(tmp_path)
    _truncate(root / "widget" / "train" / "good" / "000.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    rej = ingest_category(root, "widget").rejects
    assert rej["reason"].str.startswith(v.UNREADABLE).tolist() == [True]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


def test_loco_region_mask_problem_names_the_region_file(tmp_path):
    root = build_loco(tmp_path)
    region = root / "juice" / "ground_truth" / "logical_anomalies" / "000" / "001.png"
    write_png(region, np.ones((8, 8), bool))
    rej = ingest_category(root, "juice", cache_dir=tmp_path / "cache").rejects
    assert rej[["path", "reason"]].values.tolist() == [
        ["juice/ground_truth/logical_anomalies/000/001.png", f"{v.SIZE_MISMATCH}: mask is 8x8, image is 40x32"]]


def test_visa_csv_problems(tmp_path):
    root = build_visa(tmp_path, n_anomaly=2)
    path = root / "split_csv" / "1cls.csv"
    rows = list(csv.reader(path.open()))
    rows += [["candle", "test", "anomaly", "../outside.JPG", ""],
             ["candle", "test", "anomaly", "candle/Data/Images/Anomaly/404.JPG", "candle/Data/Masks/Anomaly/404.png"],
             ["candle", "val", "normal", "candle/Data/Images/Normal/0000.JPG", ""]]
    rows[-5][4] = ""  # the first anomaly loses its mask
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    res = ingest_category(root, "candle")
    got = sorted((r.path, r.reason.split(":")[0]) for r in res.rejects.itertuples())
    assert got == sorted([("candle/Data/Images/Anomaly/000.JPG", v.MISSING_MASK),
                          ("candle/Data/Images/Anomaly/404.JPG", v.MISSING_FILE),
                          ("split_csv/1cls.csv", v.OUTSIDE_ROOT), ("split_csv/1cls.csv", v.BAD_CSV_ROW)])
    bad_row = res.rejects[res.rejects["reason"].str.startswith(v.BAD_CSV_ROW)].iloc[0]
    assert "1cls.csv line 11: split='val'" in bad_row["reason"]
    assert len(res.rows) == 3 + 2 + 1


def test_visa_csv_without_header_columns(tmp_path):
    root = build_visa(tmp_path)
    (root / "split_csv" / "1cls.csv").write_text("name,path\ncandle,x.JPG\n")
    with pytest.raises(ValueError, match=r"1cls\.csv: missing column\(s\) \['object', 'split', 'label'"):
        ingest_category(root, "candle")


def test_structural_problems_raise_with_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        discover_categories(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest_category(tmp_path / "nope", "widget")

    odd = tmp_path / "odd"
    write_png(odd / "stuff" / "a.png", image(0))
    with pytest.raises(ValueError, match=f"no category folder with a known layout under {odd}; expected one of"):
        discover_categories(odd)
    with pytest.raises(ValueError, match=f"{odd / 'stuff'} matches no dataset layout"):
        ingest_category(odd, "stuff")

    root = build_mvtec(tmp_path / "data")
    with pytest.raises(ValueError, match="is itself a category folder.*pass its parent"):
        discover_categories(root / "widget")
    with pytest.raises(FileNotFoundError, match=r"gadget does not exist; folders there: \['widget'\]"):
        ingest_category(root, "gadget")
    with pytest.raises(ValueError, match="unknown layout 'coco'"):
        ingest_category(root, "widget", layout="coco")
    with pytest.raises(ValueError, match="not a VisA root"):
        ingest_category(root, "widget", layout="visa")


@pytest.mark.parametrize("name", ["../widget", "a/b", "x|y", ".hidden", "sp ace"])
def test_unsafe_category_names_are_refused(tmp_path, name):
    root = build_mvtec(tmp_path)
    with pytest.raises(ValueError, match="invalid category"):
        ingest_category(root, name)


def test_discover_refuses_an_unsafe_category_folder(tmp_path):
    build_mvtec(tmp_path, category="bad name")
    with pytest.raises(ValueError, match=f"{tmp_path / 'bad name'}: invalid category 'bad name'.*rename"):
        discover_categories(tmp_path)


@pytest.mark.parametrize("values,rule,code", [
    ((0, 255), "binary", None), ((0, 251), "binary", None), ((0, 1), "binary", None),
    ((100, 255), "binary", v.NON_BINARY), ((0, 128, 255), "binary", v.NON_BINARY),
    ((0, 1, 2), "labels", None), ((0, 0), "binary", v.EMPTY_MASK), ((0, 0), "labels", v.EMPTY_MASK)])
def test_mask_value_rules(tmp_path, values, rule, code):
    arr = np.full(SHAPE, values[0], np.uint8)
    for j, value in enumerate(values[1:], start=1):
        arr[4 * j:4 * j + 4] = value
    path = write_png(tmp_path / "m.png", arr)
    if code is None:
        assert np.array_equal(v.read_mask(path, (SHAPE[1], SHAPE[0]), rule), arr > 0)
    else:
        with pytest.raises(v.Problem, match=f"^{code}: "):
            v.read_mask(path, (SHAPE[1], SHAPE[0]), rule)

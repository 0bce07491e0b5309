"""A corpus of hostile dataset trees and storage failures: each case is decided (kept with a note, rejected with a
reason, or a clear error) and visible in the rejects / notes manifests; nothing half-written is left."""
import errno
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ops import atomic
from ops.ingest import discover_categories, ingest_category
from ops.ingest import validate as v
from tests.fixtures import SHAPE, build_mvtec, image, write_png


def _ingest(root):
    result = ingest_category(root, "widget")
    notes = dict(zip(result.notes["path"], result.notes["note"]))
    rejects = dict(zip(result.rejects["path"], result.rejects["reason"]))
    return result, notes, rejects


def test_alpha_and_grayscale_images_are_kept_with_a_note(tmp_path):
    root = build_mvtec(tmp_path, "widget")
    good = root / "widget" / "train" / "good"
    rgba = np.dstack([image(50), np.full(SHAPE, 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(good / "rgba.png")
    Image.fromarray(image(51)[..., 0], "L").save(good / "gray.png")
    result, notes, rejects = _ingest(root)
    assert not rejects
    assert "alpha channel dropped (100% of pixels not opaque)" in notes["widget/train/good/rgba.png"]
    assert "mode L converted to RGB" in notes["widget/train/good/gray.png"]
    assert {"train/good/rgba", "train/good/gray"} <= set(result.rows["image_id"])


def test_one_huge_image_among_small_ones_is_rejected_naming_the_usual_size(tmp_path):
    root = build_mvtec(tmp_path, "widget")
    Image.new("RGB", (1024, 1024), (90, 90, 90)).save(root / "widget" / "train" / "good" / "huge.png")
    result, _, rejects = _ingest(root)
    assert rejects["widget/train/good/huge.png"].startswith(f"{v.SIZE_OUTLIER}: 1024x1024 among images of about 40x32")
    assert "train/good/huge" not in set(result.rows["image_id"])


def test_odd_names_are_kept_and_hidden_entries_skipped_with_notes(tmp_path):
    root = build_mvtec(tmp_path, "widget")
    good = root / "widget" / "train" / "good"
    write_png(good / "with space.png", image(60))
    write_png(good / "größe.png", image(61))
    write_png(root / "widget" / "test" / "..%2Fescape" / "000.png", image(62))
    write_png(root / "widget" / "test" / ".hidden" / "000.png", image(63))
    write_png(good / ".DS_Store.png", image(64))
    (root / ".cache").mkdir()
    result, notes, rejects = _ingest(root)
    assert not rejects
    assert {"train/good/with space", "train/good/größe"} <= set(result.rows["image_id"])
    assert "spaces or non-ASCII" in notes["widget/train/good/with space.png"]
    assert "widget/train/good/größe.png" in notes
    assert notes["widget/test/..%2Fescape"] == notes["widget/test/.hidden"] == "hidden folder skipped"
    assert notes["widget/train/good/.DS_Store.png"] == "hidden file skipped"
    assert not any("escape" in i for i in result.rows["image_id"])
    with pytest.warns(UserWarning, match=r"skipped hidden folders \['.cache'\]"):
        discover_categories(root)


def test_decompression_bombs_are_rejected_before_decoding(tmp_path, monkeypatch):
    root = build_mvtec(tmp_path, "widget")
    scratch = root / "widget" / "test" / "scratch"
    Image.new("RGB", (64, 64)).save(scratch / "bomb.png")       # over 2x the limit: PIL's error
    Image.new("RGB", (48, 48)).save(scratch / "warning.png")    # between 1x and 2x: PIL only warns
    for name in ("bomb", "warning"):
        write_png(root / "widget" / "ground_truth" / "scratch" / f"{name}_mask.png", np.ones((2, 2), bool))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # the 40x32 images of the fixture stay under it
    result, _, rejects = _ingest(root)
    for name in ("bomb", "warning"):
        assert rejects[f"widget/test/scratch/{name}.png"].startswith(f"{v.BOMB}: Image size"), rejects
    assert len(result.rows) == 10


def test_unreadable_files_are_rejects_naming_the_file(tmp_path, monkeypatch):
    root = build_mvtec(tmp_path, "widget")
    locked = root / "widget" / "train" / "good" / "001.png"
    real = Path.read_bytes

    def read_bytes(self):  # tests run as root, where chmod 000 does not stop reading
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    result, _, rejects = _ingest(root)
    assert rejects["widget/train/good/001.png"] == f"{v.NO_ACCESS}: PermissionError: Permission denied"
    assert len(result.rows) == 9


def test_reject_reasons_name_the_file_not_a_memory_address(tmp_path):
    root = build_mvtec(tmp_path, "widget")
    (root / "widget" / "train" / "good" / "000.png").write_bytes(b"not a png at all")
    _, _, rejects = _ingest(root)
    reason = rejects["widget/train/good/000.png"]
    assert "000.png" in reason and "0x" not in reason and "BytesIO" not in reason


@pytest.mark.parametrize("code, where", [(errno.EROFS, "mkstemp"), (errno.EACCES, "mkstemp"),
                                         (errno.ENOSPC, "fsync")])
def test_read_only_or_full_storage_raises_naming_the_target_and_leaves_nothing_partial(tmp_path, monkeypatch,
                                                                                      code, where):
    target = tmp_path / "manifests" / "x.parquet"
    atomic.write_bytes_atomic(target, b"old")

    def fail(*_a, **_k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile if where == "mkstemp" else os, where, fail)
    with pytest.raises(OSError, match=f"writing {target}") as info:
        atomic.write_bytes_atomic(target, b"new")
    assert info.value.errno == code and info.value.filename == str(target)
    assert target.read_bytes() == b"old" and os.listdir(target.parent) == ["x.parquet"]


def test_ingest_asset_says_what_a_folder_without_a_layout_holds(tmp_path):
    import dagster as dg

    from assets.ingest import raw_defect_sets
    from resources.settings import ForgeSettings
    from resources.storage import ParquetIOManager, StorageResource

    root = build_mvtec(tmp_path / "data", "widget")
    write_png(root / "odd" / "pictures" / "a.png", image(0))
    store = str(tmp_path / "s")
    resources = {"settings": ForgeSettings(dataset_roots=[str(root)]), "storage": StorageResource(root=store),
                 "io_manager": ParquetIOManager(root=store)}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("category", ["odd"])
        with pytest.raises(ValueError, match=r"odd matches no dataset layout: it holds pictures/; tried loco, mvtec"):
            dg.materialize([raw_defect_sets], partition_key="odd", instance=instance, resources=resources)


def test_ingest_asset_writes_the_notes_manifest(tmp_path):
    import dagster as dg
    import pandas as pd

    from assets.ingest import NOTES, raw_defect_sets
    from ops.storage import Storage
    from resources.settings import ForgeSettings
    from resources.storage import ParquetIOManager, StorageResource

    root = build_mvtec(tmp_path / "data", "widget")
    write_png(root / "widget" / "train" / "good" / "a b.png", image(70))
    store = str(tmp_path / "s")
    resources = {"settings": ForgeSettings(dataset_roots=[str(root)]), "storage": StorageResource(root=store),
                 "io_manager": ParquetIOManager(root=store)}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("category", ["widget"])
        result = dg.materialize([raw_defect_sets], partition_key="widget", instance=instance, resources=resources)
    meta = result.asset_materializations_for_node("raw_defect_sets")[0].metadata
    assert meta["notes"].value == 1 and any("a b.png" in r.data["path"] for r in meta["notes_table"].records)
    notes = pd.read_parquet(Storage(tmp_path / "s").manifest_path(NOTES, "widget"))
    assert list(notes["path"]) == ["widget/train/good/a b.png"]


def test_an_image_level_only_dataset_gets_one_line_saying_what_runs(tmp_path, capsys, monkeypatch):
    import shutil

    from pipelines import cli

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    root = build_mvtec(tmp_path / "data", "widget")
    shutil.rmtree(root / "widget" / "ground_truth")
    assert cli.main(["add-category", "widget", "--root", str(root), "--methods", "cutpaste,perlin", "--no-run"]) == 0
    out = [line for line in capsys.readouterr().out.splitlines() if "image-level" in line]
    assert out == ["widget: image-level labels only (test/{hole,scratch}/ without ground_truth/): runs perlin, the "
                   "no-synthetic-data reference detector and image-level metrics; skips cutpaste (need defect masks) "
                   "and pixel metrics (no real masks)"]
    assert cli.main(["add-category", "widget", "--root", str(root), "--methods", "cutpaste", "--no-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--methods cutpaste: none of them runs on 'widget'" in err[0]
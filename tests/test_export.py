"""anomaly-forge export: a partition's synthetic data as an MVTec AD tree that the MVTec AD ingest reads back
with identical masks; nothing half-written, reruns byte-identical."""
import hashlib

import numpy as np
import pandas as pd
import pytest

from ops.generation import SYNTHETIC_SCHEMA, fit_adapter, synthesize_partition
from ops.ingest import discover_categories, ingest_category
from ops.manifest import write_manifest
from ops.masks.refine import REFINED_SCHEMA, refine_partition
from ops.samples import encode_png, read_mask
from ops.splits import SPLIT_SCHEMA
from ops.storage import Storage
from pipelines import cli

N = 6


@pytest.fixture(scope="module")
def partition(tmp_path_factory, demo_split):
    storage = Storage(tmp_path_factory.mktemp("export_storage"))
    write_manifest(storage.manifest_path("few_shot_splits", "brick"), demo_split, SPLIT_SCHEMA)
    adapters = fit_adapter(storage, "brick", "cutpaste", demo_split, None, {}, progress=lambda *a: None)
    synthetic = synthesize_partition(storage, "brick", "cutpaste", demo_split, adapters, None, n=N, seed=1, cfg={})
    write_manifest(storage.manifest_path("synthetic_anomalies", "brick|cutpaste"), synthetic, SYNTHETIC_SCHEMA)
    refined = refine_partition(storage, synthetic, {})
    # cutpaste's final mask is its own mask; give row 0 a different final mask so the --mask choice shows
    shifted = np.roll(read_mask(storage.path(refined.loc[0, "final_path"])), 3, axis=1)
    refined.loc[0, "final_path"] = storage.write_bytes("images/test/shifted_mask.png", encode_png(shifted))
    write_manifest(storage.manifest_path("refined_masks", "brick|cutpaste"), refined, REFINED_SCHEMA)
    return storage, synthetic, refined


def _tree(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mask", ["final", "method"])
def test_export_ingests_back_through_mvtec_with_identical_masks(partition, tmp_path, mask, demo_split):
    storage, synthetic, refined = partition
    out = tmp_path / "export"
    assert cli.main(["export", "--category", "brick", "--method", "cutpaste", "--out", str(out), "--mask", mask,
                     "--storage", str(storage.root)]) == 0
    assert discover_categories(out) == [("brick", "mvtec")]
    back = ingest_category(out, "brick")
    assert back.rejects.empty
    rows = back.rows
    defects = rows[rows["defect_type"] != "good"]
    assert len(defects) == N and sorted(set(defects["defect_type"])) == sorted(set(synthetic["defect_type"]))
    roles = demo_split["role"].value_counts()
    assert (rows["split"] == "train").sum() == roles["train_good"]
    assert ((rows["split"] == "test") & (rows["defect_type"] == "good")).sum() == roles["test_good"]
    source = synthetic.merge(refined[["index", "final_path"]], on="index")
    col = "final_path" if mask == "final" else "mask_path"
    for row in source.itertuples(index=False):
        got = defects[defects["image_path"] == f"brick/test/{row.defect_type}/{row.index:05d}.png"].iloc[0]
        assert np.array_equal(read_mask(out / got["mask_path"]), read_mask(storage.path(getattr(row, col))))
        assert (out / got["image_path"]).read_bytes() == storage.path(row.image_path).read_bytes()
    # the two mask choices differ for some rows here, so the comparison above tells them apart
    assert any(not np.array_equal(read_mask(storage.path(r.final_path)), read_mask(storage.path(r.mask_path)))
               for r in source.itertuples(index=False))


def test_export_refuses_to_overwrite_and_reruns_identically(partition, tmp_path):
    storage, _, _ = partition
    args = ["export", "--category", "brick", "--method", "cutpaste", "--out", str(tmp_path),
            "--storage", str(storage.root)]
    assert cli.main(args) == 0
    first = _tree(tmp_path / "brick")
    with pytest.raises(SystemExit, match="already exists"):
        cli.main(args)
    assert cli.main(args + ["--overwrite"]) == 0
    assert _tree(tmp_path / "brick") == first
    assert [p.name for p in tmp_path.iterdir()] == ["brick"]  # no temp folder left behind
    with pytest.raises(SystemExit, match="materialize synthetic_anomalies"):
        cli.main(["export", "--category", "brick", "--method", "perlin", "--out", str(tmp_path / "x"),
                  "--storage", str(storage.root)])

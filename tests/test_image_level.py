"""A category with image-level labels only (MVTec tree without ground_truth/): recognised as its own layout, one
line says what runs without masks, exactly that runs through the Dagster lineage, every skipped method and metric
group has its reason, and detector evaluation reports image-level metrics only (and says so)."""
import shutil

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from ops.image_level import MASK_FREE_TYPE, PIXEL_NOTE, is_image_level, summary_line
from ops.ingest import discover_categories, ingest_category
from ops.splits import make_split
from ops.storage import Storage
from tests.fixtures.layouts import build_mvtec

CHEAP = {"detection_options": {"detectors": ["segmenter", "patchcore"], "steps": {"segmenter": 4}, "val_every": 2,
                               "image_size": 64},
         "quality_options": {"ic_size": 32, "kid_subsets": 2, "kid_subset_size": 2, "is_splits": 1}}


def _tree(tmp_path):
    root = build_mvtec(tmp_path / "data", "widget", n_train=4, defects={"scratch": 3, "hole": 2})
    shutil.rmtree(root / "widget" / "ground_truth")
    return root


def test_the_layout_is_recognised_and_every_defect_is_held_out(tmp_path):
    root = _tree(tmp_path)
    assert discover_categories(root) == [("widget", "mvtec-image-level")]
    result = ingest_category(root, "widget")
    assert result.rejects.empty  # defects without masks are data here, not "missing mask" rejects
    defects = result.rows[result.rows["defect_type"] != "good"]
    assert len(defects) == 5 and defects["mask_path"].isna().all() and defects["mask_area"].isna().all()
    split = make_split(result.rows)
    assert is_image_level(split)
    assert set(split.loc[split["defect_type"] != "good", "role"]) == {"holdout"}
    line = summary_line("widget", ["hole", "scratch"], ["cutpaste", "perlin", "apo"])
    assert line.startswith("widget: image-level labels only (test/{hole,scratch}/ without ground_truth/): runs perlin")
    assert "skips cutpaste, apo (need defect masks)" in line and "\n" not in line


def test_only_mask_free_work_runs_through_the_lineage_with_reasons_for_the_rest(tmp_path):
    from pipelines.definitions import build_definitions
    from pipelines.demo import NOT_APPLICABLE, failures, run_lineage

    root = _tree(tmp_path)
    storage = Storage(tmp_path / "s")
    defs = build_definitions(storage_root=str(storage.root), dataset_roots=[str(root)], n_per_partition=4, **CHEAP)
    lines: list[str] = []
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("category", ["widget"])
        steps = run_lineage(defs, instance, ["widget"], ["cutpaste", "perlin"], echo=lines.append,
                            log_level="CRITICAL")
        split_meta = instance.get_latest_materialization_event(dg.AssetKey("few_shot_splits")).asset_materialization
    assert not failures(steps), [(s.job, s.partition, s.error) for s in failures(steps)]
    na = [s for s in steps if s.status == NOT_APPLICABLE]
    assert na and {s.partition for s in na} == {"widget|cutpaste"}
    assert all("cutpaste needs real defect masks" in s.error for s in na)
    assert sum("image-level labels only" in line for line in lines) == 1  # said once, in one line
    meta = split_meta.metadata
    assert "runs perlin" in meta["image_level"].value
    skipped = {r.data["skipped"]: r.data["reason"] for r in meta["skipped"].records}
    assert "method cutpaste" in skipped and any(k.startswith("pixel metrics") for k in skipped)

    synth = pd.read_parquet(storage.manifest_path("synthetic_anomalies", "widget|perlin"))
    assert len(synth) == 4 and set(synth["defect_type"]) == {MASK_FREE_TYPE}
    assert not storage.manifest_path("synthetic_anomalies", "widget|cutpaste").exists()
    evaluation = pd.read_parquet(storage.manifest_path("detector_evaluation", "widget|perlin"))
    assert set(evaluation["detector"]) == {"segmenter", "patchcore"}  # the no-synthetic-data reference included
    assert evaluation[["image_auroc", "image_ap", "image_f1max"]].notna().all().all()
    assert evaluation[["pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"]].isna().all().all()
    assert (evaluation["metric_note"] == PIXEL_NOTE).all() and (evaluation["n_test_defective"] == 5).all()
    summary = pd.read_parquet(storage.manifest_path("detector_summary", None))
    assert summary.loc[summary["category"] == "widget", "note"].str.contains("image-level labels only").all()


def test_a_method_that_needs_masks_is_refused_with_its_reason(tmp_path):
    from ops.generation import fit_adapter

    split = make_split(ingest_category(_tree(tmp_path), "widget").rows)
    with pytest.raises(ValueError, match=r"image-level labels only .*cutpaste needs real defect masks.*perlin"):
        fit_adapter(Storage(tmp_path / "s"), "widget", "cutpaste", split, None, None)

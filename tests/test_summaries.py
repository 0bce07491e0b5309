"""detector_summary and method_comparison: materialized by Dagster from the evaluation partitions, every row kept,
means / spreads / ranks right, and both in the summary stage job that the demo, the CLI and the sensor run."""
import json
import math

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from assets.detection import detector_summary, method_comparison
from assets.quality import quality_summary
from ops.detection.evaluate import METRIC_COLUMNS
from ops.detection.stage import EVALUATION_SCHEMA, REFERENCE_METHOD, row_label
from ops.detection.summary import MEAN, summarize_detectors
from ops.manifest import write_manifest
from ops.metrics.quality import ALL, QUALITY_SCHEMA
from ops.storage import Storage
from pipelines.definitions import collect_assets
from resources.backbone import DiffusionBackbone
from resources.settings import ForgeSettings
from resources.storage import ParquetIOManager, StorageResource

CATEGORIES = ["brick", "grass"]
METHODS = ["cutpaste", "perlin"]
# image_auroc of (category, method, detector); the reference (patchcore on normals) depends on the category only
SCORES = {("brick", "cutpaste", "segmenter"): 0.9, ("grass", "cutpaste", "segmenter"): 0.7,
          ("brick", "perlin", "segmenter"): 0.6, ("grass", "perlin", "segmenter"): 0.8,
          ("brick", "none", "patchcore"): 0.5, ("grass", "none", "patchcore"): 0.95}


def _evaluation(category, method):
    rows = []
    for det_method, detector in ((method, "segmenter"), (REFERENCE_METHOD, "patchcore")):
        score = SCORES[(category, det_method, detector)]
        rows.append({"category": category, "method": det_method, "detector": detector,
                     "row_label": row_label(det_method), "is_baseline": det_method in METHODS,
                     "trained_on": "normal_only" if det_method == REFERENCE_METHOD else "synthetic",
                     "weak_tau": None, "n_test_good": 8, "n_test_defective": 5,
                     **{m: score for m in METRIC_COLUMNS}, "pixel_ap": score / 2, "aupro_fpr_limit": 0.3,
                     "metric_resolution": "64x64", "metric_note": "", "backbone_source": "lite0" if detector == "patchcore" else "",
                     "val_score": 0.5, "train_seconds": 1.0, "eval_seconds": 0.1,
                     "checkpoint_path": f"detectors/{category}/{det_method}/{detector}/checkpoints/best.ckpt"})
    return pd.DataFrame(rows)


def _quality(category, method):
    row = {f.name: math.nan for f in QUALITY_SCHEMA if pd.api.types.is_float_dtype(f.type.to_pandas_dtype())}
    row.update(category=category, method=method, defect_type=ALL, n_generated=8, n_real=6, n_support=2,
               kid_subset_size=2, kid_subsets=5, is_splits=1, fid_effl0=10.0 + len(method), bg_ssim=0.9,
               mask_iou_mean=1.0, clusters_json="{}", notes="", params_json="{}", seconds=1.0,
               sources_json=json.dumps({"fid": "skipped: InceptionV3: weight file 'w.pth' not found (searched: x)",
                                        "fid_effl0": "efficientnet-lite0"}))
    return pd.DataFrame([row])


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    root = tmp_path_factory.mktemp("summaries")
    store = Storage(root)
    for c in CATEGORIES:
        for m in METHODS:
            write_manifest(store.manifest_path("detector_evaluation", f"{c}|{m}"), _evaluation(c, m), EVALUATION_SCHEMA)
            write_manifest(store.manifest_path("quality_metrics", f"{c}|{m}"), _quality(c, m), QUALITY_SCHEMA)
    resources = {"storage": StorageResource(root=str(root)), "io_manager": ParquetIOManager(root=str(root)),
                 "settings": ForgeSettings(dataset_roots=[str(root)]), "backbone": DiffusionBackbone(model="tiny")}
    assets, _ = collect_assets()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("category", CATEGORIES)
        result = dg.materialize(assets, selection=[quality_summary, detector_summary, method_comparison],
                                instance=instance, resources=resources)
    return store, result


def test_summary_holds_every_row_and_the_ranked_means(materialized):
    store, result = materialized
    assert result.success
    df = pd.read_parquet(store.path("manifests/detector_summary/all.parquet"))
    rows = df[df["category"] != MEAN]
    assert sorted(zip(rows["category"], rows["method"], rows["detector"])) == sorted(SCORES)  # reference once
    means = df[df["category"] == MEAN].set_index(["method", "detector"])
    for (method, detector) in {(m, d) for _, m, d in SCORES}:
        values = [v for (c, m, d), v in SCORES.items() if (m, d) == (method, detector)]
        assert means.loc[(method, detector), "image_auroc"] == pytest.approx(np.mean(values))
        assert means.loc[(method, detector), "image_auroc_std"] == pytest.approx(np.std(values, ddof=1))
        assert means.loc[(method, detector), "n_categories"] == 2
    # means: cutpaste 0.8, reference 0.725, perlin 0.7
    assert list(df[df["category"] == MEAN].sort_values("rank")["method"]) == ["cutpaste", "none", "perlin"]
    assert store.path("reports/detectors.md").exists() and store.path("previews/detector_summary.png").exists()
    meta = result.asset_materializations_for_node("detector_summary")[0].metadata
    assert meta["best"].value == "baseline: cutpaste / segmenter" and meta["rows"].value == len(SCORES)
    assert isinstance(meta["ranking"], dg.TableMetadataValue) and len(meta["ranking"].records) == 3


def test_method_comparison_joins_quality_onto_every_detector_row(materialized):
    store, _ = materialized
    summary = pd.read_parquet(store.path("manifests/detector_summary/all.parquet"))
    df = pd.read_parquet(store.path("manifests/method_comparison/all.parquet"))
    assert len(df) == len(summary)
    cut = df[(df["category"] == "brick") & (df["method"] == "cutpaste")].iloc[0]
    assert cut["fid_effl0"] == 18.0 and cut["image_auroc"] == 0.9 and math.isnan(cut["fid"])
    assert "fid: no w.pth" in cut["quality_note"]
    ref = df[(df["category"] == "brick") & (df["method"] == REFERENCE_METHOD)].iloc[0]
    assert math.isnan(ref["fid_effl0"]) and ref["quality_note"].startswith("no synthetic data")
    mean = df[(df["category"] == MEAN) & (df["method"] == "perlin")].iloc[0]
    assert mean["fid_effl0"] == 16.0 and mean["rank"] == 3


def test_undefined_metrics_and_single_categories_say_why():
    ev = _evaluation("brick", "cutpaste").assign(n_test_defective=0, **{m: math.nan for m in METRIC_COLUMNS})
    df = summarize_detectors(ev)
    assert set(df.loc[df["category"] == "brick", "note"]) == {"metrics undefined: no defective test image"}
    notes = df.loc[df["category"] == MEAN, "note"]
    assert all("spread needs >= 2 categories" in n and "image_auroc" in n for n in notes)
    with pytest.raises(ValueError, match="materialize detector_evaluation"):
        summarize_detectors(ev.iloc[:0])


def test_summaries_run_in_the_summary_stage_job():
    from pipelines.definitions import build_definitions
    from pipelines.jobs import SUMMARY_JOB, lineage_stages

    stages = {s.job_name: s for s in lineage_stages(list(build_definitions(storage_root="/tmp/x").assets))}
    keys = {k.to_user_string() for k in stages[SUMMARY_JOB].asset_keys}
    assert {"quality_summary", "detector_summary", "method_comparison"} <= keys

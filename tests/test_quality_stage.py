"""Quality stage: background preservation of a real cutpaste image, and the three assets materialized by Dagster."""
import json
import math

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch

from assets.generation import anomaly_adapters, synthetic_anomalies
from assets.ingest import few_shot_splits, raw_defect_sets
from assets.quality import CHECKS, quality_metrics, quality_summary, refined_masks
from ops.demo_data import build_demo_dataset
from ops.metrics.background import background_region, psnr_ssim
from ops.metrics.quality import ALL, QUALITY_SCHEMA, check_quality
from ops.storage import Storage
from resources.backbone import DiffusionBackbone
from resources.settings import ForgeSettings
from resources.storage import ParquetIOManager, StorageResource

torch.set_num_threads(1)
N = 8


@pytest.fixture(scope="module")
def grass(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("quality_data"), ["grass"], size=64)


def test_cutpaste_background_is_perfect_outside_its_blending_margin(grass):
    from ops.ingest import ingest_category
    from ops.methods.cutpaste import CutPaste, CutPasteConfig
    from ops.samples import load_sample
    from ops.splits import make_split
    from ops.types import Adapter, SynthesisJob

    demo_split = make_split(ingest_category(grass, "grass").rows)
    normal = load_sample(demo_split[demo_split["role"] == "train_good"].iloc[0])
    support = demo_split[demo_split["role"] == "support"].iloc[0]
    ref = load_sample(support)
    target = np.zeros(normal.image.shape[:2], bool)
    target[20:40, 18:44] = True
    job = SynthesisJob(index=0, seed=3, category="grass", defect_type=ref.defect_type, normal=normal,
                       target_mask=target, reference=ref)
    cfg = CutPasteConfig(margin=3)
    out = next(iter(CutPaste().synthesize(None, Adapter("cutpaste", "grass"), [job], cfg)))
    assert (out.image != normal.image).any()
    psnr, ssim = psnr_ssim(out.image, normal.image, background_region(target, out.mask, margin=3))
    assert psnr == 100.0 and ssim == pytest.approx(1.0, abs=1e-12)
    tight_psnr, tight_ssim = psnr_ssim(out.image, normal.image, background_region(target, out.mask, margin=0))
    assert tight_psnr < 60 and tight_ssim < 1.0  # the blending ring is seen when the margin is ignored


@pytest.fixture(scope="module")
def run(tmp_path_factory, grass):
    base = tmp_path_factory.mktemp("quality_stage")
    data = grass
    root = str(base / "storage")
    resources = {"storage": StorageResource(root=root), "io_manager": ParquetIOManager(root=root),
                 "settings": ForgeSettings(dataset_roots=[str(data)], n_per_partition=N,
                                           quality_options={"ic_size": 64, "kid_subsets": 20}),
                 "backbone": DiffusionBackbone(model="tiny")}
    everything = [raw_defect_sets, few_shot_splits, anomaly_adapters, synthetic_anomalies, refined_masks,
                  quality_metrics, quality_summary, *CHECKS]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("category", ["grass"])
        assert dg.materialize([raw_defect_sets, few_shot_splits], partition_key="grass", instance=instance,
                              resources=resources).success
        result = dg.materialize(everything, selection=[anomaly_adapters, synthetic_anomalies, refined_masks,
                                                       quality_metrics, *CHECKS],
                                partition_key="grass|cutpaste", instance=instance, resources=resources)
        summary = dg.materialize(everything, selection=[quality_summary], instance=instance, resources=resources)
    return Storage(root), result, summary


def test_assets_materialize_with_passing_checks_and_metadata(run):
    _, result, summary = run
    assert result.success and summary.success
    checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"refined_masks_valid": True, "quality_metrics_complete": True}
    meta = result.asset_materializations_for_node("quality_metrics")[0].metadata
    assert "data:image/png;base64," in meta["plot"].value and "| defect_type |" in meta["table"].value
    assert "vgg16-397923af.pth" in meta["skipped_metrics"].value


def test_refined_manifest_matches_cutpaste_masks(run):
    storage, _, _ = run
    ref = pd.read_parquet(storage.path("manifests/refined_masks/grass|cutpaste.parquet"))
    assert len(ref) == N and (ref["final_kind"] == "method").all() and (ref["final_iou"] == 1.0).all()
    for rel in ref["final_path"]:
        assert rel.startswith("images/refined_masks/grass/cutpaste/final/") and storage.path(rel).stat().st_size
    assert ref["diff_path"].notna().all() and ref["attention_path"].isna().all()


def test_quality_rows_backbones_and_values(run):
    storage, _, _ = run
    q = pd.read_parquet(storage.path("manifests/quality_metrics/grass|cutpaste.parquet"))
    assert list(q.columns) == QUALITY_SCHEMA.names and check_quality(q) == []
    types = sorted(set(q["defect_type"]) - {ALL})
    assert len(types) == 2 and (q["defect_type"] == ALL).sum() == 1
    pooled = q[q["defect_type"] == ALL].iloc[0]
    assert pooled["n_generated"] == N and pooled["n_generated"] == q[q["defect_type"] != ALL]["n_generated"].sum()
    sources = json.loads(pooled["sources_json"])
    for col in ("fid", "kid_mean", "is_mean", "ic_lpips_ad", "ic_lpips_dfm", "bg_lpips"):
        assert sources[col].startswith("skipped") and math.isnan(pooled[col])  # never a random backbone
    for col in ("fid_effl0", "kid_effl0_mean", "is_effl0_mean", "bg_effl0"):
        assert "efficientnet-lite0" in sources[col] and math.isfinite(pooled[col])
    assert pooled["bg_psnr"] == 100.0 and pooled["bg_ssim"] == pytest.approx(1.0)  # cutpaste keeps the background
    assert pooled["mask_iou_mean"] == 1.0
    for _, row in q[q["defect_type"] != ALL].iterrows():
        assert row["kid_subset_size"] == min(row["n_real"], row["n_generated"])
    ic = q[q["defect_type"] != ALL]["ic_effl0_ad"].dropna()
    assert pooled["ic_effl0_ad"] == pytest.approx(ic.mean())


def test_summary_has_the_pair_and_the_method_mean(run):
    storage, _, summary = run
    s = pd.read_parquet(storage.path("manifests/quality_summary/all.parquet"))
    assert s[["category", "method"]].values.tolist() == [["grass", "cutpaste"], ["__mean__", "cutpaste"]]
    assert storage.path("previews/quality_summary.png").stat().st_size > 0


def test_nearest_support_distance_exposes_copies_of_the_support_set():
    from ops.metrics.quality import _nearest_support, _nn_cols

    g = torch.Generator().manual_seed(0)
    support = torch.randn(3, 16, generator=g, dtype=torch.float64)
    holdout = torch.randn(4, 16, generator=g, dtype=torch.float64)
    real = [(None, "support", "hole")] * 3 + [(None, "holdout", "hole")] * 4
    real_feats = (torch.cat([support, holdout]), None)

    def ratio(fake):
        items = {i: {"defect_type": "hole"} for i in range(len(fake))}
        held = _nearest_support(items, list(items), real, (real_feats, (fake, None)))
        return _nn_cols(list(items.values()), [d for _, d in held])

    copies = ratio(support[[0, 1, 2, 0]] + 1e-6)
    fresh = ratio(torch.randn(4, 16, generator=g, dtype=torch.float64))
    assert copies["nn_support_effl0_min"] < 1e-6 and copies["nn_support_ratio"] < 0.01
    assert 0.5 < fresh["nn_support_ratio"] < 2.0  # independent draws sit as far from the support as real defects
    other = {0: {"defect_type": "scratch"}}  # no support of its own type: no distance, not a wrong one
    _nearest_support(other, [0], real, (real_feats, (support[:1], None)))
    assert math.isnan(other[0]["nn_support"])

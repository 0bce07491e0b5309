"""The demo lineage with ANOMALY_FORGE_STORAGE=s3://bucket/prefix against a real S3 server (SeaweedFS, loopback):
everything lands in the bucket, nothing in a local storage root, and every step starts from an EMPTY local cache,
so no step can depend on files another step left on this machine's disk."""
from __future__ import annotations

import json

import dagster as dg
import pandas as pd
import pytest

from ops.cache import upath
from pipelines import cli
from pipelines.definitions import build_definitions
from pipelines.jobs import lineage_stages

pytestmark = pytest.mark.slow

METHODS = ["perlin", "anogen"]  # a baseline, and a diffusion method with an adapter folder to upload and mirror
N = 2
CHEAP = {"detection_options": {"detectors": ["segmenter"], "steps": {"segmenter": 4}, "image_size": 64,
                               "weak_ablation": [], "mix_perlin": False},
         "quality_options": {"ic_size": 64, "kid_subsets": 2},
         "method_options": {"anogen": {"train_steps": 2, "steps": 2}}}


@pytest.fixture(scope="module")
def s3_demo(s3_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_s3")
    caches = []
    original = dg.JobDefinition.execute_in_process

    def fresh_cache_per_step(self, *args, **kwargs):
        caches.append(out / "caches" / str(len(caches)))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ANOMALY_FORGE_STORAGE_CACHE", str(caches[-1]))
            return original(self, *args, **kwargs)

    root = s3_server.url("demo-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANOMALY_FORGE_STORAGE", root)
        mp.setattr(dg.JobDefinition, "execute_in_process", fresh_cache_per_step)
        code = cli.main(["demo", "--out", str(out), "--categories", "brick", "--methods", ",".join(METHODS),
                         "--n", str(N), "--size", "64", "--settings", json.dumps(CHEAP)])
    return out, root, code, caches


def test_demo_on_s3_writes_every_manifest_and_image_to_the_bucket(s3_demo):
    out, root, code, caches = s3_demo
    assert code == 0, (out / "report.md").read_text()
    fs = upath(root).fs
    prefix = root.removeprefix("s3://")
    defs = build_definitions(storage_root=root, dataset_roots=[f"{root}/demo_data"])
    for stage in lineage_stages(list(defs.assets)):
        for asset in stage.asset_keys:
            for key in stage.partition_keys(["brick"], METHODS):
                assert fs.exists(f"{prefix}/manifests/{asset.to_user_string()}/{key or 'all'}.parquet"), \
                    f"{asset.to_user_string()} {key} has no manifest in the bucket"
    raw = pd.read_parquet(fs.open(f"{prefix}/manifests/raw_defect_sets/brick.parquet"))
    assert set(raw["dataset_root"]) == {f"{root}/demo_data"}  # ingest read the dataset from the bucket too
    for method in METHODS:
        synth = pd.read_parquet(fs.open(f"{prefix}/manifests/synthetic_anomalies/brick|{method}.parquet"))
        assert len(synth) == N
        for rel in list(synth["image_path"]) + list(synth["mask_path"]):
            assert fs.info(f"{prefix}/{rel}")["size"] > 0
    adapters = pd.read_parquet(fs.open(f"{prefix}/manifests/anomaly_adapters/brick|anogen.parquet"))
    assert fs.find(f"{prefix}/{adapters['adapter_path'].iloc[0]}")  # the fitted tokens were uploaded
    detectors = pd.read_parquet(fs.open(f"{prefix}/manifests/anomaly_detectors/brick|perlin.parquet"))
    assert all(fs.exists(f"{prefix}/{p}") for p in detectors["checkpoint_path"])
    evaluation = pd.read_parquet(fs.open(f"{prefix}/manifests/detector_evaluation/brick|perlin.parquet"))
    assert evaluation["image_auroc"].notna().all()
    assert "brick" in (out / "report.md").read_text()


def test_demo_on_s3_writes_nothing_to_a_local_storage_root(s3_demo):
    out, _, code, caches = s3_demo
    assert code == 0
    local = sorted(p.relative_to(out).parts[0] for p in out.iterdir())
    assert local == ["caches", "dagster_home", "report.md"]  # no storage/, no data/
    assert len(caches) == len(METHODS) + 2  # ingest, one generation run per method, the summaries: each on its own cache

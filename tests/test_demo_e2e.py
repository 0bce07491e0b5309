"""The demo end to end (one category, cutpaste + perlin, small n) and the CLI around it."""
import json
import os

import dagster as dg
import pandas as pd
import pytest

from pipelines import cli
from pipelines.definitions import build_definitions
from pipelines.demo import run_lineage
from pipelines.jobs import lineage_stages
from tests.fixtures.layouts import build_mvtec

pytestmark = pytest.mark.slow  # the whole lineage, about a minute of CPU with every stage present

METHODS = ["cutpaste", "perlin"]
N = 8
# the smallest settings of the later stages that still exercise them (the demo runs every stage there is)
CHEAP = {"detection_options": {"detectors": ["segmenter"], "steps": {"segmenter": 10}, "image_size": 64},
         "quality_options": {"ic_size": 64, "kid_subsets": 5}}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    before = os.environ.get("DAGSTER_HOME")
    code = cli.main(["demo", "--out", str(out), "--categories", "brick", "--methods", ",".join(METHODS),
                     "--n", str(N), "--size", "64", "--settings", json.dumps(CHEAP)])
    assert os.environ.get("DAGSTER_HOME") == before  # the demo does not leak its instance into the caller
    return out, code


def test_demo_succeeds_and_writes_manifests_and_images(demo):
    out, code = demo
    assert code == 0
    storage = out / "storage"
    defs = build_definitions(storage_root=str(storage), dataset_roots=[str(out / "data")])
    for stage in lineage_stages(list(defs.assets)):
        for asset in stage.asset_keys:
            for key in stage.partition_keys(["brick"], METHODS):
                path = storage / "manifests" / asset.to_user_string() / f"{key or 'all'}.parquet"
                assert path.exists(), f"{asset.to_user_string()} {key} has no manifest"
    for method in METHODS:
        synth = pd.read_parquet(storage / "manifests" / "synthetic_anomalies" / f"brick|{method}.parquet")
        assert len(synth) == N and set(synth["method"]) == {method}
        for rel in list(synth["image_path"]) + list(synth["mask_path"]):
            assert (storage / rel).stat().st_size > 0
        assert (storage / "previews" / "synthetic_anomalies" / "brick" / f"{method}.png").exists()
    report = (out / "report.md").read_text()
    assert all(f"| brick | {m} | {N} |" in report for m in METHODS)
    assert "tiny" in report and "dagster dev" in report
    keys = {k.to_user_string() for a in defs.assets for k in a.keys}
    if "quality_metrics" in keys:  # key metrics reach the summary once the stage exists
        assert "mask_iou_mean" in report
    if "detector_evaluation" in keys:
        assert "image_auroc" in report


def test_demo_runs_are_recorded_in_the_persistent_instance(demo):
    out, _ = demo
    with dg.DagsterInstance.from_config(str(out / "dagster_home")) as instance:
        runs = instance.get_runs()
        assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        assert {r.job_name for r in runs} >= {"ingest_job", "generation_job"}
        assert {r.tags.get("dagster/partition") for r in runs if r.job_name == "generation_job"} == {
            f"brick|{m}" for m in METHODS}
        assert instance.get_dynamic_partitions("category") == ["brick"]
        assert instance.get_materialized_partitions(dg.AssetKey("synthetic_anomalies")) == {
            f"brick|{m}" for m in METHODS}
        checks = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("few_shot_splits"), "no_holdout_in_support"), limit=5)
        assert checks and checks[0].status.value == "SUCCEEDED"


def test_a_failed_step_skips_its_downstream_and_fails_the_run(tmp_path):
    root = build_mvtec(tmp_path / "data", "widget", defects={"scratch": 3, "hole": 3})
    defs = build_definitions(storage_root=str(tmp_path / "storage"), dataset_roots=[str(root)], n_per_partition=2)
    lines = []
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("category", ["ghost"])
        steps = run_lineage(defs, instance, ["ghost"], ["cutpaste"], echo=lines.append, log_level="CRITICAL")
    assert steps[0].status == "failed" and "ghost" in steps[0].error
    assert all(s.status == "skipped" for s in steps[1:] if s.partition is not None)
    assert len(lines) == len(steps) and "failed" in lines[0]
    assert len(steps) == len(lineage_stages(list(defs.assets)))  # one partition per stage here


def test_add_category_adds_the_partition_to_the_instance(demo, tmp_path, monkeypatch, capsys):
    out, _ = demo
    root = build_mvtec(tmp_path / "more", "widget", defects={"scratch": 3, "hole": 3})
    monkeypatch.setenv("DAGSTER_HOME", str(out / "dagster_home"))
    assert cli.main(["add-category", "widget", "--root", str(root), "--no-run"]) == 0
    with dg.DagsterInstance.from_config(str(out / "dagster_home")) as instance:
        assert set(instance.get_dynamic_partitions("category")) == {"brick", "widget"}
    capsys.readouterr()
    assert cli.main(["add-category", "nope", "--root", str(root), "--no-run"]) == 2
    assert "no category folder 'nope'" in capsys.readouterr().err
    monkeypatch.delenv("DAGSTER_HOME")
    assert cli.main(["add-category", "widget", "--root", str(root), "--no-run"]) == 2
    assert "DAGSTER_HOME" in capsys.readouterr().err


def test_list_methods_prints_the_registry(capsys):
    assert cli.main(["list-methods"]) == 0
    printed = capsys.readouterr().out.split("\n")
    assert {line.split()[0] for line in printed if line.strip()} >= set(METHODS)

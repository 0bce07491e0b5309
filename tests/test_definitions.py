"""The code location loads, its jobs cover the lineage in order, heavy assets ask for a GPU, no torch at load."""
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from assets.partitions import GPU_POOL, GPU_TAGS, category_method_partitions, category_partitions
from pipelines.definitions import collect_assets
from pipelines.jobs import (CATEGORY_KIND, CATEGORY_METHOD_KIND, GENERATION_JOB, INGEST_JOB, SUMMARY_JOB,
                            UNPARTITIONED_KIND, lineage_stages)

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"anomaly_adapters", "synthetic_anomalies", "anomaly_detectors"}
SPINE = {"raw_defect_sets", "few_shot_splits", "anomaly_adapters", "synthetic_anomalies"}


@pytest.fixture(scope="module")
def defs():
    from pipelines.definitions import defs

    return defs


def test_definitions_validate_and_every_job_resolves(defs):
    dg.Definitions.validate_loadable(defs)
    jobs = {j.name for j in defs.get_repository_def().get_all_jobs()}
    assert {INGEST_JOB, GENERATION_JOB} <= jobs
    keys = {k.to_user_string() for a in defs.assets for k in a.keys}
    assert SPINE <= keys
    checks = {k.name for c in defs.asset_checks for k in c.check_keys}
    assert {"reject_fraction", "no_holdout_in_support"} <= checks
    assert defs.get_repository_def().has_sensor_def("new_category_sensor")
    assert defs.get_repository_def().has_schedule_def("regeneration_schedule")


def test_every_asset_of_every_module_is_in_exactly_one_stage_job(defs):
    stages = lineage_stages(list(defs.assets))
    staged = [k for s in stages for k in s.asset_keys]
    assert sorted(staged) == sorted(k for a in defs.assets for k in a.keys) and len(set(staged)) == len(staged)
    order = {k: i for i, s in enumerate(stages) for k in s.asset_keys}
    for a in defs.assets:
        for dep in a.dependency_keys:
            assert order[dep] <= order[a.key], f"{a.key} runs before its input {dep}"
    repo = defs.get_repository_def()
    for s in stages:
        job = repo.get_job(s.job_name)
        assert set(job.asset_layer.executable_asset_keys) == set(s.asset_keys)
        assert job.partitions_def == {CATEGORY_KIND: category_partitions,
                                      CATEGORY_METHOD_KIND: category_method_partitions,
                                      UNPARTITIONED_KIND: None}[s.kind]
    # the ingest job also runs the blocking checks of its assets
    ingest_checks = {k.name for k in repo.get_job(INGEST_JOB).asset_layer.asset_graph.asset_check_keys}
    assert {"reject_fraction", "no_holdout_in_support"} <= ingest_checks


def test_heavy_assets_carry_the_gpu_pool_and_the_k8s_gpu_request(defs):
    by_name = {a.key.to_user_string(): a for a in defs.assets}
    heavy = HEAVY & set(by_name)
    assert {"anomaly_adapters", "synthetic_anomalies"} <= heavy
    for name in heavy:
        op = by_name[name].op
        assert op.pool == GPU_POOL, name
        assert json.loads(op.tags["dagster-k8s/config"]) == GPU_TAGS["dagster-k8s/config"], name
    assert by_name["raw_defect_sets"].op.pool is None  # ingest must not wait for a GPU slot


def test_stages_follow_the_graph_not_a_fixed_list():
    @dg.asset(partitions_def=category_partitions)
    def a():
        return 1

    @dg.asset(partitions_def=category_method_partitions,
              ins={"a": dg.AssetIn(partition_mapping=dg.MultiToSingleDimensionPartitionMapping(
                  partition_dimension_name="category"))})
    def b(a):
        return a

    @dg.asset(partitions_def=category_partitions,
              ins={"b": dg.AssetIn(partition_mapping=dg.MultiToSingleDimensionPartitionMapping(
                  partition_dimension_name="category"))})
    def c(b):
        return b

    @dg.asset
    def d(c):
        return c

    @dg.asset(partitions_def=category_partitions)
    def e():
        return 2

    stages = lineage_stages([d, c, b, a, e])
    assert [(s.job_name, sorted(k.to_user_string() for k in s.asset_keys)) for s in stages] == [
        (INGEST_JOB, ["a", "e"]), (GENERATION_JOB, ["b"]), (f"{INGEST_JOB}_2", ["c"]), (SUMMARY_JOB, ["d"])]
    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["x"]))
    def daily():
        return 3

    with pytest.raises(ValueError, match="partitions"):
        lineage_stages([daily])


def test_missing_asset_modules_are_skipped_but_broken_ones_fail(tmp_path, monkeypatch):
    (tmp_path / "broken_forge_assets.py").write_text("import a_package_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assets, checks = collect_assets(["assets.ingest", "assets.not_written_yet"])
    assert {a.key.to_user_string() for a in assets} == {"raw_defect_sets", "few_shot_splits"} and len(checks) == 2
    with pytest.raises(ModuleNotFoundError, match="a_package_that_does_not_exist"):
        collect_assets(["assets.ingest", "broken_forge_assets"])


def test_loading_the_code_location_imports_no_torch():
    code = ("import sys, pipelines.definitions as d; d.defs.get_repository_def(); "
            "bad = sorted(m for m in ('torch', 'diffusers', 'anomalib', 'lightning') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]


def test_workspace_yaml_loads_with_the_dagster_cli(tmp_path):
    env = dict(os.environ, DAGSTER_HOME=str(tmp_path), ANOMALY_FORGE_HOME=str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    res = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and "anomaly_forge" in res.stderr + res.stdout, res.stderr[-3000:]


def test_backbone_is_loaded_only_for_methods_that_need_it():
    from assets.generation import _backbone_for
    from ops.methods.registry import available_methods, get_method
    from resources.backbone import DiffusionBackbone

    missing = DiffusionBackbone(model="/nonexistent/stable-diffusion")  # constructing it loads nothing
    for name in available_methods():
        if get_method(name).needs_backbone:
            with pytest.raises(FileNotFoundError, match="/nonexistent/stable-diffusion"):
                _backbone_for(name, missing)
        else:
            assert _backbone_for(name, missing) is None

"""A new category folder → one asset backfill → every asset of its lineage, through the real daemons.

The instance is a real (temporary, SQLite) Dagster instance; the sensor tick and the backfill iterations are the
daemons' own functions (``dagster._daemon.sensor.execute_sensor_iteration``,
``dagster._daemon.backfill.execute_backfill_iteration``) over an in-process workspace, with runs launched
synchronously so the test needs no daemon process.
"""
import json
import logging
from pathlib import Path

import dagster as dg
import pytest

from ops.demo_data import build_demo_dataset
from tests.fixtures.layouts import build_mvtec
from pipelines import cli
from pipelines.backfill import CATEGORY_TAG, lineage_partitions
from pipelines.sensors import READY_MARKER, SENSOR


METHODS = ["cutpaste", "perlin"]
LOCATION = Path(__file__).parent / "fixtures" / "backfill_location.py"
CHEAP = {"detection_options": {"detectors": ["segmenter"], "steps": {"segmenter": 5}, "image_size": 64},
         "quality_options": {"ic_size": 64, "kid_subsets": 5}}


def daemon_workspace(instance):
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget

    origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(
        python_file=str(LOCATION), attribute="defs", working_directory=str(LOCATION.parents[2])),
        location_name="anomaly_forge")
    return create_test_daemon_workspace_context(InProcessWorkspaceLoadTarget(origin), instance)


@pytest.fixture
def env(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("ANOMALY_FORGE_DATASETS", str(data))
    monkeypatch.setenv("ANOMALY_FORGE_STORAGE", str(tmp_path / "storage"))
    monkeypatch.setenv("ANOMALY_FORGE_N", "4")
    monkeypatch.setenv("ANOMALY_FORGE_METHODS", ",".join(METHODS))
    monkeypatch.setenv("ANOMALY_FORGE_TEST_SETTINGS", json.dumps(CHEAP))
    monkeypatch.setenv("ANOMALY_FORGE_EXECUTOR", "in_process")
    return data


@pytest.mark.slow  # the whole lineage of one category (cutpaste + perlin, n=4): a minute or two
def test_a_new_category_folder_becomes_one_backfill_of_its_whole_lineage(env, tmp_path):
    from dagster._core.execution.backfill import BulkActionStatus
    from dagster._daemon.backfill import execute_backfill_iteration
    from dagster._daemon.sensor import execute_sensor_iteration

    log = logging.getLogger("test_backfill")
    with dg.instance_for_test(synchronous_run_coordinator=True, synchronous_run_launcher=True) as instance, \
            daemon_workspace(instance) as workspace:
        repo = next(iter(workspace.create_request_context().get_code_location_entries().values())) \
            .code_location.get_repository("__repository__")
        instance.start_sensor(repo.get_sensor(SENSOR))
        build_demo_dataset(env, categories=["brick"], size=64)
        (env / "brick" / READY_MARKER).write_text("")  # copy finished: the first tick may act

        list(execute_sensor_iteration(workspace, log, None, None))
        assert instance.get_dynamic_partitions("category") == ["brick"]
        backfills = instance.get_backfills()
        assert len(backfills) == 1 and backfills[0].tags[CATEGORY_TAG] == "brick"
        backfill_id = backfills[0].backfill_id

        for _ in range(10):  # each iteration launches (and here runs) what the previous ones made ready
            list(execute_backfill_iteration(workspace, log))
            if instance.get_backfill(backfill_id).status != BulkActionStatus.REQUESTED:
                break
        backfill = instance.get_backfill(backfill_id)
        assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS, backfill.status

        wanted = lineage_partitions(repo.asset_graph, ["brick"], METHODS)
        assert {k.partition_key for k in wanted if k.asset_key == dg.AssetKey("synthetic_anomalies")} == {
            f"brick|{m}" for m in METHODS}
        for key in wanted:
            if key.partition_key is None:
                assert instance.get_latest_materialization_event(key.asset_key), key
            else:
                assert key.partition_key in instance.get_materialized_partitions(key.asset_key), key
        runs = instance.get_runs()
        assert runs and all(r.tags.get("dagster/backfill") == backfill_id for r in runs)
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        assert (tmp_path / "storage" / "manifests" / "quality_summary" / "all.parquet").exists()

        # nothing changed: the next tick launches nothing and says so
        list(execute_sensor_iteration(workspace, log, None, None))
        assert len(instance.get_backfills()) == 1


def test_add_category_submits_one_backfill_for_the_daemon(tmp_path, monkeypatch, capsys):
    root = build_mvtec(tmp_path / "data", "widget", defects={"scratch": 3})
    monkeypatch.setenv("ANOMALY_FORGE_DATASETS", str(root))
    monkeypatch.setenv("ANOMALY_FORGE_STORAGE", str(tmp_path / "storage"))
    monkeypatch.setenv("ANOMALY_FORGE_METHODS", "cutpaste")
    with dg.instance_for_test() as instance:  # sets DAGSTER_HOME for the CLI
        assert cli.main(["add-category", "widget", "--root", str(root), "--methods", "perlin"]) == 0
        [backfill] = instance.get_backfills()
        assert backfill.tags[CATEGORY_TAG] == "widget" and instance.get_dynamic_partitions("category") == ["widget"]
        target = backfill.asset_backfill_data.target_subset
        assert list(target.get_partitions_subset(dg.AssetKey("synthetic_anomalies")).get_partition_keys()) == [
            "widget|perlin"]
        assert list(target.get_partitions_subset(dg.AssetKey("few_shot_splits")).get_partition_keys()) == ["widget"]
        assert dg.AssetKey("quality_summary") in target.non_partitioned_asset_keys
        assert not instance.get_runs()  # the daemon runs it, not the CLI
        assert backfill.backfill_id in capsys.readouterr().out
        assert cli.main(["add-category", "widget", "--root", str(root)]) == 0  # settings' methods by default
        newest = max(instance.get_backfills(), key=lambda b: b.backfill_timestamp)
        assert list(newest.asset_backfill_data.target_subset.get_partitions_subset(
            dg.AssetKey("synthetic_anomalies")).get_partition_keys()) == ["widget|cutpaste"]

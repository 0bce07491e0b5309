"""New-category sensor (partitions, staged backfill, cursor) and the regeneration schedule."""
import datetime as dt
import json

import dagster as dg
import pytest

from assets.partitions import category_method_partitions, method_partitions
from ops.methods.registry import available_methods
from pipelines.definitions import build_definitions
from pipelines.jobs import GENERATION_JOB, INGEST_JOB, build_jobs, lineage_stages
from pipelines.schedules import CRON_ENV, DEFAULT_CRON, build_regeneration_schedule
from tests.fixtures.layouts import build_mvtec

DEFECTS = {"scratch": 3, "hole": 3}


@pytest.fixture
def setup(tmp_path):
    root = build_mvtec(tmp_path / "data", "widget", defects=DEFECTS)
    defs = build_definitions(storage_root=str(tmp_path / "storage"), dataset_roots=[str(root)], n_per_partition=2)
    with dg.instance_for_test() as instance:
        yield root, defs, instance


def _tick(defs, instance, cursor):
    """One evaluation as the daemon's code server does it: top-level resources, requests resolved against jobs."""
    repo = defs.get_repository_def()
    sensor = repo.get_sensor_def("new_category_sensor")
    resources = {k: v for k, v in repo.get_top_level_resources().items() if k in sensor.required_resource_keys}
    with dg.build_sensor_context(instance_ref=instance.get_ref(), cursor=cursor, repository_def=repo,
                                 resources=resources) as ctx:
        result = sensor.evaluate_tick(ctx)
    for request in result.dynamic_partitions_requests or []:  # what the sensor daemon does with them
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def _report(instance, asset, partition):
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset, partition=partition))


def test_sensor_adds_new_categories_and_backfills_stage_by_stage(setup, tmp_path):
    root, defs, instance = setup
    instance.add_dynamic_partitions("category", ["known"])  # an existing partition is not re-ingested
    build_mvtec(root, "known", defects=DEFECTS)

    first = _tick(defs, instance, None)
    assert [(r.partitions_def_name, list(r.partition_keys)) for r in first.dynamic_partitions_requests] == [
        ("category", ["widget"])]
    assert [(r.job_name, r.partition_key) for r in first.run_requests] == [(INGEST_JOB, "widget")]
    assert set(instance.get_dynamic_partitions("category")) == {"known", "widget"}

    # the ingest request is a valid run of the real job
    run = defs.resolve_job_def(INGEST_JOB).execute_in_process(partition_key=first.run_requests[0].partition_key,
                                                              instance=instance)
    assert run.success
    assert (tmp_path / "storage" / "manifests" / "few_shot_splits" / "widget.parquet").exists()

    second = _tick(defs, instance, first.cursor)
    stages = lineage_stages(list(defs.assets))
    assert stages[1].job_name == GENERATION_JOB
    expected = {str(dg.MultiPartitionKey({"category": "widget", "method": m})) for m in available_methods()}
    assert {(r.job_name, str(r.partition_key)) for r in second.run_requests} == {(GENERATION_JOB, k) for k in expected}
    assert not second.dynamic_partitions_requests

    third = _tick(defs, instance, second.cursor)  # nothing new, generation not materialized yet
    assert not third.run_requests and not third.dynamic_partitions_requests
    assert third.cursor == second.cursor


def test_sensor_waits_for_the_previous_stage_and_picks_up_later_folders(setup):
    root, defs, instance = setup
    first = _tick(defs, instance, None)
    again = _tick(defs, instance, first.cursor)
    assert not again.run_requests and not again.dynamic_partitions_requests

    _report(instance, "raw_defect_sets", "widget")  # only half of the ingest stage: still waiting
    assert not _tick(defs, instance, again.cursor).run_requests
    _report(instance, "few_shot_splits", "widget")
    gen = _tick(defs, instance, again.cursor)
    assert len(gen.run_requests) == len(available_methods())
    assert all(r.run_key.startswith(GENERATION_JOB) for r in gen.run_requests)

    build_mvtec(root, "gadget", defects=DEFECTS)
    later = _tick(defs, instance, gen.cursor)
    assert [list(r.partition_keys) for r in later.dynamic_partitions_requests] == [["gadget"]]
    assert [(r.job_name, r.partition_key) for r in later.run_requests] == [(INGEST_JOB, "gadget")]
    assert json.loads(later.cursor)["seen"] == ["gadget", "widget"]


def test_sensor_skips_an_unreadable_root_with_the_reason(tmp_path):
    defs = build_definitions(storage_root=str(tmp_path / "s"), dataset_roots=[str(tmp_path / "nowhere")])
    with dg.instance_for_test() as instance:
        result = _tick(defs, instance, None)
    assert not result.run_requests and "nowhere" in result.skip_message


def test_schedule_requests_every_method_for_ingested_categories(setup):
    _, defs, instance = setup
    instance.add_dynamic_partitions("category", ["widget", "pending"])
    repo = defs.get_repository_def()
    schedule = repo.get_schedule_def("regeneration_schedule")
    when = dt.datetime(2026, 1, 4, 3, 0, tzinfo=dt.timezone.utc)

    def tick():
        return schedule.evaluate_tick(dg.build_schedule_context(
            instance_ref=instance.get_ref(), scheduled_execution_time=when, repository_def=repo))

    skip = tick()
    assert not skip.run_requests and "few_shot_splits" in skip.skip_message

    _report(instance, "few_shot_splits", "widget")
    data = tick()
    keys = {str(r.partition_key) for r in data.run_requests}
    assert keys == {f"widget|{m}" for m in available_methods()}
    with dg.partition_loading_context(dynamic_partitions_store=instance):
        valid = set(category_method_partitions.get_partition_keys())
    assert keys <= valid
    assert len({r.run_key for r in data.run_requests}) == len(keys)
    assert all(r.tags["dagster/partition"] in keys for r in data.run_requests)  # resolved against the job


def test_schedule_cron_comes_from_the_environment(monkeypatch, tmp_path):
    defs = build_definitions(storage_root=str(tmp_path), dataset_roots=[str(tmp_path)])
    generation = next(j for j in build_jobs(lineage_stages(list(defs.assets))) if j.name == GENERATION_JOB)
    monkeypatch.delenv(CRON_ENV, raising=False)
    assert build_regeneration_schedule(generation).cron_schedule == DEFAULT_CRON
    monkeypatch.setenv(CRON_ENV, "15 2 * * 1")
    assert build_regeneration_schedule(generation, methods=method_partitions.get_partition_keys()).cron_schedule == \
        "15 2 * * 1"
    monkeypatch.setenv(CRON_ENV, "weekly")
    with pytest.raises(ValueError, match=CRON_ENV):
        build_regeneration_schedule(generation)

"""New-category sensor (stable folders, one asset backfill, listing hash, skip reasons) and the regeneration schedule."""
import datetime as dt
import json
import shutil

import dagster as dg
import pytest

from assets.partitions import SEED_TAG, category_method_partitions
from ops.methods.registry import available_methods
from pipelines.definitions import build_definitions
from pipelines.jobs import GENERATION_JOB, INGEST_JOB, build_jobs, lineage_stages
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.definitions.events import AssetKeyPartitionKey

from pipelines.backfill import CATEGORY_TAG, LISTING_TAG, submit_backfill
from pipelines.sensors import READY_MARKER
from pipelines.schedules import CRON_ENV, DEFAULT_CRON, build_regeneration_schedule, round_seed
from resources.settings import ForgeSettings
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


def _backfills(result):
    return [r for r in result.run_requests if r.requires_backfill_daemon()]


def _partitions(request):
    return {(k.asset_key.to_user_string(), k.partition_key) for k in request.asset_graph_subset.iterate_asset_partitions()}


def test_sensor_waits_for_a_stable_folder_then_requests_one_backfill(setup):
    root, defs, instance = setup
    instance.add_dynamic_partitions("category", ["known"])  # an existing partition is not re-ingested
    build_mvtec(root, "known", defects=DEFECTS)

    first = _tick(defs, instance, None)  # widget seen for the first time: it may still be copying
    assert not first.run_requests and not first.dynamic_partitions_requests
    assert "widget" in first.skip_message and "unchanged" in first.skip_message
    assert "known" not in first.skip_message

    second = _tick(defs, instance, first.cursor)
    assert [(r.partitions_def_name, list(r.partition_keys)) for r in second.dynamic_partitions_requests] == [
        ("category", ["widget"])]
    [request] = second.run_requests
    assert request.requires_backfill_daemon() and request.tags[CATEGORY_TAG] == "widget"
    methods = available_methods()
    wanted = {("raw_defect_sets", "widget"), ("few_shot_splits", "widget"), ("quality_summary", None)} | {
        (a, f"widget|{m}") for a in ("anomaly_adapters", "synthetic_anomalies", "quality_metrics") for m in methods}
    assert wanted <= _partitions(request)
    assert not any(p and p.startswith("known") for _, p in _partitions(request))

    third = _tick(defs, instance, second.cursor)  # nothing changed: no second backfill
    assert not third.run_requests and not third.dynamic_partitions_requests


def test_sensor_methods_come_from_settings(tmp_path):
    root = build_mvtec(tmp_path / "data", "widget", defects=DEFECTS)
    (root / "widget" / READY_MARKER).write_text("")  # the copier says it is done: no waiting tick
    defs = build_definitions(storage_root=str(tmp_path / "s"), dataset_roots=[str(root)], methods=["perlin"])
    with dg.instance_for_test() as instance:
        [request] = _tick(defs, instance, None).run_requests
    assert {p for a, p in _partitions(request) if a == "synthetic_anomalies"} == {"widget|perlin"}


def test_sensor_reingests_a_changed_folder_and_does_not_readd_a_deleted_partition(setup):
    root, defs, instance = setup
    (root / "widget" / READY_MARKER).write_text("")
    cursor = _tick(defs, instance, None).cursor
    assert instance.get_dynamic_partitions("category") == ["widget"]
    (root / "widget" / READY_MARKER).unlink()
    quiet = _tick(defs, instance, cursor)  # the marker is not part of the listing
    assert not quiet.run_requests and "widget" not in quiet.skip_message

    extra = root / "widget" / "train" / "good" / "099.png"  # the copy was not finished after all
    shutil.copy(next((root / "widget" / "train" / "good").glob("*.png")), extra)
    waiting = _tick(defs, instance, cursor)
    assert not waiting.run_requests and "widget: changed folder" in waiting.skip_message
    again = _tick(defs, instance, waiting.cursor)
    [request] = again.run_requests
    assert request.requires_backfill_daemon() and not again.dynamic_partitions_requests
    assert request.tags[LISTING_TAG] == json.loads(again.cursor)["categories"]["widget"]["backfilled"]

    instance.delete_dynamic_partition("category", "widget")
    extra.unlink()
    for _ in range(2):
        gone = _tick(defs, instance, again.cursor)
        again = gone
    assert not gone.run_requests and not gone.dynamic_partitions_requests
    assert "widget: its partition was deleted" in gone.skip_message


def test_sensor_names_a_running_or_failed_backfill_in_its_skip_reason(setup):
    from dagster._core.execution.backfill import BulkActionStatus

    root, defs, instance = setup
    (root / "widget" / READY_MARKER).write_text("")
    cursor = _tick(defs, instance, None).cursor
    graph = defs.get_repository_def().asset_graph
    backfill_id = submit_backfill(instance, graph, "widget", ["perlin"], "test")
    running = _tick(defs, instance, cursor)
    assert f"widget: backfill {backfill_id} REQUESTED, 0/" in running.skip_message

    backfill = instance.get_backfill(backfill_id)
    failed = AssetGraphSubset.from_asset_partition_set(
        {AssetKeyPartitionKey(dg.AssetKey("synthetic_anomalies"), "widget|perlin")}, graph)
    data = backfill.asset_backfill_data._replace(failed_and_downstream_subset=failed)
    instance.update_backfill(backfill.with_asset_backfill_data(data, dynamic_partitions_store=instance,
                                                               asset_graph=graph)
                             .with_status(BulkActionStatus.COMPLETED_FAILED))
    stalled = _tick(defs, instance, cursor)
    assert "COMPLETED_FAILED" in stalled.skip_message and "synthetic_anomalies[widget|perlin]" in stalled.skip_message
    assert "Backfills page" in stalled.skip_message


def test_sensor_skips_an_unreadable_root_with_the_reason(tmp_path):
    defs = build_definitions(storage_root=str(tmp_path / "s"), dataset_roots=[str(tmp_path / "nowhere")])
    with dg.instance_for_test() as instance:
        result = _tick(defs, instance, None)
    assert not result.run_requests and "nowhere" in result.skip_message


WHEN = dt.datetime(2026, 1, 4, 3, 0, tzinfo=dt.timezone.utc)


def _schedule_tick(defs, instance, schedule=None, when=WHEN):
    repo = defs.get_repository_def()
    schedule = schedule or repo.get_schedule_def("regeneration_schedule")
    resources = {k: v for k, v in repo.get_top_level_resources().items() if k in schedule.required_resource_keys}
    with dg.build_schedule_context(instance_ref=instance.get_ref(), scheduled_execution_time=when,
                                   repository_def=repo, resources=resources) as ctx:
        return schedule.evaluate_tick(ctx)


def test_schedule_requests_every_missing_partition_of_ingested_categories(setup):
    _, defs, instance = setup
    instance.add_dynamic_partitions("category", ["widget", "pending"])

    skip = _schedule_tick(defs, instance)
    assert not skip.run_requests and "few_shot_splits" in skip.skip_message

    _report(instance, "few_shot_splits", "widget")
    data = _schedule_tick(defs, instance)
    keys = {str(r.partition_key) for r in data.run_requests}
    assert keys == {f"widget|{m}" for m in available_methods()}
    with dg.partition_loading_context(dynamic_partitions_store=instance):
        valid = set(category_method_partitions.get_partition_keys())
    assert keys <= valid
    assert len({r.run_key for r in data.run_requests}) == len(keys)
    assert all(r.tags["dagster/partition"] in keys for r in data.run_requests)  # resolved against the job
    assert all(r.job_name in (None, GENERATION_JOB) for r in data.run_requests)


CHEAP_STAGE = [dg.AssetKey("anomaly_adapters"), dg.AssetKey("synthetic_anomalies")]


def _cheap_schedule(defs):
    """The regeneration schedule over the two cheap assets of the generation stage (the rest trains detectors)."""
    job = next(j for j in build_jobs(lineage_stages(list(defs.assets))) if j.name == GENERATION_JOB)
    return build_regeneration_schedule(job, CHEAP_STAGE)


def _materialize(defs, instance, key, assets=None):
    job = INGEST_JOB if assets is None else GENERATION_JOB
    result = defs.resolve_job_def(job).execute_in_process(partition_key=key, instance=instance,
                                                          asset_selection=assets)
    assert result.success


def test_schedule_regenerates_only_what_code_settings_or_data_made_stale(tmp_path):
    root = build_mvtec(tmp_path / "data", "widget", defects=DEFECTS)

    def make(**overrides):
        settings = {"n_per_partition": 2, "methods": ["cutpaste", "perlin"], **overrides}
        return build_definitions(storage_root=str(tmp_path / "storage"), dataset_roots=[str(root)], **settings)

    defs = make()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("category", ["widget"])
        _materialize(defs, instance, "widget")
        _materialize(defs, instance, "widget|perlin", CHEAP_STAGE)
        first = _schedule_tick(defs, instance, _cheap_schedule(defs))
        assert [str(r.partition_key) for r in first.run_requests] == ["widget|cutpaste"]  # perlin is fresh

        _materialize(defs, instance, "widget|cutpaste", CHEAP_STAGE)
        fresh = _schedule_tick(defs, instance, _cheap_schedule(defs))
        assert not fresh.run_requests and "nothing stale" in fresh.skip_message

        _materialize(defs, instance, "widget")  # re-ingest of unchanged files: same data version
        assert not _schedule_tick(defs, instance, _cheap_schedule(defs)).run_requests

        changed = make(n_per_partition=3)  # a setting synthesis reads: its code version changes
        stale = _schedule_tick(changed, instance, _cheap_schedule(changed))
        assert {str(r.partition_key) for r in stale.run_requests} == {"widget|cutpaste", "widget|perlin"}
        other = make(detection_options={"image_size": 64})  # a setting only the detectors read
        assert not _schedule_tick(other, instance, _cheap_schedule(other)).run_requests

        image = next((root / "widget" / "train" / "good").glob("*.png"))
        shutil.copy(next((root / "widget" / "test" / "scratch").glob("*.png")), image)  # new content
        _materialize(defs, instance, "widget")
        data = _schedule_tick(defs, instance, _cheap_schedule(defs))
        assert {str(r.partition_key) for r in data.run_requests} == {"widget|cutpaste", "widget|perlin"}

        rounds = make(regen_seed="per_round")
        seeded = _schedule_tick(rounds, instance, _cheap_schedule(rounds))
        assert {r.tags[SEED_TAG] for r in seeded.run_requests} == {str(round_seed(0, WHEN))} == {"20260104"}
    with pytest.raises(ValueError, match="regen_seed"):
        ForgeSettings(dataset_roots=["x"], regen_seed="sometimes").check()


def test_summaries_wait_for_the_round_by_automation_condition(tmp_path):
    defs = build_definitions(storage_root=str(tmp_path), dataset_roots=[str(tmp_path)])
    repo = defs.get_repository_def()
    summary = repo.asset_graph.get(dg.AssetKey("quality_summary"))
    assert summary.automation_condition is not None and summary.automation_condition.label == "after the round"
    sensor = repo.get_sensor_def("summary_automation_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert dg.AssetKey("quality_summary") in sensor.asset_selection.resolve(repo.asset_graph)
    assert dg.AssetKey("synthetic_anomalies") not in sensor.asset_selection.resolve(repo.asset_graph)


def test_schedule_cron_comes_from_the_environment(monkeypatch, tmp_path):
    defs = build_definitions(storage_root=str(tmp_path), dataset_roots=[str(tmp_path)])
    generation = next(j for j in build_jobs(lineage_stages(list(defs.assets))) if j.name == GENERATION_JOB)
    monkeypatch.delenv(CRON_ENV, raising=False)
    assert build_regeneration_schedule(generation).cron_schedule == DEFAULT_CRON
    monkeypatch.setenv(CRON_ENV, "15 2 * * 1")
    assert build_regeneration_schedule(generation).cron_schedule == "15 2 * * 1"
    monkeypatch.setenv(CRON_ENV, "weekly")
    with pytest.raises(ValueError, match=CRON_ENV):
        build_regeneration_schedule(generation)

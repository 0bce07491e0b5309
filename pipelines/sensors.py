"""The new-category sensor: a new folder under a dataset root becomes a partition and its lineage is backfilled.

Choices:
- New = discovered by ``ops.ingest.discover_categories`` (through ``assets.ingest.find_categories``), not yet a
  ``category`` partition, and not seen before by this sensor (the cursor): a partition an operator deleted is not
  re-added behind their back, and a tick with no new folders does nothing.
- A run has one partition key, so the lineage is backfilled stage by stage (``pipelines.jobs.lineage_stages``):
  the tick that adds the partition requests the ingest run; a later tick requests the next stage (one run per
  category x method for generation) once every asset of the previous stage is materialized for that category.
  The cursor keeps, per category, the next stage to request. A failed or blocked stage (e.g. a failing blocking
  check) therefore stops its category's backfill until someone re-materializes it.
- Unpartitioned stages (summaries) get one run per category that reaches them and count as done once requested.
- Run keys name the stage and partition, so even a lost cursor cannot launch a stage twice for the same partition.
- A dataset root that cannot be read (missing, empty, unsafe folder names) is logged and skipped, and a tick
  with nothing to do then reports it as the skip reason: the default root of a fresh deployment
  (``demo_out/data``) may not exist yet, and one bad root must not stop the others from being watched.
"""
import json
from typing import Sequence

import dagster as dg

from assets.ingest import find_categories
from assets.partitions import CATEGORY, category_partitions, method_partitions
from pipelines.jobs import UNPARTITIONED_KIND, Stage
from resources.settings import ForgeSettings


def stage_complete(instance: dg.DagsterInstance, stage: Stage, category: str, methods: Sequence[str]) -> bool:
    if stage.kind == UNPARTITIONED_KIND:
        return True
    wanted = set(stage.partition_keys([category], methods))
    return all(wanted <= instance.get_materialized_partitions(key) for key in stage.asset_keys)


def advance(instance: dg.DagsterInstance, stages: Sequence[Stage], pending: dict[str, int],
            methods: Sequence[str]) -> list[dg.RunRequest]:
    """Run requests for every category whose previous stage is complete; updates ``pending`` in place."""
    requests = []
    for category in sorted(pending):
        i = pending[category]
        if i > 0 and not stage_complete(instance, stages[i - 1], category, methods):
            continue
        stage = stages[i]
        for key in stage.partition_keys([category], methods):
            requests.append(dg.RunRequest(job_name=stage.job_name, partition_key=key,
                                          run_key=f"{stage.job_name}:{key or category}",
                                          tags={"anomaly_forge/trigger": "new_category_sensor",
                                                "anomaly_forge/category": category}))
        pending[category] = i + 1
        if pending[category] >= len(stages):
            del pending[category]
    return requests


def build_new_category_sensor(stages: Sequence[Stage], jobs: Sequence, methods: Sequence[str] | None = None,
                              minimum_interval_seconds: int = 60) -> dg.SensorDefinition:
    methods = list(methods or method_partitions.get_partition_keys())

    @dg.sensor(name="new_category_sensor", jobs=list(jobs), minimum_interval_seconds=minimum_interval_seconds,
               description="Adds a category partition for each new folder under the dataset roots and backfills "
                           "its lineage stage by stage")
    def new_category_sensor(context: dg.SensorEvaluationContext, settings: ForgeSettings):
        state = json.loads(context.cursor) if context.cursor else {"seen": [], "pending": {}}
        seen, pending = set(state["seen"]), dict(state["pending"])
        problems: list[str] = []
        found = find_categories(settings.dataset_roots, problems)
        for problem in problems:
            context.log.warning(problem)
        existing = set(context.instance.get_dynamic_partitions(CATEGORY))
        new = sorted(c for c in found if c not in existing and c not in seen)
        pending.update({c: 0 for c in new})
        requests = advance(context.instance, stages, pending, methods)
        cursor = json.dumps({"seen": sorted(seen | set(found)), "pending": pending}, sort_keys=True)
        if new:
            context.log.info(f"new categories: {new}")
        if not requests and problems:
            return dg.SensorResult(skip_reason="; ".join(problems), cursor=cursor)
        return dg.SensorResult(run_requests=requests, cursor=cursor,
                               dynamic_partitions_requests=[category_partitions.build_add_request(new)] if new else [])

    return new_category_sensor

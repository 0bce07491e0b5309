"""The regeneration schedule: re-run the generation stage for every category x method partition.

Choices:
- Cron from ``ANOMALY_FORGE_REGEN_CRON`` (read when the definitions load; default weekly, Sunday 03:00 UTC),
  stopped by default like every Dagster schedule, so a fresh deployment does not start GPU work on its own.
- Only categories whose ``few_shot_splits`` partition is materialized get runs: for the others the run could only
  fail loading its input; they are reported in the skip message / tick log instead.
- One run per category x method (each a separate GPU job), keyed by partition and scheduled time so a retried
  tick does not launch duplicates.
"""
import os
from typing import Any, Sequence

import dagster as dg

from assets.partitions import CATEGORY, METHOD, method_partitions

CRON_ENV = "ANOMALY_FORGE_REGEN_CRON"
DEFAULT_CRON = "0 3 * * 0"
SPLITS = dg.AssetKey("few_shot_splits")


def ingested_categories(instance: dg.DagsterInstance) -> tuple[list[str], list[str]]:
    """(categories with a materialized split, categories still waiting for ingest)."""
    done = instance.get_materialized_partitions(SPLITS)
    cats = list(instance.get_dynamic_partitions(CATEGORY))
    return [c for c in cats if c in done], [c for c in cats if c not in done]


def build_regeneration_schedule(job: Any, methods: Sequence[str] | None = None) -> dg.ScheduleDefinition:
    """The schedule launching ``job`` (the category x method generation stage) for every ingested partition."""
    methods = list(methods or method_partitions.get_partition_keys())
    cron = os.environ.get(CRON_ENV, DEFAULT_CRON).strip()

    def regeneration_schedule(context: dg.ScheduleEvaluationContext):
        ready, waiting = ingested_categories(context.instance)
        if not ready:
            return dg.SkipReason(f"no ingested category yet (waiting for few_shot_splits: {waiting or 'none'})")
        if waiting:
            context.log.info(f"not regenerating categories without few_shot_splits: {waiting}")
        stamp = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
        return [dg.RunRequest(run_key=f"{c}|{m}@{stamp}", partition_key=dg.MultiPartitionKey({CATEGORY: c, METHOD: m}),
                              tags={"anomaly_forge/trigger": "regeneration_schedule"})
                for c in ready for m in methods]

    description = f"Regenerate every ingested category x method partition ({CRON_ENV} sets the cron)"
    try:
        return dg.schedule(cron_schedule=cron, job=job, name="regeneration_schedule",
                           description=description)(regeneration_schedule)
    except dg.DagsterInvalidDefinitionError as e:
        raise ValueError(f"{CRON_ENV}={cron!r} is not a valid cron string; use five fields, e.g. {DEFAULT_CRON!r} "
                         f"(weekly, Sunday 03:00 UTC)") from e

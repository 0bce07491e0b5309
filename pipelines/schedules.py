"""The regeneration schedule: re-materialize what is stale, and only that; the summaries follow by automation.

Choices:
- Cron from ``ANOMALY_FORGE_REGEN_CRON`` (read when the definitions load; default weekly, Sunday 03:00 UTC),
  stopped by default like every Dagster schedule, so a fresh deployment does not start GPU work on its own.
- Purpose: a round regenerates a category x method partition when Dagster says it is MISSING or STALE (its code
  version changed: code, settings or backbone, see ``pipelines.versions``; or an input's data version changed:
  a re-ingested category with different images). Same code, data and settings: nothing to do, no GPU time spent,
  and the tick's skip reason says so. Staleness is Dagster's own (``CachingStaleStatusResolver``), per partition,
  over every asset of the generation stage (adapters → synthesis → masks → quality → detectors), so the UI shows
  the same "stale" badges the schedule acts on.
- ``ForgeSettings.regen_seed = "per_round"`` instead regenerates every partition each round with a fresh seed (the
  base seed plus the round's date as YYYYMMDD, recorded in the run tag ``anomaly_forge/seed`` and in every row):
  new samples from the same model, for users who want a growing pool rather than a reproduction.
- Only categories whose ``few_shot_splits`` partition is materialized get runs: for the others the run could only
  fail loading its input; they are reported in the skip message / tick log instead.
- One run per category x method partition of the generation stage job (a schedule launches runs, not backfills;
  the stage holds every category x method asset, so each run takes its partition from adapters to evaluation).
  Run keys name the partition and the scheduled time, so a retried tick does not launch duplicates.
- Summaries (the unpartitioned assets) are not requested here: a summary run started while the round is still
  writing would read half of it. They carry an AutomationCondition (``summary_condition``): materialize after any
  dependency updated, once no dependency is in progress; ``summary_automation_sensor`` (running by default)
  evaluates it, so a round's summaries are refreshed once, last.
- The methods are ``ForgeSettings.methods`` (empty: every registered method), read at every tick.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import dagster as dg
from dagster._core.loader import LoadingContext

from assets.partitions import CATEGORY, METHOD, SEED_TAG
from resources.settings import ForgeSettings

CRON_ENV = "ANOMALY_FORGE_REGEN_CRON"
DEFAULT_CRON = "0 3 * * 0"
SPLITS = dg.AssetKey("few_shot_splits")


def ingested_categories(instance: dg.DagsterInstance) -> tuple[list[str], list[str]]:
    """(categories with a materialized split, categories still waiting for ingest)."""
    done = instance.get_materialized_partitions(SPLITS)
    cats = list(instance.get_dynamic_partitions(CATEGORY))
    return [c for c in cats if c in done], [c for c in cats if c not in done]


class _Loading(LoadingContext):
    """The minimal LoadingContext Dagster's stale-status resolver needs outside a workspace request."""

    def __init__(self, instance: dg.DagsterInstance):
        self._instance = instance
        self._loaders: dict = {}

    @property
    def instance(self) -> dg.DagsterInstance:
        return self._instance

    @property
    def loaders(self) -> dict:
        return self._loaders


def stale_partitions(instance: dg.DagsterInstance, asset_graph: Any, assets: Sequence[dg.AssetKey],
                     keys: Sequence[str]) -> dict[str, list[str]]:
    """partition key -> '<asset>: <STATUS>' for every asset of ``assets`` not FRESH in that partition."""
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus

    resolver = CachingStaleStatusResolver(instance, asset_graph, _Loading(instance))
    out: dict[str, list[str]] = {}
    for key in keys:
        reasons = []
        for asset in assets:
            status = resolver.get_status(asset, key)
            if status != StaleStatus.FRESH:
                causes = resolver.get_stale_root_causes(asset, key) if status == StaleStatus.STALE else []
                why = f" ({causes[0].category.value.lower()}: {causes[0].reason})" if causes else ""
                reasons.append(f"{asset.to_user_string()} {status.value}{why}")
        if reasons:
            out[key] = reasons
    return out


def round_seed(base: int, when: Any) -> int:
    """The seed of a ``per_round`` regeneration: base + the round's date as YYYYMMDD."""
    return base + int(when.strftime("%Y%m%d"))


def summary_condition() -> dg.AutomationCondition:
    """After any dependency updated, once none is in progress (and not while a run of the summary is)."""
    return (dg.AutomationCondition.any_deps_updated().since_last_handled()
            & ~dg.AutomationCondition.any_deps_in_progress()
            & ~dg.AutomationCondition.in_progress()).with_label("after the round")


def with_summary_automation(assets: list[Any]) -> tuple[list[Any], list[dg.AssetKey]]:
    """(``assets`` with ``summary_condition`` on every unpartitioned asset, those assets' keys)."""
    out, summaries = [], []
    for a in assets:
        if a.is_executable and a.partitions_def is None:
            a = dg.map_asset_specs(lambda spec: spec.replace_attributes(automation_condition=summary_condition()),
                                   [a])[0]
            summaries.extend(a.keys)
        out.append(a)
    return out, summaries


def build_summary_automation_sensor(summaries: Sequence[dg.AssetKey]) -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        "summary_automation_sensor", target=dg.AssetSelection.assets(*summaries),
        default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=60,
        description="Refreshes the summaries once the partitions they read are updated and none is in progress")


def build_regeneration_schedule(job: Any, assets: Sequence[dg.AssetKey] = ()) -> dg.ScheduleDefinition:
    """The schedule launching ``job`` (the category x method stage, whose assets are ``assets``) for every
    ingested partition that is missing or stale (or every one, with ``regen_seed="per_round"``)."""
    cron = os.environ.get(CRON_ENV, DEFAULT_CRON).strip()
    assets = list(assets)

    def regeneration_schedule(context: dg.ScheduleEvaluationContext, settings: ForgeSettings):
        ready, waiting = ingested_categories(context.instance)
        if not ready:
            return dg.SkipReason(f"no ingested category yet (waiting for few_shot_splits: {waiting or 'none'})")
        if waiting:
            context.log.info(f"not regenerating categories without few_shot_splits: {waiting}")
        methods = settings.active_methods()
        keys = [str(dg.MultiPartitionKey({CATEGORY: c, METHOD: m})) for c in ready for m in methods]
        when = context.scheduled_execution_time
        stamp = when.isoformat() if when else "now"
        tags = {"anomaly_forge/trigger": "regeneration_schedule"}
        if settings.regen_seed == "per_round":
            if when is None:
                return dg.SkipReason("regen_seed='per_round' needs a scheduled time to derive the round's seed")
            tags[SEED_TAG] = str(round_seed(settings.seed, when))
            todo = {k: ["fresh seed per round"] for k in keys}
        else:
            todo = stale_partitions(context.instance, context.repository_def.asset_graph, assets, keys)
        if not todo:
            return dg.SkipReason(f"nothing stale: all {len(keys)} category x method partitions "
                                 f"({', '.join(ready)} x {', '.join(methods)}) are up to date with their code, "
                                 f"settings and data")
        for key, reasons in todo.items():
            context.log.info(f"{key}: {'; '.join(reasons[:3])}")
        return [dg.RunRequest(run_key=f"{key}@{stamp}", partition_key=key, tags=tags) for key in todo]

    description = (f"Regenerate the category x method partitions that are missing or stale ({CRON_ENV} sets the "
                   f"cron; ForgeSettings.regen_seed='per_round' regenerates all with a fresh seed)")
    try:
        return dg.schedule(cron_schedule=cron, job=job, name="regeneration_schedule",
                           description=description)(regeneration_schedule)
    except dg.DagsterInvalidDefinitionError as e:
        raise ValueError(f"{CRON_ENV}={cron!r} is not a valid cron string; use five fields, e.g. {DEFAULT_CRON!r} "
                         f"(weekly, Sunday 03:00 UTC)") from e

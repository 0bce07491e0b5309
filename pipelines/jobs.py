"""Jobs: the lineage cut into stages that one partitioned run each can execute.

A Dagster run has one partition key, and the lineage mixes three partitionings (category; category x method;
none). So the assets are cut, in dependency order, into *stages*: maximal groups of consecutive assets that share
a partitioning. Each stage is one asset job; the sensor, the schedule, the demo and ``anomaly-forge
add-category`` all launch these same jobs, stage after stage.

Choices:
- Stage order comes from the asset graph, not from a fixed list, so assets that later issues add (in any of the
  three partitionings, anywhere in the graph) are run by the demo and the sensor without edits here.
- Among assets ready at the same time, category stages go first, then category x method, then unpartitioned:
  ingest before generation before summaries.
- The first stage of each partitioning gets a stable name (``ingest_job``, ``generation_job``, ``summary_job``);
  later ones get a numeric suffix.
- Asset checks of the selected assets run in the same job (blocking checks stop downstream steps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import dagster as dg

from assets.partitions import category_method_partitions, category_partitions

CATEGORY_KIND, CATEGORY_METHOD_KIND, UNPARTITIONED_KIND = "category", "category_method", "unpartitioned"
KIND_ORDER = (CATEGORY_KIND, CATEGORY_METHOD_KIND, UNPARTITIONED_KIND)
JOB_NAMES = {CATEGORY_KIND: "ingest_job", CATEGORY_METHOD_KIND: "generation_job", UNPARTITIONED_KIND: "summary_job"}
INGEST_JOB, GENERATION_JOB, SUMMARY_JOB = (JOB_NAMES[k] for k in KIND_ORDER)


@dataclass(frozen=True)
class Stage:
    job_name: str
    kind: str
    asset_keys: tuple[dg.AssetKey, ...]

    def partition_keys(self, categories: Sequence[str], methods: Sequence[str]) -> list[str | None]:
        """The run partition keys that cover ``categories`` x ``methods`` for this stage."""
        if self.kind == CATEGORY_KIND:
            return list(categories)
        if self.kind == CATEGORY_METHOD_KIND:
            return [str(dg.MultiPartitionKey({"category": c, "method": m})) for c in categories for m in methods]
        return [None]


def partition_kind(assets_def: dg.AssetsDefinition) -> str:
    pd_ = assets_def.partitions_def
    if pd_ is None:
        return UNPARTITIONED_KIND
    if pd_ == category_partitions:
        return CATEGORY_KIND
    if pd_ == category_method_partitions:
        return CATEGORY_METHOD_KIND
    raise ValueError(f"asset {assets_def.key.to_user_string()} uses partitions {pd_}; the pipeline knows only "
                     f"category (assets.partitions.category_partitions), category x method "
                     f"(category_method_partitions) and unpartitioned assets")


def lineage_stages(assets: Sequence[dg.AssetsDefinition]) -> list[Stage]:
    kinds = {a.key: partition_kind(a) for a in assets}
    deps = {a.key: {d for d in a.dependency_keys if d in kinds} for a in assets}
    done: set[dg.AssetKey] = set()
    stages: list[Stage] = []
    used: dict[str, int] = {}
    while len(done) < len(kinds):
        ready = [k for k in kinds if k not in done and deps[k] <= done]
        if not ready:
            left = sorted(k.to_user_string() for k in kinds if k not in done)
            raise ValueError(f"dependency cycle among assets {left}")
        kind = min((kinds[k] for k in ready), key=KIND_ORDER.index)
        members: list[dg.AssetKey] = []
        grown = True
        while grown:  # pull in same-kind assets whose inputs this stage itself produces
            grown = False
            for k in kinds:
                if k not in done and k not in members and kinds[k] == kind and deps[k] <= done | set(members):
                    members.append(k)
                    grown = True
        used[kind] = used.get(kind, 0) + 1
        name = JOB_NAMES[kind] if used[kind] == 1 else f"{JOB_NAMES[kind]}_{used[kind]}"
        stages.append(Stage(name, kind, tuple(members)))
        done.update(members)
    return stages


def build_jobs(stages: Sequence[Stage]) -> list[Any]:
    """One asset job per stage (unresolved: Definitions binds them to the assets and resources)."""
    return [dg.define_asset_job(s.job_name, selection=dg.AssetSelection.assets(*s.asset_keys),
                                description=f"{s.kind} stage: {', '.join(k.to_user_string() for k in s.asset_keys)}")
            for s in stages]

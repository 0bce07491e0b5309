"""The Dagster code location: ``dagster dev -w workspace.yaml`` loads ``defs`` from this module.

Choices:
- Asset modules are collected by name; a module that does not exist yet is skipped (the lineage grows issue by
  issue), but a module that exists and fails to import is an error, never silently dropped.
- Resources come from the environment (``ANOMALY_FORGE_HOME``, ``ANOMALY_FORGE_STORAGE``,
  ``ANOMALY_FORGE_DATASETS``, ``ANOMALY_FORGE_MODEL``, ...; see resources/) so that one code location serves a
  demo folder, a laptop and a cluster; ``build_definitions`` takes explicit values for the demo, the CLI and tests.
- Dagster's beta/preview warnings about the partition mapping and partitioned checks this project relies on (on
  a pinned Dagster) are silenced while the asset modules are imported here, as the CLI does: ``dagster dev``
  loads this module at every reload and would print them each time. Warnings raised elsewhere still show.
- Library deprecation notices (FutureWarnings that anomalib / timm / diffusers print on import, "... is deprecated",
  "... will be removed") are ignored in every process that loads this module (the code server and each step
  process of a run), as the CLI does: they are not the operator's business and would repeat in every step's log.
- Every job runs on the executor chosen by ``ANOMALY_FORGE_EXECUTOR`` (multiprocess by default; k8s / celery
  from the YAML under deploy/; ``pipelines.executors``).
- Loading the definitions imports no torch: ops stage modules are imported inside asset bodies (code versions
  are computed by parsing their source, ``pipelines.versions``).
"""
import importlib
import warnings
from typing import Any, Sequence

import dagster as dg

from pipelines.executors import build_executor
from pipelines.jobs import GENERATION_JOB, build_jobs, lineage_stages
from pipelines.schedules import build_regeneration_schedule, build_summary_automation_sensor, with_summary_automation
from pipelines.sensors import build_new_category_sensor
from pipelines.versions import with_code_versions
from resources.backbone import DiffusionBackbone
from resources.settings import ForgeSettings
from resources.storage import ParquetIOManager, StorageResource, storage_root_from_env

warnings.filterwarnings("ignore", category=FutureWarning, message=".*(deprecated|will be removed)")

ASSET_MODULES = ("assets.ingest", "assets.generation", "assets.quality", "assets.detection")


def collect_assets(modules: Sequence[str] = ASSET_MODULES) -> tuple[list[Any], list[Any]]:
    """(assets, checks) from every asset module that exists."""
    assets: list[Any] = []
    checks: list[Any] = []
    for name in modules:
        try:
            with warnings.catch_warnings():  # as the CLI does: see the module docstring
                warnings.simplefilter("ignore", dg.BetaWarning)
                warnings.simplefilter("ignore", dg.PreviewWarning)
                module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        assets.extend(module.ASSETS)
        checks.extend(module.CHECKS)
    return assets, checks


def build_resources(storage_root: str | None = None, **settings: Any) -> dict[str, Any]:
    root = str(storage_root or storage_root_from_env())
    return {
        "storage": StorageResource(root=root),
        "io_manager": ParquetIOManager(root=root),
        "settings": ForgeSettings.from_env(**settings),
        "backbone": DiffusionBackbone.from_env(),
    }


def build_definitions(storage_root: str | None = None, **settings: Any) -> dg.Definitions:
    """The full code location; keyword arguments override ``ForgeSettings`` fields (e.g. dataset_roots=[...])."""
    assets, checks = collect_assets()
    resources = build_resources(storage_root, **settings)
    assets = with_code_versions(assets, resources["settings"], resources["backbone"].model)
    assets, summaries = with_summary_automation(assets)
    stages = lineage_stages(assets)
    jobs = build_jobs(stages)
    generation = [s for s in stages if s.job_name == GENERATION_JOB]
    sensors = [build_new_category_sensor()] + ([build_summary_automation_sensor(summaries)] if summaries else [])
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        schedules=[build_regeneration_schedule(jobs[stages.index(generation[0])], generation[0].asset_keys)]
        if generation else [],
        sensors=sensors,
        resources=resources,
        executor=build_executor(),
    )


defs = build_definitions()

"""The executor of every job in the code location: ``ANOMALY_FORGE_EXECUTOR`` = ``multiprocess`` (default), ``k8s``,
``celery`` or ``in_process``.

Choices:
- ``multiprocess`` is Dagster's ``multiprocess_executor``, left unconfigured so that a run's config (launchpad,
  ``execution: config: max_concurrent: N``) still sets its parallelism; its default is one process per CPU core,
  and the heavy steps are held back across runs by the ``gpu`` pool anyway (dagster.yaml).
- ``k8s`` / ``celery`` are ``dagster_k8s.k8s_job_executor`` / ``dagster_celery.celery_executor`` configured from
  the YAML the repository ships (``deploy/k8s/executor.yaml``, ``deploy/celery/executor.yaml``, in run-config form
  ``execution: config: ...``, the same file ``dagster-celery worker start -y`` reads) or from the file named by
  ``ANOMALY_FORGE_EXECUTOR_CONFIG``. Configured, not left to run config: runs launched by the daemon (backfills,
  the sensor, the schedule) carry no run config, and they are the ones that must land on the cluster.
- Where a heavy step goes is not in these files: it is in the op tags of the GPU assets
  (``assets.partitions.GPU_TAGS``: a ``nvidia.com/gpu`` limit, node selector and toleration for the step's pod,
  the ``gpu`` celery queue), so each executor places exactly those steps on GPU machines.
- ``in_process`` runs every step in the run's own process (debugging, and daemon tests on a small machine where a
  process per step would re-import torch each time).
- dagster-k8s and dagster-celery are imported only when chosen (the ``deploy`` extra of pyproject.toml).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

EXECUTORS = ("multiprocess", "k8s", "celery", "in_process")
DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"


def executor_kind() -> str:
    kind = os.environ.get("ANOMALY_FORGE_EXECUTOR", "").strip() or "multiprocess"
    if kind not in EXECUTORS:
        raise ValueError(f"ANOMALY_FORGE_EXECUTOR={kind!r}; use one of {list(EXECUTORS)} (or leave it unset for "
                         f"multiprocess)")
    return kind


def executor_config_path(kind: str) -> Path:
    return Path(os.environ.get("ANOMALY_FORGE_EXECUTOR_CONFIG") or DEPLOY_DIR / kind / "executor.yaml")


def load_executor_config(path: Path) -> dict[str, Any]:
    """The ``execution: config:`` mapping of a run-config YAML file."""
    if not path.is_file():
        raise ValueError(f"executor config {path} does not exist; set ANOMALY_FORGE_EXECUTOR_CONFIG to a run-config "
                         f"YAML with an 'execution: config:' section (see deploy/)")
    data = yaml.safe_load(path.read_text()) or {}
    config = data.get("execution", {}).get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict):
        raise ValueError(f"executor config {path} has no 'execution: config:' mapping; see deploy/k8s/executor.yaml")
    return config


def build_executor(kind: str | None = None) -> dg.ExecutorDefinition:
    kind = kind or executor_kind()
    if kind == "multiprocess":
        return dg.multiprocess_executor
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor as executor
    elif kind == "celery":
        from dagster_celery import celery_executor as executor
    else:
        raise ValueError(f"executor {kind!r}; use one of {list(EXECUTORS)}")
    return executor.configured(load_executor_config(executor_config_path(kind)), name=kind)

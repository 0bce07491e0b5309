"""Executors and GPU placement: multiprocess by default; the k8s / celery deployments of deploy/ validated with the
real dagster-k8s / dagster-celery config schemas, and their GPU placement derived from the op tags of exactly the
assets that hold the ``gpu`` pool."""
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.execution.api import create_execution_plan

from assets.partitions import GPU_POOL, GPU_QUEUE
from pipelines.definitions import build_definitions
from pipelines.executors import DEPLOY_DIR, build_executor, load_executor_config
from pipelines.instance_config import limits
from pipelines.jobs import GENERATION_JOB, INGEST_JOB

REPO = Path(__file__).resolve().parents[1]
# the assets whose steps must land on a GPU (a minimal list: any other asset holding the gpu pool must follow)
MUST_BE_GPU = {"anomaly_adapters", "synthetic_anomalies", "anomaly_detectors"}


@pytest.fixture(autouse=True)
def _no_executor_env(monkeypatch):
    for name in ("ANOMALY_FORGE_EXECUTOR", "ANOMALY_FORGE_EXECUTOR_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def _defs(monkeypatch, tmp_path, kind=None):
    if kind:
        monkeypatch.setenv("ANOMALY_FORGE_EXECUTOR", kind)
    return build_definitions(storage_root=str(tmp_path / "storage"), dataset_roots=[str(tmp_path / "data")])


def _gpu_assets(defs):
    return {a.key.to_user_string() for a in defs.assets if a.op.pool == GPU_POOL}


def _steps(defs, job_name):
    job = defs.resolve_job_def(job_name)
    return job, create_execution_plan(job).get_all_steps_in_topo_order()


def test_the_code_location_runs_on_the_multiprocess_executor_by_default(monkeypatch, tmp_path):
    defs = _defs(monkeypatch, tmp_path)
    repo = defs.get_repository_def()
    for job in repo.get_all_jobs():  # the stage jobs and the implicit asset job backfills run
        assert job.executor_def.name == "multiprocess", job.name
    job = repo.get_job(GENERATION_JOB)
    assert dg.validate_run_config(job, {"execution": {"config": {"max_concurrent": 2}}})  # still set per run


def test_an_unknown_executor_or_missing_config_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("ANOMALY_FORGE_EXECUTOR", "dask")
    with pytest.raises(ValueError, match=r"ANOMALY_FORGE_EXECUTOR='dask'; use one of \['multiprocess', 'k8s'"):
        build_executor()
    monkeypatch.setenv("ANOMALY_FORGE_EXECUTOR", "k8s")
    monkeypatch.setenv("ANOMALY_FORGE_EXECUTOR_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match="nope.yaml does not exist"):
        build_executor()
    (tmp_path / "bad.yaml").write_text("max_concurrent: 2\n")
    monkeypatch.setenv("ANOMALY_FORGE_EXECUTOR_CONFIG", str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="bad.yaml has no 'execution: config:'"):
        build_executor()


def test_gpu_tags_are_on_exactly_the_assets_of_the_gpu_pool(monkeypatch, tmp_path):
    defs = _defs(monkeypatch, tmp_path)
    gpu = _gpu_assets(defs)
    assert MUST_BE_GPU <= gpu and "raw_defect_sets" not in gpu
    for a in defs.assets:
        tags = a.op.tags
        name = a.key.to_user_string()
        assert ("dagster-k8s/config" in tags) == (name in gpu), name
        assert (tags.get("dagster-celery/queue") == GPU_QUEUE) == (name in gpu), name


def _k8s_step_job(step, executor_config):
    """The Kubernetes Job dagster-k8s builds for ``step``, merged as K8sStepHandler does: executor step config, then
    the step's op tags, then the executor's per-op override."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job,
                                 get_user_defined_k8s_config)

    ctx = K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
        executor_config.get("step_k8s_config", {})))
    ctx = ctx.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step.tags)))
    ctx = ctx.merge(K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
        executor_config.get("per_step_k8s_config", {}).get(step.op_name, {}))))
    job_config = DagsterK8sJobConfig(job_image="anomaly-forge:test", dagster_home="/opt/dagster/dagster_home")
    return construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], "dagster-step-test",
                                     ctx.run_k8s_config, component="step_worker")


def test_k8s_executor_config_is_valid_and_gpu_steps_get_a_gpu_node(monkeypatch, tmp_path):
    pytest.importorskip("dagster_k8s", reason="the deploy extra (pip install .[deploy]) is not installed")
    from dagster_k8s import k8s_job_executor

    path = DEPLOY_DIR / "k8s" / "executor.yaml"
    config = load_executor_config(path)
    assert validate_config(k8s_job_executor.config_schema.config_type, config).success
    defs = _defs(monkeypatch, tmp_path, "k8s")
    for name in (INGEST_JOB, GENERATION_JOB):
        job, steps = _steps(defs, name)
        assert job.executor_def.name == "k8s"
        assert dg.validate_run_config(job, {})  # the shipped config, as a daemon-launched run resolves it
        for step in steps:
            pod = _k8s_step_job(step, config).spec.template.spec
            container = pod.containers[0]
            asset = step.op_name
            limits_ = (container.resources.limits or {}) if container.resources else {}
            if asset in _gpu_assets(defs):
                assert limits_.get("nvidia.com/gpu") == "1", asset
                assert pod.node_selector == {"nvidia.com/gpu.present": "true"}, asset
                assert [(t.key, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "NoSchedule")], asset
            else:
                assert "nvidia.com/gpu" not in limits_ and not pod.node_selector and not pod.tolerations, asset
            assert container.resources.requests == {"cpu": "2", "memory": "8Gi"}  # step_k8s_config reaches all
    assert {s.op_name for s in _steps(defs, GENERATION_JOB)[1]} & MUST_BE_GPU
    # a cluster with other GPU node labels replaces the selector per op, as deploy/k8s/executor.yaml documents
    other = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    override = dict(config, per_step_k8s_config={"synthetic_anomalies": {
        "merge_behavior": "SHALLOW", "pod_spec_config": {"node_selector": other}}})
    assert validate_config(k8s_job_executor.config_schema.config_type, override).success
    step = next(s for s in _steps(defs, GENERATION_JOB)[1] if s.op_name == "synthetic_anomalies")
    pod = _k8s_step_job(step, override).spec.template.spec
    assert pod.node_selector == other and pod.containers[0].resources.limits["nvidia.com/gpu"] == "1"


def test_celery_executor_config_is_what_workers_load_and_routes_gpu_steps_to_the_gpu_queue(monkeypatch, tmp_path):
    pytest.importorskip("dagster_celery", reason="the deploy extra (pip install .[deploy]) is not installed")
    from dagster._config import post_process_config
    from dagster._core.execution.retries import RetryMode
    from dagster_celery import celery_executor
    from dagster_celery.cli import get_validated_config
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app
    from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG

    path = DEPLOY_DIR / "celery" / "executor.yaml"
    schema = celery_executor.config_schema.config_type
    unset = post_process_config(schema, load_executor_config(path))
    assert not unset.success and "ANOMALY_FORGE_CELERY_BROKER" in str(unset.errors)  # no silent default broker
    monkeypatch.setenv("ANOMALY_FORGE_CELERY_BROKER", "memory://")
    monkeypatch.setenv("ANOMALY_FORGE_CELERY_BACKEND", "cache+memory://")
    config = get_validated_config(str(path))  # what `dagster-celery worker start -y` does with the file
    assert config is not None
    # the Celery app the executor builds in the run process from the same config
    app = make_app(CeleryExecutor(broker=config["broker"], backend=config["backend"], include=config.get("include"),
                                  config_source=config["config_source"],
                                  retries=RetryMode.from_config(config["retries"])).app_args())
    assert app.conf.broker_url == "memory://" and app.conf.worker_prefetch_multiplier == 1
    defs = _defs(monkeypatch, tmp_path, "celery")
    gpu = _gpu_assets(defs)
    queues = {}
    for name in (INGEST_JOB, GENERATION_JOB):
        job, steps = _steps(defs, name)
        assert job.executor_def.name == "celery" and dg.validate_run_config(job, {})
        # the executor's own choice (dagster_celery.core_execution_loop): the step's tag, else the default queue
        queues.update({s.op_name: s.tags.get(DAGSTER_CELERY_QUEUE_TAG, app.conf.task_default_queue) for s in steps})
    assert {op for op, q in queues.items() if q == GPU_QUEUE} == gpu & set(queues)
    assert {q for op, q in queues.items() if op not in gpu} == {"dagster"}
    assert MUST_BE_GPU <= set(queues)


def test_helm_values_serve_this_code_location_with_the_k8s_executor_and_sized_limits(tmp_path):
    values = yaml.safe_load((DEPLOY_DIR / "k8s" / "values.yaml").read_text())
    (dep,) = values["dagster-user-deployments"]["deployments"]
    args = dep["dagsterApiGrpcArgs"]
    module, attr = args[args.index("-m") + 1], args[args.index("-a") + 1]
    import importlib

    assert isinstance(getattr(importlib.import_module(module), attr), dg.Definitions)
    env = {e["name"]: e["value"] for e in dep["env"]}
    assert env["ANOMALY_FORGE_EXECUTOR"] == "k8s" and dep["includeConfigInLaunchedRuns"]["enabled"]
    # the executor file the pods read is the shipped one, at the path the image puts the repository
    assert env["ANOMALY_FORGE_EXECUTOR_CONFIG"].endswith("/deploy/k8s/executor.yaml")
    assert not env["ANOMALY_FORGE_STORAGE"].startswith("/")  # pods share no disk: an object store URL
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    # the instance part the chart renders verbatim: loaded by dagster itself, and sized by the project's rule
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(values["additionalInstanceConfig"]))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        config = instance.get_concurrency_config()
        gpus = config.pool_config.default_pool_limit
        assert (config.run_queue_config.max_concurrent_runs, gpus) == limits(cpus=64, gpus=gpus)
        assert config.pool_config.pool_granularity.value == "op"

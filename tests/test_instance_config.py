"""The shipped dagster.yaml: a valid instance with a run queue and a `gpu` pool that two runs never hold at once."""
import shutil
from pathlib import Path

import dagster as dg
import pytest

from assets.partitions import GPU_POOL
from pipelines.instance_config import instance_yaml, limits, main

SHIPPED = Path(__file__).resolve().parents[1] / "dagster.yaml"


def test_shipped_yaml_is_the_generator_output_for_the_reference_machine():
    assert SHIPPED.read_text() == instance_yaml(cpus=2, gpus=0)


@pytest.mark.parametrize("cpus,gpus,runs,pool", [(2, 0, 1, 1), (16, 0, 8, 4), (16, 1, 2, 1), (64, 8, 9, 8)])
def test_limits_are_sized_from_the_machine(cpus, gpus, runs, pool):
    assert limits(cpus, gpus) == (runs, pool)


def test_the_cli_writes_a_yaml_the_instance_loads(tmp_path):
    assert main(["--cpus", "16", "--gpus", "2", "--out", str(tmp_path / "dagster.yaml")]) == 0
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        config = instance.get_concurrency_config()
        assert config.run_queue_config.max_concurrent_runs == 3
        assert config.pool_config.default_pool_limit == 2
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"


def test_two_runs_never_hold_the_gpu_pool_at_once(tmp_path):
    """The slot accounting a step of each run goes through (what the executor calls before a pool step starts),
    on an instance with the shipped settings: the second run's step waits until the first one's is freed.

    (Two real runs in two processes on the default SQLite storage were seen to overlap: the claims raced.
    Multi-run deployments should use Postgres storage; docs/usage.md says so.)"""
    shutil.copy(SHIPPED, tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        storage = instance.event_log_storage
        assert storage.supports_global_concurrency_limits
        assert storage.initialize_concurrency_limit_to_default(GPU_POOL)  # as the first claim does
        first = storage.claim_concurrency_slot(GPU_POOL, "run-a", "synthetic_anomalies")
        second = storage.claim_concurrency_slot(GPU_POOL, "run-b", "synthetic_anomalies")
        assert first.is_claimed and not second.is_claimed
        info = storage.get_concurrency_info(GPU_POOL)
        assert info.slot_count == 1 and info.active_run_ids == {"run-a"} and info.pending_run_ids == {"run-b"}
        storage.free_concurrency_slot_for_step("run-a", "synthetic_anomalies")
        assert storage.claim_concurrency_slot(GPU_POOL, "run-b", "synthetic_anomalies").is_claimed
        assert storage.get_concurrency_info(GPU_POOL).active_run_ids == {"run-b"}

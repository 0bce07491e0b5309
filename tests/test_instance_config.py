"""The shipped dagster.yaml: a valid instance with a run queue and a `gpu` pool that two runs never hold at once."""
import shutil
import threading
import time
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


def test_two_real_runs_never_hold_the_gpu_pool_at_once(tmp_path):
    """Two runs of a step in the ``gpu`` pool, on an instance with the shipped settings, each through its own
    DagsterInstance (as two run processes would). The step of each run stays in until the other run has come to
    the pool too (its step waiting for a slot, or inside), so the runs really compete: with the shipped limit the
    second run's step enters only after the first one's has left. The second run is launched once the first holds
    the slot: simultaneous first claims race on SQLite (see the test above; Postgres for real multi-run use)."""
    shutil.copy(SHIPPED, tmp_path / "dagster.yaml")
    marks = tmp_path / "marks"
    marks.mkdir()

    @dg.asset(pool=GPU_POOL)
    def gpu_probe(context: dg.AssetExecutionContext) -> None:
        me = context.run_id
        (marks / f"{me}.enter").write_text(repr(time.monotonic()))
        storage = context.instance.event_log_storage
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            inside = [f for f in marks.glob("*.enter") if f.stem != me]
            waiting = storage.get_concurrency_info(GPU_POOL).pending_run_ids - {me}
            if inside or waiting:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        (marks / f"{me}.exit").write_text(repr(time.monotonic()))

    results = {}

    def run(name: str) -> None:
        with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
            results[name] = dg.materialize([gpu_probe], instance=instance, raise_on_error=False)

    first = threading.Thread(target=run, args=("a",))
    first.start()
    deadline = time.monotonic() + 120
    while not list(marks.glob("*.enter")) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = threading.Thread(target=run, args=("b",))
    second.start()
    first.join(180)
    second.join(180)
    assert results["a"].success and results["b"].success
    a, b = results["a"].run_id, results["b"].run_id
    t = {f.name: float(f.read_text()) for f in marks.iterdir()}
    assert t[f"{b}.enter"] >= t[f"{a}.exit"], "the second run's gpu step entered while the first held the pool"

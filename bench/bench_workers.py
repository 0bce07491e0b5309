"""Local scale-out: N worker processes (Dagster's multiprocess executor, ``max_concurrent = N``) generating one
category's partitions (one step per method: fit the adapter, synthesize ``--n`` images, exactly the calls of the
``anomaly_adapters`` / ``synthetic_anomalies`` assets), against the same work in one plain Python process.

    python bench/bench_workers.py [--category brick] [--methods cutpaste,perlin] [--n 150] [--size 64]
                                  [--workers 1,2] [--out bench/out/workers.json]

Reported per N: the run's wall time and the speed-up over N = 1; the compute each step measured around its own work
(wall and CPU seconds); the Dagster overhead in CPU seconds = CPU of the run process and its step processes - step
compute CPU (process start and imports per step, event log writes, run start/stop), per step and as a fraction of
compute, and the same in wall time (run wall x N - step compute wall; at N > 1 it also counts a worker idling while
the last step finishes). CPU seconds are the figure to read on a shared machine: wall time there is mostly waiting.
The baseline is the same steps in one plain process (imports paid once).

Every step writes into its own storage root per N, so no run reuses another's files (adapters and synthesis
journals would otherwise be resumed). The demo data and its split are built once, outside the timings.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dagster as dg  # noqa: E402

STATE_ENV = "BENCH_WORKERS_STATE"


def generate(state: dict, method: str, storage_root: str) -> dict:
    """One category x method partition (adapter + synthesis); the wall and CPU seconds of that work alone."""
    import pandas as pd

    from ops.generation import fit_adapter, synthesize_partition
    from ops.methods.registry import get_method
    from ops.storage import Storage

    split = pd.read_parquet(state["split"])
    backbone = None
    if get_method(method).needs_backbone:
        from ops.diffusion.backbone import load_backbone

        backbone = load_backbone("tiny", device="cpu")
    t0, c0 = time.perf_counter(), time.process_time()
    store = Storage(storage_root)
    adapters = fit_adapter(store, state["category"], method, split, backbone, {})
    synthesize_partition(store, state["category"], method, split, adapters, backbone, n=state["n"], seed=0, cfg={})
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def _step(method: str):
    @dg.op(name=f"generate_{method}", config_schema={"storage_root": str})
    def step(context: dg.OpExecutionContext) -> dg.Output[dict]:
        state = json.loads(Path(os.environ[STATE_ENV]).read_text())
        seconds = generate(state, method, context.op_config["storage_root"])
        return dg.Output(seconds, metadata=seconds)

    return step


def bench_job() -> dg.JobDefinition:
    """One independent step per method (rebuilt in every step process, from the state file in the environment)."""
    state = json.loads(Path(os.environ[STATE_ENV]).read_text())

    @dg.job(executor_def=dg.multiprocess_executor)
    def workers_bench():
        for method in state["methods"]:
            _step(method)()

    return workers_bench


def run_dagster(state: dict, home: Path, workers: int, root: Path) -> dict:
    job = dg.reconstructable(bench_job)
    config = {"execution": {"config": {"max_concurrent": workers}},
              "ops": {f"generate_{m}": {"config": {"storage_root": str(root / m)}} for m in state["methods"]}}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        cpu0 = _cpu()
        t0 = time.perf_counter()
        with dg.execute_job(job, instance=instance, run_config=config) as result:
            wall = time.perf_counter() - t0
            cpu = _cpu() - cpu0
            if not result.success:
                raise RuntimeError(f"the N={workers} run failed; see {home}")
            compute = {m: result.output_for_node(f"generate_{m}") for m in state["methods"]}
    return {"workers": workers, "wall_s": wall, "cpu_s": cpu, "steps": compute}


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (the step processes)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_plain(state_path: Path, state: dict, root: Path) -> dict:
    """The same steps one after the other in a fresh plain process (one interpreter start, imports paid once)."""
    code = ("import json, sys, time; t0 = time.perf_counter(); sys.path.insert(0, sys.argv[1]); "
            "sys.path.insert(0, sys.argv[1] + '/bench'); import bench_workers as b; "
            "s = json.load(open(sys.argv[2])); "
            "c = {m: b.generate(s, m, sys.argv[3] + '/' + m) for m in s['methods']}; "
            "print(json.dumps({'wall_s': time.perf_counter() - t0, 'cpu_s': time.process_time(), 'steps': c}))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(REPO), str(state_path), str(root)], check=True,
                         capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    res["process_wall_s"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", default="brick")
    parser.add_argument("--methods", default="cutpaste,perlin")
    parser.add_argument("--n", type=int, default=150, help="images per partition")
    parser.add_argument("--size", type=int, default=64, help="demo image size (px)")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "workers.json"))
    args = parser.parse_args(argv)
    from ops.demo_data import build_demo_dataset
    from ops.ingest import discover_categories, ingest_category
    from ops.splits import make_split

    with tempfile.TemporaryDirectory(prefix="bench_workers_") as tmp:
        tmp = Path(tmp)
        data = build_demo_dataset(tmp / "data", categories=[args.category], size=args.size)
        layout = dict(discover_categories(data))[args.category]
        make_split(ingest_category(data, args.category, layout).rows).to_parquet(tmp / "split.parquet")
        state = {"category": args.category, "methods": args.methods.split(","), "n": args.n,
                 "split": str(tmp / "split.parquet")}
        state_path = tmp / "state.json"
        state_path.write_text(json.dumps(state))
        os.environ[STATE_ENV] = str(state_path)
        (tmp / "home").mkdir()
        (tmp / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        plain = run_plain(state_path, state, tmp / "plain")
        plain["compute_cpu_s"] = sum(v["cpu_s"] for v in plain["steps"].values())
        print(f"plain: {plain['process_wall_s']:.1f} s wall, {plain['cpu_s']:.1f} CPU s, of which compute "
              f"{plain['compute_cpu_s']:.1f}", flush=True)
        rows = []
        steps = len(state["methods"])
        for n in [int(w) for w in args.workers.split(",")]:
            row = run_dagster(state, tmp / "home", n, tmp / f"n{n}")
            compute_cpu = sum(v["cpu_s"] for v in row["steps"].values())
            compute_wall = sum(v["wall_s"] for v in row["steps"].values())
            row.update(compute_cpu_s=compute_cpu, compute_wall_s=compute_wall,
                       overhead_cpu_s=row["cpu_s"] - compute_cpu,
                       overhead_cpu_per_step_s=(row["cpu_s"] - compute_cpu) / steps,
                       overhead_cpu_fraction=(row["cpu_s"] - compute_cpu) / compute_cpu,
                       overhead_wall_s=row["wall_s"] * n - compute_wall,
                       overhead_wall_fraction=(row["wall_s"] * n - compute_wall) / compute_wall)
            rows.append(row)
            print(f"N={n}: {row['wall_s']:.1f} s wall, {row['cpu_s']:.1f} CPU s; compute {compute_cpu:.1f} CPU s; "
                  f"Dagster overhead {row['overhead_cpu_s']:.1f} CPU s = {row['overhead_cpu_fraction']:.0%} of "
                  f"compute ({row['overhead_cpu_per_step_s']:.1f} per step); wall overhead "
                  f"{row['overhead_wall_fraction']:.0%}", flush=True)
        base = rows[0]["wall_s"]
        for row in rows:
            row["speedup_vs_first"] = base / row["wall_s"]
    result = {"category": args.category, "methods": state["methods"], "n_per_partition": args.n, "size": args.size,
              "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "plain": plain, "dagster": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({r["workers"]: round(r["speedup_vs_first"], 2) for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

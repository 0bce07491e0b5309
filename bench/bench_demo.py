"""Benchmark of the whole demo: wall time and peak memory, baselines only vs every registered method.

    python bench/bench_demo.py [--n 16] [--configs baselines,all] [--keep DIR]

Each configuration runs ``anomaly-forge demo`` in a fresh child process; its peak RSS is that child's own
``ru_maxrss`` from ``os.wait4`` (RUSAGE_CHILDREN would only report the largest child so far). The first
configuration is the baseline; the table reports every other configuration as a ratio against it, measured by this
same process on this same machine. Writes
bench/out/bench_demo.json (gitignored). Timings on a shared machine are noisy: compare numbers from one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_demo(out: Path, methods: str | None, n: int) -> dict:
    cmd = [sys.executable, "-m", "pipelines.cli", "demo", "--out", str(out), "--n", str(n)]
    if methods:
        cmd += ["--methods", methods]
    env = dict(os.environ, ANOMALY_FORGE_NO_PROGRESS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    return {"methods": methods or "all", "n": n, "seconds": round(seconds, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "exit": os.waitstatus_to_exitcode(status),
            "tail": output[-3000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--configs", default="baselines,all",
                    help="comma-separated: 'baselines' (cutpaste,perlin), 'all', or a method name")
    ap.add_argument("--keep", help="keep the demo folders under this directory")
    args = ap.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="af-bench-demo-"))
    rows = []
    for name in args.configs.split(","):
        methods = {"baselines": "cutpaste,perlin", "all": None}.get(name, name)
        row = run_demo(base / name, methods, args.n)
        row["config"] = name
        rows.append(row)
        print(f"{name}: {row['seconds']} s, peak {row['peak_rss_mb']} MB, exit {row['exit']}", flush=True)
        if row["exit"] != 0:
            print(row["tail"])
    ref = rows[0]
    print(f"\n| config | wall s | x {ref['config']} | peak RSS MB | x {ref['config']} | exit |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['config']} | {r['seconds']} | {r['seconds'] / ref['seconds']:.2f} | {r['peak_rss_mb']} | "
              f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f} | {r['exit']} |")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_demo.json").write_text(json.dumps(
        {"cpu_count": os.cpu_count(), "rows": [{k: v for k, v in r.items() if k != "tail"} for r in rows]}, indent=2))


if __name__ == "__main__":
    main()

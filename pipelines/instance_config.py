"""The Dagster instance settings (``$DAGSTER_HOME/dagster.yaml``) sized from the machine: run queue and ``gpu`` pool.

``python -m pipelines.instance_config [--cpus N] [--gpus N] [--out PATH]`` prints (or writes) a dagster.yaml for
this machine; the repository's ``dagster.yaml`` is its output for the reference machine of the docs (2 CPU cores,
no GPU) and ``anomaly-forge demo`` writes one sized for the machine it runs on into its ``dagster_home``.

Choices:
- ``gpu`` pool limit = number of GPUs (each heavy step — adapters, synthesis, quality metrics, detectors — holds
  one slot for its duration, so each GPU runs one heavy step at a time); on a machine without a GPU the heavy
  steps run on the CPU cores and the limit is ``max(1, cpus // 4)``: torch already uses several threads per step.
  It is the pools' ``default_limit``: ``gpu`` is the only pool this project declares, and a per-pool limit in
  the YAML does not exist (``dagster instance concurrency set gpu N`` overrides it in the database).
- Granularity ``op``: a run waiting for a slot does not block the queue for runs that need none (ingest,
  summaries), and two runs never hold more slots than the limit.
- Run queue: ``max_concurrent_runs`` = GPUs + 1 (one run per GPU plus one light run), at least 1 and at most
  ``cpus // 2`` on a CPU-only machine: every run is a process that imports torch (hundreds of MB, seconds of CPU),
  so 4 generation runs on 2 cores only thrash.
- GPUs are counted without importing torch: ``CUDA_VISIBLE_DEVICES`` if set, else the lines of ``nvidia-smi -L``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from assets.partitions import GPU_POOL


def count_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def limits(cpus: int, gpus: int) -> tuple[int, int]:
    """(max concurrent runs, gpu pool limit) for a machine with ``cpus`` cores and ``gpus`` GPUs."""
    cpus, gpus = max(1, cpus), max(0, gpus)
    pool = gpus if gpus else max(1, cpus // 4)
    runs = gpus + 1 if gpus else max(1, cpus // 2)
    return runs, pool


def instance_yaml(cpus: int | None = None, gpus: int | None = None) -> str:
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    gpus = count_gpus() if gpus is None else gpus
    runs, pool = limits(cpus, gpus)
    return f"""\
# Dagster instance settings for AnomalyForge, sized for {cpus} CPU cores and {gpus} GPUs
# (regenerate for another machine: python -m pipelines.instance_config --out $DAGSTER_HOME/dagster.yaml;
# the sizing rules are in pipelines/instance_config.py, the reasons in docs/usage.md "Concurrency").
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
concurrency:
  runs:
    max_concurrent_runs: {runs}  # queued runs beyond this wait (the UI shows them as Queued)
  pools:
    default_limit: {pool}  # the "{GPU_POOL}" pool: heavy steps holding a GPU (or CPU cores) at once, across all runs
    granularity: op
telemetry:
  enabled: false
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=int, default=None, help="CPU cores (default: this machine's)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs (default: this machine's)")
    parser.add_argument("--out", help="write here (e.g. $DAGSTER_HOME/dagster.yaml) instead of printing")
    args = parser.parse_args(argv)
    text = instance_yaml(args.cpus, args.gpus)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: peak resident memory of generation + metrics as ``n_per_partition`` grows 1x, 10x, 100x.

    python bench/bench_memory.py [--n 16] [--scales 1,10,100] [--method cutpaste] [--size 64] [--chunk 32] [--ic-feature-mb 512]

Each point runs in a fresh subprocess (peak RSS is a high-water mark: it never goes down inside one process):
the demo dataset's "brick" category at ``--size`` px, its default split, then ``fit_adapter`` +
``synthesize_partition`` (the generation stage, chunked: ``--chunk`` jobs in memory at a time) and
``refine_partition`` (refined masks, one image at a time) and ``quality_partition`` (the generation-quality
metrics on the offline EfficientNet-Lite0 backbone, loaded before the floor is taken) for
``n = --n x scale`` images of ``--method``. The child reports ``ru_maxrss`` after the imports and model loads
(the floor: torch, pandas, PIL, the metric networks), after generation and after the metrics; the table gives
them and each point's growth (peak - floor) as a ratio to the 1x point's, measured in this run on this machine.
Flat memory means ratios near 1 while n grows 100x. Writes bench/out/bench_memory.json
(gitignored). The 1x point is one full batch of the metric networks (16): below it a point's batches are smaller,
and their activations would read as growth with n. The metrics use QualityConfig's defaults (``ic_size`` 256,
``ic_feature_mb`` 512: the IC metrics' feature budget, so growth stops once a cluster's features exceed it).
16 -> 1600 images of 64 px take about 25 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, resource, sys
sys.path.insert(0, {repo!r})
os.environ["ANOMALY_FORGE_NO_PROGRESS"] = "1"
import pandas as pd, torch  # the floor: what every stage process imports anyway
from ops.demo_data import build_demo_dataset
from ops.generation import fit_adapter, synthesize_partition
from ops.ingest import ingest_category
from ops.masks.refine import refine_partition
from ops.metrics.quality import QualityConfig, load_backbones, quality_partition
from ops.splits import make_split
from ops.storage import Storage

def split_image(split):
    from ops.samples import load_sample
    return load_sample(split.iloc[0].to_dict()).image

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

tmp, n, method, size, chunk = {tmp!r}, {n}, {method!r}, {size}, {chunk}
root = build_demo_dataset(os.path.join(tmp, "data"), categories=["brick"], size=size)
split = make_split(ingest_category(root, "brick").rows)
qcfg = QualityConfig(ic_feature_mb={ic_mb})
nets = load_backbones(None, qcfg)
nets.lite0.pooled_and_logits([split_image(split)])  # networks built and run once: part of the floor
floor = rss_mb()
storage = Storage(os.path.join(tmp, "storage"))
adapters = fit_adapter(storage, "brick", method, split, None, None)
synth = synthesize_partition(storage, "brick", method, split, adapters, None, n, 0, None, chunk_size=chunk)
after_generation = rss_mb()
refined = refine_partition(storage, synth, None)
after_refine = rss_mb()
quality = quality_partition(storage, split, synth, refined, nets, qcfg)
print(json.dumps({{"n": n, "floor_mb": floor, "generation_mb": after_generation, "refine_mb": after_refine,
                  "peak_mb": rss_mb(), "rows": len(synth), "refined": len(refined), "quality_rows": len(quality)}}))
"""


def run_point(n: int, method: str, size: int, chunk: int, ic_mb: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_memory-") as tmp:
        code = CHILD.format(repo=str(REPO), tmp=tmp, n=n, method=method, size=size, chunk=chunk, ic_mb=ic_mb)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"n={n}: child failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16, help="base n_per_partition (the 1x point)")
    parser.add_argument("--scales", default="1,10,100")
    parser.add_argument("--method", default="cutpaste", help="a baseline (no diffusion backbone needed)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=32, help="synthesize_partition chunk_size")
    parser.add_argument("--ic-feature-mb", type=int, default=512, help="QualityConfig.ic_feature_mb (the default)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from ops.atomic import write_bytes_atomic
    from ops.viz import markdown_table
    import pandas as pd

    points = []
    for scale in [int(s) for s in args.scales.split(",")]:
        t0 = time.monotonic()
        p = run_point(args.n * scale, args.method, args.size, args.chunk, args.ic_feature_mb)
        p["seconds"] = time.monotonic() - t0
        p.update(scale=scale, growth_mb=p["peak_mb"] - p["floor_mb"])
        points.append(p)
        print(f"x{scale:<4} n={p['n']:<6} floor {p['floor_mb']:7.1f} MB  generation {p['generation_mb']:7.1f} MB  "
              f"peak {p['peak_mb']:7.1f} MB  growth {p['growth_mb']:6.1f} MB  ({p['seconds']:.0f} s)", flush=True)
    base = max(points[0]["growth_mb"], 1.0)  # growth below 1 MB is noise: do not divide by it
    for p in points:
        p["growth_ratio"] = p["growth_mb"] / base
    df = pd.DataFrame(points)[["scale", "n", "floor_mb", "generation_mb", "refine_mb", "peak_mb", "growth_mb",
                               "growth_ratio", "seconds"]]
    print(markdown_table(df.round(2)))
    result = {"method": args.method, "size": args.size, "chunk": args.chunk, "ic_feature_mb": args.ic_feature_mb,
              "machine": platform.platform(),
              "python": platform.python_version(), "points": points,
              "note": "peak RSS (ru_maxrss) per fresh process; ratios against the 1x point of this run"}
    write_bytes_atomic(REPO / "bench" / "out" / "bench_memory.json", json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()

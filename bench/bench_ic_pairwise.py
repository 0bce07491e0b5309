"""Benchmark of the IC metrics' pairwise distances: product form vs direct sum, whole vs budget-blocked clusters.

    python bench/bench_ic_pairwise.py [--n 48] [--size 256] [--threads 2] [--repeats 3] [--budget-mb 24]

On the offline EfficientNet-Lite0 perceptual distance (the one every install has; LPIPS trunks are user files)
at ``--size`` px, for one cluster of ``--n`` images:
- pairwise distances of embedded features: the float64 matrix-product form (``PerceptualDistance.pairwise``)
  against the direct per-row sum (``PerceptualDistance._row``, the form it replaced; the baseline);
- the whole IC pair matrix, embedding included (``ic_lpips.pair_matrix``): the cluster embedded once (the default
  512 MB budget) against blocks of a small ``--budget-mb`` (re-embedded column blocks; the baseline is whole).
Times are medians of interleaved rounds; peak memory is the sampled growth of glibc's in-use heap during one call
(see bench_toolkit.cpu_peak). Ratios are against each group's baseline measured in this run. Writes
bench/out/bench_ic_pairwise.json (gitignored).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_toolkit import cpu_peak, interleaved_seconds  # noqa: E402
from ops.atomic import write_bytes_atomic  # noqa: E402
from ops.metrics.features import Lite0Features, lite0_distance  # noqa: E402
from ops.metrics.ic_lpips import block_size, pair_matrix  # noqa: E402
from ops.viz import markdown_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--size", type=int, default=256, help="ic_size: the images are embedded at this size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-mb", type=int, default=24, help="the small IC feature budget (blocked variant)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(args.n)]
    dist = lite0_distance(Lite0Features(), args.size)
    feats = dist.embed(images)
    cpu = torch.device("cpu")
    small = args.budget_mb * 2 ** 20

    def direct():
        return torch.stack([dist._row(feats, i, feats) for i in range(args.n)]).numpy()

    def product():
        return dist.pairwise(feats, feats)

    def whole():
        return pair_matrix(images, dist)

    def blocked():
        return pair_matrix(images, dist, small)

    gap = float(np.abs(product() - direct()).max())
    blocked_gap = float(np.abs(blocked() - whole()).max())
    rows = []
    for group, fns in (("pairwise of embedded features", {"direct sum (baseline)": direct, "matrix product": product}),
                       ("IC pair matrix, embedding included", {"whole cluster (baseline)": whole,
                                                               f"blocks of {block_size(images, dist, small)}": blocked})):
        secs = interleaved_seconds(list(fns.values()), cpu, args.repeats)
        peaks = [cpu_peak(fn) / 2 ** 20 for fn in fns.values()]
        for (name, _), s, p in zip(fns.items(), secs, peaks):
            rows.append({"group": group, "variant": name, "seconds": s, "time_ratio": s / secs[0],
                         "peak_heap_mb": p, "memory_ratio": p / max(peaks[0], 1e-9)})
    import pandas as pd

    df = pd.DataFrame(rows)
    print(f"Lite0 distance at {args.size} px, {args.n} images, {args.threads} threads; max |product - direct| = "
          f"{gap:.2e}, max |blocked - whole| = {blocked_gap:.2e}")
    print(markdown_table(df.round(3)))
    out = {"n": args.n, "size": args.size, "threads": args.threads, "budget_mb": args.budget_mb,
           "machine": platform.platform(), "torch": torch.__version__, "max_abs_product_vs_direct": gap,
           "max_abs_blocked_vs_whole": blocked_gap, "rows": rows}
    write_bytes_atomic(REPO / "bench" / "out" / "bench_ic_pairwise.json", json.dumps(out, indent=2).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

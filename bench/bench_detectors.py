"""Benchmark: training (and scoring) time of each detector on the embedded demo, with its scores.

    python bench/bench_detectors.py [--categories brick,grass,gravel] [--method cutpaste] [--n 16]
                                    [--size 128] [--threads 1] [--detectors segmenter,patchcore,supersimplenet,draem]
                                    [--steps N]

Per category: the demo dataset at ``--size`` px, the default (anomalydiffusion) split, ``--n`` synthetic anomalies
of ``--method`` (a classical baseline: no diffusion backbone needed), then each detector trained from scratch with
the demo defaults of ``ops.detection.stage.DetectionConfig`` and scored on the held-out real defects. The table
gives train seconds (anomalib Engine fit incl. validation for checkpoint selection), evaluation seconds and the
headline metrics. The one-class PatchCore is trained once per category. Writes bench/out/bench_detectors.json
(gitignored). DRAEM at its paper width is minutes per run on 2 CPU cores: time it with ``--steps 4``.
``--threads 1`` is the right setting on a shared 2-core box: oversubscribed OpenMP threads spin
(measured here: one U-Net step 0.46 s with 1 thread vs 4.6 s with 2 while other processes held the cores).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ANOMALY_FORGE_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ops.atomic import write_bytes_atomic  # noqa: E402
from ops.demo_data import build_demo_dataset  # noqa: E402
from ops.detection.stage import evaluate_detectors, train_detectors  # noqa: E402
from ops.generation import fit_adapter, synthesize_partition  # noqa: E402
from ops.ingest import ingest_category  # noqa: E402
from ops.splits import make_split  # noqa: E402
from ops.storage import Storage  # noqa: E402
from ops.viz import markdown_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--categories", default="brick,grass,gravel")
    ap.add_argument("--method", default="cutpaste")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--detectors", default="segmenter,patchcore,supersimplenet,draem")
    ap.add_argument("--steps", type=int, default=None, help="override the default optimizer steps of trained detectors")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_detectors.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quiet = lambda *a: None  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_detectors-") as tmp:
        categories = args.categories.split(",")
        data = build_demo_dataset(Path(tmp) / "data", categories=categories, size=args.size)
        storage = Storage(Path(tmp) / "storage")
        for category in categories:
            split = make_split(ingest_category(data, category).rows)
            adapters = fit_adapter(storage, category, args.method, split, None, {}, progress=quiet)
            synthetic = synthesize_partition(storage, category, args.method, split, adapters, None, n=args.n, seed=0,
                                             cfg={}, progress=quiet)
            for detector in args.detectors.split(","):
                cfg = {"detectors": [detector], "image_size": args.size}
                if args.steps is not None and detector != "patchcore":
                    cfg["steps"] = {detector: args.steps}
                start = time.perf_counter()
                det = train_detectors(storage, category, args.method, split, synthetic, None, cfg, progress=quiet)
                wall = time.perf_counter() - start
                ev = evaluate_detectors(storage, split, det, cfg).iloc[0]
                d = det.iloc[0]
                rows.append({"category": category, "detector": detector, "train_s": round(float(d["seconds"]), 2),
                             "wall_s": round(wall, 2), "eval_s": round(float(ev["eval_seconds"]), 2),
                             "steps": int(d["steps"]), "n_train": int(d["n_train_normal"] + d["n_train_anomalous"]),
                             "image_auroc": ev["image_auroc"], "pixel_auroc": ev["pixel_auroc"],
                             "pixel_ap": ev["pixel_ap"], "aupro": ev["aupro"]})
                print(f"{category:8s} {detector:15s} train {d['seconds']:6.1f}s  eval {ev['eval_seconds']:5.1f}s  "
                      f"image AUROC {ev['image_auroc']:.3f}  pixel AUROC {ev['pixel_auroc']:.3f}", flush=True)
    df = pd.DataFrame(rows)
    mean = df.groupby("detector", sort=False)[["train_s", "wall_s", "eval_s", "image_auroc", "pixel_auroc", "pixel_ap",
                                               "aupro"]].mean().round(3).reset_index()
    print("\n" + markdown_table(df) + "\n\nmean over categories\n\n" + markdown_table(mean))
    meta = {"threads": args.threads, "size": args.size, "n": args.n, "method": args.method,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average": os.getloadavg(), "torch": torch.__version__}
    write_bytes_atomic(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2, default=float).encode())
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

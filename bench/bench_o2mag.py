"""Benchmark of O2MAG's branch cache: time per generated image for 1, 8 and 32 targets per reference.

    python bench/bench_o2mag.py [--model tiny] [--device cpu] [--steps 12] [--targets 1,8,32] [--threads 1]

One (reference, normal) pair at ``backbone.resolution``, n box target masks, the demo settings (TriAG on the
decoder self-attention at every step, DAE on the middle steps, attention capture). Variants:

- ``cached b=8``: the method's default: each source branch inverted and sampled once, targets in batches of 8;
- ``cached b=1``: the same cache, one target per UNet call (the batching effect alone);
- ``uncached b=8``: every target batch inverts both sources again and runs the three branches jointly;
- ``uncached b=1``: the naive one-target-at-a-time pipeline (the baseline of the speed-up column).

Reported per variant: seconds per image (wall clock and process CPU time of ``run_targets``, best of ``--repeats``;
on a shared machine the CPU time with ``--threads 1`` is the steadier number, and the speed-up column uses it),
UNet forward calls (exact, device independent), the bytes the cache holds (exact sum of its K/V and latent tensors, what O2MAG keeps
alive between target batches) and, on CUDA, the peak allocation growth. Checks that cached and uncached runs with
the same batch give identical latents. Writes bench/out/bench_o2mag.json (gitignored).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops.atomic import write_bytes_atomic  # noqa: E402
from ops.diffusion.backbone import load_backbone  # noqa: E402
from ops.diffusion.vae import encode  # noqa: E402
from ops.methods.o2mag import O2MAGConfig, render_prompt, triag_settings  # noqa: E402
from ops.methods.o2mag.triag import BranchCache, run_targets  # noqa: E402

VARIANTS = (("cached b=8", True, 8), ("cached b=1", True, 1), ("uncached b=8", False, 8), ("uncached b=1", False, 1))


def inputs(size: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    ref_mask = np.zeros((size, size), bool)
    ref_mask[size // 3: size // 2, size // 4: size // 2] = True
    normal = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        h, w = rng.integers(size // 8, size // 3, 2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        masks[i, y:y + h, x:x + w] = True
    return ref, ref_mask, normal, masks


def measure(bb, s, cond, ref, normal, masks, repeats: int) -> dict:
    calls = [0]
    handle = bb.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    cuda = bb.device.type == "cuda"
    best, best_cpu, out, cache_bytes, peak = float("inf"), float("inf"), None, 0, None
    try:
        for _ in range(repeats):
            calls[0] = 0
            cache = BranchCache() if s.cache else None
            if cuda:
                torch.cuda.synchronize(bb.device)
                torch.cuda.reset_peak_memory_stats(bb.device)
                base = torch.cuda.memory_allocated(bb.device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = run_targets(bb, cond, ref, normal, masks, s, cache)
            if cuda:
                torch.cuda.synchronize(bb.device)
                peak = torch.cuda.max_memory_allocated(bb.device) - base
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
            cache_bytes = cache.peak_bytes if cache is not None else 0
    finally:
        handle.remove()
    return dict(seconds_per_image=best / len(masks), cpu_seconds_per_image=best_cpu / len(masks), unet_calls=calls[0], cache_bytes=cache_bytes,
                cuda_peak_bytes=peak, z0=out.z0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=12, help="DDIM steps (the demo preset's)")
    p.add_argument("--targets", default="1,8,32")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_o2mag.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = load_backbone(args.model, device=args.device)
    cfg = O2MAGConfig(ago_steps=0, steps=args.steps)
    cond = bb.encode_prompt([render_prompt(cfg, "bench", "hole")])
    rows = []
    for n in [int(x) for x in args.targets.split(",")]:
        ref_img, ref_mask, normal_img, masks = inputs(bb.resolution, n)
        ref = (ref_img, ref_mask, encode(bb, ref_img))
        normal = (normal_img, encode(bb, normal_img))
        results = {}
        for name, cache, batch in VARIANTS:
            s = triag_settings(O2MAGConfig(ago_steps=0, steps=args.steps, cache_branches=cache, target_batch=batch),
                               bb, "bench", "hole")
            results[name] = measure(bb, s, cond, ref, normal, masks, args.repeats)
            print(f"n={n:3d} {name:13s} {results[name]['seconds_per_image']:8.3f} s/image "
                  f"{results[name]['cpu_seconds_per_image']:8.3f} CPU s/image "
                  f"{results[name]['unet_calls']:5d} UNet calls  cache {results[name]['cache_bytes'] / 2**20:7.2f} MiB",
                  flush=True)
        same = {b: bool(torch.equal(results[f"cached b={b}"]["z0"], results[f"uncached b={b}"]["z0"])) for b in (1, 8)}
        base = results["uncached b=1"]["cpu_seconds_per_image"]
        for name, r in results.items():
            r.pop("z0")
            rows.append(dict(targets=n, variant=name, speedup_vs_naive=base / r["cpu_seconds_per_image"],
                             cached_equals_uncached=same[int(name.split("=")[1])], **r))
    print(f"\n{'targets':>7} {'variant':13s} {'s/image':>8} {'CPU s/im':>8} {'x naive':>7} {'UNet calls':>10} "
          f"{'cache MiB':>9} {'identical':>9}")
    for r in rows:
        print(f"{r['targets']:7d} {r['variant']:13s} {r['seconds_per_image']:8.3f} {r['cpu_seconds_per_image']:8.3f} "
              f"{r['speedup_vs_naive']:7.2f} "
              f"{r['unet_calls']:10d} {r['cache_bytes'] / 2**20:9.2f} {str(r['cached_equals_uncached']):>9}")
    meta = dict(model=args.model, device=str(bb.device), dtype=str(bb.dtype), steps=args.steps,
                resolution=bb.resolution, threads=torch.get_num_threads(), repeats=args.repeats)
    write_bytes_atomic(Path(args.out), json.dumps({"meta": meta, "rows": rows}, indent=1).encode())
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()

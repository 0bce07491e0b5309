"""Benchmark of bgdisentangle: training step time, generation time per image, and the inversion cache.

    python bench/bench_bgdisentangle.py [--model tiny] [--device cpu] [--steps 10] [--targets 1,8,32]
                                        [--train-steps 3] [--batch 2] [--uncached-max 4] [--threads 1]

All figures are ratios against a baseline run in the same process (plus the raw seconds, which depend on the
machine). The UNet carries a fresh rank-4 LoRA, as during the method's training and sampling.

- Training: seconds per optimiser step of eq. 5 (two predictions, C1 and C2, masked cross-attention, one batched
  UNet call of 2 x batch) against the plain LDM loss (``ops.diffusion.training.denoising_loss``, one prediction)
  on the same latents and batch size.
- Generation: n targets on ONE (normal image, target mask) pair with different seeds - the case the cache serves.
  ``cached`` = one masked inversion (eq. 8) + one background stream, then only the defect branch per target
  (batches of ``--target-batch``); ``uncached`` = every target inverts and runs both branches itself. The
  uncached cost per image does not depend on n (each target repeats the same work), so it is measured on
  min(n, ``--uncached-max``) targets. Speed-up = uncached / cached CPU seconds per image. UNet forward calls
  are counted exactly. Also checks that both give the same latents (max |Δ| reported).

Writes bench/out/bench_bgdisentangle.json (gitignored).

Measured 2026-12-02 on the shared 2-core CPU (heavily loaded: load average 12-19), ``tiny`` backbone (untrained,
fp32), 1 thread, 10 DDIM steps, rank-4 LoRA, ``--uncached-max 2``:
- training: eq. 5 step 0.46 CPU s vs plain LDM step 0.25 CPU s (batch 2): ratio 1.85 (one UNet call of
  2x the batch, plus the explicit masked-softmax cross-attention);
- generation: n=1 cached 2.38 / uncached 2.34 CPU s per image (30 UNet calls each: nothing to share);
  n=8 cached 0.76 / uncached 2.22 CPU s per image, 2.92x, 30 calls in all vs 30 per image, max |Δz| 1.9e-5;
  n=32 (second run, ``--uncached-max 1``) cached 0.60 / uncached 2.20 CPU s per image, 3.65x, 60 UNet calls
  (20 + 4 batches of 8 x 10) for 32 images vs 30 per image; training ratio in that run 1.94.
  Background-run cache: 0.19 MiB per (normal, mask) at 10 steps.
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
from ops.diffusion import lora  # noqa: E402
from ops.diffusion.backbone import load_backbone  # noqa: E402
from ops.diffusion.training import denoising_loss  # noqa: E402
from ops.diffusion.vae import encode  # noqa: E402
from ops.methods.bgdisentangle.conditioning import build  # noqa: E402
from ops.methods.bgdisentangle.loss import loss_batch  # noqa: E402
from ops.methods.bgdisentangle.sampling import (background_run, denoise, invert_masked, start_latents,  # noqa: E402
                                                target_latent_mask)


class Timer:
    """Wall and process-CPU seconds of a block, plus UNet forward calls."""

    def __init__(self, unet):
        self.calls = 0
        self._handle = unet.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def __enter__(self):
        self.calls, self.t0, self.c0 = 0, time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0

    def close(self):
        self._handle.remove()


def images(size: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    mask = np.zeros((size, size), bool)
    mask[size // 3: size // 2 + size // 8, size // 4: size // 2 + size // 8] = True
    return imgs, mask


def bench_training(bb, cond, timer, steps: int, batch: int) -> dict:
    imgs, mask = images(bb.resolution, 3)
    latents = encode(bb, np.stack(imgs)).float()
    masks = target_latent_mask(np.stack([mask] * 3), tuple(latents.shape[-2:]))
    params = [p for p in bb.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    pixel_masks = torch.from_numpy(np.stack([mask] * batch))
    out = {}
    for name in ("eq5", "plain"):
        rng = torch.Generator().manual_seed(0)
        best_cpu = best_wall = float("inf")
        for _ in range(steps + 1):  # the first step warms up and is not counted
            with timer:
                opt.zero_grad(set_to_none=True)
                if name == "eq5":
                    loss = loss_batch(bb.unet, bb.scheduler, latents, masks, cond, rng, batch)
                else:
                    loss = denoising_loss(bb.unet, bb.scheduler, latents[:batch], cond.c1.expand(batch, -1, -1),
                                          rng, mask=pixel_masks)
                loss.backward()
                opt.step()
            calls = timer.calls
            if _ > 0:
                best_cpu, best_wall = min(best_cpu, timer.cpu), min(best_wall, timer.wall)
        out[name] = dict(cpu_seconds_per_step=best_cpu, seconds_per_step=best_wall, unet_calls_per_step=calls)
    out["eq5_vs_plain_cpu"] = out["eq5"]["cpu_seconds_per_step"] / out["plain"]["cpu_seconds_per_step"]
    return out


def bench_generation(bb, cond, timer, n: int, steps: int, target_batch: int, uncached_max: int) -> dict:
    (normal,), mask = images(bb.resolution, 1, seed=1)
    z0 = encode(bb, normal)
    m = target_latent_mask(mask, tuple(z0.shape[-2:]))
    seeds = list(range(n))
    with torch.no_grad(), timer:
        run = background_run(bb, z0, m, cond, steps)
        cached = torch.cat([denoise(bb, cond, m, start_latents(run.zT_m, m, seeds[i:i + target_batch]), steps,
                                    background=run).z0 for i in range(0, n, target_batch)])
    c = dict(cpu_seconds_per_image=timer.cpu / n, seconds_per_image=timer.wall / n, unet_calls=timer.calls,
             cache_bytes=run.nbytes)
    k = min(n, uncached_max)
    with torch.no_grad(), timer:
        plain = []
        for s in seeds[:k]:
            zT_m = invert_masked(bb, z0, m, cond, steps)
            plain.append(denoise(bb, cond, m, start_latents(zT_m, m, [s]), steps).z0)
        plain = torch.cat(plain)
    u = dict(cpu_seconds_per_image=timer.cpu / k, seconds_per_image=timer.wall / k,
             unet_calls_per_image=timer.calls / k, measured_on=k)
    return dict(targets=n, cached=c, uncached=u, speedup_cpu=u["cpu_seconds_per_image"] / c["cpu_seconds_per_image"],
                max_abs_diff=float((cached[:k] - plain).abs().max()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (the demo preset's)")
    p.add_argument("--targets", default="1,8,32")
    p.add_argument("--target-batch", type=int, default=8)
    p.add_argument("--uncached-max", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_bgdisentangle.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = load_backbone(args.model, device=args.device, cache=False)
    cond = build(bb, "sks hole defect", "an empty masked region", "a photo of a bench")
    lora.add_lora(bb.unet, rank=4, seed=0, adapter_name="bench")
    timer = Timer(bb.unet)
    try:
        train = bench_training(bb, cond, timer, args.train_steps, args.batch)
        print(f"training  eq.5 {train['eq5']['cpu_seconds_per_step']:.3f} CPU s/step "
              f"({train['eq5']['unet_calls_per_step']} UNet call of 2x{args.batch})  plain LDM "
              f"{train['plain']['cpu_seconds_per_step']:.3f} CPU s/step  ratio {train['eq5_vs_plain_cpu']:.2f}",
              flush=True)
        gen = []
        for n in [int(x) for x in args.targets.split(",")]:
            r = bench_generation(bb, cond, timer, n, args.steps, args.target_batch, args.uncached_max)
            gen.append(r)
            print(f"n={n:3d} cached {r['cached']['cpu_seconds_per_image']:7.3f} CPU s/image "
                  f"({r['cached']['unet_calls']} UNet calls)  uncached "
                  f"{r['uncached']['cpu_seconds_per_image']:7.3f} CPU s/image "
                  f"({r['uncached']['unet_calls_per_image']:.0f} calls/image, on {r['uncached']['measured_on']})  "
                  f"speed-up {r['speedup_cpu']:5.2f}x  max|Δz| {r['max_abs_diff']:.1e}  "
                  f"cache {r['cached']['cache_bytes'] / 2**20:.2f} MiB", flush=True)
    finally:
        timer.close()
        lora.remove_lora(bb.unet, "bench")
    meta = dict(model=args.model, device=str(bb.device), dtype=str(bb.dtype), steps=args.steps,
                resolution=bb.resolution, threads=torch.get_num_threads(), target_batch=args.target_batch,
                batch=args.batch)
    write_bytes_atomic(Path(args.out), json.dumps({"meta": meta, "training": train, "generation": gen},
                                                  indent=1).encode())
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

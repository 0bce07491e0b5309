"""Benchmark of CADiff on a backbone (default ``tiny``): training step with/without the ControlNet, generation
per image with/without it, peak memory.

    python bench/bench_cadiff.py [--model tiny] [--device cpu] [--threads 1] [--repeats 5] [--steps 10]

- training step: one optimisation step of L = L_CALDM + γ L_loc + β L_contrastive (``--batch`` images × 2 views ×
  ``--loc-timesteps``) through ``ops.diffusion.training.train``: CTP (token rows only, the plain UNet) vs SSC
  (ControlNet + SAIM trainable, the UNet through them); median over ``--repeats`` steps after a warm-up step.
- generation: one image at ``--steps`` DDIM steps with CFG and IAR (placed on a normal image), without and with
  the SSC; median over ``--images`` seeds after a warm-up image.
- peak memory: on CUDA ``torch.cuda.max_memory_allocated`` per phase (reset before each); on CPU the process's
  peak RSS (``ru_maxrss``, monotonic, so a phase can only show growth over the phases before it) plus the bytes of
  the trainable tensors and their AdamW state per stage.
Ratios (with / without ControlNet) come from the same process. Writes bench/out/bench_cadiff.json (gitignored)
and prints a table. Timings on a shared CPU are noisy: compare numbers from one run only.

Measured (closing note of issue 13; ``tiny`` backbone, untrained, CPU, 1 thread, on the 2-core machine shared by
~10 busy processes, so absolute seconds are inflated several-fold; ``--repeats 2 --images 1 --steps 4``):
training step (1 image x 2 views) CTP 2.9 s, SSC 4.7 s = 1.64x; generation per image (4 DDIM steps, CFG, IAR,
64 px -> 128 px model) 4.6 s plain, 6.6 s with the SSC = 1.43x; peak RSS 1.0 GiB in both phases (the process's
models dominate); trainable state CTP 1.5 KiB (3 tokens x 32 dims), SSC 9.3 MiB (ControlNet 0.54 M + SAIM 0.07 M
parameters with grads and AdamW moments). No GPU was available to this task: SD-1.5-sized figures are not measured.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops.atomic import write_bytes_atomic  # noqa: E402
from ops.diffusion.backbone import load_backbone  # noqa: E402
from ops.diffusion.textual_inversion import add_placeholder_tokens  # noqa: E402
from ops.diffusion.training import train  # noqa: E402
from ops.methods.cadiff.iar import IARSettings, generate  # noqa: E402
from ops.methods.cadiff.ssc import SSC  # noqa: E402
from ops.methods.cadiff.trainer import CTPLoss, render, token_columns, token_names  # noqa: E402
from ops.types import Sample  # noqa: E402


def _support(size: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i, d in enumerate(("crack", "hole", "crack")):
        m = np.zeros((size, size), bool)
        m[size // 4 + 2 * i: size // 2 + 2 * i, size // 4: 3 * size // 4] = True
        out.append(Sample(f"s{i}", "bench", d, rng.integers(0, 256, (size, size, 3), dtype=np.uint8), m))
    return out


class Memory:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2 ** 20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed_train(params, loss, repeats: int, lr: float) -> float:
    stamps: list[float] = []

    def fn(step, rng):
        stamps.append(time.perf_counter())
        return loss(step, rng)

    train(params, fn, repeats + 1, lr, seed=0, desc="bench train")
    end = time.perf_counter()
    return float(np.median(np.diff(stamps + [end])[1:]))  # first step = warm-up


def _state_mib(params) -> float:
    return sum(p.numel() for p in params) * 4 * 4 / 2 ** 20  # weights + grads + AdamW's two moments, float32


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps per generated image")
    ap.add_argument("--batch", type=int, default=1, help="support images per step (each in 2 views)")
    ap.add_argument("--loc-timesteps", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bb = load_backbone(args.model, device=args.device, cache=False)
    mem = Memory(bb.device)
    support = _support(bb.resolution)
    ctx, ano = token_names("bench", ["crack", "hole"])
    template = "a photo of {context} with {anomaly}"
    ti = add_placeholder_tokens(bb.tokenizer, bb.text_encoder, [ctx, ano["crack"], ano["hole"]], "anomaly")
    prompts = {d: render(template, ctx, ano[d]) for d in ano}
    cols = tuple(token_columns(bb.tokenizer, prompts["crack"], ti.token_ids[:2]))
    loss = CTPLoss(bb, support, prompts, cols, {"crack": 1, "hole": 2}, args.batch, 2, args.loc_timesteps,
                   1e-3, 5e-4, 0.5)
    result = {"model": args.model, "device": str(bb.device), "threads": args.threads, "steps": args.steps,
              "batch_images": args.batch, "views": 2, "loc_timesteps": args.loc_timesteps}
    mem.reset()
    result["train_step_ctp_s"] = _timed_train(ti.params, loss, args.repeats, 5e-3)
    result["peak_mib_ctp"] = mem.peak_mib()
    ti.bake()
    ssc = SSC.from_unet(bb.unet, bb.vae_factor, seed=0).train()
    with torch.no_grad():
        loss.fixed_cond = {d: bb.encode_prompt([p]) for d, p in prompts.items()}
    loss.ssc = ssc
    params = list(ssc.parameters())
    mem.reset()
    result["train_step_ssc_s"] = _timed_train(params, loss, args.repeats, 1e-4)
    result["peak_mib_ssc"] = mem.peak_mib()
    result["train_ssc_over_ctp"] = result["train_step_ssc_s"] / result["train_step_ctp_s"]
    result["trainable_state_mib_ctp"] = _state_mib(ti.params)
    result["trainable_state_mib_ssc"] = _state_mib(params)
    result["controlnet_params_m"] = sum(p.numel() for p in ssc.controlnet.parameters()) / 1e6
    result["saim_params_m"] = sum(p.numel() for p in ssc.saims.parameters()) / 1e6
    ssc.eval().requires_grad_(False)

    with torch.no_grad():
        cond = bb.encode_prompt([prompts["crack"]])
    normal = np.random.default_rng(7).integers(0, 256, (bb.resolution, bb.resolution, 3), dtype=np.uint8)
    target = np.zeros(normal.shape[:2], bool)
    r = bb.resolution
    target[r // 4: r // 2, r // 4: 3 * r // 4] = True
    s = IARSettings(steps=args.steps, w=1.3)
    for name, control in (("plain", None), ("ssc", ssc)):
        seeds = iter(range(1000))
        times = []
        mem.reset()
        for i in range(args.images + 1):
            t0 = time.perf_counter()
            generate(bb, cond, bb.null_embedding(), cols[1], normal, target, next(seeds), s, control)
            if i:  # the first image is the warm-up
                times.append(time.perf_counter() - t0)
        result[f"generate_{name}_s"] = statistics.median(times)
        result[f"peak_mib_generate_{name}"] = mem.peak_mib()
    result["generate_ssc_over_plain"] = result["generate_ssc_s"] / result["generate_plain_s"]
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    out = Path(__file__).resolve().parent / "out" / "bench_cadiff.json"
    write_bytes_atomic(out, json.dumps(result, indent=1).encode())
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark of APO on a backbone (default ``tiny``): training step, generation per image, 3-branch step.

    python bench/bench_apo.py [--model tiny] [--device cpu] [--threads 1] [--repeats 10] [--steps 12]

- training step: one CPO optimisation step (batch ``--batch``: reference forward under no_grad, TACA-gated policy
  forward, backward, AdamW) through ``ops.diffusion.training.train``; median over ``--repeats`` steps after one
  warm-up step.
- generation: one image per mode (placed: inversion + sampling + compositing; free: sampling) at ``--steps`` DDIM
  steps with a trained adapter loaded; median over ``--images`` seeds after a warm-up image.
- 3-prediction step: the hierarchical step's three predictions (ε_ref(z), ε_ref(z, c), ε_θ(z, c)) as ONE batched
  UNet call vs three sequential calls (the baseline), with the same per-sample LoRA gates; median of
  ``--repeats`` after a warm-up; the outputs of both modes are compared.
- β_t at small t (``--small-t-steps N``, 0 = skip; ``--only-small-t`` runs just this): the same seeded CPO
  training (N AdamW steps, lr 1e-3, gradient clip 1) under each treatment of ``ops.methods.apo.loss``
  ("none" = the raw weight, the baseline; "clip" and "skip" at t_small 50); reports, per treatment, the spread of
  the per-step loss and of the pre-clip gradient norm (coefficient of variation, max/median), the fraction of
  steps whose gradient was clipped, and the adapter it leaves: the stratified support loss
  (``support_loss``, t at bin midpoints) and the LoRA update's norm ||ΔW|| = Σ ||B A||, as ratios to "none".
Writes bench/out/bench_apo.json (gitignored) and prints a table. Timings on a shared CPU are noisy: compare
numbers from one run only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops.atomic import write_bytes_atomic  # noqa: E402
from ops.diffusion import lora  # noqa: E402
from ops.diffusion.backbone import load_backbone  # noqa: E402
from ops.diffusion.training import train  # noqa: E402
from ops.diffusion.vae import encode  # noqa: E402
from ops.methods.apo import ADAPTER_NAME, APO, read_taca  # noqa: E402
from ops.methods.apo.loss import cpo_batch, support_loss  # noqa: E402
from ops.methods.apo.sampling import LoRAGate, apo_branches, generate, initial_noise  # noqa: E402
from ops.types import Sample  # noqa: E402


def _images(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _median(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up (allocator, lazy init)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bench_training(backbone, support, args) -> dict:
    latents = torch.cat([encode(backbone, s.image) for s in support])
    cond = backbone.encode_prompt(["a photo of a bench with a crack defect"]).detach()
    params = lora.add_lora(backbone.unet, rank=args.rank, seed=0, adapter_name="bench")
    try:
        stamps = []

        def loss_fn(_step, rng):
            stamps.append(time.perf_counter())
            return cpo_batch(backbone.unet, backbone.scheduler, latents, cond, rng, 1000.0, 1, args.rank,
                             args.batch)[0]

        t0 = time.perf_counter()
        train(params, loss_fn, args.repeats + 1, 1e-3, seed=0, frozen_modules=[backbone.unet], desc="bench train")
        end = time.perf_counter()
    finally:
        lora.remove_lora(backbone.unet, "bench")
    per_step = np.diff(stamps + [end])[1:]  # first step = warm-up
    return {"train_step_s": float(np.median(per_step)), "train_steps_timed": len(per_step),
            "batch": args.batch, "rank": args.rank, "total_s": end - t0}


def _train_small_t(backbone, latents, cond, small_t: str, args) -> dict:
    params = lora.add_lora(backbone.unet, rank=args.rank, seed=0, adapter_name="smallt")
    try:
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        rng = torch.Generator("cpu").manual_seed(0)
        losses, norms = [], []
        for _ in range(args.small_t_steps):
            opt.zero_grad(set_to_none=True)
            loss = cpo_batch(backbone.unet, backbone.scheduler, latents, cond, rng, 1000.0, 1, args.rank, args.batch,
                             small_t=small_t, t_small=50)[0]
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
            opt.step()
            losses.append(float(loss))
        probe = support_loss(backbone.unet, backbone.scheduler, latents, cond, 1000.0, 1, args.rank)
        mods = [m for m in backbone.unet.modules() if hasattr(m, "lora_A") and "smallt" in getattr(m, "lora_A", {})]
        dw = sum(float((m.lora_B["smallt"].weight @ m.lora_A["smallt"].weight).norm()) for m in mods)
    finally:
        lora.remove_lora(backbone.unet, "smallt")
    lo, gn = np.asarray(losses), np.asarray(norms)
    return {"loss_cv": float(lo.std() / max(abs(lo.mean()), 1e-12)), "grad_cv": float(gn.std() / gn.mean()),
            "grad_max_over_median": float(gn.max() / np.median(gn)), "clipped_frac": float((gn > 1.0).mean()),
            "support_loss": probe, "delta_w": dw}


def bench_small_t(backbone, support, args) -> dict:
    latents = torch.cat([encode(backbone, s.image) for s in support])
    cond = backbone.encode_prompt(["a photo of a bench with a crack defect"]).detach()
    runs = {mode: _train_small_t(backbone, latents, cond, mode, args) for mode in ("none", "clip", "skip")}
    out = {"small_t_steps": args.small_t_steps}
    for mode, r in runs.items():
        for k, v in r.items():
            out[f"small_t_{mode}_{k}"] = v
    for mode in ("clip", "skip"):  # ratios against the raw weight, measured in this process
        for k in ("loss_cv", "grad_cv", "support_loss", "delta_w"):
            out[f"small_t_{mode}_{k}_vs_none"] = runs[mode][k] / runs["none"][k] if runs["none"][k] else float("nan")
    return out


def bench_generation(backbone, adapter_dir: Path, args) -> dict:
    info = read_taca(adapter_dir)
    lora.load_lora(backbone.unet, adapter_dir / info["weights"], adapter_name=ADAPTER_NAME)
    out = {}
    try:
        gate = LoRAGate(backbone.unet, info["k_min"], info["k_max"], info["T"])
        cond = backbone.encode_prompt([info["prompt"]]).detach()
        uncond = backbone.null_embedding()
        size = (backbone.resolution, backbone.resolution)
        normal = _images(1, backbone.resolution, 7)[0]
        target = np.zeros(size, bool)
        target[size[0] // 4: size[0] // 2, size[1] // 4: 3 * size[1] // 4] = True
        for mode in ("free", "placed"):
            seeds = iter(range(1000))
            kw = dict(normal=normal, target_mask=target) if mode == "placed" else {}
            med, _ = _median(lambda: generate(backbone, gate, cond, uncond, next(seeds), size, args.steps, 5.0, 1.5,
                                              branch_mode=args.branch_mode, **kw), args.images)
            out[f"generate_{mode}_s"] = med
        # the 3-prediction step in both modes, same gates, same inputs
        z = initial_noise(backbone, 0)
        branches = apo_branches(cond, uncond)
        t = int(backbone.scheduler.timesteps[len(backbone.scheduler.timesteps) // 2])
        results = {}
        for mode in ("batched", "sequential"):
            runner = gate.runner(backbone, mode)

            def step():
                gate.set_step(0, t)
                with torch.no_grad():
                    results[mode] = runner({"x": z}, t, branches)

            med, _ = _median(step, args.repeats)
            out[f"step3_{mode}_s"] = med
            out[f"step3_{mode}_unet_calls"] = runner.calls // (args.repeats + 1)
        out["step3_batched_over_sequential"] = out["step3_batched_s"] / out["step3_sequential_s"]
        out["step3_max_abs_diff"] = max(float((results["batched"][k] - results["sequential"][k]).abs().max())
                                        for k in results["batched"])
    finally:
        lora.remove_lora(backbone.unet, ADAPTER_NAME)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="DDIM steps per generated image")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--branch-mode", default="batched", choices=("batched", "sequential"))
    ap.add_argument("--small-t-steps", type=int, default=40, help="training steps per β_t treatment (0 = skip)")
    ap.add_argument("--only-small-t", action="store_true", help="run only the β_t small-t comparison")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.model, device=args.device, cache=False)
    support = [Sample(f"s{i}", "bench", "crack", img) for i, img in enumerate(_images(3, 96, 0))]
    result = {"model": args.model, "device": str(backbone.device), "threads": args.threads, "steps": args.steps}
    if args.small_t_steps > 0:
        result.update(bench_small_t(backbone, support, args))
    if not args.only_small_t:
        result.update(bench_training(backbone, support, args))
    if not args.only_small_t:
        with tempfile.TemporaryDirectory() as tmp:
            method = APO()
            cfg = method.config({"train_steps": 10, "rank": args.rank, "k_max": args.rank})
            adapter = method.fit(backbone, support, cfg, Path(tmp))
            result.update(bench_generation(backbone, adapter.path / "crack", args))
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    out = Path(__file__).resolve().parent / "out" / "bench_apo.json"
    write_bytes_atomic(out, json.dumps(result, indent=1).encode())
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

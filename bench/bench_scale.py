"""Speed and memory at Stable-Diffusion scale (issue 15), on the ``sd15-shape`` backbone by default.

    python bench/bench_scale.py [--device cpu|cuda] [--resolution 512] [--methods all] [--train-steps 2]
                                [--gen-steps 50] [--batch 8] [--channels-last] [--inference-mode] ...

``sd15-shape`` is SD 1.5's architecture with seeded RANDOM weights: speed and memory are real, images are noise.
Never read quality into anything this script produces.

Rows (every figure is measured in this process, on the device and dtype printed in the header):
- ``sd-cfg``: plain text-to-image DDIM sampling with classifier-free guidance (2 UNet branches per step, batched)
  for ``--batch`` images at ``--gen-steps`` steps, then VAE decode: images/s (the issue's training-free target:
  >= 3 images/s at 50 steps with CFG on one H100/H200-class GPU) and peak memory.
- one row per registered method (``ops.methods.registry``; ``--methods`` picks some), run through its public
  ``fit`` + ``synthesize`` with its ``paper`` preset where it has one, the sampling ``steps`` set to
  ``--gen-steps`` and the training steps to ``--train-steps`` (fields in ``TRAIN_STEP_FIELDS``; ``--set
  method.key=value`` overrides anything else). Training: seconds per optimisation step (the gap between the
  training loop's consecutive per-step progress calls; step 1 includes setup, so with >= 2 steps it is left out)
  and peak memory of ``fit``. Generation: ``--batch`` jobs sharing one reference and one normal image (O2MAG
  batches them into one target branch, at its default target_batch 8), seconds per image, images/s, peak
  memory of ``synthesize``.
- ``o2mag-cache``: O2MAG's branch cache at this resolution: bytes held (K/V of the grafted self-attention layers
  at every step + latents) and the seconds a cache hit saves per extra target batch (a batch on a cold cache
  minus the same batch on the warm cache).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before each phase; the weights are included,
reported separately as ``weights_bytes``); on CPU the process's peak resident set (VmHWM, reset before each phase
through /proc/self/clear_refs) - the whole process, weights included. Times are wall clock (CUDA synchronised);
rows also give the process CPU time (`*cpu_seconds`), the steadier figure on a shared CPU.
Writes bench/out/bench_scale.json (gitignored) and prints a table. See docs/scale.md for measured figures.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops.atomic import write_bytes_atomic  # noqa: E402
from ops.diffusion.backbone import load_backbone  # noqa: E402
from ops.diffusion.fastpath import FastPath, apply_fast_path  # noqa: E402
from ops.types import Sample, SynthesisJob  # noqa: E402

TRAIN_STEP_FIELDS = ("train_steps", "ago_steps", "control_steps")  # training-length options (CADiff: two)
CATEGORY, DEFECT = "bench", "crack"


# ---------------------------------------------------------------------------------------------- measuring
class Meter:
    """Wall time and peak memory of one phase on the backbone's device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _clear_rss_peak()

    def peak(self) -> int:
        self.sync()
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        return _proc_status("VmHWM")

    def run(self, fn: Callable[[], Any]) -> tuple[Any, float, int]:
        """(result, seconds, peak bytes) of ``fn()``; ``self.cpu_seconds``: the process CPU time it took."""
        self.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        self.sync()
        self.cpu_seconds = time.process_time() - c0
        return out, time.perf_counter() - t0, self.peak()


def _proc_status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def _clear_rss_peak() -> None:
    try:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then VmHWM is the process's peak so far, which only overstates


def _weights_bytes(bb) -> int:
    return sum(t.numel() * t.element_size() for m in (bb.unet, bb.vae, bb.text_encoder)
               for t in [*m.parameters(), *m.buffers()])


# ---------------------------------------------------------------------------------------------- inputs
def _image(size: int, seed: int) -> np.ndarray:
    """A smooth random image (low-frequency noise), so VAE and masks see structure rather than pure noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(small).permute(2, 0, 1)[None], size=(size, size),
                                         mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    return np.clip(up, 0, 255).astype(np.uint8)


def _box(size: int, rng: np.random.Generator) -> np.ndarray:
    m = np.zeros((size, size), bool)
    h, w = rng.integers(size // 8, size // 3, 2)
    y, x = rng.integers(0, size - h), rng.integers(0, size - w)
    m[y:y + h, x:x + w] = True
    return m


def bench_inputs(size: int, n_jobs: int, seed: int = 0) -> tuple[list[Sample], list[SynthesisJob]]:
    rng = np.random.default_rng(seed)
    support = [Sample(f"support{i}", CATEGORY, DEFECT, _image(size, 10 + i), _box(size, rng)) for i in range(2)]
    normal = Sample("normal0", CATEGORY, "good", _image(size, 99))
    jobs = [SynthesisJob(index=i, seed=1000 + i, category=CATEGORY, defect_type=DEFECT, normal=normal,
                         target_mask=_box(size, rng), reference=support[0],
                         support_ids=tuple(s.image_id for s in support)) for i in range(n_jobs)]
    return support, jobs


# ---------------------------------------------------------------------------------------------- rows
def bench_cfg(bb, meter: Meter, args) -> dict:
    from ops.diffusion.ddim import cfg_branches, sample
    from ops.diffusion.vae import decode

    with torch.no_grad():
        cond = bb.encode_prompt(["a photo of a bench with a crack defect"])
    g = torch.Generator("cpu").manual_seed(0)
    z = torch.randn(args.batch, 4, bb.latent_size, bb.latent_size, generator=g).to(bb.device)
    branches, guidance = cfg_branches(cond, bb.null_embedding(), 7.5)

    def run():
        z0 = sample(bb, z, branches, guidance, num_steps=args.gen_steps)["x"]
        return decode(bb, z0, batch_size=args.batch)

    run() if args.warmup else None
    images, seconds, peak = meter.run(run)
    return dict(row="sd-cfg", images=len(images), steps=args.gen_steps, seconds=seconds,
                cpu_seconds=meter.cpu_seconds, seconds_per_image=seconds / len(images),
                images_per_s=len(images) / seconds, gen_peak_bytes=peak)


def _method_config(method, name: str, args) -> tuple[Any, dict]:
    names = {f.name for f in fields(method.config_cls)}
    values: dict[str, Any] = {}
    if "preset" in names:
        values["preset"] = args.preset
    values.update({f: args.train_steps for f in TRAIN_STEP_FIELDS if f in names})
    if "steps" in names:
        values["steps"] = args.gen_steps
    for item in args.set:
        key, _, raw = item.partition("=")
        meth, _, opt = key.partition(".")
        if meth == name:
            try:
                values[opt] = json.loads(raw)
            except json.JSONDecodeError:
                values[opt] = raw
    return method.config(values), values


def bench_method(name: str, bb, meter: Meter, args, workdir: Path) -> dict:
    from ops.methods.registry import get_method

    method = get_method(name)
    cfg, values = _method_config(method, name, args)
    support, jobs = bench_inputs(bb.resolution, args.batch)
    calls: list[tuple[str, int, int, float, float]] = []

    def progress(desc: str, done: int, total: int) -> None:
        meter.sync()
        calls.append((desc, done, total, time.perf_counter(), time.process_time()))

    backbone = bb if method.needs_backbone else None
    out_dir = workdir / name
    adapter, fit_s, fit_peak = meter.run(lambda: method.fit(backbone, support, cfg, out_dir, progress))
    steps = _train_step_times(calls)
    preset = {k: v for k, v in values.items() if k == "preset"}
    full = [getattr(method.config(preset), f) for f in TRAIN_STEP_FIELDS if f in values]  # the preset's length
    if full and steps["train_step_s"] is not None:  # the "adapter per defect type" figure, extrapolated
        steps.update(preset_train_steps=full[0], projected_fit_s=full[0] * steps["train_step_s"])
    row = dict(row=name, options=values, fit_seconds=fit_s, fit_cpu_seconds=meter.cpu_seconds,
               fit_peak_bytes=fit_peak, **steps)
    results, gen_s, gen_peak = meter.run(lambda: list(method.synthesize(backbone, adapter, jobs, cfg)))
    row.update(images=len(results), gen_seconds=gen_s, gen_cpu_seconds=meter.cpu_seconds,
               seconds_per_image=gen_s / len(results), images_per_s=len(results) / gen_s, gen_peak_bytes=gen_peak)
    return row


def _train_step_times(calls: list[tuple[str, int, int, float, float]]) -> dict:
    """Per-step wall and CPU seconds from the training loop's progress calls (desc, done, total, wall, cpu):
    two calls in a row (no other call between them: an outer loop's gap holds a whole inner loop) of one loop
    with done = k and k + 1, k >= 1 (the first step, setup included, is left out)."""
    wall, cpu = [], []
    for (desc0, d0, _, t0, c0), (desc1, d1, _, t1, c1) in zip(calls, calls[1:]):
        if desc0 == desc1 and d1 == d0 + 1 and d0 >= 1:
            wall.append(t1 - t0)
            cpu.append(c1 - c0)
    if not wall:
        return dict(train_step_s=None, train_step_cpu_s=None, train_steps_timed=0)
    return dict(train_step_s=float(np.median(wall)), train_step_cpu_s=float(np.median(cpu)),
                train_steps_timed=len(wall))


def bench_o2mag_cache(bb, meter: Meter, args) -> dict:
    from ops.diffusion.vae import encode
    from ops.methods.o2mag import O2MAGConfig, render_prompt, triag_settings
    from ops.methods.o2mag.triag import BranchCache, run_targets

    cfg = O2MAGConfig.from_dict({"preset": args.preset, "steps": args.gen_steps})
    s = triag_settings(cfg, bb, CATEGORY, DEFECT)
    support, jobs = bench_inputs(bb.resolution, args.batch)
    with torch.no_grad():
        cond = bb.encode_prompt([render_prompt(cfg, CATEGORY, DEFECT)])
    ref = (support[0].image, support[0].mask, encode(bb, support[0].image))
    normal = (jobs[0].normal.image, encode(bb, jobs[0].normal.image))
    masks = np.stack([j.target_mask for j in jobs])
    cache = BranchCache()
    _, cold_s, cold_peak = meter.run(lambda: run_targets(bb, cond, ref, normal, masks, s, cache))
    cold_cpu = meter.cpu_seconds
    _, warm_s, warm_peak = meter.run(lambda: run_targets(bb, cond, ref, normal, masks, s, cache))
    return dict(row="o2mag-cache", targets=len(masks), steps=s.steps, cache_bytes=cache.peak_bytes,
                cold_seconds=cold_s, warm_seconds=warm_s, saved_seconds_per_extra_batch=cold_s - warm_s,
                cold_cpu_seconds=cold_cpu, warm_cpu_seconds=meter.cpu_seconds,
                saved_cpu_seconds_per_extra_batch=cold_cpu - meter.cpu_seconds,
                cold_peak_bytes=cold_peak, warm_peak_bytes=warm_peak, source_runs=cache.runs)


# ---------------------------------------------------------------------------------------------- main
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and v > 2**20:
        return f"{v / 2**30:.2f} GiB"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    from ops.methods.registry import available_methods

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15-shape")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bf16/fp16 on CUDA, float32 on CPU")
    p.add_argument("--resolution", type=int, default=512, help="image size in px (latents = resolution / 8)")
    p.add_argument("--rows", default="cfg,methods,o2mag-cache", help="which of cfg, methods, o2mag-cache to run")
    p.add_argument("--methods", default="all", help=f"comma list or 'all' ({', '.join(available_methods())})")
    p.add_argument("--preset", default="paper", help="method preset where a method has presets")
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--gen-steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8, help="images per generation batch (O2MAG's default 8)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override one method option (JSON value), e.g. apo.batch_size=4")
    p.add_argument("--warmup", action="store_true", help="run the sd-cfg row once before timing it")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--attn-chunk-mb", type=float, default=None,
                   help="attention controller's score budget before query chunking (default 256)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--inference-mode", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (unmeasured so far)")
    p.add_argument("--vae-slicing", action="store_true")
    p.add_argument("--vae-tiling", action="store_true")
    p.add_argument("--fp32-inversion", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_scale.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attn_chunk_mb is not None:
        os.environ["ANOMALY_FORGE_ATTN_CHUNK_MB"] = str(args.attn_chunk_mb)
    rows_wanted = set(args.rows.split(","))
    methods = available_methods() if args.methods == "all" else args.methods.split(",")

    t0, c0 = time.perf_counter(), time.process_time()
    bb = load_backbone(args.model, device=args.device, dtype=args.dtype, cache=False)
    build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    if args.resolution % bb.vae_factor:
        raise SystemExit(f"--resolution {args.resolution} must be a multiple of {bb.vae_factor}")
    bb.resolution = args.resolution  # the UNet and VAE are fully convolutional: any multiple of 8 (64 for SD)
    fp = FastPath(channels_last=args.channels_last, inference_mode=args.inference_mode, compile=args.compile,
                  vae_slicing=args.vae_slicing, vae_tiling=args.vae_tiling, fp32_inversion=args.fp32_inversion)
    apply_fast_path(bb, fp)
    meter = Meter(bb.device)
    meta = dict(model=args.model, weights="random (sd15-shape: speed/memory only)" if args.model == "sd15-shape"
                else args.model, device=str(bb.device),
                device_name=torch.cuda.get_device_name(bb.device) if bb.device.type == "cuda" else platform.processor()
                or platform.machine(), dtype=str(bb.dtype), resolution=bb.resolution, latent=bb.latent_size,
                threads=torch.get_num_threads(), torch=torch.__version__, fast_path=fp.as_dict(),
                attn_chunk_mb=args.attn_chunk_mb, build_seconds=build_s, build_cpu_seconds=build_cpu, weights_bytes=_weights_bytes(bb),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                argv=sys.argv[1:] if argv is None else argv)
    print(" ".join(f"{k}={_fmt(v)}" for k, v in meta.items()), flush=True)
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        write_bytes_atomic(Path(args.out), json.dumps({"meta": meta, "rows": rows}, indent=1).encode())

    if "cfg" in rows_wanted:
        report(bench_cfg(bb, meter, args))
    if "methods" in rows_wanted:
        with tempfile.TemporaryDirectory() as tmp:
            for name in methods:
                report(bench_method(name, bb, meter, args, Path(tmp)))
    if "o2mag-cache" in rows_wanted:
        report(bench_o2mag_cache(bb, meter, args))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

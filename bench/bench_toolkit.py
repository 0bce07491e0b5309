"""Benchmark of the diffusion toolkit: batched vs sequential branches, attention control, inversion storage.

    python bench/bench_toolkit.py [--model tiny] [--devices cpu,cuda] [--steps 10] [--latent 32] [--threads 1]

Per device (cuda only when available): the time of one denoising step of three branches (reference / normal /
target) as ONE batched UNet call vs three sequential calls (the baseline), plain and with TriAG grafting +
capture active, and DDIM inversion with and without trajectory storage (baseline: without). Peak memory is
torch.cuda.max_memory_allocated growth on CUDA. On CPU torch keeps no allocation statistics and RSS hides reuse,
so a thread samples glibc's in-use heap (mallinfo2: uordblks + hblkhd) every 0.5 ms during one call and reports
the peak growth (short spikes between samples can be missed; the numbers compare variants, they are not exact
allocations). Prints a table of ratios
against each group's baseline measured in the same run and writes bench/out/bench_toolkit.json (gitignored).
"""
from __future__ import annotations

import argparse
import json
import ctypes
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops.atomic import write_bytes_atomic  # noqa: E402
from ops.diffusion.attention import AttentionController, Capture, Graft  # noqa: E402
from ops.diffusion.backbone import load_backbone  # noqa: E402
from ops.diffusion.branches import Branch, BranchRunner  # noqa: E402
from ops.diffusion.inversion import invert  # noqa: E402


def cuda_peak(fn, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def cpu_peak(fn) -> int:
    """Peak growth of glibc's in-use heap bytes during ``fn()`` (sampled)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    base, peak, stop = in_use(), [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], in_use() - base)
            time.sleep(0.0005)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        fn()
        time.sleep(0.002)
    finally:
        stop.set()
        th.join()
    return peak[0]


def interleaved_seconds(fns: list, device: torch.device, repeats: int) -> list[float]:
    """Median seconds per function, timed in interleaved rounds (A B A B ...) after one warm-up each, so that
    load from other processes on a shared machine hits every variant alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def variants(model: str, device: str, steps: int, latent: int) -> tuple[torch.device, dict]:
    """{key: (group, variant label, divisor for per-step time, fn)}; the first of each group is its baseline."""
    bb = load_backbone(model, device=device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        c = bb.encode_prompt(["a photo of a scratch"])
    lat = {n: torch.randn(1, 4, latent, latent, generator=g).to(bb.device) for n in ("ref", "nrm", "tgt")}
    branches = [Branch(n, c, n) for n in ("ref", "nrm", "tgt")]
    size = latent * bb.vae_factor
    m_t = np.zeros((size, size), bool)
    m_t[size // 4: size // 2, size // 4: size // 2] = True
    m_r = np.roll(m_t, size // 4, axis=1)

    def step_fn(mode: str, controlled: bool):
        rules = [Graft("tgt", "ref", m_t, m_r, normal="nrm"), Capture("cross", branches=["tgt"])] if controlled else []
        ctl = AttentionController(bb.unet, rules=rules) if controlled else None
        runner = BranchRunner(bb, mode=mode, controller=ctl)

        def run() -> None:
            with torch.no_grad():
                if ctl is None:
                    runner(lat, 500, branches)
                    return
                with ctl:
                    ctl.set_step(0, 500)
                    runner(lat, 500, branches)
                ctl.reset()

        return run

    out = {}
    for controlled in (False, True):
        group = "3 branches + TriAG graft/capture" if controlled else "3 branches, plain"
        for mode in ("sequential", "batched"):
            label = "batched (1 call)" if mode == "batched" else "sequential (3 calls)"
            out[f"{int(controlled)}-{mode}"] = (group, label, 1, step_fn(mode, controlled))
    for keep in (False, True):
        out[f"inv-{int(keep)}"] = (f"inversion, {steps} steps", "with trajectory" if keep else "zT only", steps,
                                   lambda keep=keep: invert(bb, lat["nrm"], c, num_steps=steps, keep_trajectory=keep))
    return bb.device, out


def bench_device(args: argparse.Namespace, device: str) -> list[dict]:
    dev, table = variants(args.model, device, args.steps, args.latent)
    groups: dict[str, list[tuple[str, int, object]]] = {}
    for group, label, per, fn in table.values():
        groups.setdefault(group, []).append((label, per, fn))
    rows = []
    for group, items in groups.items():
        secs = interleaved_seconds([fn for _, _, fn in items], dev, args.repeats)
        base = None
        for (label, per, fn), sec in zip(items, secs):
            peak = cuda_peak(fn, dev) if dev.type == "cuda" else cpu_peak(fn)
            base = base or (sec / per, peak)
            rows.append(dict(device=str(dev), group=group, variant=label, seconds_per_step=sec / per,
                             peak_bytes=peak, time_ratio=sec / per / base[0],
                             memory_ratio=peak / base[1] if base[1] else float("nan")))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped when unavailable")
    p.add_argument("--steps", type=int, default=10, help="inversion steps")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--latent", type=int, default=32, help="latent side (tiny: 32 = 128 px)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_toolkit.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("ANOMALY_FORGE_NO_PROGRESS", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    for d in [d.strip() for d in args.devices.split(",") if d.strip()]:
        if d.startswith("cuda") and not torch.cuda.is_available():
            print(f"skipping {d}: no CUDA device", file=sys.stderr)
            continue
        rows += bench_device(args, d)
    print(f"{'device':6} {'group':34} {'variant':22} {'ms/step':>9} {'peak MiB':>9} {'time x':>7} {'mem x':>7}")
    for r in rows:
        print(f"{r['device']:6} {r['group']:34} {r['variant']:22} {1e3 * r['seconds_per_step']:9.2f} "
              f"{r['peak_bytes'] / 2**20:9.2f} {r['time_ratio']:7.2f} {r['memory_ratio']:7.2f}")
    meta = dict(model=args.model, latent=args.latent, repeats=args.repeats, torch=torch.__version__,
                threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    write_bytes_atomic(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2).encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
